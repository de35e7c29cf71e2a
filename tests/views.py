"""What a user sees of a tree, independent of uniond's code: the tests' yardstick.

A view maps each path below the root (the root itself excluded: a layer does not carry
it) to its type, permission bits, owner, mtime in nanoseconds, content digest (regular
files), target (symlinks), device number (devices) and user.* xattrs; hard-link groups
are the sets of paths sharing one inode. Directory sizes and link counts are left out:
they tell how a file system stores a tree, not what is in it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    content: str  # sha256 of a file, a symlink's target, a device's number
    xattrs: tuple[tuple[str, bytes], ...]


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names if n.startswith("user.")))


def entry(path: str, st: os.stat_result) -> Entry:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        with open(path, "rb") as f:
            kind, content = "file", hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISDIR(mode):
        kind, content = "dir", ""
    elif stat.S_ISLNK(mode):
        kind, content = "symlink", os.readlink(path)
    elif stat.S_ISFIFO(mode):
        kind, content = "fifo", ""
    else:
        kind, content = "device", f"{stat.S_IFMT(mode)}:{st.st_rdev}"
    return Entry(kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns, content, _xattrs(path))


def walk(root: str | os.PathLike) -> dict[str, tuple[Entry, os.stat_result]]:
    out = {}
    root = os.fspath(root)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            out["/" + os.path.relpath(path, root)] = (entry(path, st), st)
    return out


def view(root: str | os.PathLike) -> tuple[dict[str, Entry], frozenset[frozenset[str]]]:
    tree = walk(root)
    groups: dict[int, set[str]] = defaultdict(set)
    for path, (e, st) in tree.items():
        if e.kind != "dir":
            groups[st.st_ino].add(path)
    links = frozenset(frozenset(g) for g in groups.values() if len(g) > 1)
    return {path: e for path, (e, _) in tree.items()}, links


def differences(a, b) -> list[str]:
    """The paths where two views differ, with both sides: an assertion message a user reads."""
    (ea, la), (eb, lb) = a, b
    out = [f"{p}: {ea.get(p)} != {eb.get(p)}" for p in sorted(set(ea) | set(eb)) if ea.get(p) != eb.get(p)]
    if la != lb:
        out.append(f"hard links: {sorted(map(sorted, la))} != {sorted(map(sorted, lb))}")
    return out
