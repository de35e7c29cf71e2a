"""The file-system side of layers: reading an upper entry by entry, and building a
layer directory that can be a lowerdir of a later Mount.

Export, Import and Commit all meet the same two problems: walking an upper in a stable
order with whiteouts and opaque directories recognised (D1-D3), and creating entries
below a destination without ever being led out of it. Both live once: the walk here,
the creating in builder.py.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from uniond.errors import InvalidArgument
from uniond.layers import diff

# D6: what a layer carries of an entry's xattrs; overlay's own never leave the upper.
EXPORTED_XATTR_PREFIXES = ("user.",)
EXPORTED_XATTRS = ("security.capability",)
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
OPAQUE_XATTR = "trusted.overlay.opaque"  # uniond mounts as root, without userxattr (D3)
NAME_MAX = 255
PATH_MAX = 4096
XATTR_SIZE_MAX = 65536

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def exported_xattr(name: str) -> bool:
    if name.startswith(OVERLAY_XATTR_PREFIXES):
        return False
    return name.startswith(EXPORTED_XATTR_PREFIXES) or name in EXPORTED_XATTRS


def list_xattrs(target: str | int) -> list[str]:
    """Every xattr name of ``target`` (a path, not following a symlink, or an open fd),
    or none where the file system keeps none."""
    try:
        return os.listxattr(target, follow_symlinks=isinstance(target, int))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def read_xattrs(path: str | int, names: list[str] | None = None) -> tuple[tuple[str, bytes], ...]:
    """The exported xattrs of ``path`` (not following a symlink) or of an open fd, sorted
    by name; ``names`` is its list_xattrs when the caller has it already."""
    follow = isinstance(path, int)  # an fd: follow_symlinks=False is not allowed with it
    out = []
    for name in sorted(list_xattrs(path) if names is None else names):
        if not exported_xattr(name):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed since listxattr
                raise
    return tuple(out)


@dataclass(frozen=True)
class Meta:
    """What a layer keeps of an entry besides its type and content."""

    mode: int  # permission bits only (S_IMODE)
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, st: os.stat_result, xattrs: tuple[tuple[str, bytes], ...]) -> Meta:
        return cls(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs)


@dataclass(frozen=True)
class UpperEntry:
    rel: str  # relative to the upper, "/"-separated, never empty
    path: str  # absolute, in the upper
    st: os.stat_result
    whiteout: bool = False  # D2, either form
    opaque: bool = False  # D3, directories only


def walk_upper(upper: str) -> Iterator[UpperEntry]:
    """Every entry of an upper, parents before children, siblings sorted by name (D1, E2).

    Sockets are skipped (D8). Only what the checks need is read: the opaque xattr of
    directories and the whiteout xattr of zero-size regular files (D2, D3).
    """
    return _walk(upper, "")


def _walk(directory: str, prefix: str) -> Iterator[UpperEntry]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return  # removed since its parent was listed: a live mount's upper
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone since the listing: a live mount's upper
        mode = st.st_mode
        rel = prefix + entry.name
        if stat.S_ISDIR(mode):
            yield UpperEntry(rel, entry.path, st, opaque=diff.is_opaque(entry.path))
            yield from _walk(entry.path, rel + "/")
        elif not stat.S_ISSOCK(mode):
            yield UpperEntry(rel, entry.path, st, whiteout=diff.is_whiteout(entry.path, st))


# A directory a layer names only as a parent, when no lower one has it: containerd's
# choice (0755, root, the epoch), so that the same layer always unpacks the same.
IMPLICIT_DIRECTORY = Meta(0o755, 0, 0, 0)


def lower_directory_meta(parents: tuple[str, ...], rel: str) -> Meta | None:
    """The metadata of directory ``rel`` as the stack ``parents`` (top-most first)
    shows it: from the first parent that has ``rel``, or None if none has it or the
    first that has it holds something else there (containerd's rule).

    Overlay's rules decide what a lower hides: a non-directory (a whiteout, a file, a
    symlink, never followed) on the way ends the search, and so does an opaque
    directory on the way in which ``rel`` is missing (D2, D3).
    """
    parts = rel.split("/")
    for root in parents:
        fd = os.open(root, _DIR_FLAGS)
        hides_below = False  # an opaque directory on the way: the parents below are hidden there
        try:
            for name in parts:
                try:
                    new = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if hides_below:
                        return None
                    break  # not in this parent: ask the next one
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        return None  # replaced by a non-directory: hides the parents below
                    raise
                os.close(fd)
                fd = new
                hides_below = hides_below or diff.is_opaque(f"/proc/self/fd/{fd}/.")
            else:
                st = os.fstat(fd)
                return Meta.of(st, read_xattrs(fd))
        finally:
            os.close(fd)
    return None


def check_destdir_empty(destdir: str) -> None:
    with os.scandir(destdir) as it:
        if next(it, None) is not None:
            raise InvalidArgument(f"destdir {destdir!r} is not empty; give an empty directory")
