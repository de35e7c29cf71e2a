"""What the client hands back: plain, frozen values with stable field names.

The same names are unionctl's ``--json`` fields (``as_json``), so a script that reads
``unionctl list --json`` and a service that reads ``client.mounts()`` see one shape.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass, field
from typing import Any

from uniond import constants


@dataclass(frozen=True)
class MountInfo:
    """A mount's properties (org.uniond1.Mount) as they were when read."""

    id: str
    path: str  # the D-Bus object path, /org/uniond1/mount/<id>
    mountpoint: str
    lowerdirs: tuple[str, ...]  # top-most first
    upperdir: str  # "" for a read-only mount
    workdir: str
    readonly: bool
    owner: int  # uid of the caller that asked for it
    created_us: int  # µs since the epoch
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # a declared mount's NAME (mounts.d/NAME.toml), else ""
    persistent: bool = False  # declared: brought up whenever uniond runs
    bound_to: str = ""  # what the `bind` option tied it to ("unit:app.service"), else ""
    detached: bool = False  # lazily unmounted, still in use by processes inside

    @classmethod
    def from_properties(cls, path: str, props: dict[str, Any]) -> MountInfo:
        return cls(
            id=props["Id"], path=path, mountpoint=props["Mountpoint"], lowerdirs=tuple(props["LowerDirs"]),
            upperdir=props["UpperDir"], workdir=props["WorkDir"], readonly=bool(props["ReadOnly"]),
            owner=int(props["Owner"]), created_us=int(props["Created"]), options=dict(props["Options"]),
            # .get: a daemon from before lifetimes and declared mounts has none of these.
            name=props.get("Name", ""), persistent=bool(props.get("Persistent", False)),
            bound_to=props.get("BoundTo", ""), detached=bool(props.get("Detached", False)),
        )

    @property
    def created(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.created_us / 1e6, tz=datetime.UTC)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "path": self.path, "mountpoint": self.mountpoint, "lowerdirs": list(self.lowerdirs),
            "upperdir": self.upperdir, "workdir": self.workdir, "readonly": self.readonly, "owner": self.owner,
            "created_us": self.created_us, "created": self.created.isoformat(timespec="seconds"),
            "options": self.options, "name": self.name, "persistent": self.persistent,
            "bound_to": self.bound_to, "detached": self.detached,
        }

    @property
    def flags(self) -> str:
        """``unionctl list``'s FLAGS: declared=NAME, bound=WHAT, detached; "-" for none."""
        flags = [f"declared={self.name}" if self.persistent else "", f"bound={self.bound_to}" if self.bound_to else "",
                 "detached" if self.detached else ""]
        return ",".join(f for f in flags if f) or "-"


class MountProperties:
    """The properties of a mount object, as attributes read from ``self.info``."""

    info: MountInfo

    @property
    def id(self) -> str:
        """The mount's id, the last part of its object path."""
        return self.info.id

    @property
    def path(self) -> str:
        """The D-Bus object path, /org/uniond1/mount/<id>."""
        return self.info.path

    @property
    def mountpoint(self) -> str:
        """Where the union is mounted (uniond's own directory if none was asked for)."""
        return self.info.mountpoint

    @property
    def lowerdirs(self) -> tuple[str, ...]:
        """The read-only layers, top-most first."""
        return self.info.lowerdirs

    @property
    def upperdir(self) -> str:
        """The writable layer that receives the changes; "" for a read-only view."""
        return self.info.upperdir

    @property
    def workdir(self) -> str:
        """overlayfs' working directory, beside the upper."""
        return self.info.workdir

    @property
    def readonly(self) -> bool:
        return self.info.readonly

    @property
    def owner(self) -> int:
        """The uid of the caller that asked for the mount."""
        return self.info.owner

    @property
    def created(self) -> datetime.datetime:
        """When the mount was made (UTC)."""
        return self.info.created

    @property
    def options(self) -> dict[str, Any]:
        """The options the mount was asked with (description, volatile, ...)."""
        return self.info.options

    @property
    def name(self) -> str:
        """A declared mount's NAME (its mounts.d/NAME.toml); "" for others."""
        return self.info.name

    @property
    def persistent(self) -> bool:
        """True for a declared mount, which uniond brings up whenever it runs."""
        return self.info.persistent

    @property
    def bound_to(self) -> str:
        """What the ``bind`` option tied the mount to (caller:…, unit:…, session:…); "" if unbound."""
        return self.info.bound_to

    @property
    def detached(self) -> bool:
        """Unmounted lazily and gone from the mountpoint, still used by processes inside."""
        return self.info.detached


