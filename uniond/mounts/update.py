"""Update: a live mount's lower layers replaced with no moment of an empty mountpoint.

The new overlay is built on the same upper, workdir and mountpoint and attached
beneath the old one (M10); the old one is then detached. A writable mount is made
read-only first, as Commit's freeze does, so that the upper is never written through
two overlays at once (M7): the new overlay starts on an upper nobody writes, and
processes still inside the old one keep a read-only view until they leave. If the
kernel refuses the new stack, the old mount is made writable again and stays.

The manager (``MountManager.update``) calls in here; a changed declared mount uses
``swap`` the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from uniond.access import paths, reach
from uniond.access.caller import Caller
from uniond.access.paths import OpenDir
from uniond.constants import ACTION_MOUNT, ACTION_MOUNT_ANY, ACTION_UNMOUNT_OTHER
from uniond.errors import Busy, Failed, InvalidArgument, NotSupported
from uniond.kernel import holders, syscalls
from uniond.kernel import overlay as engine
from uniond.mounts import crash, options, plan
from uniond.mounts.plan import MAX_LOWERS
from uniond.mounts.records import MountRecord

if TYPE_CHECKING:
    from uniond.mounts.manager import MountManager

log = logging.getLogger(__name__)

BENEATH_SINCE = (6, 5)  # MOVE_MOUNT_BENEATH (M10)


def check_kernel() -> None:
    if syscalls.kernel_version() < BENEATH_SINCE:
        raise NotSupported(
            f"Update needs move_mount(MOVE_MOUNT_BENEATH), kernel {'.'.join(map(str, BENEATH_SINCE))} or later; "
            f"this kernel is {os.uname().release}. Unmount and Mount again instead"
        )


def check_count(lowerdirs: Sequence[str]) -> None:
    if not lowerdirs:
        raise InvalidArgument("lowerdirs: give at least one lower directory")
    if len(lowerdirs) > MAX_LOWERS:
        raise InvalidArgument(f"lowerdirs: {len(lowerdirs)} given; the kernel stacks at most {MAX_LOWERS}")


def open_lowers(
    manager: MountManager, held: contextlib.ExitStack, record: MountRecord, lowerdirs: Sequence[str]
) -> tuple[OpenDir, ...]:
    """The new lowers, checked as Mount checks them, against the mount's other layers."""
    for i, p in enumerate(lowerdirs):
        paths.canonical(f"lowerdirs[{i}]", p)
    lowers = tuple(manager.places.open(held, f"lowerdirs[{i}]", p) for i, p in enumerate(lowerdirs))
    if len({h.path for h in lowers}) != len(lowers) or len({(h.st.st_dev, h.st.st_ino) for h in lowers}) != len(
        lowers
    ):
        raise InvalidArgument("lowerdirs: the same directory is given twice")
    spec = record.spec
    named = {h.argument: h.path for h in lowers}
    named.update({k: v for k, v in (("upperdir", spec.upperdir), ("workdir", spec.workdir),
                                     ("mountpoint", spec.mountpoint)) if v})
    paths.refuse_nesting(named)
    return lowers


async def update(
    manager: MountManager, mount_id: str, lowerdirs: Sequence[str], caller: Caller, opts: dict[str, Any]
) -> MountRecord:
    opts = options.check("Update", opts, options.UPDATE_OPTIONS)
    check_count(lowerdirs)
    record = manager.get(mount_id)
    if record.detached:
        raise InvalidArgument(f"mount {mount_id} was unmounted lazily and is kept only for the processes still in it")
    with contextlib.ExitStack() as held:
        lowers = open_lowers(manager, held, record, lowerdirs)
        joined = ":".join(plan.escape(h.path) for h in lowers)
        own = caller.uid == record.owner
        if not own:
            await manager.authorize(caller, ACTION_UNMOUNT_OTHER, opts, record)
        readable = all(reach.can_read(caller, h.path, h.st) for h in lowers)
        action = ACTION_MOUNT if own and readable else ACTION_MOUNT_ANY
        await manager.authorize(caller, action, opts, record, lowerdirs=joined)
        # No await from here on; the mount may have changed or gone meanwhile.
        current = manager.get(mount_id)
        if current.spec != record.spec or current.mnt_id != record.mnt_id:
            raise Busy(f"mount {mount_id} was changed by another call meanwhile; try again")
        new_spec = dataclasses.replace(record.spec, lowerdirs=tuple(h.path for h in lowers))
        return swap(manager, current, dataclasses.replace(current, spec=new_spec), tuple(h.fd for h in lowers))


