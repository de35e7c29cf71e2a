"""Every name that appears on the bus, in one place.

Tools and users are written against these names (the D-Bus contract), so they are
defined once here and imported everywhere else; a rename is then one diff line.
"""

from __future__ import annotations

VERSION = "0.1.0"

BUS_NAME = "org.uniond1"
MANAGER_PATH = "/org/uniond1"
MOUNT_PATH_PREFIX = "/org/uniond1/mount"

MANAGER_INTERFACE = "org.uniond1.Manager"
MOUNT_INTERFACE = "org.uniond1.Mount"
OBJECT_MANAGER_INTERFACE = "org.freedesktop.DBus.ObjectManager"

ERROR_PREFIX = "org.uniond1.Error"
ERROR_INVALID_ARGUMENT = f"{ERROR_PREFIX}.InvalidArgument"
ERROR_NOT_FOUND = f"{ERROR_PREFIX}.NotFound"
ERROR_BUSY = f"{ERROR_PREFIX}.Busy"
ERROR_ALREADY_MOUNTED = f"{ERROR_PREFIX}.AlreadyMounted"
ERROR_NOT_PERMITTED = f"{ERROR_PREFIX}.NotPermitted"
ERROR_FAILED = f"{ERROR_PREFIX}.Failed"
ERROR_NOT_AUTHORIZED = f"{ERROR_PREFIX}.NotAuthorized"
ERROR_NOT_AUTHORIZED_CAN_OBTAIN = f"{ERROR_PREFIX}.NotAuthorizedCanObtain"
ERROR_NOT_AUTHORIZED_DISMISSED = f"{ERROR_PREFIX}.NotAuthorizedDismissed"
ERROR_NOT_SUPPORTED = f"{ERROR_PREFIX}.NotSupported"

# polkit actions (dbus/org.uniond1.policy declares them and their defaults).
ACTION_MOUNT = "org.uniond1.mount"  # directories the caller can reach itself
ACTION_MOUNT_ANY = "org.uniond1.mount-any"
ACTION_UNMOUNT_OWN = "org.uniond1.unmount-own"
ACTION_UNMOUNT_OTHER = "org.uniond1.unmount-other"
ACTION_EXPORT = "org.uniond1.export"
ACTION_COMMIT = "org.uniond1.commit"
ACTION_IMPORT = "org.uniond1.import"
ACTION_RELOAD = "org.uniond1.reload"  # Reload(): re-read the configuration and mounts.d

# The option every method accepts (udisks2's name): never ask the user to authenticate.
OPTION_NO_USER_INTERACTION = "auth.no_user_interaction"

POLKIT_BUS_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"

SYSTEMD_UNIT = "uniond.service"

DEFAULT_STATE_DIRECTORY = "/var/lib/uniond"
DEFAULT_RUNTIME_DIRECTORY = "/run/uniond"
DEFAULT_CONFIG_PATH = "/etc/uniond/uniond.conf"
DEFAULT_MOUNTS_DIRECTORY = "/etc/uniond/mounts.d"  # declared mounts; also $RUNTIME_DIRECTORY/mounts.d
MOUNTS_D = "mounts.d"
SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
