"""Making the record agree with the kernel after a start (C3), and cleaning after mounts.

The kernel's table is the truth: a recorded mount that is still there is adopted, one
that is gone has what the daemon made for it removed (its workdir and a daemon-made
mountpoint, C4), and the caller's layers are never touched.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from uniond.kernel import holders, mountinfo
from uniond.kernel import overlay as engine
from uniond.mounts.journal import StateStore
from uniond.mounts.records import MountRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    adopted: tuple[str, ...]
    cleaned: tuple[str, ...]
    kept: tuple[str, ...]  # cleanup failed; retried at the next start


@dataclass(frozen=True)
class Outcome:
    """What reconciliation found: the mounts still live and those whose cleanup waits."""

    live: dict[str, MountRecord]
    stale: dict[str, MountRecord]
    report: ReconcileReport


def reconcile(
    store: StateStore, boot_id: str, progress: Callable[[], None] | None = None
) -> Outcome:
    """``progress`` is called about once a second while this runs long, so that the
    daemon can ask systemd for more start-up time."""
    recorded = store.load()
    table = mountinfo.read()
    at = {e.mountpoint: e for e in table}  # the last (top-most) mount wins
    in_table = {e.mnt_id for e in table}
    workdirs_in_use = {w for e in table if e.fstype == "overlay" for w in e.option_values("workdir")}
    # M12: a mount of this boot that is in no table but still held by a process was
    # detached by a lazy Unmount (perhaps just before a crash): it lives on, so does
    # its workdir.
    maybe_detached = {
        r.mnt_id for r in recorded.values()
        if r.boot_id == boot_id and r.mnt_id and r.mnt_id not in in_table
    }
    held = holders.holding(maybe_detached)
    live: dict[str, MountRecord] = {}
    stale: dict[str, MountRecord] = {}
    adopted, cleaned, kept = [], [], []
    last_progress = time.monotonic()
    for record in recorded.values():
        if progress is not None and time.monotonic() - last_progress > 1:
            progress()
            last_progress = time.monotonic()
        entry = at.get(record.spec.mountpoint)
        if record.boot_id == boot_id and record.mnt_id in held:
            record = dataclasses.replace(record, detached=True)
            live[record.id] = record
            adopted.append(record.id)
            log.info("mount %s: adopted as detached, still used by %s", record.id,
                     ", ".join(map(str, held[record.mnt_id])))
        elif record.boot_id == boot_id and entry is not None and not record.detached and is_ours(record, entry):
            record = dataclasses.replace(record, mnt_id=entry.mnt_id)
            live[record.id] = record
            adopted.append(record.id)
            log.info("mount %s: adopted at %s (kernel mount %d)", record.id, record.spec.mountpoint, entry.mnt_id)
        elif record.spec.workdir in workdirs_in_use:
            stale[record.id] = record
            kept.append(record.id)
            log.warning(
                "mount %s: gone, but its workdir %s is used by another overlay; kept",
                record.id, record.spec.workdir,
            )
        elif cleanup(store, record):
            cleaned.append(record.id)
        else:
            stale[record.id] = record
            kept.append(record.id)
    store.compact({**stale, **live})
    return Outcome(live, stale, ReconcileReport(tuple(adopted), tuple(cleaned), tuple(kept)))


def is_ours(record: MountRecord, entry: mountinfo.MountEntry) -> bool:
    if record.mnt_id:
        return entry.mnt_id == record.mnt_id
    # A crash between mount and the record's completion: recognise it by its layers.
    spec = record.spec
    if spec.upperdir and not spec.readonly:
        return entry.fstype == "overlay" and entry.option_values("upperdir") == [spec.upperdir]
    lowers = entry.option_values("lowerdir")
    return entry.fstype == "overlay" and lowers[-len(spec.lowerdirs) :] == list(spec.lowerdirs)


def cleanup(store: StateStore, record: MountRecord) -> bool:
    """Remove what the daemon made for a mount that is gone; False if it must be retried."""
    spec = record.spec
    try:
        if spec.workdir:
            engine.clear_workdir(spec.workdir, remove_dir=record.workdir_created)
        if record.mountpoint_created and os.path.isdir(spec.mountpoint):
            if engine.is_mount_root(spec.mountpoint):
                raise OSError(errno.EBUSY, f"{spec.mountpoint} is still a mount point")
            os.rmdir(spec.mountpoint)
    except OSError as e:
        log.warning("mount %s: cleanup failed, will retry at next start: %s", record.id, e)
        return False
    if spec.volatile:
        # M6: after a crash the upper of a volatile mount may be incomplete.
        log.warning("mount %s: was volatile; its upper %s may be inconsistent", record.id, spec.upperdir)
    log.info("mount %s: gone; cleaned its workdir and daemon-made mountpoint", record.id)
    store.drop(record.id)
    return True
