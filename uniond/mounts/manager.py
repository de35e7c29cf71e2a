"""The mount manager: owns the set of mounts, their record and their life cycle.

It checks requests (through the plan module), keeps the journal (C1), drives the
kernel room, and tells listeners about every change before the call that caused it
returns (U3). It knows nothing of D-Bus: callers are plain Caller values,
authorization goes through an Authority, and errors are uniond.errors classes. Each
method authorizes before it changes anything. From a Mount's last check on, what it
uses (upper, workdir, mountpoint, a place in its owner's quota) is held in the
holdings, and an Unmount's mount counts as gone for other calls, so that the waits
that follow (the journal's sync, the kernel calls, which run in threads so that calls
overlap) race nothing; a caller who disconnects mid-call never leaves a half-made mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from uniond.access.caller import Caller
from uniond.access.paths import Places
from uniond.access.polkit import Authority
from uniond.config import Config
from uniond.constants import ACTION_MOUNT, ACTION_MOUNT_ANY, ACTION_UNMOUNT_OTHER, ACTION_UNMOUNT_OWN
from uniond.errors import Busy, Failed, InvalidArgument, NotFound, NotPermitted, NotRecorded
from uniond.kernel import holders
from uniond.kernel.mounttable import OverlayUppers
from uniond.mounts import crash, detached, options, plan, reconcile, steps
from uniond.mounts import update as updating
from uniond.mounts.claims import Claims
from uniond.mounts.groupsync import GroupSync
from uniond.mounts.holdings import Holdings
from uniond.mounts.journal import StateStore, boot_id
from uniond.mounts.lifetimes import Lifetimes
from uniond.mounts.marks import Marks
from uniond.mounts.plan import MAX_LOWERS, MountRequest
from uniond.mounts.reconcile import ReconcileReport
from uniond.mounts.records import MountListener, MountRecord

__all__ = ["MountManager", "MountRequest", "MountListener", "ReconcileReport"]

log = logging.getLogger(__name__)



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
        self.holdings = Holdings()  # self.records, indexed (kept in step by _add/_remove)
        self.kernel = OverlayUppers()
        self._stale: dict[str, MountRecord] = {}  # gone from the kernel, cleanup pending
        self._listeners: list[MountListener] = []
        self._boot_id = boot_id()
        self.claims = Claims()  # what the layer operations are using
        self.marks = Marks(runtime_dir)
        self._leaving: set[str] = set()  # being unmounted
        # The kernel calls of Mount and Unmount (umount waits for RCU grace periods, the
        # journal for the disk) run here, not on the event loop, so calls overlap.
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="uniond-kernel")
        # The journal's sync has a thread of its own: it waits for the disk, and one runs
        # at a time anyway (GroupSync), so it never keeps a kernel call waiting for a thread.
        self._sync = GroupSync(store.sync, ThreadPoolExecutor(max_workers=1, thread_name_prefix="uniond-sync"))
        # Whether another call waits for the event loop (the service knows; without one,
        # assume so): a call alone runs its kernel calls in place, as a thread would only
        # add its hand-over to the time the caller waits.
        self.others_waiting: Callable[[], bool] = lambda: True
        self.lifetimes = Lifetimes(self)  # mounts bound to a caller, unit or session

    def configure(self, config: Config) -> None:
        """Take a (re)loaded configuration; paths are compared in canonical form."""
        self.config = config
        self.places = Places.of(config.allowed_roots, (self.store.directory, self.runtime_dir))

    def subscribe(self, listener: MountListener) -> None:
        self._listeners.append(listener)

    # ---- queries -------------------------------------------------------------

    def get(self, mount_id: str) -> MountRecord:
        if mount_id in self._leaving:
            raise NotFound(f"mount {mount_id} is being unmounted")
        try:
            return self.records[mount_id]
        except KeyError:
            raise NotFound(f"no mount with id {mount_id!r}; ListMounts shows the current ones") from None

    def list(self) -> list[MountRecord]:
        return sorted(self.records.values(), key=lambda r: (r.created_us, r.id))

    # ---- start-up --------------------------------------------------------------

    def start(self, progress: Callable[[], None] | None = None) -> ReconcileReport:
        """Lock the state, then make the record agree with the kernel (C3)."""
        self.store.lock()
        outcome = reconcile.reconcile(self.store, self.marks, self._boot_id, progress)
        for record in outcome.live.values():
            self._add(record)
        self._stale.update(outcome.stale)
        for record in self.records.values():
            self._notify("mount_added", record)
        return outcome.report

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
            found = plan.details(record.spec, record.id, record.owner)
        found.update(details)
        await self.authority.authorize(caller, action, found, options.interactive(opts))

    # ---- Mount -----------------------------------------------------------------

    def mount_declared(self, request: MountRequest, mount_id: str, name: str) -> MountRecord:
        """A mount the administrator declared: made for root, with nobody to ask, in
        place (it comes up before READY=1 or from a periodic check, with no caller waiting)."""
        if mount_id in self.records:
            raise Busy(f"the previous mount of {name!r} is detached and still in use; it comes up when that ends")
        opts = options.check(name, request.options, options.MOUNT_OPTIONS)
        with contextlib.ExitStack() as held:
            context = plan.Context(self.places, self.runtime_dir, self._boot_id, self.holdings, self.kernel)
            checked = plan.make(request, opts, mount_id, 0, context, held)
            plan.recheck(checked, self.holdings, self.kernel)
            record = dataclasses.replace(checked.record, name=name, persistent=True)
            checked = dataclasses.replace(checked, record=record)
            self.holdings.add(record)
            with self._recording(record):
                self.store.intend(record, durable=True)
            try:
                made = steps.attach(checked, self.marks)
            except BaseException as e:
                raise self._refused(record, e) from None
            return self._made(record, made)

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
        binding = await self.lifetimes.resolve(caller, opts["bind"], opts) if opts.get("bind") else None
        mount_id = secrets.token_hex(6)
        with contextlib.ExitStack() as held:
            context = plan.Context(self.places, self.runtime_dir, self._boot_id, self.holdings, self.kernel)
            checked = plan.make(request, opts, mount_id, caller.uid, context, held)
            # Root is allowed without asking, so what it could reach (a stat of every
            # ancestor of every lower) need not be worked out.
            action = ACTION_MOUNT if caller.is_root or plan.reachable(checked, caller) else ACTION_MOUNT_ANY
            await self.authority.authorize(
                caller, action, plan.details(checked.record.spec), options.interactive(opts)
            )
            # What was authorized is what gets mounted, and the daemon's own state is
            # checked again, as it may have changed meanwhile; from that check on, the
            # plan holds what it uses (upper, workdir, mountpoint, quota) in the holdings,
            # so that the awaits below (the journal sync, the kernel calls) race nothing.
            self._check_quota(caller)
            plan.recheck(checked, self.holdings, self.kernel)
            if binding is not None:
                checked = dataclasses.replace(
                    checked, record=dataclasses.replace(checked.record, bound_to=str(binding))
                )
            record = await self._make(checked)
        if binding is not None:
            self.lifetimes.watch(binding)
        return record

    def _check_quota(self, caller: Caller) -> None:
        if caller.is_root:
            return
        limit = self.config.max_mounts_per_uid
        owned = self.holdings.owned[caller.uid]
        if owned >= limit:
            raise NotPermitted(
                f"uid {caller.uid} already owns {owned} mounts, the limit (max_mounts_per_uid = {limit}); "
                "unmount some first"
            )

    async def _make(self, checked: plan.Plan) -> MountRecord:
        record = checked.record
        self.holdings.add(record)
        with self._recording(record):
            self.store.intend(record, durable=False)
            await self._sync.durable(alone=not self.others_waiting())  # C1: durable before anything exists
        crash.point("mount.intended")
        try:
            made = await self._in_thread(steps.attach, checked, self.marks)
        except BaseException as e:
            raise self._refused(record, e) from None
        return self._made(record, made)

    @contextlib.contextmanager
    def _recording(self, record: MountRecord) -> Iterator[None]:
        """Around the intent (C1): if it cannot be made durable, what the Mount holds is
        let go, and the caller is told that nothing was made."""
        try:
            yield
        except NotRecorded as e:
            self.holdings.remove(record)
            raise NotRecorded(f"uniond could not record the mount, so it made none: {e}") from None
        except BaseException:
            self.holdings.remove(record)
            raise

    def _refused(self, record: MountRecord, error: BaseException) -> BaseException:
        """The mount was not made: undo what was, and say why."""
        self.holdings.remove(record)
        self._undo(record)
        if isinstance(error, OSError):
            return Failed(f"the kernel refused the mount: {error.strerror or error}")
        return error

    def _made(self, intended: MountRecord, record: MountRecord) -> MountRecord:
        """``record`` is ``intended`` made, with its mount id (and its mark saying so)."""
        self.holdings.remove(intended)
        # Not written (a full disk): the mount is made and kept all the same, since its
        # synced intent and its marks are what a start recognises it by (C1, C4).
        self.store.update(record)
        crash.point("mount.recorded")
        self._add(record)
        log.info("mount %s: mounted %s (owner uid %d)", record.id, record.spec.mountpoint, record.owner)
        self._notify("mount_added", record)
        return record

    def _undo(self, record: MountRecord) -> None:
        if reconcile.cleanup(self.store, record, self.marks):
            return
        self._stale[record.id] = record

    # ---- Unmount ---------------------------------------------------------------

    async def unmount(self, mount_id: str, caller: Caller, opts: dict[str, Any]) -> MountRecord:
        opts = options.check("Unmount", opts, options.UNMOUNT_OPTIONS)
        record = self.get(mount_id)
        # A declared mount is the administrator's, whoever its owner uid is.
        own = caller.uid == record.owner and not record.persistent
        await self.authorize(caller, ACTION_UNMOUNT_OWN if own else ACTION_UNMOUNT_OTHER, opts, record)
        record = self.get(mount_id)  # another call may have unmounted it meanwhile
        lazy = opts.get("lazy", False)
        if record.detached:
            return detached.unmount(self, record, lazy)
        if self.claims.in_use(mount_id):
            raise Busy(f"mount {mount_id} is being exported or committed; unmount it when that has finished")
        reason = f"asked by uid {caller.uid}"
        self._leaving.add(mount_id)  # to other calls, from here on, it is gone
        try:
            removed = await self._in_thread(self._take_off, record, lazy)
        finally:
            self._leaving.discard(mount_id)
        if removed is None:
            return self._detach(record, reason)
        self._remove(record)
        return self._unmounted(record, removed, reason)

    def _take_off(self, record: MountRecord, lazy: bool) -> bool | None:
        """The kernel's part of an Unmount and the cleanup after it, in one hand-over to
        a thread: None if the overlay lives on (M12), else whether all was removed."""
        steps.take_off(record, lazy)
        if self._lives_on(record, lazy):
            return None
        return reconcile.remove_made(record, self.marks)

    def remove(self, mount_id: str, reason: str) -> MountRecord | None:
        """Unmount without a caller (its binding ended, its declaration went), in place
        and lazily when busy; ``reason`` goes to the log. None if it was no longer there."""
        record = self.records.get(mount_id)
        if record is None or record.detached or mount_id in self._leaving:
            return None  # detached: off its mountpoint already, cleaned when its last user goes
        lazy = False
        try:
            steps.take_off(record, lazy)
        except Busy:
            log.info("mount %s: busy, detaching it lazily", mount_id)
            lazy = True
            steps.take_off(record, lazy)
        if self._lives_on(record, lazy):
            return self._detach(record, reason)
        self._remove(record)
        return self._unmounted(record, reconcile.remove_made(record, self.marks), reason)

    @staticmethod
    def _lives_on(record: MountRecord, lazy: bool) -> bool:
        """M12: a lazily detached overlay lives on for the processes inside it; its
        workdir must too."""
        return lazy and bool(record.mnt_id) and bool(holders.holding({record.mnt_id}))

    def _unmounted(self, record: MountRecord, removed: bool, reason: str) -> MountRecord:
        """The mount is off the kernel and out of the holdings: drop or keep its record."""
        if removed:
            self.store.drop(record.id)
        else:
            self._stale[record.id] = record
        self._notify("mount_removed", record)
        log.info("mount %s: unmounted %s (%s)", record.id, record.spec.mountpoint, reason)
        return record

    def _detach(self, record: MountRecord, reason: str) -> MountRecord:
        self._remove(record)
        record = dataclasses.replace(record, detached=True)
        self._add(record)
        self.store.update(record)
        self.marks.refresh(record)
        log.info(
            "mount %s: detached from %s (%s); cleaned once its last user has gone",
            record.id, record.spec.mountpoint, reason,
        )
        self._notify("mount_changed", record)
        return record

    def forget(self, record: MountRecord) -> None:
        """The mount is gone from the kernel: clean what the daemon made and drop it."""
        self._remove(record)
        if not reconcile.cleanup(self.store, record, self.marks):
            self._stale[record.id] = record
        self._notify("mount_removed", record)

    def detached(self) -> list[MountRecord]:
        return list(self.holdings.detached.values())

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.others_waiting():
            return fn(*args)
        job = asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread works on descriptors this call holds open (a stop cancels the
            # call): they are closed only once it is done with them.
            await asyncio.wait([job])
            raise

    def _add(self, record: MountRecord) -> None:
        self.records[record.id] = record
        self.holdings.add(record)

    def _remove(self, record: MountRecord) -> None:
        del self.records[record.id]
        self.holdings.remove(record)

    # ---- Update ----------------------------------------------------------------

    async def update(
        self, mount_id: str, lowerdirs: tuple[str, ...], caller: Caller, opts: dict[str, Any]
    ) -> MountRecord:
        """Replace a live mount's lowers without a gap (the update module says how)."""
        return await updating.update(self, mount_id, lowerdirs, caller, opts)

    def replaced(self, record: MountRecord, changed: tuple[str, ...]) -> None:
        """A mount changed in place (Update): record and mark it, tell the listeners
        which properties of its object changed."""
        self.store.update(record)
        self.marks.refresh(record)
        self._remove(self.records[record.id])
        self._add(record)
        self._notify("mount_changed", record, changed)

    def _notify(self, event: str, record: MountRecord, *args: Any) -> None:
        for listener in self._listeners:
            try:
                handler = getattr(listener, event, None)
                if handler is not None:
                    handler(record, *args)
            except Exception:
                log.exception("mount %s: listener %s failed on %s", record.id, listener, event)
