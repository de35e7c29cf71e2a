"""The D-Bus face of uniond: translates calls to the manager and back. Nothing more.

This is the only module that imports the D-Bus library (dbus-next), so swapping it for
its API-compatible fork dbus-fast stays a change of the imports below.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import NameFlag, PropertyAccess, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from uniond import constants
from uniond.caller import Caller
from uniond.errors import Failed, InvalidArgument, NotFound, UniondError
from uniond.manager import MountManager, MountRequest
from uniond.options import ForeignValue
from uniond.polkit import Authority, PolkitAbsent, PolkitAnswer, PolkitFailed
from uniond.records import MountRecord

log = logging.getLogger(__name__)

# dbus-next gives a method no access to its message; a message handler that runs first
# stores the sender here, and the method (run in a copy of this context) reads it.
_sender: contextvars.ContextVar[str] = contextvars.ContextVar("sender", default="")

# The bus answers such errors when nobody owns (and nothing activates) polkit's name.
_NO_SUCH_NAME = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
_PEER_TIMEOUT = 25.0  # dbus-next calls have no timeout of their own

_PLAIN_SIGNATURES = {"b", "s", "t", "u", "i", "x", "n", "q", "y", "d", "as"}


def _unwrap_options(raw: dict[str, Variant]) -> dict[str, Any]:
    """Variants to Python values; types no option uses stay recognisably foreign."""
    return {
        key: v.value if v.signature in _PLAIN_SIGNATURES else ForeignValue(v.signature)
        for key, v in raw.items()
    }


def _wrap(value: Any) -> Variant:
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("t", value)
    return Variant("s", str(value))


# Where each method taking a descriptor has it: (member, signature) -> argument position.
_FD_ARGUMENTS = {("ExportDiff", "oha{sv}"): 1, ("ImportLayer", "hsa{sv}"): 0}


def _close_unclaimed_fds(msg: Message) -> None:
    """dbus-next never closes the descriptors that come with a message, and any caller
    may attach some to any call: keep only the one a layer method takes (and closes
    itself), close the others now, so that no caller can exhaust the daemon's fds."""
    if not msg.unix_fds:
        return
    keep = None
    if (
        msg.message_type == MessageType.METHOD_CALL
        and msg.path == constants.MANAGER_PATH
        and msg.interface in (None, constants.MANAGER_INTERFACE)
    ):
        position = _FD_ARGUMENTS.get((msg.member, msg.signature))
        if position is not None and len(msg.body) > position:
            index = msg.body[position]
            if isinstance(index, int) and 0 <= index < len(msg.unix_fds):
                keep = index
    for index, fd in enumerate(msg.unix_fds):
        if index != keep:
            try:
                os.close(fd)
            except OSError:
                pass


@contextlib.contextmanager
def _owned(fd: int | None) -> Iterator[int]:
    """The received descriptor, closed on every path; an index without one is refused."""
    try:
        if fd is None:
            raise InvalidArgument("fd: the message carries no file descriptor for it")
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def mount_path(mount_id: str) -> str:
    return f"{constants.MOUNT_PATH_PREFIX}/{mount_id}"


def mount_id_of(path: str) -> str:
    prefix = constants.MOUNT_PATH_PREFIX + "/"
    if not path.startswith(prefix) or "/" in path[len(prefix) :]:
        raise NotFound(f"{path!r} is not a uniond mount object; ListMounts gives valid paths")
    return path[len(prefix) :]


def translated(fn):
    """Send UniondErrors under their own names and anything else as one-line Failed.

    dbus-next would otherwise send a Python traceback to the caller.
    """

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except UniondError as e:
            log.info("%s refused: %s", fn.__name__, e)
            raise DBusError(e.dbus_name, str(e)) from None
        except DBusError:
            raise
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DBusError(Failed.dbus_name, f"{fn.__name__} failed: {text}") from None

    return wrapper


def _ignore_replied_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """dbus-next sends a DBusError raised by an async method as the reply, then lets it
    escape to the event loop as well; it was answered, so it is not logged twice."""
    if isinstance(context.get("exception"), DBusError):
        return
    loop.default_exception_handler(context)


def _name_arguments(interface: ServiceInterface, names: dict[str, list[str]]) -> None:
    """dbus-next leaves results and signal arguments unnamed; the contract names them."""
    members = [*ServiceInterface._get_methods(interface), *ServiceInterface._get_signals(interface)]
    for member in members:
        intro = member.introspection
        args = intro.out_args if hasattr(intro, "out_args") else intro.args
        for arg, name in zip(args, names.get(member.name, []), strict=False):
            arg.name = name


