"""Mount+Unmount over D-Bus against the raw system calls, measured in the same run.

Run as root from the repository (after `sudo ./dev test` or `./dev run` made .venv):

    sudo unshare --mount --propagation private .venv/bin/python bench/mount_roundtrip.py [N]

Prints milliseconds per round trip for (1) the raw calls the engine makes
(fsopen/fsconfig/fsmount/move_mount + umount2) and (2) a D-Bus client calling Mount then
Unmount on a running uniond (a separate process on a private dbus-daemon, as in the
tests), and their ratio; and (3) two ListMounts calls, the cost of the bus itself.
The target in the issue is a ratio of at most 2.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from uniond import constants
from uniond.kernel import syscalls
from uniond.service import privatebus


def raw_round_trip(lower2: str, lower1: str, upper: str, work: str, target: str) -> None:
    fs = syscalls.fsopen("overlay")
    for layer in (lower2, lower1):
        syscalls.fsconfig_string(fs, "lowerdir+", layer)
    syscalls.fsconfig_string(fs, "upperdir", upper)
    syscalls.fsconfig_string(fs, "workdir", work)
    for key in ("redirect_dir", "metacopy", "index"):
        syscalls.fsconfig_string(fs, key, "off")
    syscalls.fsconfig_create(fs)
    mnt = syscalls.fsmount(fs, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOSUID)
    syscalls.move_mount(mnt, target)
    os.close(mnt)
    os.close(fs)
    syscalls.umount(target)


async def dbus_round_trips(address: str, args: list, n: int) -> tuple[list[float], list[float]]:
    bus = await MessageBus(bus_address=address).connect()

    async def call(member: str, signature: str, body: list):
        reply = await bus.call(Message(destination=constants.BUS_NAME, path=constants.MANAGER_PATH,
                                       interface=constants.MANAGER_INTERFACE, member=member,
                                       signature=signature, body=body))
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{reply.error_name}: {reply.body}")
        return reply.body

    times, floor = [], []
    for _ in range(n):
        start = time.perf_counter()
        (path,) = await call("Mount", "asssa{sv}", args)
        await call("Unmount", "oa{sv}", [path, {}])
        times.append(time.perf_counter() - start)
        # The bus alone: two calls that do nothing (ListMounts with no mounts).
        start = time.perf_counter()
        await call("ListMounts", "", [])
        await call("ListMounts", "", [])
        floor.append(time.perf_counter() - start)
    bus.disconnect()
    return times, floor


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    if os.geteuid() != 0:
        sys.exit("run as root, inside unshare --mount (see the docstring)")
    top = tempfile.mkdtemp(prefix="uniond-bench-")
    for name in ("l1", "l2", "upper", "work", "merge", "state", "run"):
        os.mkdir(os.path.join(top, name))
    p = {name: os.path.join(top, name) for name in ("l1", "l2", "upper", "work", "merge")}

    raw = []
    for _ in range(n):
        start = time.perf_counter()
        raw_round_trip(p["l2"], p["l1"], p["upper"], p["work"], p["merge"])
        raw.append(time.perf_counter() - start)

    bus, address = privatebus.start(os.path.join(top, "bus"))
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address, "STATE_DIRECTORY": os.path.join(top, "state"),
           "RUNTIME_DIRECTORY": os.path.join(top, "run")}
    daemon = subprocess.Popen([sys.executable, "-m", "uniond", "--bus", "system", "--config", "/dev/null"],
                              env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            probe = subprocess.run(["busctl", f"--address={address}", "status", constants.BUS_NAME],
                                   capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(0.05)
        args = [[p["l2"], p["l1"]], p["upper"], p["merge"], {}]
        over_bus, floor = asyncio.run(dbus_round_trips(address, args, n))
    finally:
        daemon.terminate()
        daemon.wait()
        bus.terminate()
        bus.wait()

    raw_ms = statistics.median(raw) * 1000
    bus_ms = statistics.median(over_bus) * 1000
    print(f"round trips: {n}")
    print(f"raw syscalls  (mount+umount)        median {raw_ms:.3f} ms")
    print(f"D-Bus Mount+Unmount (uniond)        median {bus_ms:.3f} ms")
    floor_ms = statistics.median(floor) * 1000
    print(f"two empty calls (the bus floor)     median {floor_ms:.3f} ms")
    print(f"ratio D-Bus / raw: {bus_ms / raw_ms:.2f}x (target <= 2x)")
    print(f"ratio (D-Bus - floor) / raw: {(bus_ms - floor_ms) / raw_ms:.2f}x (what uniond adds to the mount itself)")


if __name__ == "__main__":
    main()
