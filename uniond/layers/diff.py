"""What a mount changed, read from its upper layer alone (D1-D5).

Walking the merged view would read every lower file; the upper already holds exactly
the entries that were touched, so the walk is bounded by the size of the change, with
one lstat per touched entry in the lowers to tell Added from Changed. Valid only with
the options of M8, which uniond always mounts writable overlays with.
"""

from __future__ import annotations

import errno
import operator
import os
import stat
from collections.abc import Callable
from stat import S_ISCHR, S_ISREG, S_ISSOCK

from uniond.layers.stream import Sink

ADDED, CHANGED, DELETED = "A", "C", "D"
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
_COMPARED_XATTR_PREFIXES = ("user.", "security.capability")
_NAME = operator.attrgetter("name")
_PATH = operator.itemgetter(1)


Change = tuple[str, str]  # (kind: A, C or D as `docker diff` prints them, path absolute in the merged view)


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


def _names_if_cheap(directory: bytes, upper_entries: int) -> frozenset[bytes] | None:
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
    live: list[tuple[bytes, frozenset[bytes] | None]], name: bytes, want_dirs: bool
) -> tuple[bytes | None, os.stat_result | None, list[bytes]]:
    """Find ``name`` in the visible lower directories, top-most first (D4).

    Returns the top-most lower path and stat (None if no lower shows it) and, when the
    top-most is a directory, the lower directories that still show through below it.
    """
    found_path: bytes | None = None
    found: os.stat_result | None = None
    below: list[bytes] = []
    for directory, names in live:
        if names is not None and name not in names:
            continue
        path = directory + b"/" + name
        # Most probes miss: access() answers with a bool, where a failed lstat would
        # cost a Python exception.
        if names is None and not os.access(path, os.F_OK, follow_symlinks=False):
            continue
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


def _opaque_value(path: bytes | str) -> bytes | None:
    """The directory's overlay.opaque xattr: b"y" (opaque, D3), b"x" (holds xattr whiteouts, D2) or None.

    One listxattr answers for the usual directory that has neither, where asking for each
    name would fail twice, each failure a Python exception.
    """
    try:
        present = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return None
        raise
    for name in _OPAQUE_XATTRS:
        if name in present:
            value = _getxattr(path, name)
            if value is not None:
                return value
    return None


def _text_name(entry: os.DirEntry[bytes]) -> str:
    return os.fsdecode(entry.name)


def _as_text(names: list[bytes]) -> bool:
    """Whether ``names`` must be decoded to sort as text does (Diff's order, by name).

    Bytes sort as text does while they are ASCII (UTF-8 keeps the order of code points
    too, but a byte that is not UTF-8 decodes to a surrogate, which sorts elsewhere).
    """
    return not b"".join(names).isascii()


def _plain(entries: list[os.DirEntry[bytes]], listed: frozenset[bytes]) -> list[bool]:
    """Per entry: a regular file that no lower shows, so Added without a look."""
    if listed:
        return [e.is_file(follow_symlinks=False) and e.name not in listed for e in entries]
    return [e.is_file(follow_symlinks=False) for e in entries]


