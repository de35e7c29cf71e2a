"""The D-Bus half of mount lifetimes (uniond.mounts.lifetimes holds the rules).

Who a caller is bound to is asked of the bus and its peers, never of the caller:
its unique name, its unit (systemd's GetUnitByPID with the pid the bus vouches for)
or its session (logind's GetSessionByPID). An end is seen from signals:
NameOwnerChanged with an empty new owner, a unit's ActiveState turning inactive or
failed (after systemd's Subscribe, which makes it send them), logind's
SessionRemoved or a session's State turning "closing". After each match rule is added
the peer's state is read once, so an end that came before the rule is not missed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from dbus_next import Message, MessageType

from uniond.access.caller import Caller
from uniond.errors import Failed, InvalidArgument
from uniond.mounts.lifetimes import Binding, Lifetimes

if TYPE_CHECKING:
    from dbus_next.aio import MessageBus

log = logging.getLogger(__name__)

SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
SYSTEMD_UNIT = "org.freedesktop.systemd1.Unit"
LOGIND = ("org.freedesktop.login1", "/org/freedesktop/login1", "org.freedesktop.login1.Manager")
LOGIND_SESSION = "org.freedesktop.login1.Session"
PROPERTIES = "org.freedesktop.DBus.Properties"
UNIT_ENDED = ("inactive", "failed")
SESSION_ENDED = ("closing",)
_TIMEOUT = 25.0
_ABSENT = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
_NO_SUCH = {
    "org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.NoUnitForPID",
    "org.freedesktop.login1.NoSuchSession", "org.freedesktop.login1.NoSessionForPID",
}


class PeerError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name


class BusPeers:
    """Implements uniond.mounts.lifetimes.Peers on a dbus-next connection."""

    def __init__(self, bus: MessageBus, lifetimes: Lifetimes) -> None:
        self.bus = bus
        self.lifetimes = lifetimes
        self._names: set[str] = set()  # bus names watched
        self._units: dict[str, str] = {}  # object path -> unit name
        self._sessions: dict[str, str] = {}  # session id -> object path
        self._subscribed = False
        self._session_rule = False
        bus.add_message_handler(self._on_message)

    async def _call(self, peer: tuple[str, str, str], member: str, signature: str = "", body: list | None = None,
                    path: str | None = None, interface: str | None = None) -> list[Any]:
        destination, default_path, default_interface = peer
        reply = await asyncio.wait_for(self.bus.call(Message(
            destination=destination, path=path or default_path, interface=interface or default_interface,
            member=member, signature=signature, body=body or [],
        )), _TIMEOUT)
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise PeerError(reply.error_name or "", text)
        return reply.body

    async def _property(self, peer: tuple[str, str, str], path: str, interface: str, name: str) -> Any:
        body = await self._call(peer, "Get", "ss", [interface, name], path=path, interface=PROPERTIES)
        return body[0].value

    async def _match(self, rule: str, add: bool = True) -> None:
        await self._call(("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus"),
                         "AddMatch" if add else "RemoveMatch", "s", [rule])

    def _unmatch(self, rule: str) -> None:
        """The bus allows a connection only so many rules: drop one no longer needed."""
        async def drop() -> None:
            try:
                await self._match(rule, add=False)
            except (TimeoutError, PeerError) as e:
                log.debug("RemoveMatch %s: %s", rule, e)

        asyncio.get_running_loop().create_task(drop())

    @staticmethod
    def _changes(path: str, sender: str) -> str:
        return f"type='signal',sender='{sender}',path='{path}',interface='{PROPERTIES}',member='PropertiesChanged'"

    # ---- Peers ---------------------------------------------------------------

    async def own(self, caller: Caller, kind: str) -> str:
        if kind == "caller":
            return caller.bus_name
        try:
            if kind == "unit":
                (path,) = await self._call(SYSTEMD, "GetUnitByPID", "u", [caller.pid])
                return await self._property(SYSTEMD, path, SYSTEMD_UNIT, "Id")
            (path,) = await self._call(LOGIND, "GetSessionByPID", "u", [caller.pid])
            return await self._property(LOGIND, path, LOGIND_SESSION, "Id")
        except PeerError as e:
            what = "systemd" if kind == "unit" else "logind"
            if e.name in _ABSENT:
                raise Failed(f"bind: {what} is not on the bus, so there is no {kind} to bind to") from None
            if e.name in _NO_SUCH:
                raise InvalidArgument(f"bind: the caller (pid {caller.pid}) runs in no {kind}") from None
            raise Failed(f"bind: {what} did not say the caller's {kind}: {e}") from None

    async def alive(self, binding: Binding) -> bool:
        try:
            if binding.kind == "caller":
                (has,) = await self._call(("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus"),
                                          "NameHasOwner", "s", [binding.name])
                return bool(has)
            if binding.kind == "unit":
                (path,) = await self._call(SYSTEMD, "GetUnit", "s", [binding.name])
                return await self._property(SYSTEMD, path, SYSTEMD_UNIT, "ActiveState") not in UNIT_ENDED
            (path,) = await self._call(LOGIND, "GetSession", "s", [binding.name])
            return await self._property(LOGIND, path, LOGIND_SESSION, "State") not in SESSION_ENDED
        except PeerError as e:
            if e.name in _NO_SUCH or e.name.endswith("UnknownObject") or e.name.endswith("UnknownMethod"):
                return False
            if e.name in _ABSENT:
                return False  # the peer's whole service is gone: nothing of it is running
            raise Failed(f"could not ask whether {binding} is still there: {e}") from None

    def watch(self, binding: Binding) -> None:
        asyncio.get_running_loop().create_task(self._watch(binding))

    async def _watch(self, binding: Binding) -> None:
        try:
            if binding.kind == "caller":
                if not self._names:
                    # One rule for every connection that ends (an empty new owner), not
                    # one per caller: the bus limits the rules a connection may hold.
                    await self._match("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                                      "member='NameOwnerChanged',arg2=''")
                self._names.add(binding.name)
            elif binding.kind == "unit":
                if not self._subscribed:
                    await self._call(SYSTEMD, "Subscribe")
                    self._subscribed = True
                (path,) = await self._call(SYSTEMD, "GetUnit", "s", [binding.name])
                if path not in self._units:
                    self._units[path] = binding.name
                    await self._match(self._changes(path, SYSTEMD[0]))
            elif binding.name not in self._sessions:
                (path,) = await self._call(LOGIND, "GetSession", "s", [binding.name])
                if not self._session_rule:
                    self._session_rule = True
                    await self._match(f"type='signal',sender='{LOGIND[0]}',interface='{LOGIND[2]}',"
                                      "member='SessionRemoved'")
                self._sessions[binding.name] = path
                await self._match(self._changes(path, LOGIND[0]))
            alive = await self.alive(binding)
        except PeerError as e:
            if e.name not in _NO_SUCH:
                log.warning("cannot watch %s (%s); its mounts stay until unmounted", binding, e)
                return
            alive = False  # the unit or session is gone already
        except (TimeoutError, Failed) as e:
            log.warning("cannot watch %s (%s); its mounts stay until unmounted", binding, e)
            return
        except Exception:
            log.exception("watching %s failed", binding)
            return
        if not alive:
            self.lifetimes.ended(binding)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.interface == "org.freedesktop.DBus":
            name, _old, new = msg.body
            if name in self._names and not new:
                self._names.discard(name)
                self.lifetimes.ended(Binding("caller", name))
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            interface, changed, _ = msg.body
            if interface == SYSTEMD_UNIT and msg.path in self._units:
                state = changed.get("ActiveState")
                if state is not None and state.value in UNIT_ENDED:
                    self._unmatch(self._changes(msg.path, SYSTEMD[0]))
                    self.lifetimes.ended(Binding("unit", self._units.pop(msg.path)))
            elif interface == LOGIND_SESSION:
                state = changed.get("State")
                for session, path in list(self._sessions.items()):
                    if path == msg.path and state is not None and state.value in SESSION_ENDED:
                        self._session_ended(session)
        elif msg.member == "SessionRemoved" and msg.interface == LOGIND[2]:
            if msg.body[0] in self._sessions:
                self._session_ended(msg.body[0])

    def _session_ended(self, session: str) -> None:
        self._unmatch(self._changes(self._sessions.pop(session), LOGIND[0]))
        self.lifetimes.ended(Binding("session", session))
