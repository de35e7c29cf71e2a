"""The layer methods on mounts: Diff, ExportDiff, ImportLayer and Commit.

Each is authorized on the event loop and does its work in a thread; the layers room
does the reading and writing, this module decides what it may touch: the mount's
upper through a directory opened without symlinks, a destdir that is placed, claimed
and outside every mount's layers, and a mount frozen (read-only) while Commit copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uniond.access import paths, reach
from uniond.access.caller import Caller
from uniond.constants import ACTION_COMMIT, ACTION_EXPORT, ACTION_IMPORT
from uniond.errors import Busy, Failed, InvalidArgument, NotPermitted
from uniond.kernel import holders
from uniond.kernel import overlay as engine
from uniond.layers import diff, snapshot, stream
from uniond.layers import tar as layertar
from uniond.layers.compress import check_compression
from uniond.layers.tar_import import check_digest
from uniond.mounts import crash, options
from uniond.mounts.records import MountRecord

if TYPE_CHECKING:
    from uniond.mounts.manager import MountManager

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3


async def own_thread(fn: Callable[..., Any], *args: Any) -> Any:
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

    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "work")
    threading.Thread(target=run, name=f"uniond-{name}", daemon=True).start()
    return await future


class LayerOperations:
    """Works on the manager's mounts; the manager knows nothing of it."""

    def __init__(self, manager: MountManager) -> None:
        self.manager = manager

    @property
    def _places(self) -> paths.Places:
        return self.manager.places

    async def diff(self, mount_id: str, caller: Caller, opts: dict[str, Any]) -> list[diff.Change]:
        opts = options.check("Diff", opts, options.DIFF_OPTIONS)
        record = self.manager.get(mount_id)
        if caller.uid != record.owner:
            # A Diff names files in someone else's upper: as much as an export shows.
            await self.manager.authorize(caller, ACTION_EXPORT, opts, record)
        spec = record.spec
        if not spec.upperdir:
            return []
        # Read through directories opened without symlinks: the owner of a path could
        # otherwise point a parent of the upper at files it may not list.
        with contextlib.ExitStack() as held:
            try:
                upper = self._places.open(held, "upperdir", spec.upperdir)
                lowers = [self._places.open(held, f"lowerdirs[{i}]", p) for i, p in enumerate(spec.lowerdirs)]
            except InvalidArgument as e:
                raise Failed(f"mount {record.id}: its layers are no longer where they were mounted from: {e}") from None
            return await asyncio.to_thread(
                diff.changes, f"/proc/self/fd/{upper.fd}", [f"/proc/self/fd/{h.fd}" for h in lowers]
            )

    async def diff_into(self, mount_id: str, fd: int, caller: Caller, opts: dict[str, Any]) -> int:
        """Diff's entries written to the caller's fd as they are found (see diff.write_into),
        so that no answer is too large for a message or for the daemon's memory."""
        opts = options.check("DiffInto", opts, options.DIFF_OPTIONS)
        stream.check_fd(fd, writing=True)
        record = self.manager.get(mount_id)
        if caller.uid != record.owner:
            await self.manager.authorize(caller, ACTION_EXPORT, opts, record)
        with self._using(mount_id) as record, contextlib.ExitStack() as held:
            upper = self._upper_of(held, record)
            if not upper:
                return 0
            try:
                lowers = [self._places.open(held, f"lowerdirs[{i}]", p) for i, p in enumerate(record.spec.lowerdirs)]
            except InvalidArgument as e:
                raise Failed(f"mount {record.id}: its layers are no longer where they were mounted from: {e}") from None
            # A thread of its own: the caller's reader may take as long as it likes.
            return await own_thread(
                diff.write_into, upper, [f"/proc/self/fd/{h.fd}" for h in lowers], stream.Sink(fd)
            )

    @contextlib.contextmanager
    def _using(self, mount_id: str):
        """Holds the mount against Unmount while a layer operation reads its upper."""
        with self.manager.claims.using(mount_id, lambda: self.manager.get(mount_id)) as record:
            yield record

    def _upper_of(self, held: contextlib.ExitStack, record: MountRecord) -> str:
        """The mount's upper as a path through a descriptor opened without symlinks
        (as for Diff), or "" for a mount without one."""
        if not record.spec.upperdir:
            return ""
        try:
            upper = self._places.open(held, "upperdir", record.spec.upperdir)
        except InvalidArgument as e:
            raise Failed(f"mount {record.id}: its upper is no longer where it was mounted from: {e}") from None
        return f"/proc/self/fd/{upper.fd}/."

    def _destdir(self, held: contextlib.ExitStack, destdir: str) -> paths.OpenDir:
        """Opens ``destdir`` without symlinks, checks where it is and claims it, so that
        two calls never fill it at once. The daemon then writes only through the fd."""
        dest = self._places.open(held, "destdir", destdir, placed=True)
        for record in list(self.manager.records.values()):
            spec = record.spec
            named = {"mountpoint": spec.mountpoint, "upperdir": spec.upperdir, "workdir": spec.workdir}
            named.update({f"lowerdirs[{i}]": p for i, p in enumerate(spec.lowerdirs)})
            for name, path in named.items():
                if path and (paths.inside(dest.path, path) or paths.inside(path, dest.path)):
                    raise InvalidArgument(
                        f"destdir {dest.path!r} overlaps the {name} {path!r} of mount {record.id}; "
                        "give a directory outside every mount's layers"
                    )
        held.enter_context(self.manager.claims.destdir(dest.path))
        return dest

    async def export_diff(
        self, mount_id: str, fd: int, caller: Caller, opts: dict[str, Any], method: str = "ExportDiff"
    ) -> layertar.ExportResult:
        """ExportDiff, and ExportLayer (``method``), which also answers the digests."""
        opts = options.check(method, opts, options.EXPORT_OPTIONS)
        compression = opts.get("compression", "none")
        check_compression(compression)
        _require_upper(method, self.manager.get(mount_id))
        await self.manager.authorize(
            caller, ACTION_EXPORT, opts, self.manager.get(mount_id), compression=compression
        )
        with self._using(mount_id) as record, contextlib.ExitStack() as held:
            upper = self._upper_of(held, record)
            result = await own_thread(layertar.export_diff, upper, fd, compression, f"mount {mount_id}: export",
                                      method == "ExportLayer")
        log.info("mount %s: exported %d entries, %d bytes (uid %d)", mount_id, result.entries, result.bytes, caller.uid)
        return result

    def open_readable(self, held: contextlib.ExitStack, argument: str, path: str, caller: Caller) -> str:
        """A directory the daemon will only read for the caller (a parent layer), as a
        path through a descriptor; the caller must be able to list it itself."""
        handle = self._places.open(held, argument, path)
        if not reach.can_read(caller, handle.path, handle.st):
            raise NotPermitted(f"{argument}: you cannot list {handle.path!r} yourself; give a directory you can read")
        return f"/proc/self/fd/{handle.fd}/."

    async def import_layer(
        self, fd: int, destdir: str, caller: Caller, opts: dict[str, Any], method: str = "ImportLayer"
    ) -> layertar.ImportResult:
        """ImportLayer, and ApplyLayer (``method``): parents, digests and their checks."""
        apply = method == "ApplyLayer"
        opts = options.check(method, opts, options.APPLY_OPTIONS if apply else options.IMPORT_OPTIONS)
        devices = opts.get("devices", False)
        if devices and not caller.is_root:
            raise NotPermitted("devices: only root may import device files; other layers refuse them")
        check_digest("expected_digest", opts.get("expected_digest", ""))
        check_digest("expected_diff_id", opts.get("expected_diff_id", ""))
        canonical = self._places.placed("destdir", destdir)
        await self.manager.authorize(caller, ACTION_IMPORT, opts, destdir=canonical)
        with contextlib.ExitStack() as held:
            parents = tuple(self.open_readable(held, f"parents[{i}]", p, caller)
                            for i, p in enumerate(opts.get("parents", [])))
            dest = self._destdir(held, canonical)
            crash.point("import.claimed")
            result = await own_thread(
                functools.partial(layertar.import_layer, digests=apply, parents=parents,
                                  expected_digest=opts.get("expected_digest", ""),
                                  expected_diff_id=opts.get("expected_diff_id", "")),
                fd, f"/proc/self/fd/{dest.fd}/.", devices,
            )
            crash.point("import.written")
        log.info("imported a layer of %d entries into %s (uid %d)", result.entries, dest.path, caller.uid)
        return result

    async def commit(
        self, mount_id: str, destdir: str, caller: Caller, opts: dict[str, Any]
    ) -> snapshot.CommitResult:
        opts = options.check("Commit", opts, options.COMMIT_OPTIONS)
        _require_upper("Commit", self.manager.get(mount_id))
        canonical = self._places.placed("destdir", destdir)
        await self.manager.authorize(caller, ACTION_COMMIT, opts, self.manager.get(mount_id), destdir=canonical)
        with self._using(mount_id) as record, contextlib.ExitStack() as held:
            if record.detached:
                raise Busy(
                    f"mount {mount_id} was detached by a lazy Unmount; Commit needs it in place "
                    "(ExportDiff still reads its upper)"
                )
            dest = self._destdir(held, canonical)
            upper = self._upper_of(held, record)
            result = await asyncio.to_thread(_commit, record, upper, f"/proc/self/fd/{dest.fd}/.")
        log.info("mount %s: committed %d entries into %s (uid %d)", mount_id, result.entries, dest.path, caller.uid)
        return result


