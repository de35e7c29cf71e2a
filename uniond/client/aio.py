"""The asyncio client: every call of the D-Bus contract (README, "The D-Bus contract"),
made with dbus-next and turned into Python values and exceptions.

This is the only code of the client that speaks D-Bus; the synchronous ``Client`` runs
these same coroutines on a loop of its own. A new method of the contract is one
``_call`` here and one line in ``sync.py`` (and, for a method on a mount, one in
``mount.py``, where ``AsyncMount`` lives).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from typing import Any

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

from uniond import constants
from uniond.client import errors, files, names
from uniond.client.events import AsyncEvents
from uniond.client.files import FileOrFd, Progress
from uniond.client.mount import AsyncMount
from uniond.client.values import Change, ExportedImage, ImageInfo, LayerInfo, MountInfo, Status

_BUS = "org.freedesktop.DBus"
_PROPERTIES = "org.freedesktop.DBus.Properties"
_SYSTEMD = "org.freedesktop.systemd1"
_KIND_ORDER = {"D": 0, "C": 1, "A": 2}  # Diff's order for one path: a replaced directory is D then A
_GONE = {"org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.DBus.Error.UnknownInterface",
         "org.freedesktop.DBus.Error.UnknownMethod"}


def _variant(value: Any) -> Variant:
    """A Python option value as the contract types it (options take b, s, t, or as)."""
    if isinstance(value, list | tuple):
        return Variant("as", [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value])
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("t", value)
    return Variant("s", os.fspath(value) if isinstance(value, os.PathLike) else str(value))


def _plain(value: Any) -> Any:
    """Variants (nested in dicts and lists) to plain Python values."""
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _absolute(path: str | os.PathLike) -> str:
    """uniond takes absolute paths only; a client's relative ones are relative to its cwd."""
    return os.path.abspath(os.fspath(path))


