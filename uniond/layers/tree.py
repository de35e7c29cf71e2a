"""The file-system side of layers: reading an upper entry by entry, and building a
layer directory that can be a lowerdir of a later Mount.

Export, Import and Commit all meet the same two problems: walking an upper in a stable
order with whiteouts and opaque directories recognised (D1-D3), and creating entries
below a destination without ever being led out of it. Both live here once.
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


def read_xattrs(path: str | int) -> tuple[tuple[str, bytes], ...]:
    """The exported xattrs of ``path`` (not following a symlink) or of an open fd, sorted by name."""
    follow = isinstance(path, int)  # an fd: follow_symlinks=False is not allowed with it
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in sorted(names):
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


def _set_xattrs(target: int | str, xattrs: tuple[tuple[str, bytes], ...], follow_symlinks: bool = True) -> None:
    for name, value in xattrs:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow_symlinks)
        except OSError as e:
            # A name the kernel refuses ("user." alone, over 255 bytes), a value it
            # refuses (security.capability), or user.* on a FIFO or device: the layer's.
            if e.errno in (errno.EINVAL, errno.ERANGE, errno.E2BIG, errno.EPERM, errno.ENOTSUP):
                raise InvalidArgument(f"xattr {name[:80]!r} cannot be set: {e.strerror}") from None
            raise


class Builder:
    """Creates a layer's entries below ``root``, which must start out empty.

    Every parent is opened component by component with O_NOFOLLOW relative to the one
    before, so no name, however crafted, and no symlink created earlier can lead a
    write outside ``root`` (E3). Directory mtimes are set last, deepest first, since
    creating children changes them.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.entries = 0
        self._dir_times: list[tuple[str, int]] = []
        self._cached: tuple[str, int] | None = None  # the last parent opened, still open

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root_fd)

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def parent(self, rel: str, implicit: set[str] | None = None) -> tuple[int, str]:
        """(fd of the parent directory, base name) of ``rel``; the fd stays owned by the builder.

        Missing parents are created (mode 0755) and added to ``implicit`` when given;
        without it, a missing parent is an error.
        """
        head, _, base = rel.rpartition("/")
        if self._cached is not None and self._cached[0] == head:
            return self._cached[1], base
        self._drop_cache()
        fd = os.dup(self.root_fd)
        done = ""
        try:
            for name in head.split("/") if head else ():
                done = f"{done}/{name}" if done else name
                try:
                    new = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if implicit is None:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fd)
                    implicit.add(done)
                    self.entries += 1
                    new = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise InvalidArgument(f"{rel!r} goes through {done!r}, which is not a directory") from None
                    raise
                os.close(fd)
                fd = new
        except BaseException:
            os.close(fd)
            raise
        self._cached = (head, fd)
        return fd, base

    @staticmethod
    def _apply(fd: int, meta: Meta) -> None:
        os.chown(fd, meta.uid, meta.gid)
        os.chmod(fd, meta.mode)  # after chown, which clears set-id bits
        _set_xattrs(fd, meta.xattrs)

    def directory(self, rel: str, meta: Meta, opaque: bool = False, exists: bool = False,
                  implicit: set[str] | None = None) -> None:
        pfd, base = self.parent(rel, implicit)
        if not exists:
            os.mkdir(base, 0o700, dir_fd=pfd)
            self.entries += 1
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            self._apply(fd, meta)
            if opaque:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
        finally:
            os.close(fd)
        self._dir_times.append((rel, meta.mtime_ns))

    def set_opaque(self, rel: str, implicit: set[str]) -> None:
        """E3: a ``.wh..wh..opq`` marker; its directory is created if not seen yet."""
        pfd, base = self.parent(rel + "/x", implicit)
        os.setxattr(pfd, OPAQUE_XATTR, b"y")

    def regular(self, rel: str, meta: Meta, implicit: set[str] | None = None) -> int:
        """Create an empty regular file and return a writable fd; the caller fills it,
        then calls ``finish_regular``."""
        pfd, base = self.parent(rel, implicit)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        self.entries += 1
        return fd

    def finish_regular(self, fd: int, meta: Meta) -> None:
        try:
            self._apply(fd, meta)
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
        finally:
            os.close(fd)

    def symlink(self, rel: str, target: str, meta: Meta, implicit: set[str] | None = None) -> None:
        # The target is data, read only inside a later mount's view: never followed here.
        pfd, base = self.parent(rel, implicit)
        os.symlink(target, base, dir_fd=pfd)
        self.entries += 1
        os.chown(base, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(base, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def node(self, rel: str, kind: int, rdev: int, meta: Meta, implicit: set[str] | None = None) -> None:
        """A FIFO or a device (D8)."""
        pfd, base = self.parent(rel, implicit)
        os.mknod(base, kind | 0o600, rdev, dir_fd=pfd)
        self.entries += 1
        os.chown(base, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(base, meta.mode, dir_fd=pfd)
        _set_xattrs(f"/proc/self/fd/{pfd}/{base}", meta.xattrs, follow_symlinks=False)
        os.utime(base, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def whiteout(self, rel: str, implicit: set[str] | None = None) -> None:
        """E3: the overlay-native form, a 0/0 character device (D2)."""
        pfd, base = self.parent(rel, implicit)
        os.mknod(base, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
        self.entries += 1

    def hardlink(self, rel: str, target: str, implicit: set[str] | None = None) -> None:
        """D7: ``target`` is an entry already created below the root."""
        tfd, tbase = self.parent(target)
        tfd = os.dup(tfd)
        try:
            pfd, base = self.parent(rel, implicit)
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
        self.entries += 1

    def finish(self) -> int:
        """Set directory mtimes, deepest first; return the number of entries made."""
        self._drop_cache()
        for rel, mtime_ns in sorted(self._dir_times, key=lambda t: t[0].count("/"), reverse=True):
            pfd, base = self.parent(rel)
            os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
        self._drop_cache()
        return self.entries
