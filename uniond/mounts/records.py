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
    name: str = ""  # a declared mount's name (its mounts.d file), "" for others
    persistent: bool = False  # declared: brought up at start, mounted again when found gone
    bound_to: str = ""  # what the mount lives as long as ("caller:NAME", "unit:NAME", "session:ID")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"]["lowerdirs"] = list(self.spec.lowerdirs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        spec = dict(data["spec"])
        spec["lowerdirs"] = tuple(spec["lowerdirs"])
        return cls(**{**data, "spec": MountSpec(**spec)})
