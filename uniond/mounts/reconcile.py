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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from uniond.kernel import holders, mountinfo
from uniond.kernel import overlay as engine
from uniond.mounts import crash
from uniond.mounts.journal import StateStore
from uniond.mounts.marks import WORKDIR_MARKER, Marks, marked_workdirs
from uniond.mounts.records import MountRecord

log = logging.getLogger(__name__)

_ADOPTIONS_LOGGED = 100  # at info level, one line each


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
    store: StateStore, marks: Marks, boot_id: str, progress: Callable[[], None] | None = None
) -> Outcome:
    """``progress`` is called about once a second while this runs long, so that the
    daemon can ask systemd for more start-up time."""
    recorded = store.load()
    crash.point("reconcile.loaded")
    table = mountinfo.read()
    # C4: what the journal lost (a damaged line, a full disk), the marks still know.
    marked = marks.load()
    for record in {**marked_workdirs(table), **marked}.values():
        if record.id not in recorded:
            recorded[record.id] = record
            log.warning("mount %s: not in the journal; recovered from its mark (%s)", record.id,
                        record.spec.mountpoint)
    at = _tops(table)
    stacked = Counter(e.mountpoint for e in table)
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
        if entry is not None and stacked[entry.mountpoint] > 1 and entry.mnt_id == record.mnt_id:
            entry = _finish_update(record, entry, [e for e in table if e.mountpoint == entry.mountpoint])
        live_here = entry is not None and not record.detached and is_ours(record, entry)
        # An Update's intent names the old stack, which its swap detached: when the new
        # stack is found at the mountpoint, that one is the mount.
        if record.boot_id == boot_id and record.mnt_id in held and not live_here:
            record = dataclasses.replace(record, detached=True)
            live[record.id] = record
            adopted.append(record.id)
            log.info("mount %s: adopted as detached, still used by %s", record.id,
                     ", ".join(map(str, held[record.mnt_id])))
        elif record.boot_id == boot_id and live_here:
            record = as_in_kernel(dataclasses.replace(record, mnt_id=entry.mnt_id), entry)
            live[record.id] = record
            if record.id in marked and marked[record.id] != record:
                # A crash between an Update's swap and its new mark left the old stack's
                # mark: were the journal lost later, that mark would no longer recognise
                # the mount (C4), so it is brought up to date now.
                marks.refresh(record)
            adopted.append(record.id)
            # The first ones at info; past that, a start with 10,000 mounts would write
            # 10,000 lines (a tenth of its time): the rest at debug, and the count at info.
            level = logging.INFO if len(adopted) <= _ADOPTIONS_LOGGED else logging.DEBUG
            log.log(level, "mount %s: adopted at %s (kernel mount %d)", record.id, record.spec.mountpoint,
                    entry.mnt_id)
            _thaw_if_frozen(record)
        elif record.spec.workdir in workdirs_in_use:
            stale[record.id] = record
            kept.append(record.id)
            log.warning(
                "mount %s: gone, but its workdir %s is used by another overlay; kept",
                record.id, record.spec.workdir,
            )
        elif cleanup(store, record, marks):
            cleaned.append(record.id)
            crash.point("reconcile.cleaned")
        else:
            stale[record.id] = record
            kept.append(record.id)
    if len(adopted) > _ADOPTIONS_LOGGED:
        log.info("%d more mounts adopted (each logged at debug level)", len(adopted) - _ADOPTIONS_LOGGED)
    _remove_unrecorded_mountpoints(os.path.dirname(marks.directory), {*live, *stale})
    store.compact({**stale, **live})
    return Outcome(live, stale, ReconcileReport(tuple(adopted), tuple(cleaned), tuple(kept)))


def is_ours(record: MountRecord, entry: mountinfo.MountEntry) -> bool:
    if record.mnt_id and entry.mnt_id == record.mnt_id:
        return True
    # A crash between mount (or an Update's swap) and the record's completion: the
    # kernel's id is not the recorded one, so recognise the mount by its layers.
    spec = record.spec
    if spec.upperdir and not spec.readonly:
        return entry.fstype == "overlay" and entry.option_values("upperdir") == [spec.upperdir]
    if len(spec.lowerdirs) == 1 and not spec.upperdir:
        # M4: a one-lower view is a bind clone, whose type is the lower's filesystem:
        # it is ours if its root is the lower directory itself.
        return _same_directory(spec.mountpoint, spec.lowerdirs[0])
    lowers = entry.option_values("lowerdir")  # and lowerdir+
    layers = [spec.upperdir, *spec.lowerdirs] if spec.upperdir else list(spec.lowerdirs)
    return entry.fstype == "overlay" and lowers[-len(layers) :] == layers


