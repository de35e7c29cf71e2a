"""What a mount changed, read from its upper layer alone (D1-D5).

Walking the merged view would read every lower file; the upper already holds exactly
the entries that were touched, so the walk is bounded by the size of the change, with
one lstat per touched entry in the lowers to tell Added from Changed. Valid only with
the options of M8, which uniond always mounts writable overlays with.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from stat import S_ISCHR, S_ISDIR, S_ISREG, S_ISSOCK

ADDED, CHANGED, DELETED = "A", "C", "D"
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
_COMPARED_XATTR_PREFIXES = ("user.", "security.capability")
_KIND_ORDER = {DELETED: 0, CHANGED: 1, ADDED: 2}


@dataclass(frozen=True)
class Change:
    kind: str  # A, C or D, as `docker diff` prints them
    path: str  # absolute in the merged view


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def is_whiteout(path: str, st: os.stat_result) -> bool:
    """D2: a 0/0 character device, or a zero-size file carrying the whiteout xattr."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return any(_getxattr(path, name) is not None for name in _WHITEOUT_XATTRS)
    return False


def is_opaque(path: str) -> bool:
    """D3: "y" only; "x" marks a directory holding xattr whiteouts, not an opaque one."""
    return any(_getxattr(path, name) == b"y" for name in _OPAQUE_XATTRS)


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        n: _getxattr(path, n) or b""
        for n in names
        if n.startswith(_COMPARED_XATTR_PREFIXES)
    }


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 16), fb.read(1 << 16)
            if ca != cb:
                return False
            if not ca:
                return True


def _unchanged(upper: str, ust: os.stat_result, lower: str, lst: os.stat_result) -> bool:
    """D5: a copy-up with no real change (chmod back, mv a b; mv b a) is not a change."""
    if stat.S_IFMT(ust.st_mode) != stat.S_IFMT(lst.st_mode):
        return False
    if (ust.st_mode, ust.st_uid, ust.st_gid, ust.st_rdev) != (lst.st_mode, lst.st_uid, lst.st_gid, lst.st_rdev):
        return False
    is_dir = stat.S_ISDIR(ust.st_mode)
    if not is_dir and ust.st_size != lst.st_size:
        return False
    if ust.st_mtime_ns != lst.st_mtime_ns:
        return False
    if stat.S_ISLNK(ust.st_mode) and os.readlink(upper) != os.readlink(lower):
        return False
    if _xattrs(upper) != _xattrs(lower):
        return False
    if stat.S_ISREG(ust.st_mode) and ust.st_mtime_ns % 1_000_000_000 == 0:
        # Whole-second timestamps cannot tell a rewrite within the same second.
        return _same_content(upper, lower)
    return True


# A lower directory whose size suggests at most this many entries per entry of the upper
# directory is listed once instead of probed once per upper entry.
_LIST_FACTOR = 2
_DIRENT_BYTES = 24  # a lower bound of the bytes a name takes in a directory (ext4, xfs, tmpfs)


def _names_if_cheap(directory: str, upper_entries: int) -> frozenset[str] | None:
    """The names in a lower directory, if listing it costs no more than probing it would.

    Probing costs one failed lstat per upper entry and lower; a listing answers all of
    them at once. The size check keeps Diff's cost bounded by the upper, whatever the
    size of the lowers (a huge lower directory is still probed name by name).
    """
    try:
        size = os.stat(directory).st_size
    except OSError:
        return None
    if size > _LIST_FACTOR * _DIRENT_BYTES * max(upper_entries, 1):
        return None
    try:
        with os.scandir(directory) as it:
            return frozenset(e.name for e in it)
    except OSError:
        return None


def _lookup(
    live: list[tuple[str, frozenset[str] | None]], name: str, want_dirs: bool
) -> tuple[str | None, os.stat_result | None, list[str]]:
    """Find ``name`` in the visible lower directories, top-most first (D4).

    Returns the top-most lower path and stat (None if no lower shows it) and, when the
    top-most is a directory, the lower directories that still show through below it.
    """
    found_path: str | None = None
    found: os.stat_result | None = None
    below: list[str] = []
    for directory, names in live:
        if names is not None and name not in names:
            continue
        path = f"{directory}/{name}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if is_whiteout(path, st):
            break
        if found is None:
            found_path, found = path, st
        if not stat.S_ISDIR(st.st_mode) or not stat.S_ISDIR(found.st_mode):
            break
        if not want_dirs:
            break
        below.append(path)
        if is_opaque(path):
            break
    return found_path, found, below


def _walk(upper_dir: str, merged_dir: str, lower_dirs: list[str], out: list[Change]) -> bool:
    """Report changes below ``upper_dir``; True if an entry was added or deleted directly in it."""
    touched = False
    with os.scandir(upper_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    live = [(d, _names_if_cheap(d, len(entries))) for d in lower_dirs]
    for entry in entries:
        merged = merged_dir + entry.name
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        # Only 0/0 devices and empty regular files can be whiteouts: no xattr read otherwise.
        if (S_ISCHR(mode) or (S_ISREG(mode) and not st.st_size)) and is_whiteout(entry.path, st):
            out.append(Change(DELETED, merged))
            touched = True
            continue
        if S_ISSOCK(mode):
            continue  # D8: sockets are not part of a layer
        is_dir = S_ISDIR(mode)
        if live:
            lower_path, lower_st, below = _lookup(live, entry.name, want_dirs=is_dir)
        else:
            lower_path, lower_st, below = None, None, []
        reported = False
        if is_dir and is_opaque(entry.path):
            if lower_st is not None:
                out.append(Change(DELETED, merged))
            out.append(Change(ADDED, merged))
            touched = reported = True
            below = []
        elif lower_st is None:
            out.append(Change(ADDED, merged))
            touched = reported = True
        elif not _unchanged(entry.path, st, lower_path, lower_st):
            out.append(Change(CHANGED, merged))
            reported = True
        if is_dir:
            if _walk(entry.path, merged + "/", below, out) and not reported:
                out.append(Change(CHANGED, merged))  # D4: parent of an A/D is Changed
    return touched


def changes(upperdir: str, lowerdirs: list[str] | tuple[str, ...]) -> list[Change]:
    """All changes of the upper against its lowers, sorted by path as `docker diff` prints."""
    if not upperdir:
        return []
    out: list[Change] = []
    _walk(upperdir, "/", list(lowerdirs), out)
    out.sort(key=lambda c: (c.path, _KIND_ORDER[c.kind]))
    return out

