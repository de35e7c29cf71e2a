"""The image methods: ImportImage into a layer store, ExportImage of a mount.

As for the layer methods, authorization happens on the event loop and the work in a
thread of its own; the layers room reads and writes, this module decides what it may
touch. A store may hold the lowers of live mounts (that is what it is for), so unlike
a destdir it may contain lowerdirs; it must not lie in a mount's upper, workdir or
mountpoint, nor inside a lower, where a write would change a mounted layer.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from uniond.access import paths
from uniond.access.caller import Caller
from uniond.constants import ACTION_EXPORT, ACTION_IMPORT
from uniond.errors import InvalidArgument, NotPermitted
from uniond.layers import image, image_export
from uniond.layers.compress import check_compression
from uniond.layers.store import LAYERS, Store, hex_of
from uniond.layers.stream import Source, check_fd
from uniond.layers.tar_import import check_digest
from uniond.mounts import options
from uniond.mounts.layerops import LayerOperations, own_thread

log = logging.getLogger(__name__)


def _import(fd: int, store_path: str, devices: bool, expected_digest: str) -> image.ImageResult:
    check_fd(fd, writing=False)
    store = Store(store_path)
    try:
        return image.import_image(Source(fd), store, devices, expected_digest)
    finally:
        store.close()


class ImageOperations:
    def __init__(self, layers: LayerOperations) -> None:
        self.layers = layers
        self.manager = layers.manager

    def _check_store(self, store: str) -> None:
        for record in list(self.manager.records.values()):
            spec = record.spec
            named = {"mountpoint": spec.mountpoint, "upperdir": spec.upperdir, "workdir": spec.workdir}
            for name, path in named.items():
                if path and (paths.inside(store, path) or paths.inside(path, store)):
                    raise InvalidArgument(f"store {store!r} overlaps the {name} {path!r} of mount {record.id}; "
                                          "give a directory outside every mount's upper, workdir and mountpoint")
            for i, path in enumerate(spec.lowerdirs):
                if paths.inside(store, path):
                    raise InvalidArgument(f"store {store!r} lies in lowerdirs[{i}] {path!r} of mount {record.id}, "
                                          "which must not change while mounted; give another directory")

    async def import_image(self, fd: int, store: str, caller: Caller, opts: dict[str, Any]) -> image.ImageResult:
        opts = options.check("ImportImage", opts, options.IMPORT_IMAGE_OPTIONS)
        devices = opts.get("devices", False)
        if devices and not caller.is_root:
            raise NotPermitted("devices: only root may import device files; other layers refuse them")
        expected = opts.get("expected_digest", "")
        check_digest("expected_digest", expected)
        canonical = self.layers._places.placed("store", store)
        await self.manager.authorize(caller, ACTION_IMPORT, opts, destdir=canonical)
        with contextlib.ExitStack() as held:
            handle = self.layers._places.open(held, "store", canonical, placed=True)
            self._check_store(handle.path)
            result = await own_thread(_import, fd, f"/proc/self/fd/{handle.fd}/.", devices, expected)
        lowerdirs = tuple(f"{handle.path}/{LAYERS}/{hex_of(d)}" for d in result.lowerdirs)
        log.info("imported image %s into %s: %d layers, %d new (uid %d)",
                 result.digest, handle.path, len(lowerdirs), result.layers_stored, caller.uid)
        return image.ImageResult(lowerdirs, result.digest, result.config, result.layers_stored)

    async def export_image(self, mount_id: str, fd: int, caller: Caller,
                           opts: dict[str, Any]) -> image_export.ExportImageResult:
        opts = options.check("ExportImage", opts, options.EXPORT_IMAGE_OPTIONS)
        compression = opts.get("compression", "gzip")
        check_compression(compression)
        image_export.base_config(opts.get("config", ""))  # refused before any work
        await self.manager.authorize(caller, ACTION_EXPORT, opts, self.manager.get(mount_id), compression=compression)
        with self.layers._using(mount_id) as record, contextlib.ExitStack() as held:
            lowers = [f"/proc/self/fd/{self.layers._places.open(held, f'lowerdirs[{i}]', p).fd}/."
                      for i, p in enumerate(record.spec.lowerdirs)]
            upper = self.layers._upper_of(held, record)
            dirs = list(reversed(lowers)) + ([upper] if upper else [])
            result = await own_thread(
                image_export.export_image, dirs, fd, compression, opts.get("config", ""), opts.get("name", ""),
                len(lowers), f"mount {mount_id}: export image",
            )
        log.info("mount %s: exported image %s, %d bytes (uid %d)", mount_id, result.digest, result.bytes, caller.uid)
        return result
