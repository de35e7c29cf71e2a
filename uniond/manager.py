"""The mount manager: owns the set of mounts, their record and their life cycle.

It checks requests, keeps the journal (C1), drives the engine, and tells listeners
about every change before the call that caused it returns (U3). It knows nothing of
D-Bus: callers are plain Caller values, authorization goes through an Authority, and
errors are uniond.errors classes. Each method authorizes before it changes anything,
and nothing awaits between the last check and the mount, so a caller who disconnects
mid-call (or another call racing it) never leaves a half-made mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from uniond import access, diff, engine, holders, layerfs, layertar, mountinfo, options, paths, snapshot, syscalls
from uniond.caller import Caller
from uniond.config import Config
from uniond.constants import (
    ACTION_COMMIT,
    ACTION_EXPORT,
    ACTION_IMPORT,
    ACTION_MOUNT,
    ACTION_MOUNT_ANY,
    ACTION_UNMOUNT_OTHER,
    ACTION_UNMOUNT_OWN,
    OPTION_NO_USER_INTERACTION,
)
from uniond.errors import AlreadyMounted, Busy, Failed, InvalidArgument, NotFound, NotPermitted
from uniond.polkit import Authority
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


@dataclass(frozen=True)
class _Plan:
    """A checked Mount: the record to write and the caller's directories, held open."""

    record: MountRecord
    lowers: tuple[paths.OpenDir, ...]
    upper: paths.OpenDir | None
    upper_parent: int | None  # where the daemon creates the workdir
    workdir: paths.OpenDir | None  # the caller's own workdir option
    mountpoint: paths.OpenDir | None  # None: the daemon makes one


async def _own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``asyncio.to_thread`` for work on a caller's descriptor, which blocks for as long as
    the caller likes (a pipe it keeps open and silent): in a daemon thread of its own, so
    that it neither takes one of the event loop's few pooled workers, which Diff and
    Commit need, nor keeps the daemon from exiting when it is stopped."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            outcome = (context.run(fn, *args), None)
        except Exception as e:
            outcome = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon stopped
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=f"uniond-{fn.__name__}", daemon=True).start()
    return await future


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _details(spec: MountSpec, mount_id: str = "", owner: int | None = None) -> dict[str, str]:
    """What polkit rules can match on; lowerdirs joined with ':' as overlayfs' option (M2)."""
    details = {
        "mountpoint": spec.mountpoint,
        "lowerdirs": ":".join(_escape(p) for p in spec.lowerdirs),
        "upperdir": spec.upperdir,
    }
    if mount_id:
        details["mount"] = mount_id
    if owner is not None:
        details["owner"] = str(owner)
    return details


