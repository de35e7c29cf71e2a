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
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import MessageFlag, NameFlag, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface

from uniond import constants
from uniond.access.caller import Caller
from uniond.access.polkit import Authority, PolkitAbsent, PolkitAnswer, PolkitFailed
from uniond.errors import Failed
from uniond.mounts.layerops import LayerOperations
from uniond.mounts.manager import MountManager
from uniond.mounts.records import MountRecord
from uniond.service.interfaces import ManagerInterface, MountInterface, close_unclaimed_fds, mount_path
from uniond.service.peers import BusPeers

log = logging.getLogger(__name__)

# dbus-next gives a method no access to its message; a message handler that runs first
# stores the sender here, and the method (run in a copy of this context) reads it.
_sender: contextvars.ContextVar[str] = contextvars.ContextVar("sender", default="")

# The bus answers such errors when nobody owns (and nothing activates) polkit's name.
_NO_SUCH_NAME = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
_PEER_TIMEOUT = 25.0  # dbus-next calls have no timeout of their own


def _ignore_replied_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """dbus-next sends a DBusError raised by an async method as the reply, then lets it
    escape to the event loop as well; it was answered, so it is not logged twice."""
    if isinstance(context.get("exception"), DBusError):
        return
    loop.default_exception_handler(context)


def _retrieve(future: asyncio.Future) -> None:
    """A send that failed (the bus went away: BrokenPipeError) is no news to anyone:
    asyncio would print it as "Future exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


class _Bus(MessageBus):
    """dbus-next declares org.freedesktop.DBus.ObjectManager on every path and answers
    GetManagedObjects itself, but sends InterfacesAdded/Removed from the object's own
    path; the specification (and GDBus clients) expect them from the manager's.

    It also answers every call, whatever happens: dbus-next sends a DBusError raised by
    its own handlers (a Get of an interface that does not exist) and then logs it as a
    traceback, builds no reply when an error's text is not a string, and raises
    CancelledError out of a method's done callback when the daemon stops. Here each
    such call gets a D-Bus error and one debug line, and the method calls in flight are
    kept (``in_flight``) so a stop can wait for them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: set[asyncio.Future] = set()

    def send(self, msg: Message) -> asyncio.Future:
        future = super().send(msg)
        future.add_done_callback(_retrieve)
        return future

    def _make_method_handler(self, interface, method):
        if not asyncio.iscoroutinefunction(method.fn):
            return super()._make_method_handler(interface, method)

        def handler(msg: Message, send_reply) -> None:
            def done(fut: asyncio.Future) -> None:
                self.in_flight.discard(fut)
                with send_reply:
                    body, unix_fds = ServiceInterface._fn_result_to_body(fut.result(), method.out_signature_tree)
                    send_reply(Message.new_method_return(msg, method.out_signature, body, unix_fds))

            fut = asyncio.ensure_future(method.fn(interface, *ServiceInterface._msg_body_to_args(msg)))
            self.in_flight.add(fut)
            fut.add_done_callback(done)

        return handler

    def _send_reply(self, msg: Message) -> _Reply:
        return _Reply(self, msg)

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


class _Reply:
    """What dbus-next's handlers answer through (its SendReply, made to always answer)."""

    def __init__(self, bus: _Bus, msg: Message) -> None:
        self.bus = bus
        self.msg = msg

    def __enter__(self) -> _Reply:
        return self

    def __call__(self, reply: Message) -> None:
        if self.msg.flags & MessageFlag.NO_REPLY_EXPECTED or self.bus._disconnected:
            return
        try:
            self.bus.send(reply)
        except Exception as e:  # the connection is closing: nobody to answer
            log.debug("no answer sent to %s: %s", self.msg.sender, e)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if isinstance(exc, asyncio.CancelledError):
            name, text = Failed.dbus_name, "uniond is stopping; call again when it is back"
        elif isinstance(exc, DBusError):
            name, text = exc.type, exc.text if isinstance(exc.text, str) else repr(exc.text)
        elif isinstance(exc, Exception):
            name, text = Failed.dbus_name, f"{self.msg.member} failed: {type(exc).__name__}: {exc}".splitlines()[0]
        else:
            return False  # SystemExit, KeyboardInterrupt
        log.debug("%s.%s from %s answered %s: %s", self.msg.interface, self.msg.member, self.msg.sender, name, text)
        try:
            self(Message.new_error(self.msg, name, text))
        except Exception as e:
            log.debug("could not build the error answer: %s", e)
            self(Message.new_error(self.msg, Failed.dbus_name, "the call could not be answered"))
        return True

    def send_error(self, exc: BaseException) -> None:
        self.__exit__(type(exc), exc, exc.__traceback__)


class BusService:
    """Connects to the bus, exports the objects and keeps them in step with the manager."""

    def __init__(self, manager: MountManager, layers: LayerOperations, address: str | None) -> None:
        self.manager = manager
        self.layers = layers
        self.address = address
        self.bus: MessageBus | None = None
        self.interface = ManagerInterface(self)
        self._callers: OrderedDict[str, Caller] = OrderedDict()  # unique names are never reused
        self._objects: dict[str, MountInterface] = {}  # mount id -> its exported object
        self.on_reload: Callable[[], None] = lambda: None  # the daemon's reload
        manager.authority = Authority(self)

    async def connect(self) -> None:
        if self.address:
            self.bus = _Bus(bus_address=self.address, negotiate_unix_fd=True)
        else:
            self.bus = _Bus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await self.bus.connect()
        asyncio.get_running_loop().set_exception_handler(_ignore_replied_errors)
        self.bus.add_message_handler(close_unclaimed_fds)
        self.bus.add_message_handler(self._remember_sender)
        self.manager.lifetimes.peers = BusPeers(self.bus, self.manager.lifetimes)
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

    async def drain(self, grace: float) -> None:
        """Let the calls in flight finish for ``grace`` seconds, then cancel the rest: each
        is answered with an error (if the bus is still there) and none is left behind."""
        assert isinstance(self.bus, _Bus)
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
            self.interface.MountAdded(path, record.spec.mountpoint)

    def mount_removed(self, record: MountRecord) -> None:
        assert self.bus is not None
        path = mount_path(record.id)
        self._objects.pop(record.id, None)
        self.bus.unexport(path)
        self.interface.MountRemoved(path, record.spec.mountpoint)

    def mount_changed(self, record: MountRecord, changed: tuple[str, ...] = ()) -> None:
        """Same object, new record; PropertiesChanged carries the new values."""
        interface = self._objects.get(record.id)
        if interface is None:
            return
        before = interface.record
        interface.record = record
        names = [*changed, *(["Detached"] if before.detached != record.detached else [])]
        if names:
            interface.emit_properties_changed({name: getattr(interface, name) for name in names})
