"""What a mount is, as the daemon plans it and as it records it.

A MountSpec is everything the engine needs to make the mount; a MountRecord adds who
asked and when, and is what the state journal keeps across crashes and reboots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MountSpec:
    lowerdirs: tuple[str, ...]  # top-most first, as overlayfs' lowerdir=
    upperdir: str  # "" = read-only mount
    workdir: str  # "" when there is no upper
    mountpoint: str
    readonly: bool
    volatile: bool = False
    dev: bool = False  # device files honoured (root asked); nodev otherwise
    suid: bool = False  # setuid bits honoured (root asked); nosuid otherwise


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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"]["lowerdirs"] = list(self.spec.lowerdirs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        spec = dict(data["spec"])
        spec["lowerdirs"] = tuple(spec["lowerdirs"])
        return cls(**{**data, "spec": MountSpec(**spec)})