class MountInterface(ServiceInterface):
    """org.uniond1.Mount: one object per mount, all properties read-only."""

    def __init__(self, record: MountRecord) -> None:
        super().__init__(constants.MOUNT_INTERFACE)
        self.record = record

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.record.id

    @dbus_property(access=PropertyAccess.READ)
    def Mountpoint(self) -> "s":
        return self.record.spec.mountpoint

    @dbus_property(access=PropertyAccess.READ)
    def LowerDirs(self) -> "as":
        return list(self.record.spec.lowerdirs)

    @dbus_property(access=PropertyAccess.READ)
    def UpperDir(self) -> "s":
        return self.record.spec.upperdir

    @dbus_property(access=PropertyAccess.READ)
    def WorkDir(self) -> "s":
        return self.record.spec.workdir

    @dbus_property(access=PropertyAccess.READ)
    def ReadOnly(self) -> "b":
        return self.record.spec.readonly

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self.record.owner

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> "t":
        return self.record.created_us

    @dbus_property(access=PropertyAccess.READ)
    def Options(self) -> "a{sv}":
        return {key: _wrap(value) for key, value in self.record.options.items()}


class _Bus(MessageBus):
    """dbus-next declares org.freedesktop.DBus.ObjectManager on every path and answers
    GetManagedObjects itself, but sends InterfacesAdded/Removed from the object's own
    path; the specification (and GDBus clients) expect them from the manager's."""

    def _emit_interface_added(self, path, interface):
        if self._disconnected or not path.startswith(constants.MOUNT_PATH_PREFIX + "/"):
            return
        values = {
            prop.name: Variant(prop.signature, getattr(interface, prop.prop_getter.__name__))
            for prop in ServiceInterface._get_properties(interface)
        }
        self.send(
            Message.new_signal(
                constants.MANAGER_PATH,
                constants.OBJECT_MANAGER_INTERFACE,
                "InterfacesAdded",
                "oa{sa{sv}}",
                [path, {interface.name: values}],
            )
        )

    def _emit_interface_removed(self, path, removed_interfaces):
        if self._disconnected or not path.startswith(constants.MOUNT_PATH_PREFIX + "/"):
            return
        self.send(
            Message.new_signal(
                constants.MANAGER_PATH,
                constants.OBJECT_MANAGER_INTERFACE,
                "InterfacesRemoved",
                "oas",
                [path, removed_interfaces],
            )
        )


class ManagerInterface(ServiceInterface):
    """org.uniond1.Manager: the methods callers use."""

    def __init__(self, service: BusService) -> None:
        super().__init__(constants.MANAGER_INTERFACE)
        self.service = service
        self.manager = service.manager
        _name_arguments(
            self,
            {
                "Mount": ["mount"],
                "Diff": ["changes"],
                "ExportDiff": ["bytes"],
                "ImportLayer": ["entries"],
                "Commit": ["entries"],
                "ListMounts": ["mounts"],
                "MountAdded": ["mount", "mountpoint"],
                "MountRemoved": ["mount", "mountpoint"],
            },
        )

    @method()
    @translated
    async def Mount(self, lowerdirs: "as", upperdir: "s", mountpoint: "s", options: "a{sv}") -> "o":
        caller = await self.service.caller()
        request = MountRequest(tuple(lowerdirs), upperdir, mountpoint, _unwrap_options(options))
        record = await self.manager.mount(request, caller)
        return mount_path(record.id)

    @method()
    @translated
    async def Unmount(self, mount: "o", options: "a{sv}"):
        caller = await self.service.caller()
        await self.manager.unmount(mount_id_of(mount), caller, _unwrap_options(options))

    @method()
    @translated
    async def Diff(self, mount: "o", options: "a{sv}") -> "a(ss)":
        caller = await self.service.caller()
        changes = await self.manager.diff(mount_id_of(mount), caller, _unwrap_options(options))
        return [list(c) for c in changes]  # dbus-next wants a struct as a list

    # dbus-next hands an "h" argument over as the received descriptor itself and never
    # closes it: the method owns it and closes it on every path. An index with no
    # descriptor attached arrives as None.

    @method()
    @translated
    async def ExportDiff(self, mount: "o", fd: "h", options: "a{sv}") -> "t":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.manager.export_diff(mount_id_of(mount), owned, caller, _unwrap_options(options))
        return result.bytes

    @method()
    @translated
    async def ImportLayer(self, fd: "h", destdir: "s", options: "a{sv}") -> "t":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.manager.import_layer(owned, destdir, caller, _unwrap_options(options))
        return result.entries

    @method()
    @translated
    async def Commit(self, mount: "o", destdir: "s", options: "a{sv}") -> "t":
        caller = await self.service.caller()
        result = await self.manager.commit(mount_id_of(mount), destdir, caller, _unwrap_options(options))
        return result.entries

    @method()
    @translated
    async def ListMounts(self) -> "ao":
        return [mount_path(r.id) for r in self.manager.list()]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return constants.VERSION

    @signal()
    def MountAdded(self, mount: str, mountpoint: str) -> "os":
        return [mount, mountpoint]

    @signal()
    def MountRemoved(self, mount: str, mountpoint: str) -> "os":
        return [mount, mountpoint]


