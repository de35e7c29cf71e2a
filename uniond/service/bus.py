"""The connection to the bus: owning the name, exporting objects, and the peers uniond
asks (the bus itself for who calls, polkit for what they may do).

The service room is the only one that imports the D-Bus library (dbus-next; an
import-linter contract keeps it so), so swapping it for its API-compatible fork
dbus-fast stays a change of imports here and in interfaces.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.constants import NameFlag, RequestNameReply
from dbus_next.errors import DBusError

from uniond import constants
from uniond.access.caller import Caller
from uniond.access.polkit import Authority, PolkitAbsent, PolkitAnswer, PolkitFailed
from uniond.errors import Failed
from uniond.mounts.imageops import ImageOperations
from uniond.mounts.layerops import LayerOperations
from uniond.mounts.manager import MountManager
from uniond.mounts.records import MountRecord
from uniond.service import privatebus, wire
from uniond.service.connection import UniondBus
from uniond.service.interfaces import ManagerInterface, close_unclaimed_fds, mount_path, signature_helper
from uniond.service.mountobject import MountInterface
from uniond.service.peers import BusPeers

log = logging.getLogger(__name__)

# dbus-next gives a method no access to its message; a message handler that runs first
# stores the sender here, and the method (run in a copy of this context) reads it.
_sender: contextvars.ContextVar[str] = contextvars.ContextVar("sender", default="")

# The bus answers such errors when nobody owns (and nothing activates) polkit's name.
_NO_SUCH_NAME = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
_PEER_TIMEOUT = 25.0  # dbus-next calls have no timeout of their own
_KERNEL_CALLS = {("Mount", "asssa{sv}"), ("Unmount", "oa{sv}")}


def _ignore_replied_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """dbus-next sends a DBusError raised by an async method as the reply, then lets it
    escape to the event loop as well; it was answered, so it is not logged twice."""
    if isinstance(context.get("exception"), DBusError):
        return
    loop.default_exception_handler(context)


class NameNotAllowed(Failed):
    """The bus policy refuses uniond its name: uniond's policy file is not installed.

    uniond never falls back to a private bus by itself: under systemd that would hide a
    broken install behind a daemon nobody can reach.
    """

    exit_code = 77  # EX_NOPERM; ./dev run reads it to run on its private bus instead


class BusService:
    """Connects to the bus, exports the objects and keeps them in step with the manager."""

    def __init__(self, manager: MountManager, layers: LayerOperations, address: str | None) -> None:
        self.manager = manager
        self.layers = layers
        self.images = ImageOperations(layers)
        self.address = address
        self.bus: UniondBus | None = None
        self.interface = ManagerInterface(self)
        self._callers: OrderedDict[str, Caller] = OrderedDict()  # unique names are never reused
        self._packing: asyncio.Future | None = None
        self.kernel_calls = 0  # Mount and Unmount calls received and not yet answered
        self._objects: dict[str, MountInterface] = {}  # mount id -> its exported object
        self.on_reload: Callable[[], None] = lambda: None  # the daemon's reload
        manager.authority = Authority(self)

    async def connect(self) -> None:
        if self.address:
            self.bus = UniondBus(bus_address=self.address, negotiate_unix_fd=True)
        else:
            self.bus = UniondBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await self.bus.connect()
        asyncio.get_running_loop().set_exception_handler(_ignore_replied_errors)
        self.bus.add_message_handler(close_unclaimed_fds)
        self.bus.add_message_handler(self._remember_sender)
        self.bus.add_message_handler(signature_helper(self.interface, constants.MANAGER_PATH))
        self.bus.add_message_handler(self._count_kernel_call)
        self.manager.others_waiting = self._others_waiting
        self.manager.lifetimes.peers = BusPeers(self.bus, self.manager.lifetimes)
        self.bus.export(constants.MANAGER_PATH, self.interface)
        for record in self.manager.list():
            self.mount_added(record, announce=False)
        self.manager.subscribe(self)
        try:
            reply = await self.bus.request_name(constants.BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as e:
            if e.type != "org.freedesktop.DBus.Error.AccessDenied":
                raise Failed(f"could not own {constants.BUS_NAME}: {e.type}: {e.text}") from None
            raise NameNotAllowed(
                f"the bus does not let uniond own {constants.BUS_NAME}: its policy file "
                f"{privatebus.POLICY_NAME} is not installed; install it (apt-get install ./uniond_*.deb, or "
                f"install -m644 dbus/{privatebus.POLICY_NAME} /etc/dbus-1/system.d/) and reload the bus "
                "(systemctl reload dbus), or run with --bus private"
            ) from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise Failed(f"could not own {constants.BUS_NAME} ({reply.name}): is another uniond running?")
        # Only now can anyone listen: the adopted mounts are found by GetManagedObjects.
        self.bus.announcing = True
        self._packing = asyncio.ensure_future(self.bus.pack_entries())

    async def wait_for_disconnect(self) -> None:
        assert self.bus is not None
        await self.bus.wait_for_disconnect()

    async def drain(self, grace: float) -> None:
        """Let the calls in flight finish for ``grace`` seconds, then cancel the rest: each
        is answered with an error (if the bus is still there) and none is left behind."""
        assert isinstance(self.bus, UniondBus)
        pending = set(self.bus.in_flight)
        if pending and grace > 0:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
            log.info("stopped %d call(s) still running after %.0f s", len(pending), grace)
        await asyncio.sleep(0.05)  # the answers leave before the connection closes

    def disconnect(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()

    @staticmethod
    def _remember_sender(msg: Message) -> None:
        if msg.message_type == MessageType.METHOD_CALL:
            _sender.set(msg.sender or "")

    def _count_kernel_call(self, msg: Message) -> None:
        if (
            msg.message_type == MessageType.METHOD_CALL
            and msg.path == constants.MANAGER_PATH
            and msg.interface == constants.MANAGER_INTERFACE  # dbus-next dispatches only these
            and (msg.member, msg.signature) in _KERNEL_CALLS
        ):
            self.kernel_calls += 1  # ManagerInterface counts them off as they finish

    def _others_waiting(self) -> bool:
        """More than this one Mount or Unmount under way, or any message not yet read."""
        if self.kernel_calls > 1:
            return True
        assert self.bus is not None
        try:
            return bool(self.bus._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        except OSError:
            return True

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
        self._objects[record.id] = MountInterface(record)
        self.bus.export(path, self._objects[record.id])
        if announce:
            self._signal("MountAdded", path, record.spec.mountpoint)

    def mount_removed(self, record: MountRecord) -> None:
        assert self.bus is not None
        path = mount_path(record.id)
        self._objects.pop(record.id, None)
        self.bus.unexport(path)
        self._signal("MountRemoved", path, record.spec.mountpoint)

    def mount_changed(self, record: MountRecord, changed: tuple[str, ...] = ()) -> None:
        """Same object, new record; PropertiesChanged carries the new values."""
        interface = self._objects.get(record.id)
        if interface is None:
            return
        before = interface.record
        interface.replace(record)
        names = [*changed, *(["Detached"] if before.detached != record.detached else [])]
        if names:
            interface.emit_properties_changed({name: getattr(interface, name) for name in names})

    def _signal(self, member: str, path: str, mountpoint: str) -> None:
        """MountAdded/MountRemoved(o, s), packed directly (as ManagerInterface declares them):
        dbus-next's generic signal path costs a tenth of a Mount."""
        assert self.bus is not None
        self.bus.send(wire.signal(constants.MANAGER_PATH, constants.MANAGER_INTERFACE, member, "os",
                                  wire.strings(path, mountpoint)))
