"""The mount engine: makes and removes overlay mounts with the kernel.

It knows nothing of callers, records or D-Bus; it gets a checked MountSpec and talks
to the kernel. Every rule cited (M*, C*) is in shared/overlay-facts.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from uniond.kernel import mountinfo, syscalls

# M8: with these, the upper refers to nothing outside itself, so Diff can read it alone.
_DIFFABLE_OPTIONS = (("redirect_dir", "off"), ("metacopy", "off"), ("index", "off"))
_KERNEL_WORKDIR_ENTRIES = ("work", "index")  # what overlayfs creates in a workdir (M5)
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a directory, never through a symlink


@dataclass(frozen=True, slots=True)
class MountSpec:
    """Everything the kernel needs to make one overlay (or one-lower bind) mount.

    Slotted, as MountRecord: a daemon holds one per live mount (10,000 and more).
    """

    lowerdirs: tuple[str, ...]  # top-most first, as overlayfs' lowerdir=
    upperdir: str  # "" = read-only mount
    workdir: str  # "" when there is no upper
    mountpoint: str
    readonly: bool
    volatile: bool = False
    dev: bool = False  # device files honoured (root asked); nodev otherwise
    suid: bool = False  # setuid bits honoured (root asked); nosuid otherwise


@dataclass(frozen=True)
class LayerFds:
    """The directories of a MountSpec, already opened (O_PATH) by whoever checked them.

    Mounting through these descriptors, not through the paths, means that a rename or
    a symlink swapped in after the checks cannot redirect the mount (FSCONFIG_SET_FD
    for the layers, MOVE_MOUNT_T_EMPTY_PATH for the target).
    """

    lowers: tuple[int, ...]
    upper: int | None
    workdir: int | None
    mountpoint: int


def mount(spec: MountSpec, fds: LayerFds | None = None) -> int:
    """Mount ``spec`` at its mountpoint and return the kernel's mount id."""
    if fds is None:
        with _opened(spec) as opened:
            return mount(spec, opened)
    mount_fd = _build(spec, fds)
    try:
        return _attach(mount_fd, fds.mountpoint)
    finally:
        os.close(mount_fd)


def replace(spec: MountSpec, fds: LayerFds, old_mnt_id: int, between: Callable[[], None] | None = None) -> int:
    """Put a new overlay for ``spec`` in place of the mount ``old_mnt_id`` with no gap.

    The new mount goes beneath the old one on the same mountpoint (M10), then the old
    one is detached (lazily: processes inside keep their view until they leave), so a
    process looking at the mountpoint sees the old tree or the new one, never the
    empty directory below. ``fds.mountpoint`` must be open on the old mount's root.
    Returns the new mount's id; if the kernel refuses the new overlay, the old mount
    is left exactly as it was. ``between`` runs between the two steps (the fault
    harness kills the daemon there).
    """
    on_top = syscalls.mount_identity("", fds.mountpoint)
    if on_top != (old_mnt_id, True):
        raise OSError(errno.ESTALE, f"mount {old_mnt_id} is no longer on top of {spec.mountpoint}")
    mount_fd = _build(spec, fds)
    try:
        new_mnt_id = syscalls.mount_identity("", mount_fd)[0]
        syscalls.move_mount_beneath(mount_fd, fds.mountpoint)
    finally:
        os.close(mount_fd)
    if between is not None:
        between()
    unmount(spec.mountpoint, lazy=True, mnt_id=old_mnt_id)
    return new_mnt_id


def _build(spec: MountSpec, fds: LayerFds) -> int:
    """A detached mount of ``spec`` (an fd that the caller attaches and closes)."""
    attrs = 0 if spec.dev else syscalls.MOUNT_ATTR_NODEV
    attrs |= 0 if spec.suid else syscalls.MOUNT_ATTR_NOSUID
    if spec.readonly:
        attrs |= syscalls.MOUNT_ATTR_RDONLY
    layers = list(fds.lowers)
    if spec.upperdir and spec.readonly:
        # A read-only view of a writable layer: the upper becomes the top-most lower,
        # its whiteouts and opaque directories still apply, and no workdir is needed.
        assert fds.upper is not None
        layers.insert(0, fds.upper)
    if len(layers) == 1 and not (spec.upperdir and not spec.readonly):
        # M4: the kernel refuses a one-layer read-only overlay; a read-only bind mount
        # shows the same thing.
        mount_fd = syscalls.open_tree_clone_fd(layers[0])
        try:
            syscalls.mount_setattr(mount_fd, attrs)
        except BaseException:
            os.close(mount_fd)
            raise
        return mount_fd

    fs_fd = syscalls.fsopen("overlay")
    try:
        for layer in layers:
            syscalls.fsconfig_fd(fs_fd, "lowerdir+", layer)
        if spec.upperdir and not spec.readonly:
            assert fds.upper is not None and fds.workdir is not None
            syscalls.fsconfig_fd(fs_fd, "upperdir", fds.upper)
            syscalls.fsconfig_fd(fs_fd, "workdir", fds.workdir)
            for key, value in _DIFFABLE_OPTIONS:
                syscalls.fsconfig_string(fs_fd, key, value)
            if spec.volatile:
                syscalls.fsconfig_flag(fs_fd, "volatile")
        syscalls.fsconfig_create(fs_fd)
        return syscalls.fsmount(fs_fd, attrs)
    finally:
        os.close(fs_fd)