def _walk(upper_dir: bytes, merged_dir: bytes, lower_dirs: list[bytes], out: list[bytes],
          xwhiteouts: bool, flush: Callable[[], None] | None = None) -> bool:
    """Report changes below ``upper_dir`` as records into ``out``; True if an entry was
    added or deleted directly in it.

    The walk stats only what it must, since an lstat costs several times the listing
    itself: an entry no lower shows is Added whatever its metadata, and scandir's d_type
    tells directories, files and symlinks apart. What is stat()ed: character devices
    (0/0 whiteouts), empty-file candidates for xattr whiteouts in a directory marked
    ``x`` (``xwhiteouts``), entries a lower also shows (D5 compares both), and the rare
    types d_type does not name (FIFOs, devices, sockets). Names stay bytes from the
    listing to the record: nothing is decoded or encoded on the way.
    """
    with os.scandir(upper_dir) as it:
        entries = list(it)
    names = [e.name for e in entries]
    as_text = _as_text(names)
    live = [(d, _names_if_cheap(d, len(entries))) for d in lower_dirs]
    # When every lower directory was listed, a name in none of the listings is in no
    # lower: the common case of an added entry needs no lookup at all.
    listed: frozenset[bytes] | None = None
    if all(listing is not None for _, listing in live):
        listed = frozenset().union(*(listing for _, listing in live if listing is not None))
    added = b"A " + merged_dir
    fast = listed is not None and not xwhiteouts
    if fast and all(_plain(entries, listed)):
        # The common directory of new files: only its names are sorted, and its records
        # are joined in one piece.
        names.sort(key=os.fsdecode if as_text else None)
        if names:
            out.append(added + (b"\0" + added).join(names) + b"\0")
        if flush is not None:
            flush()
        return bool(names)
    entries.sort(key=_text_name if as_text else _NAME)
    names = [e.name for e in entries]
    plain = _plain(entries, listed) if fast else []
    touched = False
    append = out.append
    for i, entry in enumerate(entries):
        name = names[i]
        if plain and plain[i]:
            append(added + name + b"\0")
            touched = True
            continue
        merged = merged_dir + name
        is_file = entry.is_file(follow_symlinks=False)
        is_dir = not is_file and entry.is_dir(follow_symlinks=False)
        st = None
        if (is_file and xwhiteouts) or not (is_file or is_dir or entry.is_symlink()):
            st = entry.stat(follow_symlinks=False)
            mode = st.st_mode
            if (S_ISCHR(mode) or (S_ISREG(mode) and not st.st_size)) and is_whiteout(entry.path, st):
                append(b"D " + merged + b"\0")
                touched = True
                continue
            if S_ISSOCK(mode):
                continue  # D8: sockets are not part of a layer
        if listed is not None and name not in listed:
            lower_path, lower_st, below = None, None, []
        else:
            lower_path, lower_st, below = _lookup(live, name, want_dirs=is_dir)
        opaque = _opaque_value(entry.path) if is_dir else None
        reported = False
        if opaque == b"y":
            if lower_st is not None:
                append(b"D " + merged + b"\0")
            append(b"A " + merged + b"\0")
            touched = reported = True
            below = []
        elif lower_st is None:
            append(b"A " + merged + b"\0")
            touched = reported = True
        else:
            assert lower_path is not None
            if st is None:
                st = entry.stat(follow_symlinks=False)
            if not _unchanged(entry.path, st, lower_path, lower_st):
                append(b"C " + merged + b"\0")
                reported = True
        if is_dir:
            if _walk(entry.path, merged + b"/", below, out, opaque == b"x", flush) and not reported:
                append(b"C " + merged + b"\0")  # D4: parent of an A/D is Changed
    if flush is not None:
        flush()
    return touched


def _start(upperdir: str, lowerdirs: list[str] | tuple[str, ...], out: list[bytes],
           flush: Callable[[], None] | None = None) -> None:
    upper = os.fsencode(upperdir)
    _walk(upper, b"/", [os.fsencode(d) for d in lowerdirs], out, _opaque_value(upper) == b"x", flush)


def changes(upperdir: str, lowerdirs: list[str] | tuple[str, ...]) -> list[Change]:
    """All changes of the upper against its lowers, sorted by path as `docker diff` prints.

    Plain (kind, path) tuples, as a Diff can hold a million of them.
    """
    if not upperdir:
        return []
    out: list[bytes] = []
    _start(upperdir, lowerdirs, out)
    records = os.fsdecode(b"".join(out)).split("\0")  # one decode for all: a name's bytes as scandir would
    records.pop()  # after the last NUL
    result = [(r[0], r[2:]) for r in records]
    # By path alone: the sort is stable, and the one path with two records (an opaque
    # directory that replaced one of a lower, D4) has them from the walk as D, then A.
    result.sort(key=_PATH)
    return result


def write_into(upperdir: str, lowerdirs: list[str] | tuple[str, ...], sink: Sink) -> int:
    """The changes of ``changes``, written to ``sink`` as they are found, one
    ``KIND SPACE PATH NUL`` record each; returns how many.

    Records are gathered one directory at a time and written after it, so memory stays
    flat however many there are (the walk holds one directory's listing per level).
    The order is the walk's, not sorted: each directory's entries by name, a
    directory's record before what is below it, except that a directory Changed only
    because something below it was added or deleted (D4) follows them. The path's
    bytes are the name's own, so any name survives.
    """
    if not upperdir:
        return 0
    out: list[bytes] = []  # one directory's worth at most: flushed after each
    count = 0

    def flush() -> None:
        nonlocal count
        data = b"".join(out)
        out.clear()
        count += data.count(b"\0")
        sink.write(data)

    _start(upperdir, lowerdirs, out, flush)
    sink.flush()
    return count
