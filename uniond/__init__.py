"""uniond: a daemon that owns overlayfs union mounts and offers them over D-Bus."""

from uniond.constants import VERSION as __version__

__all__ = ["__version__"]
