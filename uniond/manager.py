"""The mount manager: owns the set of mounts, their record and their life cycle.

It checks requests, keeps the journal (C1), drives the engine, and tells listeners
about every change before the call that caused it returns (U3). It knows nothing of
D-Bus: callers are plain uids and errors are uniond.errors classes.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from uniond import diff, engine, holders, layerfs, layertar, mountinfo, options, paths, snapshot
from uniond.errors import AlreadyMounted, Busy, Failed, InvalidArgument, NotFound, NotPermitted
from uniond.records import MountRecord, MountSpec
from uniond.state import StateStore, boot_id

log = logging.getLogger(__name__)

MAX_LOWERS = 500  # M1: the kernel stacks at most 500 lowers


@dataclass(frozen=True)
class MountRequest:
    lowerdirs: tuple[str, ...]
    upperdir: str
    mountpoint: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ReconcileReport:
    adopted: tuple[str, ...]
    cleaned: tuple[str, ...]
    kept: tuple[str, ...]  # cleanup failed; retried at the next start


class MountListener(Protocol):
    def mount_added(self, record: MountRecord) -> None: ...

    def mount_removed(self, record: MountRecord) -> None: ...


class MountManager:
    def __init__(self, store: StateStore, runtime_dir: str) -> None:
        self.store = store
        self.runtime_dir = runtime_dir
        self.records: dict[str, MountRecord] = {}
        self._stale: dict[str, MountRecord] = {}  # gone from the kernel, cleanup pending
        self._listeners: list[MountListener] = []
        self._boot_id = boot_id()
        # Layer operations run in worker threads; these say what they are using.
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()  # mount id -> running exports/commits
        self._destdirs: set[str] = set()  # being filled by ImportLayer or Commit

    def subscribe(self, listener: MountListener) -> None:
        self._listeners.append(listener)

    # ---- queries -------------------------------------------------------------

    def get(self, mount_id: str) -> MountRecord:
        try:
            return self.records[mount_id]
        except KeyError:
            raise NotFound(f"no mount with id {mount_id!r}; ListMounts shows the current ones") from None

    def list(self) -> list[MountRecord]:
        return sorted(self.records.values(), key=lambda r: (r.created_us, r.id))

    def diff(self, mount_id: str, opts: dict[str, Any]) -> list[diff.Change]:
        options.check("Diff", opts, options.DIFF_OPTIONS)
        record = self.get(mount_id)
        return diff.changes(record.spec.upperdir, record.spec.lowerdirs)

    # ---- layers (run in worker threads) --------------------------------------------

    @staticmethod
    def _only_root(caller: int, what: str) -> None:
        if caller != 0:
            # Until callers are authorised per action (polkit), layers are root's alone.
            raise NotPermitted(f"only root may {what}; ask an administrator")

    @contextmanager
    def _using(self, mount_id: str) -> Iterator[MountRecord]:
        """Holds the mount against Unmount while a layer operation reads its upper."""
        with self._lock:
            record = self.get(mount_id)
            self._in_use[mount_id] += 1
        try:
            yield record
        finally:
            with self._lock:
                self._in_use[mount_id] -= 1
                if not self._in_use[mount_id]:
                    del self._in_use[mount_id]

    @contextmanager
    def _filling(self, destdir: str) -> Iterator[str]:
        """Checks ``destdir`` and claims it, so that two calls never fill it at once."""
        dest = paths.existing_dir("destdir", destdir)
        for record in list(self.records.values()):  # a copy: the event loop may change the dict
            spec = record.spec
            named = {"mountpoint": spec.mountpoint, "upperdir": spec.upperdir, "workdir": spec.workdir}
            named.update({f"lowerdirs[{i}]": p for i, p in enumerate(spec.lowerdirs)})
            for name, path in named.items():
                if path and (paths.inside(dest, path) or paths.inside(path, dest)):
                    raise InvalidArgument(
                        f"destdir {dest!r} overlaps the {name} {path!r} of mount {record.id}; "
                        "give a directory outside every mount's layers"
                    )
        with self._lock:
            if any(paths.inside(dest, d) or paths.inside(d, dest) for d in self._destdirs):
                raise Busy(f"destdir {dest!r} is already being filled by another call")
            self._destdirs.add(dest)
        try:
            yield dest
        finally:
            with self._lock:
                self._destdirs.discard(dest)

    def export_diff(self, mount_id: str, fd: int, opts: dict[str, Any], caller: int) -> layertar.ExportResult:
        opts = options.check("ExportDiff", opts, options.EXPORT_OPTIONS)
        self._only_root(caller, "export a mount's changes")
        with self._using(mount_id) as record:
            result = layertar.export_diff(record.spec.upperdir, fd, opts.get("compression", "none"))
        log.info("mount %s: exported %d entries, %d bytes", mount_id, result.entries, result.bytes)
        return result

    def import_layer(self, fd: int, destdir: str, opts: dict[str, Any], caller: int) -> layertar.ImportResult:
        opts = options.check("ImportLayer", opts, options.IMPORT_OPTIONS)
        self._only_root(caller, "import a layer")
        with self._filling(destdir) as dest:
            result = layertar.import_layer(fd, dest, devices=opts.get("devices", False))
        log.info("imported a layer of %d entries into %s", result.entries, dest)
        return result

    COMMIT_ATTEMPTS = 3

    def commit(self, mount_id: str, destdir: str, opts: dict[str, Any], caller: int) -> snapshot.CommitResult:
        opts = options.check("Commit", opts, options.COMMIT_OPTIONS)
        self._only_root(caller, "commit a mount")
        with self._using(mount_id) as record, self._filling(destdir) as dest:
            spec = record.spec
            if not spec.upperdir or spec.readonly or self._freeze(record):
                try:
                    result = snapshot.commit(spec.upperdir, dest)
                finally:
                    if spec.upperdir and not spec.readonly:
                        self._thaw(record)
            else:
                result = self._commit_and_verify(record, dest)
        log.info("mount %s: committed %d entries into %s", mount_id, result.entries, dest)
        return result

    def _commit_and_verify(self, record: MountRecord, dest: str) -> snapshot.CommitResult:
        """With files open for writing the mount cannot be frozen: copy, then prove
        that nothing changed meanwhile, and copy again if something did."""
        upper = record.spec.upperdir
        for attempt in range(1, self.COMMIT_ATTEMPTS + 1):
            try:
                result = snapshot.commit(upper, dest)
            except (FileNotFoundError, NotADirectoryError):
                continue  # an entry went away during the copy; destdir was emptied
            if snapshot.fingerprint(upper) == result.fingerprint:
                return result
            log.info("mount %s: upper changed during Commit (attempt %d); copying again", record.id, attempt)
            layerfs.empty_directory(dest)
        users = ", ".join(str(h) for h in holders.find(record.spec.mountpoint)) or "no process found"
        raise Busy(
            f"mount {record.id} kept changing during {self.COMMIT_ATTEMPTS} copies, so no consistent layer "
            f"could be taken; files are open for writing by: {users}"
        )

    @staticmethod
    def _freeze(record: MountRecord) -> bool:
        """Writers are held off for the copy, so the layer is one moment of the upper.

        False if the kernel refuses because files are open for writing.
        """
        try:
            engine.set_readonly(record.spec.mountpoint, True)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise Failed(f"could not freeze mount {record.id} for Commit: {e.strerror or e}") from e
        return True

    @staticmethod
    def _thaw(record: MountRecord) -> None:
        try:
            engine.set_readonly(record.spec.mountpoint, False)
        except OSError as e:
            log.error("mount %s: could not make it writable again after Commit: %s", record.id, e)

    # ---- start-up --------------------------------------------------------------

    def start(self, progress: Callable[[], None] | None = None) -> ReconcileReport:
        """Lock the state, then make the record agree with the kernel (C3).

        ``progress`` is called about once a second while this runs long, so that the
        daemon can ask systemd for more start-up time.
        """
        self.store.lock()
        recorded = self.store.load()
        table = mountinfo.read()
        at = {e.mountpoint: e for e in table}  # the last (top-most) mount wins
        workdirs_in_use = {w for e in table if e.fstype == "overlay" for w in e.option_values("workdir")}
        adopted, cleaned, kept = [], [], []
        last_progress = time.monotonic()
        for record in recorded.values():
            if progress is not None and time.monotonic() - last_progress > 1:
                progress()
                last_progress = time.monotonic()
            entry = at.get(record.spec.mountpoint)
            if record.boot_id == self._boot_id and entry is not None and self._is_ours(record, entry):
                record = dataclasses.replace(record, mnt_id=entry.mnt_id)
                self.records[record.id] = record
                adopted.append(record.id)
                log.info("mount %s: adopted at %s (kernel mount %d)", record.id, record.spec.mountpoint, entry.mnt_id)
            elif record.spec.workdir in workdirs_in_use:
                self._stale[record.id] = record
                kept.append(record.id)
                log.warning(
                    "mount %s: gone, but its workdir %s is used by another overlay; kept",
                    record.id, record.spec.workdir,
                )
            elif self._cleanup(record):
                cleaned.append(record.id)
            else:
                self._stale[record.id] = record
                kept.append(record.id)
        self.store.compact({**self._stale, **self.records})
        for record in self.records.values():
            self._notify("mount_added", record)
        return ReconcileReport(tuple(adopted), tuple(cleaned), tuple(kept))

    @staticmethod
    def _is_ours(record: MountRecord, entry: mountinfo.MountEntry) -> bool:
        if record.mnt_id:
            return entry.mnt_id == record.mnt_id
        # A crash between mount and the record's completion: recognise it by its layers.
        spec = record.spec
        if spec.upperdir and not spec.readonly:
            return entry.fstype == "overlay" and entry.option_values("upperdir") == [spec.upperdir]
        lowers = entry.option_values("lowerdir")
        return entry.fstype == "overlay" and lowers[-len(spec.lowerdirs) :] == list(spec.lowerdirs)

    def _cleanup(self, record: MountRecord) -> bool:
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
        self.store.drop(record.id)
        return True

    # ---- Mount -----------------------------------------------------------------

    def mount(self, request: MountRequest, owner: int) -> MountRecord:
        opts = options.check("Mount", request.options, options.MOUNT_OPTIONS)
        if owner != 0:
            # Until callers are authorised per action (polkit), mounting is root's alone.
            raise NotPermitted("only root may mount; ask an administrator")
        mount_id = secrets.token_hex(6)
        record = self._plan(request, opts, mount_id, owner)
        spec = record.spec
        self.store.intend(record)  # C1: durable before anything exists
        try:
            if record.workdir_created:
                os.mkdir(spec.workdir, 0o700)
            if record.mountpoint_created:
                os.makedirs(os.path.dirname(spec.mountpoint), mode=0o755, exist_ok=True)
                os.mkdir(spec.mountpoint, 0o755)
            mnt_id = engine.mount(spec)
        except OSError as e:
            self._undo(record)
            raise Failed(f"the kernel refused the mount: {e.strerror or e}") from e
        except BaseException:
            self._undo(record)
            raise
        record = dataclasses.replace(record, mnt_id=mnt_id)
        self.store.update(record)
        self.records[mount_id] = record
        log.info("mount %s: mounted %s (owner uid %d)", mount_id, spec.mountpoint, owner)
        self._notify("mount_added", record)
        return record

    def _undo(self, record: MountRecord) -> None:
        if self._cleanup(record):
            return
        self._stale[record.id] = record

    def _plan(self, request: MountRequest, opts: dict[str, Any], mount_id: str, owner: int) -> MountRecord:
        if not request.lowerdirs:
            raise InvalidArgument("lowerdirs: give at least one lower directory")
        if len(request.lowerdirs) > MAX_LOWERS:
            raise InvalidArgument(f"lowerdirs: {len(request.lowerdirs)} given; the kernel stacks at most {MAX_LOWERS}")
        lowers = tuple(paths.existing_dir(f"lowerdirs[{i}]", p) for i, p in enumerate(request.lowerdirs))
        if len(set(lowers)) != len(lowers):
            raise InvalidArgument("lowerdirs: the same directory is given twice")
        readonly = opts.get("readonly", False)
        volatile = opts.get("volatile", False)
        upper = paths.existing_dir("upperdir", request.upperdir) if request.upperdir else ""
        named = {f"lowerdirs[{i}]": p for i, p in enumerate(lowers)}
        if volatile and (not upper or readonly):
            raise InvalidArgument("volatile: only a writable mount (with an upperdir) can be volatile")

        workdir, workdir_created = "", False
        if upper:
            named["upperdir"] = upper
            if readonly and "workdir" in opts:
                raise InvalidArgument("workdir: a read-only mount uses no workdir; drop the option")
            if not readonly:
                self._refuse_upper_in_use(upper)
                if "workdir" in opts:
                    workdir = paths.existing_dir("workdir", opts["workdir"])
                    self._check_workdir(workdir, upper)
                else:
                    parent = os.path.dirname(upper)
                    if os.stat(parent).st_dev != os.stat(upper).st_dev:
                        raise InvalidArgument(
                            f"upperdir {upper!r} is the root of a filesystem, so the workdir cannot go beside it; "
                            "pass a 'workdir' option on the same filesystem"
                        )
                    workdir = os.path.join(parent, f".{os.path.basename(upper)}.uniond-work-{mount_id}")
                    workdir_created = True
                named["workdir"] = workdir

        mountpoint_created = not request.mountpoint
        if mountpoint_created:
            mountpoint = os.path.join(self.runtime_dir, "mounts", mount_id)
        else:
            mountpoint = paths.existing_dir("mountpoint", request.mountpoint)
            if engine.is_mount_root(mountpoint):
                raise AlreadyMounted(f"mountpoint {mountpoint!r} is already a mount point; unmount it or pick another")
            named["mountpoint"] = mountpoint
        paths.refuse_nesting(named)

        spec = MountSpec(lowers, upper, workdir, mountpoint, readonly=readonly or not upper, volatile=volatile)
        return MountRecord(
            id=mount_id,
            spec=spec,
            owner=owner,
            created_us=time.time_ns() // 1000,
            boot_id=self._boot_id,
            options=opts,
            description=opts.get("description", ""),
            workdir_created=workdir_created,
            mountpoint_created=mountpoint_created,
        )

    def _refuse_upper_in_use(self, upper: str) -> None:
        """M7: two overlays sharing an upper give undefined results."""
        for record in self.records.values():
            if record.spec.upperdir == upper and not record.spec.readonly:
                raise InvalidArgument(f"upperdir {upper!r} is already the upper of mount {record.id}")
        for entry in mountinfo.read():
            if entry.fstype == "overlay" and upper in entry.option_values("upperdir"):
                raise InvalidArgument(f"upperdir {upper!r} is already in use by the overlay at {entry.mountpoint}")

    def _check_workdir(self, workdir: str, upper: str) -> None:
        if os.stat(workdir).st_dev != os.stat(upper).st_dev:
            raise InvalidArgument(f"workdir {workdir!r} must be on the same filesystem as upperdir {upper!r}")
        leftovers = set(os.listdir(workdir)) - {"work", "index"}
        if leftovers:
            raise InvalidArgument(f"workdir {workdir!r} must be empty; it holds {sorted(leftovers)[:3]}")
        for record in self.records.values():
            if record.spec.workdir == workdir:
                raise InvalidArgument(f"workdir {workdir!r} is already the workdir of mount {record.id}")

    # ---- Unmount ---------------------------------------------------------------

    def unmount(self, mount_id: str, caller: int, opts: dict[str, Any]) -> MountRecord:
        opts = options.check("Unmount", opts, options.UNMOUNT_OPTIONS)
        record = self.get(mount_id)
        if caller not in (0, record.owner):
            raise NotPermitted(f"mount {mount_id} belongs to uid {record.owner}; only its owner or root may unmount it")
        with self._lock:
            if self._in_use[mount_id]:
                raise Busy(f"mount {mount_id} is being exported or committed; unmount it when that has finished")
        mountpoint = record.spec.mountpoint
        try:
            engine.unmount(mountpoint, lazy=opts.get("lazy", False))
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
        del self.records[mount_id]
        if not self._cleanup(record):
            self._stale[mount_id] = record
        log.info("mount %s: unmounted %s", mount_id, mountpoint)
        self._notify("mount_removed", record)
        return record

    def _notify(self, event: str, record: MountRecord) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, event)(record)
            except Exception:
                log.exception("mount %s: listener %s failed on %s", record.id, listener, event)