@dataclass(frozen=True)
class Change:
    """One line of a Diff, as ``docker diff`` prints it: kind A, C or D, and a path.

    ``path`` is text; a name that is not UTF-8 comes decoded with surrogateescape (as
    ``os.fsdecode`` does), so ``raw`` gives back its bytes as they are on disk.
    """

    kind: str
    path: str

    @property
    def raw(self) -> bytes:
        """The path's bytes, as on disk."""
        return self.path.encode("utf-8", "surrogateescape")

    def as_json(self) -> dict[str, str]:
        """``kind`` and ``path``; for a name that is not UTF-8, ``path`` shows the bytes
        that are not UTF-8 as ``\\xNN`` (for reading only) and ``path_base64`` holds the exact bytes."""
        raw = self.raw
        try:
            return {"kind": self.kind, "path": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"kind": self.kind, "path": raw.decode("utf-8", "backslashreplace"),
                    "path_base64": base64.b64encode(raw).decode("ascii")}

    @classmethod
    def from_record(cls, record: bytes) -> Change:
        """One DiffInto record, ``KIND SPACE PATH`` (its NUL taken off)."""
        return cls(record[:1].decode("ascii"), record[2:].decode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class Event:
    """A MountAdded or MountRemoved signal."""

    event: str  # "MountAdded" or "MountRemoved"
    path: str
    mountpoint: str

    @property
    def id(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def as_json(self) -> dict[str, str]:
        return {"event": self.event, "id": self.id, "path": self.path, "mountpoint": self.mountpoint}


@dataclass(frozen=True)
class Status:
    """The daemon as a client sees it; ``unit_*`` are None unless systemd on this bus runs it."""

    version: str
    mounts: int
    unit_active_state: str | None = None
    unit_sub_state: str | None = None
    unit_status_text: str | None = None

    def as_json(self) -> dict[str, Any]:
        unit = None
        if self.unit_active_state is not None:
            unit = {"name": constants.SYSTEMD_UNIT, "active_state": self.unit_active_state,
                    "sub_state": self.unit_sub_state, "status_text": self.unit_status_text}
        return {"version": self.version, "mounts": self.mounts, "unit": unit}


@dataclass(frozen=True)
class LayerInfo:
    """What an image manifest needs of one layer (ExportLayer, ApplyLayer)."""

    bytes: int  # through the descriptor: the blob as it travelled, compressed or not
    entries: int  # tar members, whiteouts and opaque markers included
    diff_id: str  # sha256:<hex> of the uncompressed tar (the image config's rootfs.diff_ids)
    digest: str  # sha256:<hex> of the blob (the manifest's layer descriptor); = diff_id uncompressed
    media_type: str  # application/vnd.oci.image.layer.v1.tar, +gzip or +zstd

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> LayerInfo:
        return cls(bytes=int(info["bytes"]), entries=int(info["entries"]), diff_id=info["diff_id"],
                   digest=info["digest"], media_type=info["media_type"])

    def as_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "entries": self.entries, "diff_id": self.diff_id, "digest": self.digest,
                "media_type": self.media_type}


@dataclass(frozen=True)
class ImageInfo:
    """An image ImportImage put into a store: its layers ready for ``mount``."""

    lowerdirs: tuple[str, ...]  # top-most first, directories inside the store
    digest: str  # the manifest's sha256:<hex>; for a `docker save` tar the image id (the config's)
    config: str  # the image config's JSON (Env, Entrypoint, ...; ExportImage's ``config`` takes it)
    layers: int
    layers_stored: int  # those that were not in the store before

    @classmethod
    def from_reply(cls, lowerdirs: list[str], info: dict[str, Any]) -> ImageInfo:
        return cls(lowerdirs=tuple(lowerdirs), digest=info["digest"], config=info["config"],
                   layers=int(info["layers"]), layers_stored=int(info["layers_stored"]))

    def as_json(self) -> dict[str, Any]:
        return {"lowerdirs": list(self.lowerdirs), "digest": self.digest, "config": self.config,
                "layers": self.layers, "layers_stored": self.layers_stored}


@dataclass(frozen=True)
class ExportedImage:
    """The OCI image archive ExportImage wrote: the mount's lowers and upper as layers."""

    digest: str  # the manifest's sha256:<hex> (the same layers give the same digest)
    bytes: int  # the archive's size
    layers: int
    config: str  # the new image config's JSON

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> ExportedImage:
        return cls(digest=info["digest"], bytes=int(info["bytes"]), layers=int(info["layers"]),
                   config=info["config"])

    def as_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "bytes": self.bytes, "layers": self.layers, "config": self.config}
