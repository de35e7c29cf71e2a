"""Commit: a mount's upper copied into an empty directory as a native layer.

No tar in between: entries are made directly, through the same Builder as an import,
so the result is the same as ImportLayer(ExportDiff) would give.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass

from uniond.kernel.overlay import empty_directory
from uniond.layers import tree
from uniond.layers.builder import Builder
from uniond.layers.stream import CHUNK
from uniond.layers.tree import Meta


@dataclass(frozen=True)
class CommitResult:
    entries: int
    fingerprint: bytes  # of the upper as the copy saw it; see fingerprint()


def _stamp(digest, e: tree.UpperEntry) -> None:
    st = e.st
    digest.update(b"%s\0%d %d %d %d %d %d %d %d\n" % (
        e.rel.encode("utf-8", "surrogateescape"), st.st_ino, st.st_mode, st.st_uid, st.st_gid,
        st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink))


def fingerprint(upperdir: str) -> bytes:
    """A digest of every entry's name, inode and times: any write, xattr change, rename
    or new entry changes an entry's ctime or the set of names (multigrain ctime makes a
    change right after a stat visible), so two equal fingerprints taken around a copy
    prove that the copy is one state of the upper."""
    digest = hashlib.sha256()
    for e in tree.walk_upper(upperdir) if upperdir else ():
        _stamp(digest, e)
    return digest.digest()


def commit(upperdir: str, destdir: str) -> CommitResult:
    """Copy an upper into the empty ``destdir`` as a native layer.

    Whiteouts become 0/0 devices whatever form they had (D2), opaque directories keep
    ``trusted.overlay.opaque=y``, every other overlay xattr is dropped (D6). Either the
    caller holds the upper still, or it compares the result's fingerprint with a
    fingerprint() taken after.
    """
    tree.check_destdir_empty(destdir)
    builder = Builder(destdir)
    first_names: dict[tuple[int, int], str] = {}
    digest = hashlib.sha256()
    try:
        for e in tree.walk_upper(upperdir) if upperdir else ():
            _stamp(digest, e)
            st = e.st
            mode = st.st_mode
            if e.whiteout:
                builder.whiteout(e.rel)
                continue
            meta = Meta.of(st, tree.read_xattrs(e.path))
            if stat.S_ISDIR(mode):
                builder.directory(e.rel, meta, opaque=e.opaque)
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in first_names:
                    builder.hardlink(e.rel, first_names[key])
                    continue
                first_names[key] = e.rel
            if stat.S_ISREG(mode):
                out = builder.regular(e.rel, meta)
                try:
                    _copy_file(e.path, out)
                except BaseException:
                    os.close(out)
                    raise
                builder.finish_regular(out, meta)
            elif stat.S_ISLNK(mode):
                builder.symlink(e.rel, os.readlink(e.path), meta)
            else:
                builder.node(e.rel, stat.S_IFMT(mode), st.st_rdev, meta)
        entries = builder.finish()
    except BaseException:
        builder.close()
        empty_directory(destdir)
        raise
    builder.close()
    return CommitResult(entries, digest.digest())


def _copy_file(path: str, out: int) -> None:
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            try:
                n = os.copy_file_range(src, out, 1 << 30)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                while data := os.read(src, CHUNK):
                    os.write(out, data)
                return
            if n == 0:
                return
    finally:
        os.close(src)
