"""Who is calling, as the bus vouches for it: never taken from a method's arguments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    uid: int
    pid: int
    bus_name: str  # the unique connection name, polkit's subject
    gids: tuple[int, ...] = ()  # primary and supplementary groups, when the bus knows them

    @property
    def is_root(self) -> bool:
        return self.uid == 0
