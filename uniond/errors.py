"""One exception class per error the daemon reports.

Each class carries its D-Bus error name so that the bus layer can translate any of
them in one place without a lookup table that could drift from the classes.
"""

from __future__ import annotations

from uniond import constants


class UniondError(Exception):
    """Base of every error a caller may see; the message must say what to fix."""

    dbus_name: str = constants.ERROR_FAILED


class InvalidArgument(UniondError):
    dbus_name = constants.ERROR_INVALID_ARGUMENT


class NotFound(UniondError):
    dbus_name = constants.ERROR_NOT_FOUND


class Busy(UniondError):
    dbus_name = constants.ERROR_BUSY


class AlreadyMounted(UniondError):
    dbus_name = constants.ERROR_ALREADY_MOUNTED


class NotPermitted(UniondError):
    dbus_name = constants.ERROR_NOT_PERMITTED


class Failed(UniondError):
    dbus_name = constants.ERROR_FAILED


class NotSupported(UniondError):
    """The running kernel lacks what the call needs (e.g. MOVE_MOUNT_BENEATH for Update)."""

    dbus_name = constants.ERROR_NOT_SUPPORTED


class NotRecorded(Failed):
    """The journal could not take a line (a full disk, an I/O error), and nothing of it
    remains: the operation that needed it was not done (a Failed on the bus)."""


class NotAuthorized(UniondError):
    """polkit (or its absence) says no."""

    dbus_name = constants.ERROR_NOT_AUTHORIZED


class NotAuthorizedCanObtain(UniondError):
    """polkit would say yes after authentication, which the caller ruled out."""

    dbus_name = constants.ERROR_NOT_AUTHORIZED_CAN_OBTAIN


class NotAuthorizedDismissed(UniondError):
    """The user dismissed the authentication dialog."""

    dbus_name = constants.ERROR_NOT_AUTHORIZED_DISMISSED
