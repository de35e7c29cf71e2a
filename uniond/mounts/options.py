"""Checking the options dictionaries (a{sv}) every method takes.

Each method declares the keys it understands and their Python types; anything else is
refused with a message naming the key, so a typo never silently does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from uniond.constants import OPTION_NO_USER_INTERACTION
from uniond.errors import InvalidArgument

_TYPE_WORDS = {bool: "a boolean (b)", str: "a string (s)", int: "an integer (t)"}

MAX_OPTIONS = 32  # far more than any method knows; a bigger dict is an attack or a bug
MAX_STRING = 4096  # per string option, like a path


@dataclass(frozen=True)
class ForeignValue:
    """A value whose D-Bus type has no place in any option (e.g. a nested dict)."""

    signature: str


def check(method: str, options: Mapping[str, Any], schema: dict[str, type]) -> dict[str, Any]:
    """Return ``options`` if every key is known and of the declared type."""
    if len(options) > MAX_OPTIONS:
        raise InvalidArgument(f"{method}: {len(options)} options given; at most {MAX_OPTIONS} are accepted")
    for key, value in options.items():
        if key not in schema:
            known = ", ".join(sorted(schema)) or "none"
            shown = key if len(key) <= 64 else key[:64] + "..."
            raise InvalidArgument(f"{method}: unknown option {shown!r} (known options: {known})")
        wanted = schema[key]
        if type(value) is not wanted:
            got = value.signature if isinstance(value, ForeignValue) else type(value).__name__
            raise InvalidArgument(
                f"{method}: option {key!r} must be {_TYPE_WORDS[wanted]}, not {got}"
            )
        if wanted is str and len(value) > MAX_STRING:
            raise InvalidArgument(f"{method}: option {key!r} is longer than {MAX_STRING} characters")
    return dict(options)


def interactive(options: Mapping[str, Any]) -> bool:
    """Whether polkit may ask the user to authenticate (udisks2's option, same name)."""
    return not options.get(OPTION_NO_USER_INTERACTION, False)


# Every method accepts these; a new method adds **AUTH_OPTIONS to its schema.
AUTH_OPTIONS: dict[str, type] = {OPTION_NO_USER_INTERACTION: bool}

MOUNT_OPTIONS: dict[str, type] = {
    "readonly": bool,
    "volatile": bool,
    "workdir": str,
    "description": str,
    "dev": bool,  # root only: allow device files (default nodev)
    "suid": bool,  # root only: honour setuid/setgid bits (default nosuid)
    "bind": str,  # caller, unit, unit:NAME or session: the mount goes when that ends
    **AUTH_OPTIONS,
}
UNMOUNT_OPTIONS: dict[str, type] = {"lazy": bool, **AUTH_OPTIONS}
DIFF_OPTIONS: dict[str, type] = {**AUTH_OPTIONS}
EXPORT_OPTIONS: dict[str, type] = {"compression": str, **AUTH_OPTIONS}  # "none" (default) or "gzip"
IMPORT_OPTIONS: dict[str, type] = {"devices": bool, **AUTH_OPTIONS}  # allow device files in the layer
COMMIT_OPTIONS: dict[str, type] = {**AUTH_OPTIONS}
UPDATE_OPTIONS: dict[str, type] = {**AUTH_OPTIONS}
