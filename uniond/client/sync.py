"""The synchronous client, for scripts: the asyncio client's coroutines run on an event
loop of the client's own, so both APIs are the same dbus-next code.

Not for use from inside a running event loop (use ``AsyncClient`` there).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from uniond.client.aio import AsyncClient, AsyncEvents, AsyncMount, FileOrFd, Progress
from uniond.client.values import Change, Event, ExportedImage, ImageInfo, LayerInfo, MountInfo, MountProperties, Status

T = TypeVar("T")


class Client:
    """A connection to uniond (see ``AsyncClient`` for ``address``, ``bus`` and
    ``interactive``)::

        from uniond.client import Client
        with Client() as client, client.mount(["/srv/image"], "/srv/upper") as m:
            ...                      # work in m.mountpoint
            m.export("/srv/layer.tar.gz")
        # unmounted here
    """

    def __init__(self, address: str | None = None, *, bus: str = "system", interactive: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self.aio = AsyncClient(address, bus=bus, interactive=interactive)
        try:
            self._run(self.aio.connect())
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self.aio.close())
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> str:
        """uniond's version (the Manager's Version property)."""
        return self._run(self.aio.version())

    def mount(self, lowers: Iterable[str | os.PathLike], upper: str | os.PathLike | None = None,
              mountpoint: str | os.PathLike | None = None, **options: Any) -> Mount:
        """Mount ``lowers`` (top-most first) under ``upper`` (None: read-only) at
        ``mountpoint`` (None: uniond makes one); see ``AsyncClient.mount``."""
        return Mount(self, self._run(self.aio.mount(lowers, upper, mountpoint, **options)))

    def get(self, path: str) -> Mount:
        """The mount at a D-Bus object path (``NotFound`` if there is none)."""
        return Mount(self, self._run(self.aio.get(path)))

    def mounts(self) -> list[Mount]:
        """Every mount uniond owns, oldest first."""
        return [Mount(self, m) for m in self._run(self.aio.mounts())]

    def find(self, name: str | os.PathLike) -> Mount:
        """A mount by id, object path, mountpoint or any path inside it."""
        return Mount(self, self._run(self.aio.find(name)))

    def import_layer(self, file_or_fd: FileOrFd, destdir: str | os.PathLike, *, devices: bool = False,
                     progress: Progress | None = None) -> int:
        """Unpack a layer tar into the empty ``destdir``; returns the entries made."""
        return self._run(self.aio.import_layer(file_or_fd, destdir, devices=devices, progress=progress))

    def apply_layer(self, file_or_fd: FileOrFd, destdir: str | os.PathLike, *,
                    parents: Iterable[str | os.PathLike] = (), expected_digest: str | None = None,
                    expected_diff_id: str | None = None, devices: bool = False,
                    progress: Progress | None = None) -> LayerInfo:
        """Unpack a layer tar into the empty ``destdir`` on ``parents`` (top-most first),
        checking its digests; returns its LayerInfo (see ``AsyncClient.apply_layer``)."""
        return self._run(self.aio.apply_layer(file_or_fd, destdir, parents=parents, expected_digest=expected_digest,
                                              expected_diff_id=expected_diff_id, devices=devices, progress=progress))

    def import_image(self, file_or_fd: FileOrFd, store: str | os.PathLike, *, expected_digest: str | None = None,
                     devices: bool = False, progress: Progress | None = None) -> ImageInfo:
        """Unpack an OCI archive or ``docker save`` tar into ``store``; the answer's
        ``lowerdirs`` (top-most first) are ready for ``mount`` (see ``AsyncClient.import_image``)."""
        return self._run(self.aio.import_image(file_or_fd, store, expected_digest=expected_digest, devices=devices,
                                               progress=progress))

    def status(self) -> Status:
        """Version, mount count and, when systemd runs uniond, its unit's state."""
        return self._run(self.aio.status())

    def reload(self) -> None:
        """Apply edits of the declared mounts and the configuration (``Reload()``)."""
        self._run(self.aio.reload())

    def events(self) -> Events:
        """MountAdded / MountRemoved from now on: ``for event in client.events(): ...``."""
        return Events(self, self._run(self.aio.events()))


class Mount(MountProperties):
    """One mount: ``info`` and its properties as attributes, the methods on it, and a
    context manager that unmounts it on exit."""

    def __init__(self, client: Client, mount: AsyncMount) -> None:
        self.client = client
        self.aio = mount

    def __repr__(self) -> str:
        return repr(self.aio)

    @property
    def info(self) -> MountInfo:  # type: ignore[override]
        """All the properties, as read when the mount was found or last refreshed."""
        return self.aio.info

    def refresh(self) -> Mount:
        """Read the properties again (``NotFound`` once the mount is gone)."""
        self.client._run(self.aio.refresh())
        return self

    def diff(self) -> list[Change]:
        """What the mount changed relative to its lowers (A/C/D and a path), sorted; any size."""
        return self.client._run(self.aio.diff())

    def diff_into(self, file_or_fd: FileOrFd) -> int:
        """Write the changes as ``KIND SPACE PATH NUL`` records; returns how many (see ``AsyncMount.diff_into``)."""
        return self.client._run(self.aio.diff_into(file_or_fd))

    def update(self, lowers: Iterable[str | os.PathLike], **options: Any) -> Mount:
        """Replace the lowers (top-most first) without a gap (see ``AsyncMount.update``)."""
        self.client._run(self.aio.update(lowers, **options))
        return self

    def export(self, file_or_fd: FileOrFd, compression: str | None = None, progress: Progress | None = None) -> int:
        """Write the upper as a layer tar; returns the bytes written (see ``AsyncMount.export``)."""
        return self.client._run(self.aio.export(file_or_fd, compression, progress))

    def export_layer(self, file_or_fd: FileOrFd, compression: str | None = None,
                     progress: Progress | None = None) -> LayerInfo:
        """Write the upper as a layer tar; returns its diff_id, digest, media type, bytes
        and entries (see ``AsyncMount.export_layer``)."""
        return self.client._run(self.aio.export_layer(file_or_fd, compression, progress))

    def export_image(self, file_or_fd: FileOrFd, *, compression: str | None = None, config: str | None = None,
                     name: str | None = None, progress: Progress | None = None) -> ExportedImage:
        """Write the lowers and the upper as a new OCI image archive (see ``AsyncMount.export_image``)."""
        return self.client._run(self.aio.export_image(file_or_fd, compression=compression, config=config, name=name,
                                                      progress=progress))

    def commit(self, destdir: str | os.PathLike, progress: Progress | None = None) -> int:
        """Copy one consistent state of the upper into the empty ``destdir``; returns the entries."""
        return self.client._run(self.aio.commit(destdir, progress))

    def unmount(self, lazy: bool = False) -> None:
        """Unmount (see ``AsyncMount.unmount``)."""
        self.client._run(self.aio.unmount(lazy))

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


class Events:
    """An iterator of events; ``get(timeout)`` waits at most ``timeout`` seconds."""

    def __init__(self, client: Client, stream: AsyncEvents) -> None:
        self.client = client
        self.aio = stream

    def get(self, timeout: float | None = None) -> Event:
        return self.client._run(self.aio.get(timeout))

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return self.get()

    def close(self) -> None:
        self.aio.close()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "Events", "ExportedImage", "ImageInfo", "LayerInfo", "Mount", "MountInfo"]
