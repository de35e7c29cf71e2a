"""Checking the paths callers pass, with messages that say which argument and why.

A caller path is opened once, through no symlink at all (openat2 RESOLVE_NO_SYMLINKS),
and the daemon works on that descriptor from then on: swapping a component for a
symlink or renaming a directory after the check cannot redirect a mount made as root.
Symlinks are refused outright rather than resolved, because a resolved symlink is
exactly what a caller could swap between check and use; the caller passes the real
path instead. The recorded path is the one given, normalised, which names the opened
directory because no symlink was followed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass

from uniond.errors import Failed, InvalidArgument
from uniond.kernel import syscalls

PATH_MAX = 4096  # bytes, the kernel's limit for a path name

# Never mounted over nor used as an upper, whatever the configuration says.
FORBIDDEN_TREES = ("/usr", "/etc", "/boot", "/proc", "/sys", "/dev")
FORBIDDEN_EXACT = ("/", "/run")


def inside(path: str, other: str) -> bool:
    """True if ``path`` is ``other`` or below it (both canonical)."""
    return path == other or path.startswith(other.rstrip("/") + "/")


def canonical(argument: str, path: str) -> str:
    """The normalised form of an absolute path, refusing anything ambiguous or oversized."""
    if not isinstance(path, str):
        raise InvalidArgument(f"{argument}: must be a string path")
    if not path:
        raise InvalidArgument(f"{argument}: empty path; give an absolute directory path")
    if len(path) > PATH_MAX or len(os.fsencode(path)) > PATH_MAX:
        raise InvalidArgument(f"{argument}: path is longer than {PATH_MAX} bytes (PATH_MAX)")
    if "\0" in path:
        raise InvalidArgument(f"{argument}: path contains a NUL byte")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{argument}: {path!r} is relative; give an absolute path")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise InvalidArgument(f"{argument}: {path!r} contains '..'; give the path without it")
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class OpenDir:
    """A caller's directory, opened O_PATH; ``path`` is its canonical name."""

    argument: str
    path: str
    fd: int
    st: os.stat_result

    def close(self) -> None:
        os.close(self.fd)


def open_dir(argument: str, path: str) -> OpenDir:
    """Open an existing directory named by a caller, through no symlink."""
    real = canonical(argument, path)
    try:
        fd = syscalls.open_dir_nofollow(real)
    except OSError as e:
        raise _refusal(argument, path, real, e) from None
    try:
        st = os.stat(fd)
    except OSError:
        os.close(fd)
        raise
    return OpenDir(argument, real, fd, st)


def _refusal(argument: str, given: str, real: str, e: OSError) -> InvalidArgument | Failed:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        # Each pending Mount holds its directories open: the caller is not at fault.
        return Failed(f"{argument}: too many directories held open right now; try again")
    if e.errno == errno.ENOENT:
        return InvalidArgument(f"{argument}: {given!r} does not exist")
    if e.errno == errno.ELOOP:
        return InvalidArgument(f"{argument}: {given!r} goes through a symlink; give the real path (no symlinks)")
    if e.errno == errno.ENOTDIR:
        try:
            if stat.S_ISLNK(os.lstat(real).st_mode):
                return InvalidArgument(f"{argument}: {given!r} is a symlink; give the real path (no symlinks)")
        except OSError:
            pass
        return InvalidArgument(f"{argument}: {given!r} is not a directory")
    if e.errno == errno.ENAMETOOLONG:
        return InvalidArgument(f"{argument}: a component of {given!r} is too long")
    return InvalidArgument(f"{argument}: {given!r} cannot be opened: {os.strerror(e.errno or errno.EIO)}")


def check_placement(argument: str, path: str, allowed_roots: Iterable[str], own: Iterable[str]) -> None:
    """Mountpoints, uppers and workdirs only strictly below an allowed root, never in
    the system's trees or the daemon's own directories (``own``)."""
    for tree in (*FORBIDDEN_TREES, *own):
        if inside(path, tree):
            raise InvalidArgument(f"{argument}: {path!r} is inside {tree}, where uniond never mounts or writes")
    if path in FORBIDDEN_EXACT:
        raise InvalidArgument(f"{argument}: uniond never mounts over or writes to {path!r} itself")
    roots = list(allowed_roots)
    if not any(inside(path, root) and path != root for root in roots):
        raise InvalidArgument(
            f"{argument}: {path!r} is not strictly below any allowed root ({', '.join(roots) or 'none configured'}); "
            "see allowed_roots in the configuration"
        )


def refuse_nesting(named: dict[str, str]) -> None:
    """M3: no two of lowers, upper, workdir and mountpoint may contain one another.

    Sorted by path with a "/" appended, whatever lies below a path (or equals it) comes
    right after it, so comparing neighbours finds every overlap: 500 lowers cost 500
    comparisons, not 125,000.
    """
    items = sorted(named.items(), key=lambda item: item[1].rstrip("/") + "/")
    for (name_a, a), (name_b, b) in zip(items, items[1:], strict=False):
        if inside(b, a):
            raise InvalidArgument(
                f"{name_a} {a!r} and {name_b} {b!r} overlap; they must be separate directory trees"
            )


@dataclass(frozen=True)
class Places:
    """Where callers' directories may be, and the one way in for a caller's path.

    The mounts room hands a caller's string here once and gets back an open directory
    that has been checked for form, opened without symlinks and, where it will be
    written or mounted on, placed below an allowed root; it never checks the string
    again.
    """

    allowed_roots: tuple[str, ...]
    own: tuple[str, ...]  # the daemon's own directories, never a caller's

    @classmethod
    def of(cls, allowed_roots: Iterable[str], own: Iterable[str]) -> Places:
        return cls(tuple(os.path.realpath(r) for r in allowed_roots), tuple(os.path.realpath(d) for d in own))

    def placed(self, argument: str, path: str) -> str:
        """The canonical form of ``path`` if a caller may write or mount there."""
        real = canonical(argument, path)
        check_placement(argument, real, self.allowed_roots, self.own)
        return real

    def open(self, held: ExitStack, argument: str, path: str, *, placed: bool = False) -> OpenDir:
        """Open a caller's directory for as long as ``held`` lasts; ``placed`` for one
        the daemon will write to or mount on."""
        handle = open_dir(argument, path)
        held.callback(handle.close)
        if placed:
            check_placement(argument, handle.path, self.allowed_roots, self.own)
        return handle
