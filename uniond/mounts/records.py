"""What the daemon records of a mount.

A MountSpec (kernel room) is everything the kernel needs to make the mount; a
MountRecord adds who asked and when, and is what the journal keeps across crashes and
reboots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from uniond.kernel.overlay import MountSpec

__all__ = ["MountRecord", "MountSpec"]


@dataclass(frozen=True)
class MountRecord:
    id: str
    spec: MountSpec
    owner: int
    created_us: int
    boot_id: str
    options: dict[str, Any] = field(default_factory=dict)  # as the caller gave them, validated
    description: str = ""
    workdir_created: bool = False  # the daemon made the workdir, so it may remove it (C4)
    mountpoint_created: bool = False
    mnt_id: int = 0  # kernel mount id once mounted (0 = intent only)
    # Lazily unmounted while in use (M12): the overlay lives on, detached from every
    # path, until its last user has gone; its workdir and upper stay claimed till then.
    detached: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"]["lowerdirs"] = list(self.spec.lowerdirs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        spec = dict(data["spec"])
        spec["lowerdirs"] = tuple(spec["lowerdirs"])
        return cls(**{**data, "spec": MountSpec(**spec)})