class BusService:
    """Connects to the bus, exports the objects and keeps them in step with the manager."""

    def __init__(self, manager: MountManager, address: str | None) -> None:
        self.manager = manager
        self.address = address
        self.bus: MessageBus | None = None
        self.interface = ManagerInterface(self)
        self._callers: OrderedDict[str, Caller] = OrderedDict()  # unique names are never reused
        manager.authority = Authority(self)

    async def connect(self) -> None:
        if self.address:
            self.bus = _Bus(bus_address=self.address, negotiate_unix_fd=True)
        else:
            self.bus = _Bus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await self.bus.connect()
        asyncio.get_running_loop().set_exception_handler(_ignore_replied_errors)
        self.bus.add_message_handler(_close_unclaimed_fds)
        self.bus.add_message_handler(self._remember_sender)
        self.bus.export(constants.MANAGER_PATH, self.interface)
        for record in self.manager.list():
            self.mount_added(record, announce=False)
        self.manager.subscribe(self)
        reply = await self.bus.request_name(constants.BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise Failed(f"could not own {constants.BUS_NAME} ({reply.name}): is another uniond running?")

    async def wait_for_disconnect(self) -> None:
        assert self.bus is not None
        await self.bus.wait_for_disconnect()

    def disconnect(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()

    @staticmethod
    def _remember_sender(msg: Message) -> None:
        if msg.message_type == MessageType.METHOD_CALL:
            _sender.set(msg.sender or "")

    async def _call_bus(self, member: str, signature: str, body: list[Any]) -> Message:
        assert self.bus is not None
        return await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature=signature,
                body=body,
            )
        )

    async def caller(self) -> Caller:
        """Who is calling, asked of the bus, never of the caller."""
        sender = _sender.get()
        if sender in self._callers:
            return self._callers[sender]
        reply = await asyncio.wait_for(self._call_bus("GetConnectionCredentials", "s", [sender]), _PEER_TIMEOUT)
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            raise Failed(f"the bus did not say who the caller {sender!r} is")
        credentials = {key: v.value for key, v in reply.body[0].items()}
        if "UnixUserID" not in credentials:
            raise Failed(f"the bus gave no uid for the caller {sender!r}")
        caller = Caller(
            uid=int(credentials["UnixUserID"]),
            pid=int(credentials.get("ProcessID", 0)),
            bus_name=sender,
            gids=tuple(int(g) for g in credentials.get("UnixGroupIDs", ())),
        )
        self._callers[sender] = caller
        if len(self._callers) > 1024:
            self._callers.popitem(last=False)
        return caller

    # PolkitPeer: the D-Bus half of uniond.polkit.
    async def check_authorization(
        self, bus_name: str, action: str, details: Mapping[str, str], flags: int
    ) -> PolkitAnswer:
        assert self.bus is not None
        reply = await self.bus.call(
            Message(
                destination=constants.POLKIT_BUS_NAME,
                path=constants.POLKIT_PATH,
                interface=constants.POLKIT_INTERFACE,
                member="CheckAuthorization",
                signature="(sa{sv})sa{ss}us",
                body=[["system-bus-name", {"name": Variant("s", bus_name)}], action, dict(details), flags, ""],
            )
        )
        if reply.message_type == MessageType.ERROR:
            if reply.error_name in _NO_SUCH_NAME:
                raise PolkitAbsent(reply.error_name)
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise PolkitFailed(f"{reply.error_name}: {text}")
        authorized, challenge, answer_details = reply.body[0]
        return PolkitAnswer(bool(authorized), bool(challenge), dict(answer_details))

    async def is_connected(self, bus_name: str) -> bool:
        reply = await self._call_bus("NameHasOwner", "s", [bus_name])
        return reply.message_type == MessageType.METHOD_RETURN and bool(reply.body[0])

    # MountListener: keep the bus view equal to the manager's before a call returns (U3).
    def mount_added(self, record: MountRecord, announce: bool = True) -> None:
        assert self.bus is not None
        path = mount_path(record.id)
        self.bus.export(path, MountInterface(record))
        if announce:
            self.interface.MountAdded(path, record.spec.mountpoint)

    def mount_removed(self, record: MountRecord) -> None:
        assert self.bus is not None
        path = mount_path(record.id)
        self.bus.unexport(path)
        self.interface.MountRemoved(path, record.spec.mountpoint)
