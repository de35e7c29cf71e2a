"""Asking polkit whether a caller may do something.

The D-Bus call itself is made by the bus layer and handed in as a ``PolkitPeer``, so
this module (and the manager that uses it) stays free of the D-Bus library while the
rules live here: root never asks, no polkit means root only, every answer has its own
error, and no call to a peer may hang a method forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from uniond.access.caller import Caller
from uniond.errors import NotAuthorized, NotAuthorizedCanObtain, NotAuthorizedDismissed

log = logging.getLogger(__name__)

# CheckAuthorization flags.
ALLOW_USER_INTERACTION = 0x1

# A person typing a password needs minutes; a rule engine answers in milliseconds.
INTERACTIVE_TIMEOUT = 300.0
NON_INTERACTIVE_TIMEOUT = 25.0


class PolkitAbsent(Exception):
    """Nobody owns org.freedesktop.PolicyKit1 on the bus."""


class PolkitFailed(Exception):
    """polkit answered with an error of its own."""


@dataclass(frozen=True)
class PolkitAnswer:
    authorized: bool
    challenge: bool
    details: Mapping[str, str] = field(default_factory=dict)


class PolkitPeer(Protocol):
    """What the bus layer provides: the raw call and a liveness check of a caller."""

    async def check_authorization(
        self, bus_name: str, action: str, details: Mapping[str, str], flags: int
    ) -> PolkitAnswer: ...

    async def is_connected(self, bus_name: str) -> bool: ...


class Authority:
    """The one place deciding whether ``caller`` may perform ``action``."""

    def __init__(self, peer: PolkitPeer | None) -> None:
        self.peer = peer
        self._absent_logged = False

    async def authorize(
        self, caller: Caller, action: str, details: Mapping[str, str], interactive: bool = True
    ) -> None:
        """Return if allowed; raise NotAuthorized* otherwise. Root is allowed without asking."""
        if caller.is_root:
            return
        if self.peer is None:
            raise NotAuthorized(f"{action}: no authorization service; only root may do this")
        flags = ALLOW_USER_INTERACTION if interactive else 0
        timeout = INTERACTIVE_TIMEOUT if interactive else NON_INTERACTIVE_TIMEOUT
        try:
            answer = await asyncio.wait_for(
                self.peer.check_authorization(caller.bus_name, action, dict(details), flags), timeout
            )
        except PolkitAbsent:
            if not self._absent_logged:
                log.warning("polkit is not on the bus: only root may mount or unmount until it is")
                self._absent_logged = True
            raise NotAuthorized(f"{action}: polkit is not running; only root may do this") from None
        except TimeoutError:
            log.warning("polkit gave no answer on %s for %s within %.0f s", action, caller.bus_name, timeout)
            raise NotAuthorized(f"{action}: polkit gave no answer within {timeout:.0f} s") from None
        except PolkitFailed as e:
            log.warning("polkit failed on %s for %s: %s", action, caller.bus_name, e)
            raise NotAuthorized(f"{action}: polkit could not decide: {e}") from None
        if self._absent_logged:
            log.info("polkit is back on the bus")
            self._absent_logged = False
        who = f"uid {caller.uid} ({caller.bus_name})"
        if answer.authorized:
            # Authorising can take minutes; a caller that left meanwhile gets nothing made.
            if not await asyncio.wait_for(self.peer.is_connected(caller.bus_name), NON_INTERACTIVE_TIMEOUT):
                raise NotAuthorized(f"{action}: the caller {caller.bus_name} left the bus while being authorized")
            log.debug("polkit: %s is authorized for %s", who, action)
            return
        if answer.details.get("polkit.dismissed", "").lower() in ("true", "1"):
            raise NotAuthorizedDismissed(f"{action}: {who}: the authentication request was dismissed")
        if answer.challenge:
            raise NotAuthorizedCanObtain(
                f"{action}: {who} is not authorized, but could be after authenticating; "
                "call again without auth.no_user_interaction (and with a polkit agent running)"
            )
        raise NotAuthorized(f"{action}: {who} is not authorized")
