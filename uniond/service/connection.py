"""uniond's dbus-next connection: what 0.2.3 gets wrong or makes slow at scale, fixed here.

- Writing: dbus-next's writer takes EAGAIN from a full socket buffer as fatal and drops
  the connection (python-dbus-next issue #153; its fix, PR #154, was never merged). Ours
  waits for the socket to drain, and writes at once when nothing is queued instead of
  waiting for the next turn of the event loop.
- ObjectManager: dbus-next sends InterfacesAdded/Removed from the object's own path;
  the specification (and GDBus clients) expect them from the manager's. Nothing is
  announced before the bus name is owned (nobody can be listening then): 10,000
  adopted mounts would otherwise be 10,000 signals at start.
- Lookups: dbus-next finds an interface's path by walking every export, per signal and
  per unexport; with 10,000 mounts that walk is the cost of a call. Ours keeps a map.
- GetManagedObjects: dbus-next rebuilds every object's properties through its generic
  marshaller (and checks completeness once per object: quadratic); ours joins each Mount
  object's entry, packed once (uniond.service.wire).
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import socket
from typing import Any

from dbus_next import Message
from dbus_next.aio import MessageBus
from dbus_next.aio.message_bus import _future_set_exception, _future_set_result, _MessageWriter
from dbus_next.constants import MessageFlag
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface

from uniond import constants
from uniond.errors import Failed
from uniond.service import wire

log = logging.getLogger(__name__)

_MAX_IOV = 64  # buffers per sendmsg (the kernel takes up to 1024)


class _Writer(_MessageWriter):
    """Queues marshalled messages and writes them in as few system calls as it can:
    all that two turns of the event loop queued goes in one sendmsg (a Mount's two
    signals and its reply), a message with descriptors alone with them."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus)
        self.queue: collections.deque[list[Any]] = collections.deque()  # [view, fds, future]
        self.waiting = False  # registered with the loop for writability
        self.flush_soon = False

    def buffer_message(self, msg: Message, future: Any = None) -> None:
        fds = list(msg.unix_fds or ()) if self.negotiate_unix_fd else []
        data = wire.pack(msg, self.negotiate_unix_fd) or msg._marshall(negotiate_unix_fd=self.negotiate_unix_fd)
        self.queue.append([memoryview(data), fds, future])

    def schedule_write(self, msg: Message | None = None, future: Any = None) -> None:
        if msg is not None:
            self.buffer_message(msg, future)
        if self.bus.unique_name and not self.waiting and not self.flush_soon:
            self.flush_soon = True
            # Two turns of the loop on: a method's signals are queued in the turn its
            # task ends, its reply in the next (by the task's done callback), so both
            # leave in one sendmsg, and the bus is woken once for them.
            self.loop.call_soon(self.loop.call_soon, self.write_callback)

    def write_callback(self) -> None:
        self.flush_soon = False
        queue = self.queue
        try:
            while queue:
                head = queue[0]
                try:
                    if head[1]:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", head[1]))]
                        sent = self.sock.sendmsg([head[0]], ancdata)
                        head[1] = []
                    else:
                        views = []
                        for item in queue:
                            if item[1] or len(views) == _MAX_IOV:
                                break
                            views.append(item[0])
                        sent = self.sock.sendmsg(views)
                except (BlockingIOError, InterruptedError):
                    self._wait(True)  # the socket's buffer is full: wait until it drains
                    return
                while sent and queue:
                    item = queue[0]
                    if sent < len(item[0]):
                        item[0] = item[0][sent:]
                        break
                    sent -= len(item[0])
                    queue.popleft()
                    _future_set_result(item[2], None)
            self._wait(False)
        except Exception as e:
            for item in queue:
                _future_set_exception(item[2], e)
            queue.clear()
            self.bus._finalize(e)

    def _wait(self, on: bool) -> None:
        if on and not self.waiting:
            self.loop.add_writer(self.fd, self.write_callback)
        elif not on and self.waiting:
            self.loop.remove_writer(self.fd)
        self.waiting = on


def _retrieve(future: asyncio.Future) -> None:
    """A send that failed (the bus went away: BrokenPipeError) is no news to anyone:
    asyncio would print it as "Future exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


class UniondBus(MessageBus):
    """Also answers every call, whatever happens: dbus-next sends a DBusError raised by
    its own handlers (a Get of an interface that does not exist) and then logs it as a
    traceback, builds no reply when an error's text is not a string, and raises
    CancelledError out of a method's done callback when the daemon stops. Here each
    such call gets a D-Bus error and one debug line, and the method calls in flight are
    kept (``in_flight``) so a stop can wait for them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._writer = _Writer(self)
        self._where: dict[ServiceInterface, str] = {}  # interface -> its one path (by identity)
        self.announcing = False  # set once the bus name is owned
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

    # -- exports -------------------------------------------------------------------------

    def export(self, path: str, interface: ServiceInterface) -> None:
        super().export(path, interface)
        self._where[interface] = path

    def unexport(self, path: str, interface: Any = None) -> None:
        assert interface is None, "uniond unexports whole paths"
        for iface in self._path_exports.get(path, ()):
            self._where.pop(iface, None)
        super().unexport(path)

    def _has_interface(self, interface: ServiceInterface) -> bool:
        return interface in self._where

    def _interface_signal_notify(self, interface, interface_name, member, signature, body, unix_fds=()):
        path = self._where.get(interface)
        if path is None:
            raise RuntimeError(f"signal {member} from an interface that is not exported")
        self.send(
            Message.new_signal(path=path, interface=interface_name, member=member, signature=signature,
                               body=body, unix_fds=list(unix_fds))
        )

    # -- ObjectManager -------------------------------------------------------------------

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected or not self.announcing or not path.startswith(constants.MOUNT_PATH_PREFIX + "/"):
            return
        entry = interface.packed_entry(path)  # type: ignore[attr-defined]
        self.send(wire.signal(constants.MANAGER_PATH, constants.OBJECT_MANAGER_INTERFACE, "InterfacesAdded",
                              "oa{sa{sv}}", entry))

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected or not self.announcing or not path.startswith(constants.MOUNT_PATH_PREFIX + "/"):
            return
        self.send(
            Message.new_signal(constants.MANAGER_PATH, constants.OBJECT_MANAGER_INTERFACE, "InterfacesRemoved",
                               "oas", [path, removed_interfaces])
        )

    async def pack_entries(self, batch: int = 200) -> None:
        """Pack every Mount object's entry ahead of the first GetManagedObjects, a batch
        per turn of the event loop, so that neither the start nor that call waits for it."""
        prefix = constants.MOUNT_PATH_PREFIX + "/"
        for n, (path, ifaces) in enumerate(list(self._path_exports.items()), 1):
            if path.startswith(prefix):
                for iface in ifaces:
                    iface.packed_entry(path)
            if n % batch == 0:
                await asyncio.sleep(0)

    def _default_get_managed_objects_handler(self, msg: Message, send_reply: Any) -> None:
        if msg.path != constants.MANAGER_PATH:
            super()._default_get_managed_objects_handler(msg, send_reply)
            return
        prefix = constants.MOUNT_PATH_PREFIX + "/"
        entries = (
            iface.packed_entry(path)
            for path, ifaces in self._path_exports.items()
            if path.startswith(prefix)
            for iface in ifaces
        )
        send_reply(wire.method_return(msg, "a{oa{sa{sv}}}", wire.managed_objects(entries)))


class _Reply:
    """What dbus-next's handlers answer through (its SendReply, made to always answer)."""

    def __init__(self, bus: UniondBus, msg: Message) -> None:
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
