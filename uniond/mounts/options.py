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

_TYPE_WORDS = {bool: "a boolean (b)", str: "a string (s)", int: "an integer (t)", list: "a list of strings (as)"}
MAX_LIST = 500  # strings in a list option: far more than overlay stacks

MAX_OPTIONS = 32  # far more than any method knows; a bigger dict is an attack or a bug
MAX_STRING = 4096  # per string option, like a path
LONG_STRINGS = {"config": 1 << 20}  # options that carry a document, not a path: their own limit


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
        limit = LONG_STRINGS.get(key, MAX_STRING)
        if wanted is str and len(value) > limit:
            raise InvalidArgument(f"{method}: option {key!r} is longer than {limit} characters")
        if wanted is list and len(value) > MAX_LIST:
            raise InvalidArgument(f"{method}: option {key!r} holds {len(value)} strings; at most {MAX_LIST}")
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
EXPORT_LAYER_OPTIONS: dict[str, type] = EXPORT_OPTIONS  # "none", "gzip" or "zstd"
APPLY_OPTIONS: dict[str, type] = {
    **IMPORT_OPTIONS,
    "parents": list,  # the directories the layer will sit on, top-most first
    "expected_digest": str,  # sha256:<hex>; a layer that differs is refused
    "expected_diff_id": str,
}
IMPORT_IMAGE_OPTIONS: dict[str, type] = {"devices": bool, "expected_digest": str, **AUTH_OPTIONS}
EXPORT_IMAGE_OPTIONS: dict[str, type] = {
    "compression": str,  # of the layers: "gzip" (default), "zstd" or "none"
    "config": str,  # the image config to start from (ImportImage's), JSON
    "name": str,  # the reference name the archive's index gives the image
    **AUTH_OPTIONS,
}
UPDATE_OPTIONS: dict[str, type] = {**AUTH_OPTIONS}
