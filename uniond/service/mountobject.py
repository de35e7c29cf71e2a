"""The org.uniond1.Mount object, one per mount: its read-only properties, and its
entry of GetManagedObjects packed once (10,000 objects answer in one reply).
"""

from __future__ import annotations

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property

from uniond import constants
from uniond.mounts.records import MountRecord
from uniond.service import wire
from uniond.service.values import wrap


class _Buses(list):
    """The buses an object is exported on, which dbus-next keeps in a set: 216 bytes
    per object for the one bus, where this list takes 88 (10,000 objects and more)."""

    __slots__ = ()
    add = list.append


class MountInterface(ServiceInterface):
    """org.uniond1.Mount: one object per mount, all properties read-only."""

    _members: tuple[list, list, list] | None = None  # dbus-next's lists, the same for every object

    def __init__(self, record: MountRecord) -> None:
        # dbus-next inspects the class for its members per object (getmembers: ~50 us,
        # a sixth of a start with 10,000 mounts); they are the same for every object.
        template = MountInterface._members
        if template is None:
            super().__init__(constants.MOUNT_INTERFACE)
            MountInterface._members = (
                ServiceInterface._get_methods(self), ServiceInterface._get_properties(self),
                ServiceInterface._get_signals(self),
            )
        else:
            self.name = constants.MOUNT_INTERFACE
            methods, properties, signals = template
            self._ServiceInterface__methods = methods
            self._ServiceInterface__properties = properties
            self._ServiceInterface__signals = signals
            self._ServiceInterface__buses = _Buses()
        self.record = record
        self._packed: bytes | None = None

    def replace(self, record: MountRecord) -> None:
        """The same mount, changed (detached, updated): its packed entry is made again."""
        self.record = record
        self._packed = None

    def packed_entry(self, path: str) -> bytes:
        """This object's GetManagedObjects entry, packed once (until ``replace``)."""
        if self._packed is None:
            r = self.record
            self._packed = wire.object_entry(path, constants.MOUNT_INTERFACE, [
                ("Id", "s", r.id), ("Mountpoint", "s", r.spec.mountpoint),
                ("LowerDirs", "as", r.spec.lowerdirs), ("UpperDir", "s", r.spec.upperdir),
                ("WorkDir", "s", r.spec.workdir), ("ReadOnly", "b", r.spec.readonly),
                ("Owner", "u", r.owner), ("Created", "t", r.created_us),
                ("Options", "a{sv}", self.Options), ("Name", "s", r.name),
                ("Persistent", "b", r.persistent), ("BoundTo", "s", r.bound_to),
                ("Detached", "b", r.detached),
            ])
        return self._packed

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.record.id

    @dbus_property(access=PropertyAccess.READ)
    def Mountpoint(self) -> "s":
        return self.record.spec.mountpoint

    @dbus_property(access=PropertyAccess.READ)
    def LowerDirs(self) -> "as":
        return list(self.record.spec.lowerdirs)

    @dbus_property(access=PropertyAccess.READ)
    def UpperDir(self) -> "s":
        return self.record.spec.upperdir

    @dbus_property(access=PropertyAccess.READ)
    def WorkDir(self) -> "s":
        return self.record.spec.workdir

    @dbus_property(access=PropertyAccess.READ)
    def ReadOnly(self) -> "b":
        return self.record.spec.readonly

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self.record.owner

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> "t":
        return self.record.created_us

    @dbus_property(access=PropertyAccess.READ)
    def Options(self) -> "a{sv}":
        return {key: wrap(value) for key, value in self.record.options.items()}

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.record.name

    @dbus_property(access=PropertyAccess.READ)
    def Persistent(self) -> "b":
        return self.record.persistent

    @dbus_property(access=PropertyAccess.READ)
    def BoundTo(self) -> "s":
        return self.record.bound_to

    @dbus_property(access=PropertyAccess.READ)
    def Detached(self) -> "b":
        """True after a lazy Unmount while processes still use the mount; the object
        goes when the last of them has gone."""
        return self.record.detached
