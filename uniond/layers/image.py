"""Whole images in: an OCI image layout archive (``skopeo copy ... oci-archive:``) or a
``docker save`` tar, read once from the caller's descriptor into a layer store.

The archive is a stream (a pipe is fine), and its members come in any order: the
manifest may follow the layers it names. So every blob is taken as it passes: a small
one (JSON: an index, a manifest, a config; or a tiny layer) is kept in memory, a big
one is unpacked at once into a partial directory of the store, hashed both ways on the
way (digest and diff_id). Once the archive has ended, the manifest says which blobs are
the image: every digest is checked against what was read, the layers take their
parents' metadata (fix 2) and are renamed to their diff_id; everything else is dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import posixpath
import re
import tarfile
from dataclasses import dataclass, field

from uniond.errors import InvalidArgument
from uniond.layers import tar_import
from uniond.layers.compress import Reader, decompressing
from uniond.layers.store import Store, hex_of
from uniond.layers.stream import CHUNK

log = logging.getLogger(__name__)

SMALL_BLOB = 1 << 20  # kept in memory: JSON documents, tiny layers
SMALL_TOTAL = 64 << 20  # all of them together
MAX_MEMBERS = 20000
MAX_LAYERS = 500  # overlay stacks at most 500 lowers
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
                 "s390x": "s390x", "riscv64": "riscv64"}  # uname -m -> GOARCH
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ImageResult:
    lowerdirs: tuple[str, ...]  # diff_ids, top-most first; the caller makes them paths
    digest: str  # the manifest's, or for a docker save tar the image id (the config's sha256)
    config: str  # the image config, as JSON
    layers_stored: int  # layers that were not in the store before

    def info(self) -> dict[str, object]:
        return {"digest": self.digest, "config": self.config, "layers": len(self.lowerdirs),
                "layers_stored": self.layers_stored}


@dataclass
class _Blob:
    digest: str  # "" for a big blob that is no layer: never usable
    size: int
    data: bytes | None = None  # a small blob
    partial: str = ""  # a big one, unpacked into this partial of the store
    layer: tar_import.ImportResult | None = None
    error: str = ""  # a big one that is no layer


@dataclass
class _Archive:
    blobs: dict[str, _Blob] = field(default_factory=dict)  # member name -> blob
    links: dict[str, str] = field(default_factory=dict)  # member name -> the member it names
    small_total: int = 0

    def get(self, name: str, what: str) -> _Blob:
        name = posixpath.normpath(name.lstrip("/"))
        for _ in range(40):  # a chain of links, never a loop
            if name not in self.links:
                break
            name = self.links[name]
        blob = self.blobs.get(name)
        if blob is None:
            raise InvalidArgument(f"the archive lacks {name!r}, the {what}")
        return blob


def _read_member(archive: _Archive, tf: tarfile.TarFile, member: tarfile.TarInfo, store: Store,
                 devices: bool) -> None:
    name = posixpath.normpath(member.name.lstrip("/"))
    if member.issym() or member.islnk():
        target = member.linkname if member.islnk() else posixpath.join(posixpath.dirname(name), member.linkname)
        archive.links[name] = posixpath.normpath(target.lstrip("/"))
        return
    if not member.isreg():
        return
    src = tf.extractfile(member)
    assert src is not None
    if member.size <= SMALL_BLOB:
        archive.small_total += member.size
        if archive.small_total > SMALL_TOTAL:
            raise InvalidArgument(f"the archive holds more than {SMALL_TOTAL} bytes of small files; not an image")
        data = src.read()
        archive.blobs[name] = _Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)
        return
    named = name.rpartition("/")
    known = store.known(f"sha256:{named[2]}") if named[0] == "blobs/sha256" and _HEX.fullmatch(named[2]) else None
    if known:
        # A blob stored before: hashed (its name must be its digest), never unpacked again.
        hasher = hashlib.sha256()
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
        digest = "sha256:" + hasher.hexdigest()
        log.info("import: blob %s is the stored layer %s; hashed, not unpacked", digest, known)
        archive.blobs[name] = _Blob(digest, member.size, layer=tar_import.ImportResult(0, diff_id=known, digest=digest))
        return
    partial, fd = store.partial()
    try:
        layer = tar_import.unpack(src, f"/proc/self/fd/{fd}/.", devices, digests=True, defer_parents=True)
        archive.blobs[name] = _Blob(layer.digest, member.size, partial=partial, layer=layer)
    except InvalidArgument as e:
        # Not a layer (or a broken one): an error only if the manifest names it.
        archive.blobs[name] = _Blob("", member.size, partial=partial, error=str(e))
    finally:
        os.close(fd)


def _json(blob: _Blob, what: str) -> dict | list:
    if blob.data is None:
        raise InvalidArgument(f"the {what} is larger than {SMALL_BLOB} bytes; not an image")
    try:
        return json.loads(blob.data)
    except (ValueError, UnicodeError) as e:
        raise InvalidArgument(f"the {what} is not JSON: {e}") from None
    except RecursionError:
        raise InvalidArgument(f"the {what} nests too deep; not an image") from None


def _descriptor(archive: _Archive, desc: object, what: str) -> _Blob:
    """The blob an OCI descriptor names, checked against its digest and size."""
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str) or not _DIGEST.fullmatch(desc["digest"]):
        raise InvalidArgument(f"the {what}'s descriptor has no sha256 digest")
    blob = archive.get(f"blobs/sha256/{hex_of(desc['digest'])}", what)
    if blob.digest and blob.digest != desc["digest"]:
        raise InvalidArgument(f"the {what} has digest {blob.digest}, not {desc['digest']} as its descriptor says")
    if desc.get("size") != blob.size:
        raise InvalidArgument(f"the {what} has {blob.size} bytes, not {desc.get('size')!r} as its descriptor says")
    return blob


def _check_blob_names(archive: _Archive) -> None:
    """Every blob of an OCI layout is named by its digest: check them all, used or not."""
    for name, blob in archive.blobs.items():
        head, _, tail = name.rpartition("/")
        if head == "blobs/sha256" and blob.digest and blob.digest != f"sha256:{tail}":
            raise InvalidArgument(f"blob {name!r} has digest {blob.digest}; its name says otherwise")


def _oci(archive: _Archive, platform: tuple[str, str]) -> tuple[_Blob, str, list[tuple[_Blob, str]]]:
    index = _json(archive.get("index.json", "index (index.json)"), "index")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    digest = ""
    for _ in range(4):  # an index may name an index
        if not isinstance(manifests, list) or not manifests:
            raise InvalidArgument("the index names no manifest")
        chosen = manifests[0]
        if len(manifests) > 1:
            fitting = [m for m in manifests if isinstance(m, dict) and isinstance(m.get("platform"), dict)
                       and (m["platform"].get("os"), m["platform"].get("architecture")) == platform]
            if len(fitting) != 1:
                raise InvalidArgument(f"the index names {len(manifests)} manifests and not one for "
                                      f"{platform[0]}/{platform[1]} alone; give an archive of one image")
            chosen = fitting[0]
        blob = _descriptor(archive, chosen, "manifest")
        document = _json(blob, "manifest")
        digest = chosen["digest"]
        if chosen.get("mediaType") in (INDEX, DOCKER_LIST) or (isinstance(document, dict) and "manifests" in document):
            manifests = document.get("manifests") if isinstance(document, dict) else None
            continue
        break
    else:
        raise InvalidArgument("the index names indexes four deep; not an image")
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        raise InvalidArgument("the manifest lists no layers")
    config = _descriptor(archive, document.get("config"), "config")
    layers = []
    for i, desc in enumerate(document["layers"]):
        media = desc.get("mediaType", "") if isinstance(desc, dict) else ""
        if media not in LAYER_TYPES:
            raise InvalidArgument(f"layer {i} has media type {media!r}; ImportImage reads {', '.join(LAYER_TYPES)}")
        layers.append((_descriptor(archive, desc, f"layer {i}"), desc["digest"]))
    return config, digest, layers


def _docker(archive: _Archive) -> tuple[_Blob, str, list[tuple[_Blob, str]]]:
    images = _json(archive.get("manifest.json", "manifest (manifest.json)"), "manifest.json")
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], dict):
        count = len(images) if isinstance(images, list) else 0
        raise InvalidArgument(f"manifest.json lists {count} images; ImportImage takes an archive of one")
    image = images[0]
    if not isinstance(image.get("Config"), str) or not isinstance(image.get("Layers"), list):
        raise InvalidArgument("manifest.json gives no Config and Layers")
    config = archive.get(image["Config"], "config")
    named = _HEX.search(posixpath.basename(image["Config"]))
    if named and config.digest != f"sha256:{named.group()}":
        raise InvalidArgument(f"the config {image['Config']!r} has digest {config.digest}; its name says otherwise")
    layers = [(archive.get(str(path), f"layer {i}"), "") for i, path in enumerate(image["Layers"])]
    return config, config.digest, layers


def host_platform() -> tuple[str, str]:
    """(os, architecture) in the words of OCI (Go's GOOS, GOARCH)."""
    machine = platform.machine()
    return "linux", ARCHITECTURES.get(machine, machine)


def import_image(source: Reader, store: Store, devices: bool = False, expected_digest: str = "") -> ImageResult:
    """Read an image archive from ``source`` into ``store``; see the module's docstring."""
    tar_import.check_digest("expected_digest", expected_digest)
    archive = _Archive()
    try:
        plain, _ = decompressing(source)
        with tarfile.open(fileobj=plain, mode="r|", tarinfo=tar_import.SafeHeader, errorlevel=2, bufsize=CHUNK) as tf:
            count = 0
            while (member := tf.next()) is not None:
                count += 1
                if count > MAX_MEMBERS:
                    raise InvalidArgument(f"the archive holds more than {MAX_MEMBERS} files; not an image")
                _read_member(archive, tf, member, store, devices)
                tf.members.clear()
    except (tarfile.TarError, EOFError) as e:
        raise InvalidArgument(f"not a readable image archive: {e}") from None
    except UnicodeError as e:
        raise InvalidArgument(f"a name in the image archive is not valid: {e}") from None
    _check_blob_names(archive)
    if "index.json" in archive.blobs or "index.json" in archive.links:
        config, digest, layers = _oci(archive, host_platform())
    elif "manifest.json" in archive.blobs:
        config, digest, layers = _docker(archive)
    else:
        raise InvalidArgument("neither index.json (an OCI layout) nor manifest.json (docker save) in the archive")
    if expected_digest and digest != expected_digest:
        raise InvalidArgument(f"expected_digest: the image's digest is {digest}, not {expected_digest}; refused")
    document = _json(config, "config")
    rootfs = document.get("rootfs") if isinstance(document, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise InvalidArgument(f"the config's rootfs.diff_ids do not list the manifest's {len(layers)} layers")
    if len(layers) > MAX_LAYERS:
        raise InvalidArgument(f"the image has {len(layers)} layers; overlay stacks at most {MAX_LAYERS}")
    stored = 0
    below: list[str] = []  # the layers unpacked so far, as parents: top-most first
    for i, ((blob, _), diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        if not isinstance(diff_id, str) or not _DIGEST.fullmatch(diff_id):
            raise InvalidArgument(f"the config's diff_id of layer {i} is not a sha256 digest")
        stored += _store_layer(store, blob, diff_id, i, devices, below)
        below.insert(0, store.path(hex_of(diff_id)))
    return ImageResult(tuple(reversed(diff_ids)), digest, config.data.decode("utf-8", "replace"), stored)


def _store_layer(store: Store, blob: _Blob, diff_id: str, i: int, devices: bool, below: list[str]) -> int:
    """Layer ``i`` into the store under its diff_id; 1 if it was not there before.

    A layer already stored (perhaps mounted right now) is never written to again; the
    blob must still prove to be that layer: its uncompressed tar must hash to diff_id.
    """
    if blob.error:
        raise InvalidArgument(f"layer {i}: {blob.error}")
    if blob.layer is None:  # a small blob, kept in memory until it was known to be a layer
        if store.has(diff_id):
            _check_small(blob, diff_id, i)
            return 0
        blob.partial, fd = store.partial()
        try:
            blob.layer = tar_import.unpack(io.BytesIO(blob.data or b""), f"/proc/self/fd/{fd}/.", devices,
                                           digests=True, defer_parents=True)
        finally:
            os.close(fd)
    if blob.layer.diff_id != diff_id:
        raise InvalidArgument(f"layer {i} has diff_id {blob.layer.diff_id}, not {diff_id} as the config says")
    stored = 0
    if store.has(diff_id):  # stored before, or earlier in this image: this copy goes
        if blob.partial in store.partials:
            store.discard(blob.partial)
    else:
        tar_import.adopt(store.path(blob.partial), blob.layer.implicit, tuple(below))
        store.complete(blob.partial, diff_id)
        stored = 1
    if blob.data is None:  # a big blob: the next import of it need not unpack it
        store.remember(blob.layer.digest, diff_id)
    return stored


def _check_small(blob: _Blob, diff_id: str, i: int) -> None:
    plain, _ = decompressing(io.BytesIO(blob.data or b""))
    hasher = hashlib.sha256()
    while chunk := plain.read(CHUNK):
        hasher.update(chunk)
    if f"sha256:{hasher.hexdigest()}" != diff_id:
        raise InvalidArgument(f"layer {i} has diff_id sha256:{hasher.hexdigest()}, not {diff_id} as the config says")
