"""Building a layer directory that can be a lowerdir of a later Mount (E3): the entries
of an ImportLayer or a Commit, made below a destination without ever being led out of it."""

from __future__ import annotations

import errno
import os
import stat

from uniond.errors import InvalidArgument
from uniond.layers.tree import OPAQUE_XATTR, Meta

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DEFAULT_ACL = "system.posix_acl_default"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # an old kernel: never trust the mode open(2) made


def _apply(fd: int, meta: Meta) -> None:
    os.chown(fd, meta.uid, meta.gid)
    os.chmod(fd, meta.mode)  # after chown, which clears set-id bits
    _set_xattrs(fd, meta.xattrs)


def _has_default_acl(fd: int) -> bool:
    try:
        os.getxattr(fd, _DEFAULT_ACL)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


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
        self._new_gid = -1  # the group a file made in the cached parent gets
        # A file is made with its final mode when open(2) gives exactly that: a default
        # ACL on the root (inherited below) would mask it instead of the umask.
        self._umask = _umask() if not _has_default_acl(self.root_fd) else 0o777
        self._uid, self._gid = os.geteuid(), os.getegid()
        self._made: tuple[int, int, int] = (-1, -1, 0)  # (fd, gid, mode) of the last regular file

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
        st = os.fstat(fd)
        self._new_gid = st.st_gid if st.st_mode & stat.S_ISGID else self._gid  # a set-group-ID directory's
        return fd, base

    def directory(self, rel: str, meta: Meta, opaque: bool = False, exists: bool = False,
                  implicit: set[str] | None = None) -> None:
        pfd, base = self.parent(rel, implicit)
        if not exists:
            os.mkdir(base, 0o700, dir_fd=pfd)
            self.entries += 1
        if self._cached is not None and self._cached[0] == rel:
            self._drop_cache()  # its mode changes, and with it the group of files made in it
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            _apply(fd, meta)
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
        then calls ``finish_regular``.

        Most files are made with their final mode at once, so that finish_regular needs
        no chmod (nor a chown when the owner is the daemon's). A set-ID or sticky file
        starts as 0600: a set-user-ID file of the daemon's user must never be reachable
        while its content is being written.
        """
        pfd, base = self.parent(rel, implicit)
        mode = meta.mode if not meta.mode & 0o7000 else 0o600
        fd = os.open(base, _NEW_FILE, mode, dir_fd=pfd)
        self.entries += 1
        self._made = (fd, self._new_gid, mode & ~self._umask)
        return fd

    def small_file(self, rel: str, meta: Meta, data: bytes | memoryview, implicit: set[str] | None = None) -> None:
        """A regular file holding ``data``: regular, a write and finish_regular in one."""
        pfd, base = self.parent(rel, implicit)
        mode = meta.mode if not meta.mode & 0o7000 else 0o600
        fd = os.open(base, _NEW_FILE, mode, dir_fd=pfd)
        self.entries += 1
        try:
            while data:
                data = data[os.write(fd, data):]
            if (meta.uid, meta.gid) != (self._uid, self._new_gid) or meta.xattrs:
                _apply(fd, meta)
            elif mode & ~self._umask != meta.mode:
                os.chmod(fd, meta.mode)
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
        finally:
            os.close(fd)

    def finish_regular(self, fd: int, meta: Meta) -> None:
        try:
            made_fd, gid, mode = self._made
            if made_fd != fd or (meta.uid, meta.gid) != (self._uid, gid) or meta.xattrs:
                _apply(fd, meta)
            elif mode != meta.mode:
                os.chmod(fd, meta.mode)
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