def swap(manager: MountManager, old: MountRecord, new: MountRecord, lower_fds: tuple[int, ...]) -> MountRecord:
    """Replace ``old``'s mount by one of ``new``'s spec (same upper, workdir and
    mountpoint), keep the record's id, and tell the listeners what changed."""
    check_kernel()
    if manager.claims.in_use(old.id):
        raise Busy(f"mount {old.id} is being exported or committed; update it when that has finished")
    spec = old.spec
    writable = bool(spec.upperdir) and not spec.readonly
    if writable:
        _freeze(old)
    try:
        with contextlib.ExitStack() as held:

            def open_(path: str) -> int:
                fd = syscalls.open_dir_nofollow(path)
                held.callback(os.close, fd)
                return fd

            fds = engine.LayerFds(
                lowers=lower_fds,
                upper=open_(spec.upperdir) if spec.upperdir else None,
                workdir=open_(spec.workdir) if spec.workdir else None,
                mountpoint=open_(spec.mountpoint),
            )
            # C1: durable before the change. The intent keeps the old stack's kernel id: a
            # crash before the swap finds that stack and adopts it (its lowers read back from
            # the kernel), one after it finds the new stack by its layers.
            manager.store.intend(dataclasses.replace(new, mnt_id=old.mnt_id))
            crash.point("update.intended")
            mnt_id = engine.replace(new.spec, fds, old.mnt_id, lambda: crash.point("update.beneath"))
            crash.point("update.replaced")
    except OSError as e:
        manager.store.update(old)  # the record stays as it was
        if writable:
            _thaw(old)
        if e.errno == errno.ESTALE:
            raise Failed(f"mount {old.id}: {e.strerror}; it was changed behind the daemon's back") from None
        raise Failed(f"the kernel refused the new stack of mount {old.id}: {e.strerror or e}") from None
    except BaseException:
        manager.store.update(old)
        if writable:
            _thaw(old)
        raise
    record = dataclasses.replace(new, mnt_id=mnt_id)
    log.info(
        "mount %s: lower layers replaced at %s without a gap (%d lowers, kernel mount %d)",
        record.id, spec.mountpoint, len(record.spec.lowerdirs), mnt_id,
    )
    changed = [name for name, a, b in (("LowerDirs", old.spec.lowerdirs, new.spec.lowerdirs),
                                       ("Options", old.options, new.options)) if a != b]
    manager.replaced(record, tuple(changed))
    return record


def _freeze(record: MountRecord) -> None:
    """M7: the old overlay stops writing before the new one uses the same upper."""
    try:
        engine.set_readonly(record.spec.mountpoint, True)
    except OSError as e:
        if e.errno == errno.EBUSY:
            users = ", ".join(str(h) for h in holders.find(record.spec.mountpoint)) or "no process found"
            raise Busy(
                f"mount {record.id} has files open for writing, so its upper cannot be handed to a new "
                f"stack; close them first (used by: {users})"
            ) from None
        raise Failed(f"could not make mount {record.id} read-only for Update: {e.strerror or e}") from e


def _thaw(record: MountRecord) -> None:
    try:
        engine.set_readonly(record.spec.mountpoint, False)
    except OSError as e:
        log.error("mount %s: could not make it writable again after a failed Update: %s", record.id, e)