def _require_upper(method: str, record: MountRecord) -> None:
    """A read-only view has no upper, so no changes to make a layer of: an empty tar or
    an empty destdir would pass for a layer with nothing in it."""
    if not record.spec.upperdir:
        raise InvalidArgument(
            f"{method}: mount {record.id} has no upper (it is a read-only view of its lowers), so it has "
            "no changes to make a layer of; mount with an upperdir to record changes"
        )


def _commit(record: MountRecord, upper: str, dest: str) -> snapshot.CommitResult:
    spec = record.spec
    if not upper or spec.readonly or _freeze(record):
        try:
            crash.point("commit.frozen")
            result = snapshot.commit(upper, dest)
            crash.point("commit.copied")
            return result
        finally:
            if upper and not spec.readonly:
                _thaw(record)
    return _commit_and_verify(record, upper, dest)


def _commit_and_verify(record: MountRecord, upper: str, dest: str) -> snapshot.CommitResult:
    """With files open for writing the mount cannot be frozen: copy, then prove that
    nothing changed meanwhile, and copy again if something did."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            result = snapshot.commit(upper, dest)
        except (FileNotFoundError, NotADirectoryError):
            continue  # an entry went away during the copy; destdir was emptied
        if snapshot.fingerprint(upper) == result.fingerprint:
            return result
        log.info("mount %s: upper changed during Commit (attempt %d); copying again", record.id, attempt)
        engine.empty_directory(dest)
    users = ", ".join(str(h) for h in holders.find(record.spec.mountpoint)) or "no process found"
    raise Busy(
        f"mount {record.id} kept changing during {COMMIT_ATTEMPTS} copies, so no consistent layer "
        f"could be taken; files are open for writing by: {users}"
    )


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


def _thaw(record: MountRecord) -> None:
    try:
        engine.set_readonly(record.spec.mountpoint, False)
    except OSError as e:
        log.error("mount %s: could not make it writable again after Commit: %s", record.id, e)
