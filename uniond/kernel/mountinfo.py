"""Read the kernel's table of mounts (/proc/self/mountinfo).

Reconciliation and the "upper already in use" check (M7) must trust the kernel, not
the daemon's own record, so both read this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field  # the common case, without a regular expression
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mnt_id: int
    root: str
    mountpoint: str
    fstype: str
    source: str
    super_options: tuple[str, ...]
    parent_id: int = 0  # the mount this one is attached to (M10: stacked mounts name each other)

    def option_values(self, key: str) -> list[str]:
        """Values of ``key=`` (and ``key+=``) in the superblock options, in order."""
        out = []
        for opt in self.super_options:
            name, _, value = opt.partition("=")
            if name in (key, key + "+"):
                out.append(value)
        return out


def parse(text: str, fstype: str = "") -> list[MountEntry]:
    """Every entry, or only those of ``fstype`` (the others are skipped before the costly
    unescaping: a Mount asks for the overlays of a table of hundreds of entries)."""
    entries = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        if fstype and not right.startswith(fstype + " "):
            continue
        fields = left.split(" ")
        rest = right.split(" ")
        if len(fields) < 5 or len(rest) < 3:
            continue
        # Super options are comma-separated, and a path containing a comma is
        # escaped by overlayfs as "\,": split only on unescaped commas.
        if "\\" in rest[2]:
            opts = [unescape(o.replace("\\,", ",")) for o in re.split(r"(?<!\\),", rest[2])]
        else:
            opts = rest[2].split(",")
        entries.append(
            MountEntry(
                mnt_id=int(fields[0]),
                root=unescape(fields[3]),
                mountpoint=unescape(fields[4]),
                fstype=rest[0],
                source=unescape(rest[1]),
                super_options=tuple(opts),
                parent_id=int(fields[1]),
            )
        )
    return entries


MOUNTINFO = "/proc/self/mountinfo"


def read(path: str = MOUNTINFO, fstype: str = "") -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read(), fstype)
