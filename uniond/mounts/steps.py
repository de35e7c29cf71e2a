"""The kernel's part of a Mount and of an Unmount, as the manager runs them in a worker
thread (or in place when the call is alone).

A Mount's part comes after its intent is durable (C1): first the daemon-made workdir
with its marker and the runtime mark (C4), so that a crash at any later step leaves
something a start recognises, then the daemon-made mountpoint and the mount itself,
through the directories the plan holds open. An Unmount's part turns the kernel's
answer into the error a caller can act on (Busy naming the holders).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os

from uniond.errors import Busy, Failed, NotRecorded
from uniond.kernel import holders, syscalls
from uniond.kernel import overlay as engine
from uniond.mounts import crash, plan
from uniond.mounts.marks import WORKDIR_MARKER, Marks, write_workdir_marker
from uniond.mounts.records import MountRecord

log = logging.getLogger("uniond.mounts.manager")


def attach(checked: plan.Plan, marks: Marks) -> MountRecord:
    """The kernel's part of a Mount (in a thread): what the daemon makes for it, its
    marks, then the mount; returns the record with the kernel's mount id, its mark
    brought up to date."""
    record, spec = checked.record, checked.record.spec
    opened: list[int] = []
    try:
        workdir_fd = checked.workdir.fd if checked.workdir is not None else None
        if record.workdir_created:
            assert checked.upper_parent is not None
            name = os.path.basename(spec.workdir)
            os.mkdir(name, 0o700, dir_fd=checked.upper_parent)
            workdir_fd = syscalls.open_dir_nofollow(name, checked.upper_parent)
            opened.append(workdir_fd)
            crash.point("mount.workdir-made")
            write_workdir_marker(workdir_fd, record)
        try:
            marks.put(record)
        except OSError as e:
            raise NotRecorded(f"uniond could not mark the mount in {marks.directory} ({e.strerror}), "
                              "so it made none") from None
        crash.point("mount.marked")
        if record.mountpoint_created:
            try:
                os.mkdir(spec.mountpoint, 0o755)
            except FileNotFoundError:  # the first since the runtime directory was made
                os.makedirs(os.path.dirname(spec.mountpoint), mode=0o755, exist_ok=True)
                os.mkdir(spec.mountpoint, 0o755)
            mountpoint_fd = syscalls.open_dir_nofollow(spec.mountpoint)
            opened.append(mountpoint_fd)
        else:
            assert checked.mountpoint is not None
            mountpoint_fd = checked.mountpoint.fd
        fds = engine.LayerFds(
            lowers=tuple(h.fd for h in checked.lowers),
            upper=checked.upper.fd if checked.upper is not None else None,
            workdir=workdir_fd,
            mountpoint=mountpoint_fd,
        )
        made = dataclasses.replace(record, mnt_id=engine.mount(spec, fds))
        crash.point("mount.attached")
        marks.refresh(made)
        return made
    finally:
        for fd in opened:
            os.close(fd)


def take_off(record: MountRecord, lazy: bool) -> None:
    """The kernel's part of an Unmount (in a thread, or in place).

    A daemon-made workdir's marker goes just before the unmount: the unmount syncs the
    upper's filesystem (overlayfs' sync_fs), which would otherwise write the marker's
    page out only for it to be freed (on a disk mounted with discard: discarded) a
    moment later. Meanwhile the journal and the runtime mark still name the mount (C1,
    C4; the fault harness kills the daemon right there); if the kernel refuses the
    unmount, the marker is written again.
    """
    mount_id, mountpoint = record.id, record.spec.mountpoint
    marker_gone = record.workdir_created and not record.detached and _drop_workdir_marker(record)
    if marker_gone:
        crash.point("unmount.marker-dropped")
    try:
        engine.unmount(mountpoint, lazy, record.mnt_id)
    except OSError as e:
        if marker_gone and e.errno not in (errno.EINVAL, errno.ENOENT):
            _restore_workdir_marker(record)
        if e.errno == errno.EBUSY:
            users = ", ".join(str(h) for h in holders.find(mountpoint)) or "no process found"
            raise Busy(
                f"mount {mount_id} at {mountpoint} is busy, used by: {users}; "
                "stop them or pass lazy=true to detach it now"
            ) from None
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            raise Failed(f"unmounting {mountpoint} failed: {e.strerror}") from e
        log.warning("mount %s: was already unmounted behind the daemon's back", mount_id)
    crash.point("unmount.unmounted")


def _drop_workdir_marker(record: MountRecord) -> bool:
    """Remove the marker from the daemon-made workdir; False if it could not be."""
    try:
        fd = syscalls.open_dir_nofollow(record.spec.workdir)
    except OSError:
        return False
    try:
        os.unlink(WORKDIR_MARKER, dir_fd=fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _restore_workdir_marker(record: MountRecord) -> None:
    try:
        fd = syscalls.open_dir_nofollow(record.spec.workdir)
        try:
            write_workdir_marker(fd, record)
        finally:
            os.close(fd)
    except OSError as e:  # the journal and the runtime mark still know the mount
        log.warning("mount %s: its workdir's marker could not be written again: %s", record.id, e)
