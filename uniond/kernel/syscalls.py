"""Thin ctypes wrappers for the mount system calls Python does not expose.

uniond mounts through the new mount API (fsopen/fsconfig/fsmount/move_mount, kernel
>= 5.2, ``lowerdir+`` since 6.8) rather than by spawning mount(8): it needs no option
escaping, has no page-size limit on the layer list (M2), and costs one process less
per Mount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# x86_64 and aarch64 share these numbers (the new mount calls were added to every
# architecture with the same numbers).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_MOUNT_SETATTR = 442
SYS_OPENAT2 = 437
SYS_STATX = 332 if os.uname().machine == "x86_64" else 291

FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_BENEATH = 0x200  # kernel >= 6.5 (M10)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
STATX_MNT_ID = 0x1000
STATX_ATTR_MOUNT_ROOT = 0x2000


class SyscallError(OSError):
    """An OSError that also carries what the kernel logged on the fs context."""

    def __init__(self, err: int, call: str, detail: str = "") -> None:
        message = f"{call}: {os.strerror(err)}"
        if detail:
            message += f" ({detail})"
        super().__init__(err, message)
        self.detail = detail


def _check(result: int, call: str, log_fd: int | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        detail = read_fs_log(log_fd) if log_fd is not None else ""
        raise SyscallError(err, call, detail)
    return result


def read_fs_log(fd: int) -> str:
    """Drain the messages the kernel queued on an fs context (e.g. overlayfs' reasons)."""
    messages = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        # Each message is "e|w|i <text>"; keep the text.
        messages.append(data.decode(errors="replace").split(" ", 1)[-1].strip())
    return "; ".join(messages)


def fsopen(fstype: str) -> int:
    return _check(_syscall(SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), "fsopen")


def fsconfig_string(fd: int, key: str, value: str) -> None:
    _check(
        _syscall(SYS_FSCONFIG, fd, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0),
        f"fsconfig {key}",
        fd,
    )


def fsconfig_fd(fd: int, key: str, value_fd: int) -> None:
    """Give a layer as an open directory: overlayfs takes lowerdir+/upperdir/workdir this way (6.13+)."""
    _check(_syscall(SYS_FSCONFIG, fd, FSCONFIG_SET_FD, key.encode(), None, value_fd), f"fsconfig {key}", fd)


def fsconfig_flag(fd: int, key: str) -> None:
    _check(_syscall(SYS_FSCONFIG, fd, FSCONFIG_SET_FLAG, key.encode(), None, 0), f"fsconfig {key}", fd)


def fsconfig_create(fd: int) -> None:
    _check(_syscall(SYS_FSCONFIG, fd, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig create", fd)


def fsmount(fd: int, attr_flags: int) -> int:
    return _check(_syscall(SYS_FSMOUNT, fd, FSMOUNT_CLOEXEC, attr_flags), "fsmount", fd)


def open_tree_clone(path: str) -> int:
    return _check(
        _syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        "open_tree",
    )


def open_tree_clone_fd(dir_fd: int) -> int:
    return _check(
        _syscall(SYS_OPEN_TREE, dir_fd, b"", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH),
        "open_tree",
    )


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_dir_nofollow(path: str, dir_fd: int = AT_FDCWD) -> int:
    """An O_PATH descriptor of a directory reached through no symlink at all.

    openat2's RESOLVE_NO_SYMLINKS refuses a symlink in any component (ELOOP), and
    O_NOFOLLOW|O_DIRECTORY refuses one as the last (ENOTDIR), so a caller who swaps a
    component for a symlink gets an error, never another directory.
    """
    how = _OpenHow(
        os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
    )
    result = _syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return result


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(
        _syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
        "mount_setattr",
    )


def move_mount(mount_fd: int, target: str) -> None:
    _check(
        _syscall(SYS_MOVE_MOUNT, mount_fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
        "move_mount",
    )


def move_mount_to_fd(mount_fd: int, target_fd: int) -> None:
    """Attach a detached mount onto an already opened directory, not onto a path name."""
    _check(
        _syscall(SYS_MOVE_MOUNT, mount_fd, b"", target_fd, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        "move_mount",
    )


def move_mount_beneath(mount_fd: int, target_fd: int) -> None:
    """Attach a detached mount beneath the mount on top of ``target_fd`` (M10).

    ``target_fd`` must be open on the root of that top mount; once the top is detached,
    the new mount shows at the same place with no empty moment in between.
    """
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH | MOVE_MOUNT_BENEATH
    _check(_syscall(SYS_MOVE_MOUNT, mount_fd, b"", target_fd, b"", flags), "move_mount beneath")


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel, e.g. (6, 18) for 6.18.0-1-amd64."""
    numbers = os.uname().release.split("-")[0].split(".")
    return int(numbers[0]), int(numbers[1]) if len(numbers) > 1 and numbers[1].isdigit() else 0


def umount(target: str, lazy: bool = False) -> None:
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise SyscallError(err, "umount2")


def mount_identity(path: str, dir_fd: int = AT_FDCWD) -> tuple[int, bool]:
    """Return (kernel mount id, whether ``path`` is the root of a mount).

    statx answers both in one call where /proc/self/mountinfo would need a parse of
    every mount on the system. With ``path`` "" it asks about ``dir_fd`` itself.
    """
    buf = ctypes.create_string_buffer(256)
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if not path else 0)
    _check(
        _syscall(SYS_STATX, dir_fd, os.fsencode(path), flags, STATX_MNT_ID, buf),
        "statx",
    )
    (attributes,) = struct.unpack_from("=Q", buf.raw, 8)
    (attributes_mask,) = struct.unpack_from("=Q", buf.raw, 0x38)
    (mnt_id,) = struct.unpack_from("=Q", buf.raw, 0x90)
    if not attributes_mask & STATX_ATTR_MOUNT_ROOT:
        raise SyscallError(errno.ENOTSUP, "statx", "kernel does not report STATX_ATTR_MOUNT_ROOT")
    return mnt_id, bool(attributes & STATX_ATTR_MOUNT_ROOT)
