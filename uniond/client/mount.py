"""A mount as the asyncio client hands it back: its properties as read, and the methods
on it (each a call of ``AsyncClient``, which alone speaks D-Bus).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from uniond.client.files import FileOrFd, Progress
from uniond.client.values import Change, ExportedImage, LayerInfo, MountInfo, MountProperties

if TYPE_CHECKING:
    from uniond.client.aio import AsyncClient


class AsyncMount(MountProperties):
    """One mount: its properties as read (``info``, and each as an attribute), and the
    methods on it. ``async with`` unmounts it at the end of the block."""

    def __init__(self, client: AsyncClient, info: MountInfo) -> None:
        self.client = client
        self.info = info

    def __repr__(self) -> str:
        return f"<uniond mount {self.info.id} at {self.info.mountpoint}>"

    async def refresh(self) -> AsyncMount:
        """The mount's properties read again (NotFound once it is gone)."""
        self.info = (await self.client.get(self.path)).info
        return self

    async def diff(self) -> list[Change]:
        """What the mount changed relative to its lowers, sorted by path (through
        DiffInto: any number of changes, any name; see ``Change.raw``)."""
        return await self.client._diff(self.path)

    async def diff_into(self, file_or_fd: FileOrFd) -> int:
        """Write the changes into a path, file object or fd, unsorted, one ``KIND SPACE
        PATH NUL`` record each (the path's bytes as on disk); returns how many. For a
        pipe, read it while this runs (``diff`` does that for you)."""
        return await self.client._diff_into(self.path, file_or_fd)

    async def update(self, lowers: Iterable[str | os.PathLike], **options: Any) -> AsyncMount:
        """Replace the lowers (top-most first) without a moment where the mountpoint is
        empty; the same mount, its properties read again. ``NotSupported`` below kernel 6.5."""
        await self.client._update(self.path, lowers, **options)
        return await self.refresh()

    async def export(self, file_or_fd: FileOrFd, compression: str | None = None,
                     progress: Progress | None = None) -> int:
        """Write the upper as a layer tar into a path, file object or fd; returns the
        bytes written. ``compression`` "none", "gzip" or "zstd" (default: gzip for a
        path ending in .gz or .tgz, zstd for .zst or .tzst, else none)."""
        return await self.client._export(self.path, file_or_fd, compression, progress)

    async def export_layer(self, file_or_fd: FileOrFd, compression: str | None = None,
                           progress: Progress | None = None) -> LayerInfo:
        """``export`` answering what a manifest needs: the layer's diff_id, digest,
        media type, bytes and entries."""
        return await self.client._export_layer(self.path, file_or_fd, compression, progress)

    async def export_image(self, file_or_fd: FileOrFd, *, compression: str | None = None, config: str | None = None,
                           name: str | None = None, progress: Progress | None = None) -> ExportedImage:
        """Write the lowers (bottom-most first) and the upper as a new OCI image layout
        archive that ``skopeo copy oci-archive:...`` and ``podman load`` read.
        ``compression`` of the layers (default gzip), ``config`` the image config's
        JSON to start from (e.g. ``ImageInfo.config``), ``name`` the reference the
        archive gives the image (e.g. "localhost/app:1")."""
        return await self.client._export_image(self.path, file_or_fd, progress, compression=compression,
                                               config=config, name=name)

    async def commit(self, destdir: str | os.PathLike, progress: Progress | None = None) -> int:
        """Copy the upper into the empty ``destdir`` as a native layer; returns the entries."""
        return await self.client._commit(self.info, destdir, progress)

    async def unmount(self, lazy: bool = False) -> None:
        """Unmount; ``lazy`` detaches it now even while in use (``Busy`` otherwise names
        the processes using it). uniond then removes only what it made itself."""
        await self.client._unmount(self.path, lazy)

    async def __aenter__(self) -> AsyncMount:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unmount()
