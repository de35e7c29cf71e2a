"""Checking the options dictionaries (a{sv}) every method takes.

Each method declares the keys it understands and their Python types; anything else is
refused with a message naming the key, so a typo never silently does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uniond.errors import InvalidArgument

_TYPE_WORDS = {bool: "a boolean (b)", str: "a string (s)", int: "an integer (t)"}


@dataclass(frozen=True)
class ForeignValue:
    """A value whose D-Bus type has no place in any option (e.g. a nested dict)."""

    signature: str


def check(method: str, options: dict[str, Any], schema: dict[str, type]) -> dict[str, Any]:
    """Return ``options`` if every key is known and of the declared type."""
    for key, value in options.items():
        if key not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise InvalidArgument(f"{method}: unknown option {key!r} (known options: {known})")
        wanted = schema[key]
        if type(value) is not wanted:
            got = value.signature if isinstance(value, ForeignValue) else type(value).__name__
            raise InvalidArgument(
                f"{method}: option {key!r} must be {_TYPE_WORDS[wanted]}, not {got}"
            )
    return dict(options)


MOUNT_OPTIONS: dict[str, type] = {
    "readonly": bool,
    "volatile": bool,
    "workdir": str,
    "description": str,
}
UNMOUNT_OPTIONS: dict[str, type] = {"lazy": bool}
DIFF_OPTIONS: dict[str, type] = {}
EXPORT_OPTIONS: dict[str, type] = {"compression": str}  # "none" (default) or "gzip"
IMPORT_OPTIONS: dict[str, type] = {"devices": bool}  # allow device files in the layer
COMMIT_OPTIONS: dict[str, type] = {}
