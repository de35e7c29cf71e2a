"""The D-Bus library's own floor: a service with uniond's name and Manager methods that
does nothing but answer (Mount returns a path, and each call sends the two signals
uniond sends: MountAdded and InterfacesAdded, MountRemoved and InterfacesRemoved).

    python bench/floor_service.py dbus-next|dbus-fast ADDRESS

bench/scale.py runs it with each library in turn, so that its table shows what the
library alone costs per Mount+Unmount, beside uniond, under the same clients.
"""

from __future__ import annotations

import asyncio
import sys

LIBRARY, ADDRESS = sys.argv[1], sys.argv[2]
if LIBRARY == "dbus-fast":
    from dbus_fast import Message, Variant
    from dbus_fast.aio import MessageBus
    from dbus_fast.service import ServiceInterface, method, signal
else:
    from dbus_next import Message, Variant
    from dbus_next.aio import MessageBus
    from dbus_next.service import ServiceInterface, method, signal


class Manager(ServiceInterface):
    def __init__(self, bus) -> None:
        super().__init__("org.uniond1.Manager")
        self.bus = bus
        self.n = 0

    def _object_manager(self, member: str, signature: str, body: list) -> None:
        self.bus.send(Message.new_signal("/org/uniond1", "org.freedesktop.DBus.ObjectManager", member,
                                         signature, body))

    @method()
    async def Mount(self, lowerdirs: "as", upperdir: "s", mountpoint: "s", options: "a{sv}") -> "o":
        self.n += 1
        path = f"/org/uniond1/mount/{self.n:012x}"
        self.MountAdded(path, mountpoint)
        self._object_manager("InterfacesAdded", "oa{sa{sv}}", [path, {"org.uniond1.Mount": {
            "Id": Variant("s", f"{self.n:012x}"), "Mountpoint": Variant("s", mountpoint),
            "LowerDirs": Variant("as", lowerdirs), "UpperDir": Variant("s", upperdir),
            "WorkDir": Variant("s", upperdir + ".work"), "ReadOnly": Variant("b", False),
            "Owner": Variant("u", 0), "Created": Variant("t", 0), "Options": Variant("a{sv}", {})}}])
        return path

    @method()
    async def Unmount(self, mount: "o", options: "a{sv}"):
        self.MountRemoved(mount, "")
        self._object_manager("InterfacesRemoved", "oas", [mount, ["org.uniond1.Mount"]])

    @signal()
    def MountAdded(self, mount: str, mountpoint: str) -> "os":
        return [mount, mountpoint]

    @signal()
    def MountRemoved(self, mount: str, mountpoint: str) -> "os":
        return [mount, mountpoint]


async def main() -> None:
    bus = await MessageBus(bus_address=ADDRESS).connect()
    bus.export("/org/uniond1", Manager(bus))
    await bus.request_name("org.uniond1")
    print("ready", flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    asyncio.run(main())
