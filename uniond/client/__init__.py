"""uniond's client: the library service authors use, and ``unionctl`` (``cli``) on top.

A room of its own: it speaks only the documented D-Bus contract (README, "The D-Bus
contract") and imports nothing of uniond but ``constants`` (the names on the bus) and
``errors`` (one exception class per uniond error), so it works without the daemon's
own modules; dbus-next is its only D-Bus library. No daemon room imports it.

    from uniond.client import Client, Busy
    with Client() as client:
        with client.mount(["/srv/image"], "/srv/upper", description="build") as m:
            run_build(m.mountpoint)
            print([f"{c.kind} {c.path}" for c in m.diff()])

``AsyncClient`` is the same for asyncio services (``await``/``async with``).
"""

from uniond.client.aio import AsyncClient, AsyncEvents, AsyncMount
from uniond.client.errors import (
    AlreadyMounted,
    BusError,
    Busy,
    Failed,
    InvalidArgument,
    NotAuthorized,
    NotAuthorizedCanObtain,
    NotAuthorizedDismissed,
    NotFound,
    NotPermitted,
    NotSupported,
    UniondError,
)
from uniond.client.sync import Client, Events, Mount
from uniond.client.values import Change, Event, ExportedImage, ImageInfo, LayerInfo, MountInfo, Status

__all__ = [
    "AlreadyMounted", "AsyncClient", "AsyncEvents", "AsyncMount", "BusError", "Busy", "Change", "Client",
    "Event", "Events", "ExportedImage", "Failed", "ImageInfo", "InvalidArgument", "LayerInfo", "Mount", "MountInfo",
    "NotAuthorized", "NotAuthorizedCanObtain", "NotAuthorizedDismissed", "NotFound", "NotPermitted", "NotSupported",
    "Status", "UniondError",
]
