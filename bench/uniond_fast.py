"""The real uniond daemon on dbus-fast instead of dbus-next: for the bench only.

    python bench/uniond_fast.py --bus system --config /dev/null

uniond names dbus-next in its contract (issue 14 keeps it); this launcher shows what
the same daemon does on its maintained, Cython-compiled fork. It puts dbus_fast and
its submodules into sys.modules under the dbus_next names before uniond is imported,
then bridges the few places where uniond reaches past dbus-next's public API and
dbus-fast differs (each said below), then runs uniond's main. Nothing under uniond/
changes. Exits 3 with a message when dbus-fast is not installed.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys

try:
    import dbus_fast
except ImportError:
    print("dbus-fast is not installed (pip install dbus-fast)", file=sys.stderr)
    raise SystemExit(3) from None

_SUBMODULES = ("aio", "aio.message_bus", "aio.proxy_object", "constants", "errors", "message", "message_bus",
               "proxy_object", "service", "signature", "introspection", "validators", "auth")


def alias() -> None:
    sys.modules["dbus_next"] = dbus_fast
    for name in _SUBMODULES:
        try:
            module = importlib.import_module(f"dbus_fast.{name}")
        except ImportError:
            continue
        sys.modules[f"dbus_next.{name}"] = module


def bridge() -> None:
    """Where uniond relies on dbus-next's internals and dbus-fast differs."""
    import dbus_fast.aio.message_bus as fast_bus
    from dbus_fast.service import ServiceInterface

    from uniond.service import connection, mountobject, wire

    # 1. dbus-fast makes its writer in connect() (dbus-next in __init__): make it
    #    uniond's writer (batched sendmsg, waits on EAGAIN instead of dropping the bus).
    fast_bus._MessageWriter = connection._Writer

    # 2. dbus-fast's ServiceInterface is a compiled class: its member lists cannot be
    #    shared between objects by setting its private attributes, as MountInterface
    #    does under dbus-next; each object inspects its class instead.
    def mount_interface_init(self, record) -> None:
        ServiceInterface.__init__(self, "org.uniond1.Mount")
        self.record = record
        self._packed = None

    mountobject.MountInterface.__init__ = mount_interface_init

    # 3. dbus-fast keeps each path's interfaces as {name: interface}, dbus-next as a
    #    list: the three places uniond iterates them go through .values() here.
    prefix = "/org/uniond1/mount/"

    def unexport(self, path, interface=None) -> None:
        for iface in self._path_exports.get(path, {}).values():
            self._where.pop(id(iface), None)
        fast_bus.MessageBus.unexport(self, path)

    async def pack_entries(self, batch: int = 200) -> None:
        for n, (path, ifaces) in enumerate(list(self._path_exports.items()), 1):
            if path.startswith(prefix):
                for iface in ifaces.values():
                    iface.packed_entry(path)
            if n % batch == 0:
                await asyncio.sleep(0)

    def get_managed_objects(self, msg, send_reply) -> None:
        if msg.path != "/org/uniond1":
            fast_bus.MessageBus._default_get_managed_objects_handler(self, msg, send_reply)
            return
        entries = (iface.packed_entry(path) for path, ifaces in self._path_exports.items()
                   if path.startswith(prefix) for iface in ifaces.values())
        send_reply(wire.method_return(msg, "a{oa{sa{sv}}}", wire.managed_objects(entries)))

    connection.UniondBus.unexport = unexport
    connection.UniondBus.pack_entries = pack_entries
    connection.UniondBus._default_get_managed_objects_handler = get_managed_objects


def main() -> int:
    alias()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bridge()
    from uniond.service.daemon import main as uniond_main

    return uniond_main()


if __name__ == "__main__":
    raise SystemExit(main())
