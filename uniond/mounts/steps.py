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
from uniond.mounts.marks import Marks, write_workdir_marker
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
    """The kernel's part of an Unmount (in a thread, or in place)."""
    mount_id, mountpoint = record.id, record.spec.mountpoint
    try:
        engine.unmount(mountpoint, lazy, record.mnt_id)
    except OSError as e:
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