class MountManager:
    def __init__(
        self,
        store: StateStore,
        runtime_dir: str,
        config: Config | None = None,
        authority: Authority | None = None,
    ) -> None:
        self.store = store
        self.runtime_dir = runtime_dir
        # Without a bus there is nobody to ask: only root may act.
        self.authority = authority or Authority(None)
        self.configure(config or Config())
        self.records: dict[str, MountRecord] = {}
        self._stale: dict[str, MountRecord] = {}  # gone from the kernel, cleanup pending
        self._listeners: list[MountListener] = []
        self._boot_id = boot_id()
        # Layer operations run in worker threads; these say what they are using.
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()  # mount id -> running exports/commits
        self._destdirs: set[str] = set()  # being filled by ImportLayer or Commit

    def configure(self, config: Config) -> None:
        """Take a (re)loaded configuration; paths are compared in canonical form."""
        self.config = config
        self._allowed_roots = tuple(os.path.realpath(r) for r in config.allowed_roots)
        self._own_dirs = tuple(os.path.realpath(d) for d in (self.store.directory, self.runtime_dir))

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

    async def diff(self, mount_id: str, caller: Caller, opts: dict[str, Any]) -> list[diff.Change]:
        opts = options.check("Diff", opts, options.DIFF_OPTIONS)
        record = self.get(mount_id)
        if caller.uid != record.owner:
            # A Diff names files in someone else's upper: as much as an export shows.
            await self.authorize(caller, ACTION_EXPORT, opts, record)
        spec = record.spec
        if not spec.upperdir:
            return []
        # Read through directories opened without symlinks: the owner of a path could
        # otherwise point a parent of the upper at files it may not list.
        with contextlib.ExitStack() as held:
            try:
                upper = self._open(held, "upperdir", spec.upperdir)
                lowers = [self._open(held, f"lowerdirs[{i}]", p) for i, p in enumerate(spec.lowerdirs)]
            except InvalidArgument as e:
                raise Failed(f"mount {record.id}: its layers are no longer where they were mounted from: {e}") from None
            return await asyncio.to_thread(
                diff.changes, f"/proc/self/fd/{upper.fd}", [f"/proc/self/fd/{h.fd}" for h in lowers]
            )

    # ---- layers: authorised on the event loop, the work in a worker thread ------

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

    def _upper_of(self, held: contextlib.ExitStack, record: MountRecord) -> str:
        """The mount's upper as a path through a descriptor opened without symlinks
        (as for Diff), or "" for a mount without one."""
        if not record.spec.upperdir:
            return ""
        try:
            upper = self._open(held, "upperdir", record.spec.upperdir)
        except InvalidArgument as e:
            raise Failed(f"mount {record.id}: its upper is no longer where it was mounted from: {e}") from None
        return f"/proc/self/fd/{upper.fd}/."

    def _destdir(self, held: contextlib.ExitStack, destdir: str) -> paths.OpenDir:
        """Opens ``destdir`` without symlinks, checks where it is and claims it, so that
        two calls never fill it at once. The daemon then writes only through the fd."""
        dest = self._open(held, "destdir", destdir)
        self._place("destdir", dest.path)
        for record in list(self.records.values()):
            spec = record.spec
            named = {"mountpoint": spec.mountpoint, "upperdir": spec.upperdir, "workdir": spec.workdir}
            named.update({f"lowerdirs[{i}]": p for i, p in enumerate(spec.lowerdirs)})
            for name, path in named.items():
                if path and (paths.inside(dest.path, path) or paths.inside(path, dest.path)):
                    raise InvalidArgument(
                        f"destdir {dest.path!r} overlaps the {name} {path!r} of mount {record.id}; "
                        "give a directory outside every mount's layers"
                    )
        with self._lock:
            if any(paths.inside(dest.path, d) or paths.inside(d, dest.path) for d in self._destdirs):
                raise Busy(f"destdir {dest.path!r} is already being filled by another call")
            self._destdirs.add(dest.path)

        def release() -> None:
            with self._lock:
                self._destdirs.discard(dest.path)

        held.callback(release)
        return dest

    async def export_diff(
        self, mount_id: str, fd: int, caller: Caller, opts: dict[str, Any]
    ) -> layertar.ExportResult:
        opts = options.check("ExportDiff", opts, options.EXPORT_OPTIONS)
        compression = opts.get("compression", "none")
        if compression not in layertar.COMPRESSIONS:
            raise InvalidArgument(f"compression: {compression!r} is not one of {', '.join(layertar.COMPRESSIONS)}")
        await self.authorize(caller, ACTION_EXPORT, opts, self.get(mount_id), compression=compression)
        with self._using(mount_id) as record, contextlib.ExitStack() as held:
            upper = self._upper_of(held, record)
            result = await _own_thread(layertar.export_diff, upper, fd, compression, f"mount {mount_id}: export")
        log.info("mount %s: exported %d entries, %d bytes (uid %d)", mount_id, result.entries, result.bytes, caller.uid)
        return result

    async def import_layer(
        self, fd: int, destdir: str, caller: Caller, opts: dict[str, Any]
    ) -> layertar.ImportResult:
        opts = options.check("ImportLayer", opts, options.IMPORT_OPTIONS)
        devices = opts.get("devices", False)
        if devices and not caller.is_root:
            raise NotPermitted("devices: only root may import device files; other layers refuse them")
        canonical = paths.canonical("destdir", destdir)
        self._place("destdir", canonical)
        await self.authorize(caller, ACTION_IMPORT, opts, destdir=canonical)
        with contextlib.ExitStack() as held:
            dest = self._destdir(held, canonical)
            result = await _own_thread(layertar.import_layer, fd, f"/proc/self/fd/{dest.fd}/.", devices)
        log.info("imported a layer of %d entries into %s (uid %d)", result.entries, dest.path, caller.uid)
        return result

    COMMIT_ATTEMPTS = 3

    async def commit(self, mount_id: str, destdir: str, caller: Caller, opts: dict[str, Any]) -> snapshot.CommitResult:
        opts = options.check("Commit", opts, options.COMMIT_OPTIONS)
        canonical = paths.canonical("destdir", destdir)
        self._place("destdir", canonical)
        await self.authorize(caller, ACTION_COMMIT, opts, self.get(mount_id), destdir=canonical)
        with self._using(mount_id) as record, contextlib.ExitStack() as held:
            dest = self._destdir(held, canonical)
            upper = self._upper_of(held, record)
            result = await asyncio.to_thread(self._commit, record, upper, f"/proc/self/fd/{dest.fd}/.")
        log.info("mount %s: committed %d entries into %s (uid %d)", mount_id, result.entries, dest.path, caller.uid)
        return result

    def _commit(self, record: MountRecord, upper: str, dest: str) -> snapshot.CommitResult:
        spec = record.spec
        if not upper or spec.readonly or self._freeze(record):
            try:
                return snapshot.commit(upper, dest)
            finally:
                if upper and not spec.readonly:
                    self._thaw(record)
        return self._commit_and_verify(record, upper, dest)

    def _commit_and_verify(self, record: MountRecord, upper: str, dest: str) -> snapshot.CommitResult:
        """With files open for writing the mount cannot be frozen: copy, then prove
        that nothing changed meanwhile, and copy again if something did."""
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

    # ---- authorization ---------------------------------------------------------

    async def authorize(
        self,
        caller: Caller,
        action: str,
        opts: Mapping[str, Any],
        record: MountRecord | None = None,
        **details: str,
    ) -> None:
        """Ask whether ``caller`` may do ``action``; raise NotAuthorized* if not.

        For every method that needs a polkit action: the details admins can match in
        rules are the mount's (when ``record`` is given) plus ``details``; ``opts``
        decides whether polkit may ask the user (auth.no_user_interaction). Call it
        before changing any state: it awaits, possibly for minutes.
        """
        found: dict[str, str] = {}
        if record is not None:
            found = _details(record.spec, record.id, record.owner)
        found.update(details)
        await self.authority.authorize(caller, action, found, options.interactive(opts))

    # ---- Mount -----------------------------------------------------------------

    async def mount(self, request: MountRequest, caller: Caller) -> MountRecord:
        opts = options.check("Mount", request.options, options.MOUNT_OPTIONS)
        if not request.lowerdirs:
            raise InvalidArgument("lowerdirs: give at least one lower directory")
        if len(request.lowerdirs) > MAX_LOWERS:
            raise InvalidArgument(f"lowerdirs: {len(request.lowerdirs)} given; the kernel stacks at most {MAX_LOWERS}")
        for name in ("dev", "suid"):
            if opts.get(name) and not caller.is_root:
                raise NotPermitted(f"{name}: only root may mount with {name}; other mounts are nodev,nosuid")
        self._check_quota(caller)
        mount_id = secrets.token_hex(6)
        with contextlib.ExitStack() as held:
            plan = self._plan(request, opts, mount_id, caller.uid, held)
            action = ACTION_MOUNT if self._reachable(plan, caller) else ACTION_MOUNT_ANY
            await self.authority.authorize(
                caller, action, _details(plan.record.spec), options.interactive(opts)
            )
            # No await from here on: what was authorized is what gets mounted, and the
            # daemon's own state is checked again, as it may have changed meanwhile.
            self._check_quota(caller)
            self._recheck(plan)
            return self._make(plan)

    def _check_quota(self, caller: Caller) -> None:
        if caller.is_root:
            return
        limit = self.config.max_mounts_per_uid
        owned = sum(1 for r in self.records.values() if r.owner == caller.uid)
        if owned >= limit:
            raise NotPermitted(
                f"uid {caller.uid} already owns {owned} mounts, the limit (max_mounts_per_uid = {limit}); "
                "unmount some first"
            )

    def _make(self, plan: _Plan) -> MountRecord:
        record, spec = plan.record, plan.record.spec
        self.store.intend(record)  # C1: durable before anything exists
        made: list[int] = []
        try:
            workdir_fd = plan.workdir.fd if plan.workdir is not None else None
            if record.workdir_created:
                assert plan.upper_parent is not None
                name = os.path.basename(spec.workdir)
                os.mkdir(name, 0o700, dir_fd=plan.upper_parent)
                workdir_fd = syscalls.open_dir_nofollow(name, plan.upper_parent)
                made.append(workdir_fd)
            if record.mountpoint_created:
                os.makedirs(os.path.dirname(spec.mountpoint), mode=0o755, exist_ok=True)
                os.mkdir(spec.mountpoint, 0o755)
                mountpoint_fd = syscalls.open_dir_nofollow(spec.mountpoint)
                made.append(mountpoint_fd)
            else:
                assert plan.mountpoint is not None
                mountpoint_fd = plan.mountpoint.fd
            fds = engine.LayerFds(
                lowers=tuple(h.fd for h in plan.lowers),
                upper=plan.upper.fd if plan.upper is not None else None,
                workdir=workdir_fd,
                mountpoint=mountpoint_fd,
            )
            mnt_id = engine.mount(spec, fds)
        except OSError as e:
            self._undo(record)
            raise Failed(f"the kernel refused the mount: {e.strerror or e}") from e
        except BaseException:
            self._undo(record)
            raise
        finally:
            for fd in made:
                os.close(fd)
        record = dataclasses.replace(record, mnt_id=mnt_id)
        self.store.update(record)
        self.records[record.id] = record
        log.info("mount %s: mounted %s (owner uid %d)", record.id, spec.mountpoint, record.owner)
        self._notify("mount_added", record)
        return record

    def _undo(self, record: MountRecord) -> None:
        if self._cleanup(record):
            return
        self._stale[record.id] = record

    def _open(self, held: contextlib.ExitStack, argument: str, path: str) -> paths.OpenDir:
        handle = paths.open_dir(argument, path)
        held.callback(handle.close)
        return handle

    def _place(self, argument: str, path: str) -> None:
        paths.check_placement(argument, path, self._allowed_roots, self._own_dirs)

    def _plan(
        self, request: MountRequest, opts: dict[str, Any], mount_id: str, owner: int, held: contextlib.ExitStack
    ) -> _Plan:
        # Every path is checked for form and size before any is opened.
        for i, p in enumerate(request.lowerdirs):
            paths.canonical(f"lowerdirs[{i}]", p)
        for argument, p in (("upperdir", request.upperdir), ("mountpoint", request.mountpoint),
                            ("workdir", opts.get("workdir"))):
            if p:
                paths.canonical(argument, p)
        lowers = tuple(self._open(held, f"lowerdirs[{i}]", p) for i, p in enumerate(request.lowerdirs))
        if len({h.path for h in lowers}) != len(lowers) or len({(h.st.st_dev, h.st.st_ino) for h in lowers}) != len(
            lowers
        ):
            raise InvalidArgument("lowerdirs: the same directory is given twice")
        readonly = opts.get("readonly", False)
        volatile = opts.get("volatile", False)
        named = {h.argument: h.path for h in lowers}
        if volatile and (not request.upperdir or readonly):
            raise InvalidArgument("volatile: only a writable mount (with an upperdir) can be volatile")

        upper = upper_parent = workdir_handle = None
        workdir, workdir_created = "", False
        if request.upperdir:
            upper = self._open(held, "upperdir", request.upperdir)
            self._place("upperdir", upper.path)
            named["upperdir"] = upper.path
            if readonly and "workdir" in opts:
                raise InvalidArgument("workdir: a read-only mount uses no workdir; drop the option")
            if not readonly:
                self._refuse_upper_in_use(upper.path)
                if "workdir" in opts:
                    workdir_handle = self._open(held, "workdir", opts["workdir"])
                    workdir = workdir_handle.path
                    self._place("workdir", workdir)
                    self._check_workdir(workdir_handle, upper)
                else:
                    parent = self._open(held, "upperdir", os.path.dirname(upper.path))
                    if parent.st.st_dev != upper.st.st_dev:
                        raise InvalidArgument(
                            f"upperdir {upper.path!r} is the root of a filesystem, so the workdir cannot go beside "
                            "it; pass a 'workdir' option on the same filesystem"
                        )
                    child = os.stat(os.path.basename(upper.path), dir_fd=parent.fd, follow_symlinks=False)
                    if (child.st_dev, child.st_ino) != (upper.st.st_dev, upper.st.st_ino):
                        raise InvalidArgument(f"upperdir {upper.path!r} was moved while being checked; try again")
                    upper_parent = parent.fd
                    workdir = os.path.join(parent.path, f".{os.path.basename(upper.path)}.uniond-work-{mount_id}")
                    workdir_created = True
                named["workdir"] = workdir

        mountpoint_created = not request.mountpoint
        mountpoint_handle = None
        if mountpoint_created:
            mountpoint = os.path.join(self.runtime_dir, "mounts", mount_id)
        else:
            mountpoint_handle = self._open(held, "mountpoint", request.mountpoint)
            mountpoint = mountpoint_handle.path
            self._place("mountpoint", mountpoint)
            if syscalls.mount_identity("", mountpoint_handle.fd)[1]:
                raise AlreadyMounted(f"mountpoint {mountpoint!r} is already a mount point; unmount it or pick another")
            named["mountpoint"] = mountpoint
        paths.refuse_nesting(named)

        spec = MountSpec(
            tuple(h.path for h in lowers), upper.path if upper else "", workdir, mountpoint,
            readonly=readonly or not upper, volatile=volatile,
            dev=opts.get("dev", False), suid=opts.get("suid", False),
        )
        record = MountRecord(
            id=mount_id,
            spec=spec,
            owner=owner,
            created_us=time.time_ns() // 1000,
            boot_id=self._boot_id,
            options={k: v for k, v in opts.items() if k != OPTION_NO_USER_INTERACTION},
            description=opts.get("description", ""),
            workdir_created=workdir_created,
            mountpoint_created=mountpoint_created,
        )
        return _Plan(record, lowers, upper, upper_parent, workdir_handle, mountpoint_handle)

    def _reachable(self, plan: _Plan, caller: Caller) -> bool:
        """Could the caller read every lower and does it own the upper and mountpoint?"""
        if not all(access.can_read(caller, h.path, h.st) for h in plan.lowers):
            return False
        return all(access.owns(caller, h.path, h.st) for h in (plan.upper, plan.workdir, plan.mountpoint) if h)

    def _recheck(self, plan: _Plan) -> None:
        """What another call may have changed while this one awaited authorization."""
        spec = plan.record.spec
        if spec.upperdir and not spec.readonly:
            self._refuse_upper_in_use(spec.upperdir)
            if plan.workdir is not None:
                self._check_workdir(plan.workdir, plan.upper)
        if plan.mountpoint is not None:
            # The descriptor still names the directory underneath a mount made since, so
            # ask the path and the record as well.
            taken = any(r.spec.mountpoint == spec.mountpoint for r in self.records.values())
            if taken or engine.is_mount_root(spec.mountpoint):
                raise AlreadyMounted(f"mountpoint {spec.mountpoint!r} was mounted on meanwhile; pick another")

    def _refuse_upper_in_use(self, upper: str) -> None:
        """M7: two overlays sharing an upper give undefined results."""
        for record in self.records.values():
            if record.spec.upperdir == upper and not record.spec.readonly:
                raise InvalidArgument(f"upperdir {upper!r} is already the upper of mount {record.id}")
        for entry in mountinfo.read(fstype="overlay"):
            if upper in entry.option_values("upperdir"):
                raise InvalidArgument(f"upperdir {upper!r} is already in use by the overlay at {entry.mountpoint}")

    def _check_workdir(self, workdir: paths.OpenDir, upper: paths.OpenDir | None) -> None:
        assert upper is not None
        if workdir.st.st_dev != upper.st.st_dev:
            raise InvalidArgument(f"workdir {workdir.path!r} must be on the same filesystem as upperdir {upper.path!r}")
        leftovers = set(os.listdir(f"/proc/self/fd/{workdir.fd}")) - {"work", "index"}
        if leftovers:
            raise InvalidArgument(f"workdir {workdir.path!r} must be empty; it holds {sorted(leftovers)[:3]}")
        for record in self.records.values():
            if record.spec.workdir == workdir.path:
                raise InvalidArgument(f"workdir {workdir.path!r} is already the workdir of mount {record.id}")

    # ---- Unmount ---------------------------------------------------------------

    async def unmount(self, mount_id: str, caller: Caller, opts: dict[str, Any]) -> MountRecord:
        opts = options.check("Unmount", opts, options.UNMOUNT_OPTIONS)
        record = self.get(mount_id)
        action = ACTION_UNMOUNT_OWN if caller.uid == record.owner else ACTION_UNMOUNT_OTHER
        await self.authorize(caller, action, opts, record)
        record = self.get(mount_id)  # another call may have unmounted it meanwhile
        with self._lock:
            if self._in_use[mount_id]:
                raise Busy(f"mount {mount_id} is being exported or committed; unmount it when that has finished")
        mountpoint = record.spec.mountpoint
        try:
            engine.unmount(mountpoint, lazy=opts.get("lazy", False), mnt_id=record.mnt_id)
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
        log.info("mount %s: unmounted %s (asked by uid %d)", mount_id, mountpoint, caller.uid)
        self._notify("mount_removed", record)
        return record

    def _notify(self, event: str, record: MountRecord) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, event)(record)
            except Exception:
                log.exception("mount %s: listener %s failed on %s", record.id, listener, event)
