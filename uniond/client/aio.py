"""The asyncio client: every call of the D-Bus contract (README, "The D-Bus contract"),
made with dbus-next and turned into Python values and exceptions.

This is the only code of the client that speaks D-Bus; the synchronous ``Client`` runs
these same coroutines on a loop of its own. A new method of the contract is one
``_call`` here and one line in ``sync.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

from uniond import constants
from uniond.client import errors, files, names
from uniond.client.values import Change, Event, MountInfo, MountProperties, Status

Progress = Callable[[int, int | None], None]  # (bytes done, bytes in all or None)
FileOrFd = int | IO[bytes] | str | os.PathLike

_BUS = "org.freedesktop.DBus"
_PROPERTIES = "org.freedesktop.DBus.Properties"
_SYSTEMD = "org.freedesktop.systemd1"
_GONE = {"org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.DBus.Error.UnknownInterface",
         "org.freedesktop.DBus.Error.UnknownMethod"}


def _variant(value: Any) -> Variant:
    """A Python option value as the contract types it (options take b, s, or t)."""
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
        """Unpack a layer tar (plain or gzip) from a path, file object or fd into the
        empty directory ``destdir``; returns the number of entries made."""
        with files.readable(file_or_fd) as fd:
            async with files.watch(progress, files.offset_meter(fd, reading=True)):
                (entries,) = await self._call("ImportLayer", "hsa{sv}",
                                              [0, _absolute(destdir), self._options(devices=devices or None)], fds=[fd])
        return entries

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
        (changes,) = await self._call("Diff", "oa{sv}", [path, self._options()])
        return [Change(kind, changed) for kind, changed in changes]

    async def _export(self, path: str, file_or_fd: FileOrFd, compression: str | None,
                      progress: Progress | None) -> int:
        if compression is None:
            compression = files.compression_for(file_or_fd)
        with files.writable(file_or_fd) as fd:
            async with files.watch(progress, files.offset_meter(fd, reading=False)):
                (written,) = await self._call("ExportDiff", "oha{sv}",
                                              [path, 0, self._options(compression=compression)], fds=[fd])
        return written

    async def _commit(self, info: MountInfo, destdir: str | os.PathLike, progress: Progress | None) -> int:
        dest = _absolute(destdir)
        async with files.watch(progress, files.tree_meter(dest, info.upperdir)):
            (entries,) = await self._call("Commit", "osa{sv}", [info.path, dest, self._options()])
        return entries


class AsyncMount(MountProperties):
    """One mount: its properties as read (``info``, and each as an attribute), and the
    methods on it. ``async with`` unmounts it at the end of the block."""

    def __init__(self, client: AsyncClient, info: MountInfo) -> None:
        self.client = client
        self.info = info

    def __repr__(self) -> str:
        return f"<uniond mount {self.info.id} at {self.info.mountpoint}>"

    async def refresh(self) -> AsyncMount:
        """The mount's properties read again (NotFound once it is gone)."""
        self.info = (await self.client.get(self.path)).info
        return self

    async def diff(self) -> list[Change]:
        """What the mount changed relative to its lowers, sorted by path."""
        return await self.client._diff(self.path)

    async def export(self, file_or_fd: FileOrFd, compression: str | None = None,
                     progress: Progress | None = None) -> int:
        """Write the upper as a layer tar into a path, file object or fd; returns the
        bytes written. ``compression`` "none" or "gzip" (default: gzip for a path
        ending in .gz or .tgz, else none)."""
        return await self.client._export(self.path, file_or_fd, compression, progress)

    async def commit(self, destdir: str | os.PathLike, progress: Progress | None = None) -> int:
        """Copy the upper into the empty ``destdir`` as a native layer; returns the entries."""
        return await self.client._commit(self.info, destdir, progress)

    async def unmount(self, lazy: bool = False) -> None:
        """Unmount; ``lazy`` detaches it now even while in use (``Busy`` otherwise names
        the processes using it). uniond then removes only what it made itself."""
        await self.client._unmount(self.path, lazy)

    async def __aenter__(self) -> AsyncMount:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unmount()


class AsyncEvents:
    """MountAdded / MountRemoved as they come; ``close()`` ends the subscription."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.rule = (f"type='signal',sender='{constants.BUS_NAME}',path='{constants.MANAGER_PATH}',"
                     f"interface='{constants.MANAGER_INTERFACE}'")
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def _on_message(self, msg: Message) -> None:
        if (msg.message_type == MessageType.SIGNAL and msg.path == constants.MANAGER_PATH
                and msg.interface == constants.MANAGER_INTERFACE and msg.member in ("MountAdded", "MountRemoved")):
            self._queue.put_nowait(Event(msg.member, msg.body[0], msg.body[1]))

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; TimeoutError after ``timeout`` seconds without one."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    def __aiter__(self) -> AsyncEvents:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def close(self) -> None:
        bus = self.client._bus
        if bus is not None:
            bus.remove_message_handler(self._on_message)