def as_in_kernel(record: MountRecord, entry: mountinfo.MountEntry) -> MountRecord:
    """The record with the lowers the kernel shows: an Update cut short by a crash
    leaves the record of one stack and the kernel holding the other, and the kernel's
    is what callers see."""
    if entry.fstype != "overlay":
        return record
    spec = record.spec
    shown = entry.option_values("lowerdir")
    if spec.upperdir and spec.readonly and shown[:1] == [spec.upperdir]:
        shown = shown[1:]  # a read-only view of a writable layer: the upper is the top lower
    if not shown or tuple(shown) == spec.lowerdirs:
        return record
    log.warning("mount %s: the kernel holds the lowers %s, not the recorded ones (an Update cut short); "
                "taking the kernel's", record.id, ":".join(shown))
    return dataclasses.replace(record, spec=dataclasses.replace(spec, lowerdirs=tuple(shown)))


def _tops(table: list[mountinfo.MountEntry]) -> dict[str, mountinfo.MountEntry]:
    """The mount a path shows, for each mountpoint: of mounts stacked on one path, the one
    no other of them is attached to (M10: a mount moved beneath another becomes its
    parent, so the table's order alone does not tell)."""
    tops: dict[str, mountinfo.MountEntry] = {}
    parents = {(e.mountpoint, e.parent_id) for e in table}
    for e in table:
        if e.mountpoint not in tops or (e.mountpoint, e.mnt_id) not in parents:
            tops[e.mountpoint] = e
    return tops


def _finish_update(
    record: MountRecord, top: mountinfo.MountEntry, stack: list[mountinfo.MountEntry]
) -> mountinfo.MountEntry:
    """An Update killed between its two steps leaves its new stack beneath the old one
    (M10), and its intent naming the old one: finish it, as the intent says, by
    detaching the old stack (lazily, as the Update would have)."""
    intent = dataclasses.replace(record, mnt_id=0)
    for e in stack:
        if e is not top and is_ours(intent, e):
            try:
                engine.unmount(record.spec.mountpoint, True, top.mnt_id)
            except OSError as err:
                log.warning("mount %s: an Update was cut short, and its old stack could not be detached: %s",
                            record.id, err)
                return top
            log.warning("mount %s: an Update was cut short between its two steps; finished it (the old stack "
                        "is detached, the new one is the mount)", record.id)
            return e
    return top


def _thaw_if_frozen(record: MountRecord) -> None:
    """A Commit cut short by a crash leaves its mount frozen (read-only): thaw it."""
    mountpoint = record.spec.mountpoint
    if record.spec.readonly or not os.statvfs(mountpoint).f_flag & os.ST_RDONLY:
        return
    try:
        engine.set_readonly(mountpoint, False)
        log.warning("mount %s: was left read-only by a Commit cut short; writable again", record.id)
    except OSError as e:
        log.warning("mount %s: left read-only by a Commit cut short, and could not be thawed: %s", record.id, e)


def _same_directory(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _remove_unrecorded_mountpoints(runtime_dir: str, known: set[str]) -> None:
    """Daemon-made mountpoints are named by their mount's id (C4): one that no record
    knows, empty and mounted on by nothing, is a leftover of a crash; rmdir only."""
    base = os.path.join(runtime_dir, "mounts")
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        if name in known or engine.is_mount_root(path):
            continue
        try:
            os.rmdir(path)
            log.info("removed the leftover daemon-made mountpoint %s", path)
        except OSError as e:
            log.warning("leftover daemon-made mountpoint %s not removed: %s", path, e)


def cleanup(store: StateStore, record: MountRecord, marks: Marks | None = None) -> bool:
    """Remove what the daemon made for a mount that is gone; False if it must be retried.

    The marks go before the record, so a crash in between never brings back a record."""
    if not remove_made(record, marks):
        return False
    store.drop(record.id)
    return True


def remove_made(record: MountRecord, marks: Marks | None = None) -> bool:
    """cleanup's part on the filesystem and the marks (no journal: safe in a thread of its own)."""
    spec = record.spec
    done: list[str] = []
    try:
        if spec.workdir:
            engine.clear_workdir(spec.workdir, remove_dir=record.workdir_created, marker=WORKDIR_MARKER)
            done.append(f"{'removed' if record.workdir_created else 'emptied'} the workdir {spec.workdir}")
        crash.point("cleanup.workdir-cleared")
        if record.mountpoint_created:
            try:
                os.rmdir(spec.mountpoint)  # EBUSY while still a mount point
                done.append(f"removed the mountpoint {spec.mountpoint} it had made")
            except (FileNotFoundError, NotADirectoryError):
                pass  # gone, or not the directory the daemon made: left alone
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise OSError(errno.EBUSY, f"{spec.mountpoint} is still a mount point") from None
                raise
        if marks is not None:
            marks.drop(record.id)
    except OSError as e:
        log.warning("mount %s: cleanup failed, will retry at next start: %s", record.id, e)
        return False
    if spec.volatile:
        # M6: after a crash the upper of a volatile mount may be incomplete.
        log.warning("mount %s: was volatile; its upper %s may be inconsistent", record.id, spec.upperdir)
    if not record.mountpoint_created:
        done.append(f"left the caller's mountpoint {spec.mountpoint}")
    # Say what was done: "cleaned its daemon-made mountpoint" for the caller's own
    # directory would send a reader looking for a deletion that never happened.
    log.info("mount %s: gone; %s", record.id, "; ".join(done) or "nothing to clean")
    return True
