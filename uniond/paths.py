"""Checking the paths callers pass, with messages that say which argument and why."""

from __future__ import annotations

import os

from uniond.errors import InvalidArgument


def inside(path: str, other: str) -> bool:
    """True if ``path`` is ``other`` or below it (both canonical)."""
    return path == other or path.startswith(other.rstrip("/") + "/")


def existing_dir(argument: str, path: str) -> str:
    """Return the canonical form of an absolute path naming an existing directory."""
    if not path:
        raise InvalidArgument(f"{argument}: empty path; give an absolute directory path")
    if "\0" in path:
        raise InvalidArgument(f"{argument}: path contains a NUL byte")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{argument}: {path!r} is relative; give an absolute path")
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:
        raise InvalidArgument(f"{argument}: {path!r} does not exist") from None
    if not os.path.isdir(real):
        raise InvalidArgument(f"{argument}: {path!r} is not a directory")
    return real


def refuse_nesting(named: dict[str, str]) -> None:
    """M3: no two of lowers, upper, workdir and mountpoint may contain one another."""
    items = list(named.items())
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1 :]:
            if inside(a, b) or inside(b, a):
                raise InvalidArgument(
                    f"{name_a} {a!r} and {name_b} {b!r} overlap; they must be separate directory trees"
                )
