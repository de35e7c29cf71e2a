"""The errors a client sees: one Python exception per uniond error, with the same names.

They are uniond's own classes (``uniond.errors``, which imports nothing but the
names in ``uniond.constants``), so ``except uniond.client.Busy`` catches exactly what
the daemon sent as ``org.uniond1.Error.Busy``, and the text is the daemon's message.
Errors that come from the bus rather than from uniond (no bus, uniond not running,
the bus policy refusing a call) are :class:`BusError`, carrying the bus's own name.
"""

from __future__ import annotations

from uniond.errors import (
    AlreadyMounted,
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

__all__ = [
    "AlreadyMounted", "BusError", "Busy", "Failed", "InvalidArgument", "NotAuthorized",
    "NotAuthorizedCanObtain", "NotAuthorizedDismissed", "NotFound", "NotPermitted", "NotSupported",
    "UniondError", "from_dbus",
]

NO_SERVER = "org.freedesktop.DBus.Error.NoServer"
SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


class BusError(UniondError):
    """An error named by the bus, not by uniond: its ``dbus_name`` is the bus's."""

    def __init__(self, dbus_name: str, message: str) -> None:
        super().__init__(message)
        self.dbus_name = dbus_name


_BY_NAME: dict[str, type[UniondError]] = {
    cls.dbus_name: cls
    for cls in (AlreadyMounted, Busy, Failed, InvalidArgument, NotAuthorized, NotAuthorizedCanObtain,
                NotAuthorizedDismissed, NotFound, NotPermitted, NotSupported)
}


def from_dbus(name: str, message: str) -> UniondError:
    """The exception for an error reply: uniond's own class, else a BusError."""
    cls = _BY_NAME.get(name)
    if cls is not None:
        return cls(message)
    if name == SERVICE_UNKNOWN:
        message = f"uniond is not running on this bus and could not be started ({message})"
    return BusError(name, message)
