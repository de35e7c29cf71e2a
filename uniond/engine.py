"""The mount engine: makes and removes overlay mounts with the kernel.

It knows nothing of callers, records or D-Bus; it gets a checked MountSpec and talks
to the kernel. Every rule cited (M*, C*) is in shared/overlay-facts.md.
"""

from __future__ import annotations

import errno
import os
import stat

from uniond import syscalls
from uniond.records import MountSpec

# M8: with these, the upper refers to nothing outside itself, so Diff can read it alone.
_DIFFABLE_OPTIONS = (("redirect_dir", "off"), ("metacopy", "off"), ("index", "off"))
_KERNEL_WORKDIR_ENTRIES = ("work", "index")  # what overlayfs creates in a workdir (M5)


def mount(spec: MountSpec) -> int:
    """Mount ``spec`` at its mountpoint and return the kernel's mount id."""
    attrs = syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOSUID
    if spec.readonly:
        attrs |= syscalls.MOUNT_ATTR_RDONLY
    layers = list(spec.lowerdirs)
    if spec.upperdir and spec.readonly:
        # A read-only view of a writable layer: the upper becomes the top-most lower,
        # its whiteouts and opaque directories still apply, and no workdir is needed.
        layers.insert(0, spec.upperdir)
    if len(layers) == 1 and not (spec.upperdir and not spec.readonly):
        # M4: the kernel refuses a one-layer read-only overlay; a read-only bind mount
        # shows the same thing.
        mount_fd = syscalls.open_tree_clone(layers[0])
        try:
            syscalls.mount_setattr(mount_fd, attrs)
            syscalls.move_mount(mount_fd, spec.mountpoint)
        finally:
            os.close(mount_fd)
        return syscalls.mount_identity(spec.mountpoint)[0]

    fs_fd = syscalls.fsopen("overlay")
    try:
        for layer in layers:
            syscalls.fsconfig_string(fs_fd, "lowerdir+", layer)
        if spec.upperdir and not spec.readonly:
            syscalls.fsconfig_string(fs_fd, "upperdir", spec.upperdir)
            syscalls.fsconfig_string(fs_fd, "workdir", spec.workdir)
            for key, value in _DIFFABLE_OPTIONS:
                syscalls.fsconfig_string(fs_fd, key, value)
            if spec.volatile:
                syscalls.fsconfig_flag(fs_fd, "volatile")
        syscalls.fsconfig_create(fs_fd)
        mount_fd = syscalls.fsmount(fs_fd, attrs)
        try:
            syscalls.move_mount(mount_fd, spec.mountpoint)
        finally:
            os.close(mount_fd)
    finally:
        os.close(fs_fd)
    return syscalls.mount_identity(spec.mountpoint)[0]


def set_readonly(mountpoint: str, readonly: bool) -> None:
    """Freeze or thaw writers of one mount (this mount only, not the superblock).

    The kernel refuses to freeze (EBUSY) while a file is open for writing through it.
    """
    fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if readonly:
            syscalls.mount_setattr(fd, syscalls.MOUNT_ATTR_RDONLY)
        else:
            syscalls.mount_setattr(fd, 0, syscalls.MOUNT_ATTR_RDONLY)
    finally:
        os.close(fd)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    syscalls.umount(mountpoint, lazy=lazy)


def is_mount_root(path: str) -> bool:
    return syscalls.mount_identity(path)[1]


def clear_workdir(workdir: str, remove_dir: bool) -> None:
    """Remove what overlayfs put in ``workdir`` and, if the daemon made it, the directory.

    Only the kernel's own entries are removed recursively, never across a mount (C4),
    after fixing the mode-000 the kernel gives them (C5). The directory itself goes by
    rmdir, so anything a user put there makes this fail loudly instead of vanishing.
    """
    try:
        top = os.lstat(workdir)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        raise OSError(errno.ENOTDIR, f"workdir {workdir} is no longer a directory")
    for name in _KERNEL_WORKDIR_ENTRIES:
        path = os.path.join(workdir, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(path, top.st_dev)
    if remove_dir:
        os.rmdir(workdir)


def _remove_tree(path: str, dev: int) -> None:
    if is_mount_root(path):
        raise OSError(errno.EBUSY, f"{path} is a mount point; not removing it")
    os.chmod(path, 0o700)
    with os.scandir(path) as entries:
        children = list(entries)
    for entry in children:
        st = entry.stat(follow_symlinks=False)
        if st.st_dev != dev:
            raise OSError(errno.EXDEV, f"{entry.path} is on another filesystem; not removing it")
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(entry.path, dev)
        else:
            os.unlink(entry.path)
    os.rmdir(path)
