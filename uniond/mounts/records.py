"""What the daemon records of a mount.

A MountSpec (kernel room) is everything the kernel needs to make the mount; a
MountRecord adds who asked and when, and is what the journal keeps across crashes and
reboots.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from uniond.kernel.overlay import MountSpec

__all__ = ["MountListener", "MountRecord", "MountSpec"]


@dataclass(frozen=True, slots=True)
class MountRecord:
    """One mount as the daemon knows it: one per live mount, 10,000 and more, so slotted
    (no __dict__ per record), and records read back from the journal hold the strings
    many of them have alike (the boot id, the lowers) once."""

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
    # Lazily unmounted while in use (M12): the overlay lives on, detached from every
    # path, until its last user has gone; its workdir and upper stay claimed till then.
    detached: bool = False

    def to_json(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies generically, a third of a start's
        # compaction with 10,000 records.
        data = {name: getattr(self, name) for name in _RECORD_FIELDS}
        data["spec"] = {name: getattr(self.spec, name) for name in _SPEC_FIELDS}
        data["spec"]["lowerdirs"] = list(self.spec.lowerdirs)
        data["options"] = dict(self.options)
        return data

    # encoded's bytes once made (a slot: a slotted class has no room for cached_property).
    _encoded: bytes = field(default=b"", init=False, repr=False, compare=False)

    @property
    def encoded(self) -> bytes:
        """to_json as JSON bytes, kept once made: a Mount writes the same record to its
        journal line, its workdir's marker and its mark (C1, C4)."""
        if not self._encoded:
            object.__setattr__(self, "_encoded", self.encode())
        return self._encoded

    def encode(self) -> bytes:
        """to_json as JSON bytes, not kept (a start compacts 10,000 records at once)."""
        return json.dumps(self.to_json()).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        """A record read back from the journal, every field checked: a damaged line must
        be refused here, not fail later in cleanup (or remove the wrong directory)."""
        _check(data, _RECORD_FIELDS, "record")
        spec = dict(data["spec"])
        _check(spec, _SPEC_FIELDS, "spec")
        if not spec["lowerdirs"] or not all(isinstance(p, str) and _is_path(p) for p in spec["lowerdirs"]):
            raise ValueError("spec.lowerdirs: not a list of absolute paths")
        for name in ("upperdir", "workdir", "mountpoint"):
            if spec[name] and not _is_path(spec[name]):
                raise ValueError(f"spec.{name}: {spec[name]!r} is not an absolute path")
        if not spec["mountpoint"] or not data["id"] or "/" in data["id"]:
            raise ValueError("record without a mountpoint or a usable id")
        spec["lowerdirs"] = tuple(map(sys.intern, spec["lowerdirs"]))
        return cls(**{**data, "boot_id": sys.intern(data["boot_id"]), "spec": MountSpec(**spec)})


_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "spec": dict, "owner": int, "created_us": int, "boot_id": str, "options": dict,
    "description": str, "workdir_created": bool, "mountpoint_created": bool, "mnt_id": int, "detached": bool,
    "name": str, "persistent": bool, "bound_to": str,
}
_SPEC_FIELDS: dict[str, type | tuple[type, ...]] = {
    "lowerdirs": list, "upperdir": str, "workdir": str, "mountpoint": str,
    "readonly": bool, "volatile": bool, "dev": bool, "suid": bool,
}
_OPTIONAL = {"options", "description", "workdir_created", "mountpoint_created", "mnt_id", "detached",
             "name", "persistent", "bound_to", "volatile", "dev", "suid"}


def _check(data: Any, fields: dict[str, type | tuple[type, ...]], what: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: not an object")
    for key, value in data.items():
        expected = fields.get(key)
        if expected is None:
            raise ValueError(f"{what}: unknown field {key!r}")
        # bool is an int in Python; an int field must not take true/false, nor the reverse.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{what}.{key}: {type(value).__name__} where {expected.__name__} belongs")
    missing = set(fields) - set(data) - _OPTIONAL
    if missing:
        raise ValueError(f"{what}: missing {', '.join(sorted(missing))}")


def _is_path(path: str) -> bool:
    return path.startswith("/") and "\0" not in path and ".." not in path.split("/")


class MountListener(Protocol):
    def mount_added(self, record: MountRecord) -> None: ...

    def mount_removed(self, record: MountRecord) -> None: ...

    def mount_changed(self, record: MountRecord, changed: tuple[str, ...] = ()) -> None:
        """``changed``: the properties of the mount object that changed (Detached is
        told by the record itself)."""