class AsyncClient:
    """A connection to uniond for asyncio programs.

    ``address`` is a D-Bus address ("unix:path=/run/uniond/bus/system_bus_socket");
    without it the client uses the system bus (``$DBUS_SYSTEM_BUS_ADDRESS`` is honoured),
    or the session bus with ``bus="user"``. ``interactive=False`` sends
    ``auth.no_user_interaction`` with every call: polkit then never asks for a password
    and a call that would need one fails with ``NotAuthorizedCanObtain``::

        async with AsyncClient() as client:
            async with await client.mount(["/srv/image"], "/srv/upper") as m:
                print(m.mountpoint)
    """

    def __init__(self, address: str | None = None, *, bus: str = "system", interactive: bool = True) -> None:
        if bus not in ("system", "user"):
            raise ValueError(f"bus must be 'system' or 'user', not {bus!r}")
        self.address = address
        self.bus_kind = bus
        self.interactive = interactive
        self._bus: MessageBus | None = None

    async def connect(self) -> AsyncClient:
        try:
            if self.address:
                bus = MessageBus(bus_address=self.address, negotiate_unix_fd=True)
            else:
                kind = BusType.SYSTEM if self.bus_kind == "system" else BusType.SESSION
                bus = MessageBus(bus_type=kind, negotiate_unix_fd=True)
            self._bus = await bus.connect()
        except (OSError, ValueError) as e:
            where = self.address or f"the {self.bus_kind} bus"
            text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise errors.BusError(errors.NO_SERVER, f"cannot connect to {where}: {text}") from None
        return self

    async def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
            await asyncio.sleep(0)  # let dbus-next finish closing the socket

    async def __aenter__(self) -> AsyncClient:
        return await self.connect() if self._bus is None else self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # The one place that sends calls and turns error replies into exceptions.
    async def _call(self, member: str, signature: str = "", body: Sequence[Any] = (), *, fds: Sequence[int] = (),
                    path: str = constants.MANAGER_PATH, interface: str = constants.MANAGER_INTERFACE,
                    destination: str = constants.BUS_NAME) -> list[Any]:
        if self._bus is None:
            await self.connect()
        assert self._bus is not None
        message = Message(destination=destination, path=path, interface=interface, member=member,
                          signature=signature, body=list(body), unix_fds=list(fds))
        reply = await self._bus.call(message)
        if reply is None or reply.message_type == MessageType.ERROR:
            name = reply.error_name if reply is not None else errors.NO_SERVER
            text = reply.body[0] if reply is not None and reply.body and isinstance(reply.body[0], str) else ""
            raise errors.from_dbus(name or "org.freedesktop.DBus.Error.Failed", text)
        return reply.body

    def _options(self, **options: Any) -> dict[str, Variant]:
        opts = {key: _variant(value) for key, value in options.items() if value is not None}
        if not self.interactive:
            opts[constants.OPTION_NO_USER_INTERACTION] = Variant("b", True)
        return opts

    # The Manager's methods and properties.
    async def version(self) -> str:
        body = await self._call("Get", "ss", [constants.MANAGER_INTERFACE, "Version"], interface=_PROPERTIES)
        return _plain(body[0])

    async def mount(self, lowers: Iterable[str | os.PathLike], upper: str | os.PathLike | None = None,
                    mountpoint: str | os.PathLike | None = None, **options: Any) -> AsyncMount:
        """Mount ``lowers`` (top-most first) under ``upper`` (None: read-only) at
        ``mountpoint`` (None: uniond makes one). ``options`` are the contract's
        (readonly, volatile, workdir, description, dev, suid); paths may be relative."""
        if isinstance(lowers, str | os.PathLike):
            raise TypeError("lowers is a list of directories, top-most first, not one path")
        if "workdir" in options and options["workdir"] is not None:
            options["workdir"] = _absolute(options["workdir"])
        (path,) = await self._call(
            "Mount", "asssa{sv}",
            [[_absolute(p) for p in lowers], _absolute(upper) if upper else "",
             _absolute(mountpoint) if mountpoint else "", self._options(**options)],
        )
        return await self.get(path)

    async def get(self, path: str) -> AsyncMount:
        """The mount at a D-Bus object path."""
        try:
            (props,) = await self._call("GetAll", "s", [constants.MOUNT_INTERFACE], path=path, interface=_PROPERTIES)
        except errors.BusError as e:
            if e.dbus_name in _GONE:
                raise errors.NotFound(f"no mount object {path!r}; `unionctl list` shows the mounts") from None
            raise
        return AsyncMount(self, MountInfo.from_properties(path, _plain(props)))

    async def mounts(self) -> list[AsyncMount]:
        """Every mount, with its properties, in one call (ObjectManager)."""
        (objects,) = await self._call("GetManagedObjects", interface=constants.OBJECT_MANAGER_INTERFACE)
        found = [
            MountInfo.from_properties(path, _plain(interfaces[constants.MOUNT_INTERFACE]))
            for path, interfaces in objects.items()
            if constants.MOUNT_INTERFACE in interfaces
        ]
        return [AsyncMount(self, info) for info in sorted(found, key=lambda i: (i.created_us, i.id))]

    async def find(self, name: str | os.PathLike) -> AsyncMount:
        """A mount named by its id, its object path, its mountpoint or any path inside it
        (the innermost uniond mount that contains it, as ``findmnt -T`` finds mounts)."""
        mounts = await self.mounts()
        info = names.resolve(os.fspath(name), [m.info for m in mounts])
        return next(m for m in mounts if m.info is info)

    async def import_layer(self, file_or_fd: FileOrFd, destdir: str | os.PathLike, *, devices: bool = False,
                           progress: Progress | None = None) -> int:
        """Unpack a layer tar (plain, gzip or zstd) from a path, file object or fd into
        the empty directory ``destdir``; returns the number of entries made."""
        (entries,) = await self._read_from("ImportLayer", file_or_fd, destdir, progress, devices=devices or None)
        return entries

    async def apply_layer(self, file_or_fd: FileOrFd, destdir: str | os.PathLike, *,
                          parents: Iterable[str | os.PathLike] = (), expected_digest: str | None = None,
                          expected_diff_id: str | None = None, devices: bool = False,
                          progress: Progress | None = None) -> LayerInfo:
        """``import_layer`` answering what a manifest needs (digest, diff_id, ...).

        ``parents`` are the directories the layer will sit on, top-most first: a directory
        the layer names only as a parent takes their metadata (a sticky /tmp stays sticky).
        A layer whose digests differ from ``expected_digest`` / ``expected_diff_id``
        (sha256:<hex>) is refused with ``InvalidArgument`` and ``destdir`` left empty."""
        if isinstance(parents, str | os.PathLike):
            raise TypeError("parents is a list of directories, top-most first, not one path")
        (info,) = await self._read_from(
            "ApplyLayer", file_or_fd, destdir, progress, devices=devices or None,
            parents=[_absolute(p) for p in parents] or None, expected_digest=expected_digest,
            expected_diff_id=expected_diff_id)
        return LayerInfo.from_info(_plain(info))

    async def import_image(self, file_or_fd: FileOrFd, store: str | os.PathLike, *,
                           expected_digest: str | None = None, devices: bool = False,
                           progress: Progress | None = None) -> ImageInfo:
        """Unpack an image (an OCI image layout archive or a ``docker save`` tar) into
        ``store``, each layer once (keyed by its diff_id); ``lowerdirs`` of the answer are
        ready for ``mount``. Every blob's digest is checked, and the manifest's against
        ``expected_digest`` when given."""
        lowerdirs, info = await self._read_from("ImportImage", file_or_fd, store, progress,
                                                devices=devices or None, expected_digest=expected_digest)
        return ImageInfo.from_reply(lowerdirs, _plain(info))

    async def status(self) -> Status:
        """The daemon's version and mount count, and its unit's state when systemd runs it."""
        version = await self.version()
        (listed,) = await self._call("ListMounts")
        return Status(version, len(listed), *await self._unit_state())

    async def _unit_state(self) -> tuple[str | None, str | None, str | None]:
        try:
            (unit,) = await asyncio.wait_for(self._call(
                "GetUnit", "s", [constants.SYSTEMD_UNIT], destination=_SYSTEMD, path="/org/freedesktop/systemd1",
                interface=f"{_SYSTEMD}.Manager"), 5)
        except errors.BusError as e:
            return ("inactive", "dead", None) if e.dbus_name.endswith("NoSuchUnit") else (None, None, None)
        except TimeoutError:
            return None, None, None
        (props,) = await self._call("GetAll", "s", [f"{_SYSTEMD}.Unit"], destination=_SYSTEMD, path=unit,
                                    interface=_PROPERTIES)
        (text,) = await self._call("Get", "ss", [f"{_SYSTEMD}.Service", "StatusText"], destination=_SYSTEMD,
                                   path=unit, interface=_PROPERTIES)
        props = _plain(props)
        return props.get("ActiveState"), props.get("SubState"), _plain(text) or None

    async def reload(self) -> None:
        """Apply edits of the declared mounts (mounts.d) and the configuration now, as
        ``systemctl reload uniond`` does; returns once they are applied."""
        await self._call("Reload")

    async def events(self) -> AsyncEvents:
        """Subscribe to MountAdded / MountRemoved; ``async for event in await client.events()``."""
        if self._bus is None:
            await self.connect()
        assert self._bus is not None
        stream = AsyncEvents(self)
        self._bus.add_message_handler(stream._on_message)
        await self._call("AddMatch", "s", [stream.rule], destination=_BUS, path="/org/freedesktop/DBus",
                         interface=_BUS)
        return stream

    # A mount's methods; AsyncMount is the way to call them.
    async def _unmount(self, path: str, lazy: bool) -> None:
        await self._call("Unmount", "oa{sv}", [path, self._options(lazy=lazy or None)])

    async def _diff(self, path: str) -> list[Change]:
        """DiffInto through a pipe read meanwhile, not Diff: any number of changes and any
        name fit, where Diff's one message does not. Sorted as Diff sorts."""
        changes: list[Change] = []
        await files.while_reading(lambda fd: self._diff_into(path, fd),
                                  files.nul_records(lambda record: changes.append(Change.from_record(record))))
        return sorted(changes, key=lambda c: (c.path, _KIND_ORDER[c.kind]))

    async def _diff_into(self, path: str, file_or_fd: FileOrFd) -> int:
        return await self._write_into("DiffInto", path, file_or_fd, None)

    async def _update(self, path: str, lowers: Iterable[str | os.PathLike], **options: Any) -> None:
        if isinstance(lowers, str | os.PathLike):
            raise TypeError("lowers is a list of directories, top-most first, not one path")
        await self._call("Update", "oasa{sv}", [path, [_absolute(p) for p in lowers], self._options(**options)])

    async def _read_from(self, member: str, file_or_fd: FileOrFd, destdir: str | os.PathLike,
                         progress: Progress | None, **options: Any) -> list[Any]:
        """A method that reads the descriptor into a directory: (h fd, s destdir, a{sv})."""
        with files.readable(file_or_fd) as fd:
            async with files.watch(progress, files.offset_meter(fd, reading=True)):
                return await self._call(member, "hsa{sv}", [0, _absolute(destdir), self._options(**options)],
                                        fds=[fd])

    async def _write_into(self, member: str, path: str, file_or_fd: FileOrFd, progress: Progress | None,
                          **options: Any) -> Any:
        """A method that writes a mount into the descriptor: (o mount, h fd, a{sv})."""
        with files.writable(file_or_fd) as fd:
            async with files.watch(progress, files.offset_meter(fd, reading=False)):
                (answer,) = await self._call(member, "oha{sv}", [path, 0, self._options(**options)], fds=[fd])
        return _plain(answer)

    async def _export(self, path: str, file_or_fd: FileOrFd, compression: str | None,
                      progress: Progress | None) -> int:
        return await self._write_into("ExportDiff", path, file_or_fd, progress,
                                      compression=compression or files.compression_for(file_or_fd))

    async def _export_layer(self, path: str, file_or_fd: FileOrFd, compression: str | None,
                            progress: Progress | None) -> LayerInfo:
        return LayerInfo.from_info(await self._write_into(
            "ExportLayer", path, file_or_fd, progress, compression=compression or files.compression_for(file_or_fd)))

    async def _export_image(self, path: str, file_or_fd: FileOrFd, progress: Progress | None,
                            **options: Any) -> ExportedImage:
        return ExportedImage.from_info(await self._write_into("ExportImage", path, file_or_fd, progress, **options))

    async def _commit(self, info: MountInfo, destdir: str | os.PathLike, progress: Progress | None) -> int:
        dest = _absolute(destdir)
        async with files.watch(progress, files.tree_meter(dest, info.upperdir)):
            (entries,) = await self._call("Commit", "osa{sv}", [info.path, dest, self._options()])
        return entries
