"""Peak RSS of the daemon during a 1 GiB export, over a real bus.

Run (as root, from the repository):
    unshare -m --propagation private .venv/bin/python bench/export_rss.py [/scratch/dir]

Starts a private dbus-daemon with uniond's policy and uniond itself (tests/harness.py),
mounts an overlay, writes 1 GiB into it (a 1 GiB file, and 1,000 files of 64 KiB),
and exports it over D-Bus into a pipe drained here, once plain and once with gzip.
The daemon's VmHWM (peak RSS) is read from /proc before and after each export, and
the daemon's answers to ListMounts are timed while the export runs. Target: peak RSS
flat, whatever the layer size.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from _util import ROOT, require_private_namespace

sys.path.insert(0, os.path.join(ROOT, "tests"))

from dbus_next import Message, Variant  # noqa: E402
from harness import Bus, Client, Daemon, NotifySocket  # noqa: E402

from uniond import constants  # noqa: E402


def vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    raise KeyError(key)


def main() -> None:
    require_private_namespace()
    base = Path(tempfile.mkdtemp(prefix="uniond-bench-", dir=sys.argv[1] if len(sys.argv) > 1 else None))
    busdir = Path(tempfile.mkdtemp(prefix="uniond-bench-bus-"))
    bus = Bus(busdir)
    daemon = Daemon(bus=bus, state_dir=base / "state", runtime_dir=base / "run",
                    notify=NotifySocket(base / "notify.sock"), log_path=base / "uniond.log")
    client = None
    try:
        daemon.config_path.parent.mkdir(parents=True, exist_ok=True)
        daemon.config_path.write_text('log_level = "warning"\n')
        daemon.start()
        client = Client(bus.address)
        for name in ("lower", "upper", "merge"):
            (base / name).mkdir()
        path = client.mount([base / "lower"], base / "upper", base / "merge")
        chunk = os.urandom(1 << 20)
        with open(base / "merge/big", "wb") as f:
            for _ in range(1024):
                f.write(chunk)
        (base / "merge/many").mkdir()
        for i in range(1000):
            (base / "merge/many" / f"f{i:04d}").write_bytes(chunk[: 64 << 10])
        idle = vm(daemon.pid, "VmRSS")
        print(f"daemon RSS before any export:   {idle / 1024:7.1f} MiB (VmHWM {vm(daemon.pid, 'VmHWM') / 1024:.1f})")
        for compression in ("none", "gzip"):
            read_end, write_end = os.pipe()
            msg = Message(destination=constants.BUS_NAME, path=constants.MANAGER_PATH,
                          interface=constants.MANAGER_INTERFACE, member="ExportDiff", signature="oha{sv}",
                          body=[path, 0, {"compression": Variant("s", compression)}], unix_fds=[write_end])
            received = [0]

            def drain(fd: int = read_end, received: list[int] = received) -> None:
                while data := os.read(fd, 1 << 20):
                    received[0] += len(data)

            reader = threading.Thread(target=drain)
            reader.start()
            started = time.monotonic()
            pending = asyncio.ensure_future(client.bus.call(msg), loop=client.loop)
            client.pump(0.05)
            os.close(write_end)
            answers = []
            while not pending.done():
                t = time.monotonic()
                client.list()
                answers.append(time.monotonic() - t)
                client.pump(0.05)
            reply = pending.result()
            elapsed = time.monotonic() - started
            reader.join()
            os.close(read_end)
            assert reply.body == [received[0]], reply.body
            print(f"export ({compression:4s}): {received[0] / (1 << 20):7.1f} MiB in {elapsed:5.2f} s; "
                  f"daemon VmHWM {vm(daemon.pid, 'VmHWM') / 1024:6.1f} MiB "
                  f"(ratio to idle RSS {vm(daemon.pid, 'VmHWM') / idle:4.2f}x); "
                  f"ListMounts during it: {len(answers)} calls, slowest {max(answers, default=0) * 1000:.1f} ms")
    finally:
        if client is not None:
            client.close()
        daemon.stop()
        bus.stop()
        os.system(f"umount -l {base / 'merge'} 2>/dev/null")
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(busdir, ignore_errors=True)


if __name__ == "__main__":
    main()
