"""Layer tars: a mount's upper as an OCI / Docker image layer, and back.

export_diff writes the upper as a PAX tar with AUFS-style whiteouts (E1, E2), streamed
straight to the caller's file descriptor. import_layer reads such a tar (plain or
compressed) into an empty directory in overlay's native form (E3), so that the
directory can be a lowerdir. Neither holds a whole layer in memory: file data moves in
bounded chunks, and only names (for duplicates and hard links) and directory mtimes
are remembered.

The layer holds every entry of the upper, including copies-up that Diff does not
report (D5): a copied-up file no longer shares the lower's inode, so leaving it out
would make a stacked layer show hard links the mount did not show.
"""

from uniond.layers.compress import COMPRESSIONS
from uniond.layers.tar_export import (
    AUFS_META_PREFIX,
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    ExportResult,
    export_diff,
)
from uniond.layers.tar_import import ImportResult, import_layer

__all__ = [
    "AUFS_META_PREFIX", "COMPRESSIONS", "OPAQUE_MARKER", "WHITEOUT_PREFIX",
    "ExportResult", "ImportResult", "export_diff", "import_layer",
]
