"""Mounts that live as long as what asked for them (Mount's ``bind`` option).

A binding names a peer: the caller's bus connection (``caller``), its systemd unit
(``unit``, or another unit with ``unit:NAME``) or its logind session (``session``).
When the peer ends, the mount is removed by an ordinary unmount (lazily when busy),
logged with the reason and announced like any other. The binding is kept in the
mount's record, so after a restart a mount whose peer is gone is released and one
whose peer is still there stays bound.

This module decides; the questions to the bus (who is the caller's unit, is that
session still there, tell me when it ends) go through the transport-neutral
``Peers`` protocol, which the service room implements.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from uniond.access.caller import Caller
from uniond.constants import ACTION_UNMOUNT_OTHER
from uniond.errors import InvalidArgument, NotSupported

if TYPE_CHECKING:
    from uniond.mounts.manager import MountManager

log = logging.getLogger(__name__)

KINDS = ("caller", "unit", "session")


@dataclass(frozen=True)
class Binding:
    kind: str  # caller, unit or session
    name: str  # a unique bus name, a unit name or a session id

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> Binding:
        kind, _, name = text.partition(":")
        return cls(kind, name)

    def gone(self) -> str:
        """Why a mount bound to this is removed, for the log."""
        return {
            "caller": f"its caller {self.name} left the bus",
            "unit": f"its unit {self.name} stopped",
            "session": f"its session {self.name} ended",
        }[self.kind]


class Peers(Protocol):
    """What the service room answers about the peers a mount can be bound to."""

    async def own(self, caller: Caller, kind: str) -> str:
        """The caller's own bus name, unit or session id (InvalidArgument if it has none)."""

    async def alive(self, binding: Binding) -> bool: ...

    def watch(self, binding: Binding) -> None:
        """Call ``Lifetimes.ended`` once ``binding``'s peer ends (at once if it has)."""


class Lifetimes:
    def __init__(self, manager: MountManager) -> None:
        self.manager = manager
        self.peers: Peers | None = None  # set by the service room once it is on the bus

    async def resolve(self, caller: Caller, word: str, opts: Mapping[str, Any]) -> Binding:
        """Turn Mount's ``bind`` word into the peer it names, authorizing ``unit:NAME``."""
        kind, colon, name = word.partition(":")
        if kind not in KINDS or (colon and (kind != "unit" or not name)):
            raise InvalidArgument(
                f"bind: {word[:64]!r} is not one of 'caller', 'unit', 'unit:NAME', 'session'"
            )
        if self.peers is None:
            raise NotSupported("bind: uniond is not on a bus, so it cannot watch what a mount is bound to")
        if not name:
            return Binding(kind, await self.peers.own(caller, kind))
        binding = Binding("unit", name)
        try:
            own = await self.peers.own(caller, "unit")
        except InvalidArgument:
            own = ""
        if name != own:
            # Tying a mount to someone else's unit decides when it goes: as much as unmounting it.
            await self.manager.authorize(caller, ACTION_UNMOUNT_OTHER, opts, unit=name)
        if not await self.peers.alive(binding):
            raise InvalidArgument(f"bind: unit {name!r} is not running; start it first or bind to another")
        return binding

    def watch(self, binding: Binding) -> None:
        if self.peers is not None:
            self.peers.watch(binding)

    async def restore(self) -> None:
        """After a start: release the mounts whose peer went while uniond was away."""
        bound = {r.bound_to for r in self.manager.records.values() if r.bound_to}
        for text in sorted(bound):
            binding = Binding.parse(text)
            if self.peers is not None and await self.peers.alive(binding):
                self.watch(binding)
                log.info("%s still there: its mounts stay bound", binding)
            else:
                self.ended(binding, binding.gone() + " while uniond was not running")

    def ended(self, binding: Binding, reason: str = "") -> None:
        """The peer ended: each mount bound to it goes, as an Unmount would take it."""
        for record in list(self.manager.records.values()):
            if record.bound_to == str(binding):
                try:
                    self.manager.remove(record.id, f"bound to {binding}: {reason or binding.gone()}")
                except Exception as e:  # noqa: BLE001 - one failure must not keep the others
                    log.error("mount %s: could not remove it after %s: %s", record.id, reason, e)
