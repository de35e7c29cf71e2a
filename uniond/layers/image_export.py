"""Whole images out: a mount's lowers plus its changes as an OCI image layout archive
(ExportImage), which ``skopeo copy oci-archive:...`` and ``podman load`` read.

A tar member's header carries its size and an OCI blob's name its digest, both known
only once the blob is written: each layer is therefore written to an unnamed spool
file first (disk, not memory), then sent to the caller's descriptor. The config and
the manifest leave out every timestamp, so the same layers give the same image digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass

from uniond.errors import InvalidArgument
from uniond.layers.compress import check_compression
from uniond.layers.image import host_platform
from uniond.layers.stream import CHUNK, Sink, check_fd
from uniond.layers.tar_export import export_diff

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
SPOOL_DIR = "/var/tmp"  # on disk: a layer can be far bigger than memory


@dataclass(frozen=True)
class ExportImageResult:
    digest: str  # the manifest's
    bytes: int  # written to the fd
    layers: int
    config: str

    def info(self) -> dict[str, object]:
        return {"digest": self.digest, "bytes": self.bytes, "layers": self.layers, "config": self.config}


def base_config(base: str) -> dict:
    """The image config to start from (the ``config`` option), or a minimal one."""
    if not base:
        system, architecture = host_platform()
        return {"architecture": architecture, "os": system, "config": {}}
    try:
        config = json.loads(base)
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"config: not JSON: {e}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("config: must be a JSON object, an image config")
    return config


def _config(config: dict, diff_ids: list[str], lowers: int) -> bytes:
    """The image config: ``config`` (e.g. ImportImage's) with this image's layers."""
    history = config.pop("history", None)
    old = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
    if isinstance(history, list) and isinstance(old, list) and old == diff_ids[:lowers]:
        # The lowers are the base image's layers: its history stays, one entry per new layer.
        config["history"] = history + [{"created_by": "uniond ExportImage"}] * (len(diff_ids) - lowers)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def _header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT)


def _member(sink: Sink, name: str, data: bytes) -> None:
    sink.write(_header(name, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE))


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def export_image(layer_dirs: list[str], fd: int, compression: str = "gzip", base_config_text: str = "",
                 name: str = "", lowers: int | None = None, what: str = "export") -> ExportImageResult:
    """Write ``layer_dirs`` (bottom-most first, each an upper or a layer directory in
    overlay's form) to ``fd`` as an OCI image archive. ``lowers`` of them are the base
    image's (for the history); ``name`` becomes the image's reference name."""
    check_compression(compression)
    base = base_config(base_config_text)
    check_fd(fd, writing=True)
    sink = Sink(fd)
    descriptors, diff_ids, spools = [], [], []
    try:
        for i, directory in enumerate(layer_dirs):
            spool = tempfile.TemporaryFile(dir=SPOOL_DIR if os.path.isdir(SPOOL_DIR) else None)
            spools.append(spool)
            layer = export_diff(directory, spool.fileno(), compression, f"{what} layer {i}", digests=True)
            descriptors.append({"mediaType": layer.media_type, "digest": layer.digest, "size": layer.bytes})
            diff_ids.append(layer.diff_id)
        config_digest, config = _blob(_config(base, diff_ids, len(layer_dirs) if lowers is None else lowers))
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                    "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
                    "layers": descriptors}
        manifest_digest, manifest_data = _blob(json.dumps(manifest, separators=(",", ":")).encode())
        entry = {"mediaType": MANIFEST, "digest": manifest_digest, "size": len(manifest_data)}
        if name:
            entry["annotations"] = {REF_NAME: name}
        index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [entry]},
                           separators=(",", ":")).encode()

        _member(sink, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        sink.write(_header("blobs", 0, directory=True) + _header("blobs/sha256", 0, directory=True))
        written = set()
        for spool, desc in zip(spools, descriptors, strict=True):
            if desc["digest"] in written:
                continue  # two equal layers: one blob
            written.add(desc["digest"])
            size = desc["size"]
            sink.write(_header(f"blobs/sha256/{desc['digest'][7:]}", size))
            spool.seek(0)
            left = size - sink.sendfile(spool.fileno(), size)
            while left:
                data = spool.read(min(left, CHUNK))
                if not data:
                    raise OSError("the spooled layer is shorter than written")
                sink.write(data)
                left -= len(data)
            sink.write(bytes(-size % tarfile.BLOCKSIZE))
        _member(sink, f"blobs/sha256/{config_digest[7:]}", config)
        _member(sink, f"blobs/sha256/{manifest_digest[7:]}", manifest_data)
        _member(sink, "index.json", index)
        end = 2 * tarfile.BLOCKSIZE
        sink.write(bytes(end + (-(sink.position + end)) % tarfile.RECORDSIZE))
        sink.flush()
    finally:
        for spool in spools:
            spool.close()
    return ExportImageResult(manifest_digest, sink.written, len(layer_dirs), config.decode())
