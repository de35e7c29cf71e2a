"""The mount manager: owns the set of mounts, their record and their life cycle.

It checks requests (through the plan module), keeps the journal (C1), drives the
kernel room, and tells listeners about every change before the call that caused it
returns (U3). It knows nothing of D-Bus: callers are plain Caller values,
authorization goes through an Authority, and errors are uniond.errors classes. Each
method authorizes before it changes anything, and nothing awaits between the last
check and the mount, so a caller who disconnects mid-call (or another call racing it)
never leaves a half-made mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from uniond.access.caller import Caller
from uniond.access.paths import Places
from uniond.access.polkit import Authority
from uniond.config import Config
from uniond.constants import ACTION_MOUNT, ACTION_MOUNT_ANY, ACTION_UNMOUNT_OTHER, ACTION_UNMOUNT_OWN
from uniond.errors import Busy, Failed, InvalidArgument, NotFound, NotPermitted
from uniond.kernel import holders, syscalls
from uniond.kernel import overlay as engine
from uniond.mounts import options, plan, reconcile
from uniond.mounts import update as updating
from uniond.mounts.claims import Claims
from uniond.mounts.journal import StateStore, boot_id
from uniond.mounts.lifetimes import Lifetimes
from uniond.mounts.plan import MAX_LOWERS, MountRequest
from uniond.mounts.reconcile import ReconcileReport
from uniond.mounts.records import MountRecord, MountSpec

__all__ = ["MountManager", "MountRequest", "MountListener", "ReconcileReport"]

log = logging.getLogger(__name__)


class MountListener(Protocol):
    def mount_added(self, record: MountRecord) -> None: ...

    def mount_removed(self, record: MountRecord) -> None: ...

    def mount_changed(self, record: MountRecord, changed: tuple[str, ...]) -> None: ...


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
        self.claims = Claims()  # what the layer operations are using
        self.lifetimes = Lifetimes(self)  # mounts bound to a caller, unit or session

    def configure(self, config: Config) -> None:
        """Take a (re)loaded configuration; paths are compared in canonical form."""
        self.config = config
        self.places = Places.of(config.allowed_roots, (self.store.directory, self.runtime_dir))

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

    # ---- start-up --------------------------------------------------------------

    def start(self, progress: Callable[[], None] | None = None) -> ReconcileReport:
        """Lock the state, then make the record agree with the kernel (C3)."""
        self.store.lock()
        outcome = reconcile.reconcile(self.store, self._boot_id, progress)
        self.records.update(outcome.live)
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
            found = _details(record.spec, record.id, record.owner)
        found.update(details)
        await self.authority.authorize(caller, action, found, options.interactive(opts))

    # ---- Mount -----------------------------------------------------------------

    def mount_declared(self, request: MountRequest, mount_id: str, name: str) -> MountRecord:
        """A mount the administrator declared: made for root, with nobody to ask."""
        opts = options.check(name, request.options, options.MOUNT_OPTIONS)
        with contextlib.ExitStack() as held:
            context = plan.Context(self.places, self.runtime_dir, self._boot_id, self.records.values())
            checked = plan.make(request, opts, mount_id, 0, context, held)
            plan.recheck(checked, self.records.values())
            record = dataclasses.replace(checked.record, name=name, persistent=True)
            return self._make(dataclasses.replace(checked, record=record))

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
            context = plan.Context(self.places, self.runtime_dir, self._boot_id, self.records.values())
            checked = plan.make(request, opts, mount_id, caller.uid, context, held)
            action = ACTION_MOUNT if plan.reachable(checked, caller) else ACTION_MOUNT_ANY
            await self.authority.authorize(
                caller, action, _details(checked.record.spec), options.interactive(opts)
            )
            # No await from here on: what was authorized is what gets mounted, and the
            # daemon's own state is checked again, as it may have changed meanwhile.
            self._check_quota(caller)
            plan.recheck(checked, self.records.values())
            if binding is None:
                return self._make(checked)
            record = self._make(dataclasses.replace(
                checked, record=dataclasses.replace(checked.record, bound_to=str(binding))
            ))
        self.lifetimes.watch(binding)
        return record

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

    def _make(self, checked: plan.Plan) -> MountRecord:
        record, spec = checked.record, checked.record.spec
        self.store.intend(record)  # C1: durable before anything exists
        made: list[int] = []
        try:
            workdir_fd = checked.workdir.fd if checked.workdir is not None else None
            if record.workdir_created:
                assert checked.upper_parent is not None
                name = os.path.basename(spec.workdir)
                os.mkdir(name, 0o700, dir_fd=checked.upper_parent)
                workdir_fd = syscalls.open_dir_nofollow(name, checked.upper_parent)
                made.append(workdir_fd)
            if record.mountpoint_created:
                os.makedirs(os.path.dirname(spec.mountpoint), mode=0o755, exist_ok=True)
                os.mkdir(spec.mountpoint, 0o755)
                mountpoint_fd = syscalls.open_dir_nofollow(spec.mountpoint)
                made.append(mountpoint_fd)
            else:
                assert checked.mountpoint is not None
                mountpoint_fd = checked.mountpoint.fd
            fds = engine.LayerFds(
                lowers=tuple(h.fd for h in checked.lowers),
                upper=checked.upper.fd if checked.upper is not None else None,
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
        if reconcile.cleanup(self.store, record):
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
        if self.claims.in_use(mount_id):
            raise Busy(f"mount {mount_id} is being exported or committed; unmount it when that has finished")
        return self._take_down(record, opts.get("lazy", False), f"asked by uid {caller.uid}")

    def remove(self, mount_id: str, reason: str) -> MountRecord | None:
        """Unmount without a caller (its binding ended, its declaration went), lazily
        when busy; ``reason`` goes to the log. None if it was no longer there."""
        record = self.records.get(mount_id)
        if record is None:
            return None
        try:
            return self._take_down(record, False, reason)
        except Busy:
            log.info("mount %s: busy, detaching it lazily", mount_id)
            return self._take_down(record, True, reason)

    def _take_down(self, record: MountRecord, lazy: bool, reason: str) -> MountRecord:
        mount_id, mountpoint = record.id, record.spec.mountpoint
        try:
            engine.unmount(mountpoint, lazy=lazy, mnt_id=record.mnt_id)
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
        if not reconcile.cleanup(self.store, record):
            self._stale[mount_id] = record
        log.info("mount %s: unmounted %s (%s)", mount_id, mountpoint, reason)
        self._notify("mount_removed", record)
        return record

    # ---- Update ----------------------------------------------------------------

    async def update(
        self, mount_id: str, lowerdirs: tuple[str, ...], caller: Caller, opts: dict[str, Any]
    ) -> MountRecord:
        """Replace a live mount's lowers without a gap (the update module says how)."""
        return await updating.update(self, mount_id, lowerdirs, caller, opts)

    def notify_changed(self, record: MountRecord, changed: tuple[str, ...]) -> None:
        """``changed`` names the properties of the mount object that changed."""
        self._notify("mount_changed", record, changed)

    def _notify(self, event: str, record: MountRecord, *args: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, event)(record, *args)
            except Exception:
                log.exception("mount %s: listener %s failed on %s", record.id, listener, event)
