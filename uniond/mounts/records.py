"""What the daemon records of a mount.

A MountSpec (kernel room) is everything the kernel needs to make the mount; a
MountRecord adds who asked and when, and is what the journal keeps across crashes and
reboots.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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

    def to_json(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies generically, a third of a start's
        # compaction with 10,000 records.
        data = {name: getattr(self, name) for name in _RECORD_FIELDS}
        data["spec"] = {name: getattr(self.spec, name) for name in _SPEC_FIELDS}
        data["spec"]["lowerdirs"] = list(self.spec.lowerdirs)
        data["options"] = dict(self.options)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        spec = dict(data["spec"])
        spec["lowerdirs"] = tuple(spec["lowerdirs"])
        return cls(**{**data, "spec": MountSpec(**spec)})


_RECORD_FIELDS = tuple(f.name for f in fields(MountRecord))
_SPEC_FIELDS = tuple(f.name for f in fields(MountSpec))