def _attach(mount_fd: int, target_fd: int) -> int:
    """Move a detached mount onto the target; its id, read before, names what was made."""
    mnt_id = syscalls.mount_identity("", mount_fd)[0]
    syscalls.move_mount_to_fd(mount_fd, target_fd)
    return mnt_id


@contextlib.contextmanager
def _opened(spec: MountSpec) -> Iterator[LayerFds]:
    """For callers with only a spec (the daemon's own, already checked paths)."""
    with contextlib.ExitStack() as stack:

        def open_(path: str) -> int:
            fd = syscalls.open_dir_nofollow(path)
            stack.callback(os.close, fd)
            return fd

        yield LayerFds(
            lowers=tuple(open_(p) for p in spec.lowerdirs),
            upper=open_(spec.upperdir) if spec.upperdir else None,
            workdir=open_(spec.workdir) if spec.workdir else None,
            mountpoint=open_(spec.mountpoint),
        )


def unmount(mountpoint: str, lazy: bool = False, mnt_id: int = 0) -> None:
    """Unmount the mount ``mnt_id`` (when known) that was made at ``mountpoint``.

    A path's owner can swap one of its parent directories for a symlink, which umount2
    would follow to someone else's mount. So the parent is opened without symlinks, the
    mount under it is checked to be ``mnt_id``, and the unmount names it through that
    open parent; a mountpoint itself cannot be renamed meanwhile (EBUSY). If the path no
    longer leads to the mount (its directory was moved), the kernel's table says where
    it went. ENOENT means the mount is gone or cannot be reached without symlinks.
    """
    if not mnt_id:
        syscalls.umount(mountpoint, lazy=lazy)
        return

    def candidates() -> Iterator[str]:
        yield mountpoint
        # Read only when needed: the table is long, and the mount is nearly always there.
        yield from (e.mountpoint for e in mountinfo.read() if e.mnt_id == mnt_id)

    for path in candidates():
        parent, name = os.path.split(path)
        try:
            parent_fd = syscalls.open_dir_nofollow(parent)
        except OSError:
            continue
        try:
            try:
                found, is_root = syscalls.mount_identity(name, parent_fd)
            except OSError:
                continue
            if found == mnt_id and is_root:
                syscalls.umount(f"/proc/self/fd/{parent_fd}/{name}", lazy=lazy)
                return
        finally:
            os.close(parent_fd)
    raise OSError(errno.ENOENT, f"mount {mnt_id} is not at {mountpoint} nor anywhere reachable without symlinks")


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


def is_mount_root(path: str) -> bool:
    return syscalls.mount_identity(path)[1]


def clear_workdir(workdir: str, remove_dir: bool, marker: str = "") -> None:
    """Remove what overlayfs put in ``workdir`` and, if the daemon made it, the directory
    (and the ``marker`` file it left there, C4).

    The workdir is opened without symlinks and its entries removed through that
    descriptor. The kernel's own entries are nearly always empty directories, which one
    rmdir removes whatever their mode (it needs the parent's permission, not theirs) and
    which fails on a mount point (EBUSY); only one that holds something is removed
    recursively, never across a mount (C4), after fixing the mode-000 the kernel gives
    them (C5). The directory itself goes by rmdir, so anything a user put there makes
    this fail loudly instead of vanishing.
    """
    try:
        fd = syscalls.open_dir_nofollow(workdir)
    except FileNotFoundError:
        return
    try:
        for name in _KERNEL_WORKDIR_ENTRIES:
            try:
                os.rmdir(name, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                continue  # not the kernel's: a user's file stays (and a made workdir's rmdir says so)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                _remove_tree_at(fd, name, os.fstat(fd).st_dev, workdir)
        if remove_dir and marker:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker, dir_fd=fd)
    finally:
        os.close(fd)
    if remove_dir:
        os.rmdir(workdir)


def empty_directory(root: str) -> None:
    """Remove everything below ``root`` and keep ``root`` itself (a failed ImportLayer or
    Commit undone), never across a mount (C4); a workdir's kernel entries go the same way.

    Everything goes through directory descriptors, never a path: whoever can write
    below ``root`` may swap a directory for a symlink meanwhile, and a symlink is only
    ever removed, never followed. An entry on another device, or a directory that is
    the root of a mount (a bind mount of the same file system), stops the removal with
    an error before anything of that mount is touched.
    """
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # often /proc/self/fd/N/.
    try:
        _empty_at(fd, os.fstat(fd).st_dev, root)
    finally:
        os.close(fd)


def _empty_at(fd: int, dev: int, where: str) -> None:
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        names = os.listdir(listing)
    finally:
        os.close(listing)
    for name in names:
        _remove_tree_at(fd, name, dev, where)


def _remove_tree_at(dir_fd: int, name: str, dev: int, where: str) -> None:
    """Remove the entry ``name`` of the directory ``dir_fd`` and all below it."""
    path = f"{where}/{name}"
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if st.st_dev != dev:
        raise OSError(errno.EXDEV, f"{path} is on another file system; not removing it")
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_PATH, dir_fd=dir_fd)
    try:
        if syscalls.mount_identity("", fd)[1]:
            raise OSError(errno.EBUSY, f"{path} is a mount point; not removing it")
        os.chmod(f"/proc/self/fd/{fd}", 0o700)  # C5: work/ and index/ come with mode 000
        _empty_at(fd, dev, path)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
