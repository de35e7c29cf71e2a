"""Every row of issue 14's goals in one run: uniond against a baseline measured in the
same run, with the ratio (median and min-max over the repetitions).

    sudo unshare -m --propagation private .venv/bin/python bench/scale.py [--live 10000] [--reps 3]

The clients are as cheap as a raw socket (bench/rawbus.py) so that the daemon's cost is
what is measured; the table shows the clients' CPU beside the daemon's. Everything is
made under one temporary directory (removed at the end) and in this private mount
namespace, so the live mounts vanish with it.

Rows (each a repetition pairs a baseline and a uniond figure measured back to back):
  start        start to READY=1 with 0 mounts (baseline) and with --live mounts to adopt
  roundtrip    Mount+Unmount, 0 live mounts vs --live live mounts
  latency      the raw calls (fsopen ... move_mount, umount2) plus two empty D-Bus
               calls (Peer.Ping) vs Mount+Unmount, with no other mounts
  GMO/List     GetManagedObjects and ListMounts of --live mounts, from send to the last
               byte; the slowest Ping another client got answered meanwhile beside it
  RSS          the daemon idle with 0 mounts vs with --live mounts
  throughput   32 processes doing the raw calls vs 32 raw-socket clients doing
               Mount->Unmount over D-Bus
  lowers       Mount+Unmount with 1, 10, 100, 500 lowers vs the raw calls with as many
  Diff         Diff / DiffInto of a 100,000-entry upper vs a names-only scandir walk
  layers       ExportDiff / ImportLayer of 100,000 files of 1 KiB vs tar -c / tar -x
  ... on dbus-fast  latency and throughput again, the real daemon run on dbus-fast in
               place of dbus-next by bench/uniond_fast.py (bench only; only if installed)
  floor        a service that does nothing but answer Mount and Unmount (and send the
               same signals), under dbus-next and under dbus-fast: the library's own cost
               (bench/floor_service.py; dbus-fast only if installed: pip install dbus-fast)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from _util import make_tree, names_walk, require_private_namespace
from rawbus import CallFailed, RawBus, first_string, first_u64

from uniond.kernel import overlay, syscalls
from uniond.mounts.journal import StateStore, boot_id
from uniond.mounts.records import MountRecord, MountSpec
from uniond.service import privatebus

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    name: str
    baseline_label: str
    unit: str
    goal: str
    baselines: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    note: str = ""
    failed: str = ""

    def cells(self) -> list[str]:
        def fmt(values: list[float]) -> str:
            if not values:
                return "-"
            mid = statistics.median(values)
            if len(values) == 1:
                return f"{mid:.3g} {self.unit}"
            return f"{mid:.3g} {self.unit} ({min(values):.3g}-{max(values):.3g})"

        base = fmt(self.baselines)
        ours = self.failed or fmt(self.ours)
        ratio = "-"
        if self.baselines and self.ours and not self.failed:
            ratios = [o / b for b, o in zip(self.baselines, self.ours, strict=False) if b]
            if ratios:
                ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        return [self.name, f"{self.baseline_label}: {base}", ours, ratio, self.goal, self.note]


def print_table(rows: list[Row]) -> None:
    header = ["row", "baseline", "uniond", "ratio (min-max)", "goal", "note"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    sys.stdout.flush()


# ---- the daemon ---------------------------------------------------------------------


class Daemon:
    def __init__(self, top: str, address: str, name: str) -> None:
        self.top, self.address = top, address
        self.state = os.path.join(top, f"state-{name}")  # on disk, as /var/lib/uniond
        self.run = os.path.join(top, "run", name)  # on a tmpfs, as /run/uniond
        os.makedirs(self.state, exist_ok=True)
        os.makedirs(self.run, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.command = [sys.executable, "-m", "uniond"]

    def start(self, timeout: float = 60) -> float:
        """Seconds from exec to READY=1; raises RuntimeError when it never comes."""
        path = os.path.join(self.top, "notify")
        if os.path.exists(path):
            os.unlink(path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(path)
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address, "STATE_DIRECTORY": self.state,
               "RUNTIME_DIRECTORY": self.run, "NOTIFY_SOCKET": path}
        log = open(os.path.join(self.top, "daemon.log"), "ab")
        started = time.perf_counter()
        self.process = subprocess.Popen([*self.command, "--bus", "system", "--config", "/dev/null"],
                                        env=env, stderr=log, cwd=os.path.dirname(os.path.dirname(__file__)))
        log.close()
        notify.settimeout(0.2)
        try:
            while time.perf_counter() - started < timeout:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"exited with {self.process.returncode} before READY=1") from None
                    continue
                if "READY=1" in message.split("\n"):
                    return time.perf_counter() - started
            raise RuntimeError(f"no READY=1 within {timeout} s")
        finally:
            notify.close()

    def cpu(self) -> float:
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) seconds of CPU the daemon used so far."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK

    def rss_mb(self) -> float:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextlib.contextmanager
def profiled(daemon: Daemon, name: str):
    """With BENCH_PYSPY=<dir>, py-spy samples the daemon meanwhile (collapsed stacks in
    <dir>/<name>.txt): the figures of such a run are not the daemon's alone."""
    out = os.environ.get("BENCH_PYSPY")
    if not out or daemon.process is None:
        yield
        return
    os.makedirs(out, exist_ok=True)
    spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid",
                            str(daemon.process.pid), "--rate", "250", "--format", "raw", "--threads",
                            "--output", os.path.join(out, f"{name}.txt")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait()


class Floor(Daemon):
    """bench/floor_service.py under one D-Bus library: the library's own cost."""

    def __init__(self, top: str, address: str, library: str) -> None:
        super().__init__(top, address, f"floor-{library}")
        self.library = library

    def start(self, timeout: float = 60) -> float:
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_service.py"),
             self.library, self.address], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            self.process.wait()
            raise RuntimeError(f"{self.library} is not installed (pip install {self.library})")
        return time.perf_counter() - started


# ---- the raw calls ------------------------------------------------------------------


def raw_round_trip(lowers: list[str], upper: str, work: str, target: str) -> None:
    """What the engine does for a Mount and an Unmount, through descriptors as it does."""
    fds = [syscalls.open_dir_nofollow(p) for p in lowers]
    upper_fd, work_fd, target_fd = (syscalls.open_dir_nofollow(p) for p in (upper, work, target))
    fs = syscalls.fsopen("overlay")
    try:
        for fd in fds:
            syscalls.fsconfig_fd(fs, "lowerdir+", fd)
        syscalls.fsconfig_fd(fs, "upperdir", upper_fd)
        syscalls.fsconfig_fd(fs, "workdir", work_fd)
        for key in ("redirect_dir", "metacopy", "index"):
            syscalls.fsconfig_string(fs, key, "off")
        syscalls.fsconfig_create(fs)
        mnt = syscalls.fsmount(fs, syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOSUID)
        syscalls.move_mount_to_fd(mnt, target_fd)
        os.close(mnt)
    finally:
        os.close(fs)
        for fd in (*fds, upper_fd, work_fd, target_fd):
            os.close(fd)
    syscalls.umount(target)


def median_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bus_round_trip(bus: RawBus, lowers: list[str], upper: str) -> None:
    path = first_string(bus.manager("Mount", "asssa{sv}", [lowers, upper, "", {}]))
    bus.manager("Unmount", "oa{sv}", [path, {}])


def ping(bus: RawBus) -> None:
    bus.call("org.uniond1", "/org/uniond1", "org.freedesktop.DBus.Peer", "Ping")


# ---- throughput ---------------------------------------------------------------------


def _client(address: str, lowers: list[str], upper: str, start_at: float, seconds: float, out) -> None:
    try:
        bus = RawBus(address)
    except Exception as e:  # noqa: BLE001 - reported, not raised, across the process boundary
        out.send(([], 1, 0.0, str(e)))
        return
    latencies, errors, first_error = [], 0, ""
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = sum(os.times()[:2])
    end = start_at + seconds
    while time.time() < end:
        t = time.perf_counter()
        try:
            bus_round_trip(bus, lowers, upper)
            latencies.append(time.perf_counter() - t)
        except CallFailed as e:
            errors += 1
            first_error = first_error or str(e)
    out.send((latencies, errors, sum(os.times()[:2]) - cpu0, first_error))


def _raw_client(lowers: list[str], top: str, start_at: float, seconds: float, out) -> None:
    paths = [os.path.join(top, name) for name in ("upper", "work", "merge")]
    for p in paths:
        os.makedirs(p, exist_ok=True)
    count = 0
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    while time.time() < end:
        raw_round_trip(lowers, *paths)
        count += 1
    out.send(count)


def throughput(address: str, daemon: Daemon, lowers: list[str], top: str, clients: int, seconds: float):
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 1.0
    pipes, procs = [], []
    for i in range(clients):
        upper = os.path.join(top, f"c{i}", "upper")
        os.makedirs(upper, exist_ok=True)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client, args=(address, lowers, upper, start_at, seconds, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    while time.time() < start_at:
        time.sleep(0.001)
    user0, sys0 = daemon.cpu_split()
    results = [p.recv() for p in pipes]
    user1, sys1 = daemon.cpu_split()
    daemon_cpu = (user1 - user0, sys1 - sys0)
    for proc in procs:
        proc.join()
    latencies = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)
    client_cpu = sum(r[2] for r in results)
    first_error = next((r[3] for r in results if r[3]), "")
    pairs = len(latencies)
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else float("nan")
    per_pair = (daemon_cpu[0] / max(pairs, 1), daemon_cpu[1] / max(pairs, 1))
    return pairs / seconds, p99, errors, per_pair, client_cpu / max(pairs, 1), first_error


def raw_throughput(lowers: list[str], top: str, clients: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 1.0
    pipes, procs = [], []
    for i in range(clients):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_raw_client, args=(lowers, os.path.join(top, f"r{i}"), start_at, seconds, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    total = sum(p.recv() for p in pipes)
    for proc in procs:
        proc.join()
    return total / seconds


def throughput_note(p99: float, errors: int, dcpu: tuple[float, float], ccpu: float, first: str) -> str:
    return (f"p99 {p99 * 1000:.0f} ms (<= 50), errors {errors}{' (' + first[:60] + ')' if first else ''}, "
            f"CPU/pair: daemon {sum(dcpu) * 1000:.2f} ms (user {dcpu[0] * 1000:.2f}, system {dcpu[1] * 1000:.2f}), "
            f"clients {ccpu * 1000:.2f} ms")


def on_dbus_fast(top: str, address: str, lowers: list[str], raw: list, upper: str, args, wanted) -> list[Row]:
    """The latency and throughput rows again, for the real uniond run on dbus-fast by
    bench/uniond_fast.py (the contract keeps dbus-next; this shows what the fork gives)."""
    label = "uniond on dbus-fast (bench only)"
    lat = Row(f"Mount+Unmount latency, {label}", "raw calls + 2 Ping", "ms", "<= 1.5x")
    tput = Row(f"throughput, {args.clients} clients, {label}", "raw calls", "pairs/s", ">= 1000 pairs/s")
    chosen = [row for row, name in ((lat, "roundtrip"), (tput, "throughput")) if wanted(name)]
    if importlib.util.find_spec("dbus_fast") is None:
        for row in chosen:
            row.failed = "not measured: dbus-fast is not installed (pip install dbus-fast)"
        return chosen
    fast = Daemon(top, address, "fast")
    fast.command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "uniond_fast.py")]
    try:
        for _ in range(args.reps):
            fast.start()
            if wanted("roundtrip"):
                bus = RawBus(address)
                for _ in range(20):
                    bus_round_trip(bus, lowers, upper)
                with profiled(fast, "roundtrip-fast"):
                    ours = median_of(args.pairs, lambda bus=bus: bus_round_trip(bus, lowers, upper))
                base = median_of(args.pairs, lambda: raw_round_trip(*raw)) + median_of(
                    args.pairs, lambda bus=bus: (ping(bus), ping(bus)))
                bus.close()
                lat.baselines.append(base * 1000)
                lat.ours.append(ours * 1000)
            if wanted("throughput"):
                tput.baselines.append(raw_throughput(lowers, os.path.join(top, "tp"), args.clients, args.seconds))
                with profiled(fast, "throughput-fast"):
                    rate, p99, errors, dcpu, ccpu, first = throughput(
                        address, fast, lowers, os.path.join(top, "tp"), args.clients, args.seconds)
                tput.ours.append(rate)
                tput.note = throughput_note(p99, errors, dcpu, ccpu, first)
                print(f"  throughput run, {label}: {rate:.0f} pairs/s, {tput.note}", flush=True)
            fast.stop()
    except RuntimeError as e:
        for row in chosen:
            row.failed = row.failed or f"fails: {e}"
    finally:
        fast.stop()
    return chosen


# ---- live mounts --------------------------------------------------------------------


def make_live_mounts(state: str, base: str, lowers: list[str], n: int) -> None:
    """``n`` read-only overlays and a journal that records them, as a crashed daemon
    would leave them behind (its mounts stay, its record says what they are).

    Their mountpoints are where uniond makes its own (its runtime directory, a tmpfs as
    /run is), not beside the layers: the kernel's create walks every mount below the
    mount a layer lives on (clone_private_mount's has_locked_children calls is_subdir
    for each), so 10,000 overlays mounted on the layers' own file system make every
    new overlay's fsconfig(CREATE) 0.17 -> 0.92 ms, whoever mounts it.
    """
    store = StateStore(state)
    me = boot_id()
    base = os.path.join(base, "live")
    os.makedirs(base, exist_ok=True)
    lower_fds = [syscalls.open_dir_nofollow(p) for p in lowers]
    try:
        for i in range(n):
            mountpoint = os.path.join(base, f"m{i:05d}")
            os.mkdir(mountpoint)
            spec = MountSpec(tuple(lowers), "", "", mountpoint, readonly=True)
            target = syscalls.open_dir_nofollow(mountpoint)
            try:
                mnt_id = overlay.mount(spec, overlay.LayerFds(tuple(lower_fds), None, None, target))
            finally:
                os.close(target)
            record = MountRecord(id=f"{i:012x}", spec=spec, owner=0, created_us=time.time_ns() // 1000,
                                 boot_id=me, mnt_id=mnt_id, description=f"live {i}")
            store.update(record)
    finally:
        for fd in lower_fds:
            os.close(fd)
        store.close()


def timed_to_last_byte(bus: RawBus, member: str, interface: str = "org.uniond1.Manager") -> tuple[float, int]:
    start = time.perf_counter()
    serial = bus.send("org.uniond1", "/org/uniond1", interface, member)
    kind, error, body = bus.reply(serial)
    elapsed = time.perf_counter() - start
    if error:
        raise CallFailed(error)
    return elapsed, len(body)


def slowest_ping_during(address: str, member: str, interface: str) -> tuple[float, float, float]:
    """(seconds for the big call to its last byte, slowest Ping of uniond answered
    meanwhile, slowest call answered by the bus itself meanwhile): a stall of both is
    the bus's (dbus-daemon checks and copies the big message), not uniond's."""
    big, pinger = RawBus(address), RawBus(address)
    try:
        start = time.perf_counter()
        serial = big.send("org.uniond1", "/org/uniond1", interface, member)
        slowest = slowest_bus = 0.0
        big.sock.setblocking(False)
        done = None
        while done is None:
            t = time.perf_counter()
            ping(pinger)
            slowest = max(slowest, time.perf_counter() - t)
            t = time.perf_counter()
            pinger.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId")
            slowest_bus = max(slowest_bus, time.perf_counter() - t)
            try:
                while True:
                    chunk = big.sock.recv(1 << 20)
                    if not chunk:
                        raise CallFailed("closed")
                    big.pending.extend(chunk)
            except BlockingIOError:
                pass
            big.sock.setblocking(True)
            big.sock.settimeout(0.0001)
            try:
                big.reply(serial)
                done = time.perf_counter() - start
            except (TimeoutError, BlockingIOError):
                pass
            big.sock.setblocking(False)
        return done, slowest, slowest_bus
    finally:
        big.close()
        pinger.close()


# ---- Diff and layers ----------------------------------------------------------------


def diff_into(bus: RawBus, mount: str) -> int:
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert cat.stdin is not None
    try:
        body = bus.manager("DiffInto", "oha{sv}", [mount, 0, {}], fds=[cat.stdin.fileno()])
    finally:
        cat.stdin.close()
        cat.wait()
    return first_u64(body)


def export_diff(bus: RawBus, mount: str) -> int:
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert cat.stdin is not None
    try:
        body = bus.manager("ExportDiff", "oha{sv}", [mount, 0, {}], fds=[cat.stdin.fileno()])
    finally:
        cat.stdin.close()
        cat.wait()
    return first_u64(body)


def import_layer(bus: RawBus, tarball: str, dest: str) -> int:
    fd = os.open(tarball, os.O_RDONLY)
    try:
        return first_u64(bus.manager("ImportLayer", "hsa{sv}", [0, dest, {}], fds=[fd]))
    finally:
        os.close(fd)


# ---- the run --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=int, default=10000, help="live mounts to adopt (default 10000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each row (default 3)")
    parser.add_argument("--pairs", type=int, default=200, help="round trips per median (default 200)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a throughput run")
    parser.add_argument("--files", type=int, default=100000, help="entries of the Diff and layer uppers")
    parser.add_argument("--only", default="", help="comma-separated rows: start,roundtrip,throughput,lowers,"
                        "diff,layers,floor (default all)")
    args = parser.parse_args()
    require_private_namespace()
    only = set(filter(None, args.only.split(",")))

    def wanted(name: str) -> bool:
        return not only or name in only

    top = tempfile.mkdtemp(prefix="uniond-scale-", dir="/tmp")
    os.makedirs(os.path.join(top, "run"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "bench-run", os.path.join(top, "run")],
                   check=True)
    policy = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dbus", privatebus.POLICY_NAME)
    bus_process, address = privatebus.start(os.path.join(top, "bus"), policy)
    rows: list[Row] = []
    try:
        lowers = [os.path.join(top, "l2"), os.path.join(top, "l1")]
        for p in lowers:
            os.makedirs(p)
        for p in ("upper", "work", "merge"):
            os.makedirs(os.path.join(top, p))
        raw = [lowers, *(os.path.join(top, p) for p in ("upper", "work", "merge"))]
        upper = os.path.join(top, "upper")

        # ---- with no other mounts -----------------------------------------------------
        empty = Daemon(top, address, "empty")
        start_row = Row("start to READY=1", "0 mounts", "ms", "<= 1000 ms with --live")
        rt_row = Row(f"Mount+Unmount, {args.live} live", "0 live", "ms", "<= 1.2x")
        lat_row = Row("Mount+Unmount latency", "raw calls + 2 Ping", "ms", "<= 1.5x")
        rss_row = Row(f"RSS with {args.live} live, after the calls above", "idle, 0 mounts", "MB", "<= 60 MB")
        empty_rt: list[float] = []
        raw_empty: list[float] = []
        for _ in range(args.reps):
            start_row.baselines.append(empty.start() * 1000)
            rss_row.baselines.append(empty.rss_mb())
            if wanted("roundtrip") or wanted("start"):
                bus = RawBus(address)
                for _ in range(20):
                    bus_round_trip(bus, lowers, upper)
                with profiled(empty, "roundtrip-empty"):
                    ours = median_of(args.pairs, lambda bus=bus: bus_round_trip(bus, lowers, upper))
                raw_empty.append(median_of(args.pairs, lambda: raw_round_trip(*raw)) * 1000)
                base = raw_empty[-1] / 1000 + median_of(args.pairs, lambda bus=bus: (ping(bus), ping(bus)))
                bus.close()
                lat_row.baselines.append(base * 1000)
                lat_row.ours.append(ours * 1000)
                empty_rt.append(ours * 1000)
            empty.stop()
        rows += [lat_row]
        rt_row.baselines = list(empty_rt)

        empty.start()
        try:
            if wanted("throughput"):
                # The uppers (and so the workdirs uniond makes beside them) on the disk, and
                # on a tmpfs: a file system without a journal spends most of a churn of
                # created and deleted inodes skipping recently deleted ones (ext4's
                # recently_deleted), whoever makes them.
                on_tmpfs = os.path.join(top, "tp-tmpfs")
                os.makedirs(on_tmpfs)
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "bench-tp", on_tmpfs], check=True)
                for where, base in (("", os.path.join(top, "tp")), (", uppers on a tmpfs", on_tmpfs)):
                    row = Row(f"throughput, {args.clients} clients{where}", "raw calls", "pairs/s", ">= 1000 pairs/s")
                    for _ in range(args.reps):
                        row.baselines.append(raw_throughput(lowers, base, args.clients, args.seconds))
                        with profiled(empty, "throughput"):
                            rate, p99, errors, dcpu, ccpu, first = throughput(
                                address, empty, lowers, base, args.clients, args.seconds)
                        row.ours.append(rate)
                        row.note = throughput_note(p99, errors, dcpu, ccpu, first)
                        print(f"  throughput run{where}: {rate:.0f} pairs/s, {row.note}", flush=True)
                    rows.append(row)

            if wanted("lowers"):
                many = [os.path.join(top, "many", f"l{i:03d}") for i in range(500)]
                for p in many:
                    os.makedirs(p)
                    open(os.path.join(p, "f"), "w").close()
                for k in (1, 10, 100, 500):
                    row = Row(f"Mount+Unmount, {k} lowers", "raw calls", "ms", "<= 3x at 500")
                    bus = RawBus(address)
                    pairs = max(10, args.pairs // (k // 10 + 1))
                    for _ in range(args.reps):
                        row.baselines.append(median_of(pairs, lambda k=k: raw_round_trip(many[:k], *raw[1:])) * 1000)
                        with profiled(empty, f"lowers-{k}"):
                            row.ours.append(median_of(pairs, lambda k=k, bus=bus: bus_round_trip(bus, many[:k], upper))
                                            * 1000)
                    bus.close()
                    rows.append(row)

            if wanted("diff") or wanted("layers"):
                # On a tmpfs of this namespace: the rows measure the code, not a disk that
                # other work on the machine shares (tar and uniond write to the same one).
                big = os.path.join(top, "big")
                os.makedirs(big)
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "bench-big", big], check=True)
                big_lower, big_upper = os.path.join(big, "lower"), os.path.join(big, "upper")
                os.makedirs(big_lower)
                entries = make_tree(big_upper, 1000, args.files // 1000 - 1, 1024)
                bus = RawBus(address, fds=True)
                mount = first_string(bus.manager("Mount", "asssa{sv}", [[big_lower], big_upper, "", {}]))
            if wanted("diff"):
                row = Row(f"Diff, {entries} entries, to the last byte", "names-only walk", "ms", "-")
                into = Row(f"DiffInto, {entries} entries, into a pipe", "names-only walk", "ms", "<= 2x")
                for _ in range(args.reps):
                    walk = median_of(3, lambda: names_walk(big_upper)) * 1000
                    row.baselines.append(walk)
                    into.baselines.append(walk)
                    try:
                        row.ours.append(median_of(3, lambda: bus.manager("Diff", "oa{sv}", [mount, {}])) * 1000)
                    except CallFailed as e:
                        row.failed = f"fails: {str(e)[:60]}"
                    try:
                        count = diff_into(bus, mount)
                        into.note = f"{count} records"
                        into.ours.append(median_of(3, lambda: diff_into(bus, mount)) * 1000)
                    except CallFailed as e:
                        into.failed = f"fails: {str(e)[:60]}"
                rows += [row, into]
            if wanted("layers"):
                export = Row(f"ExportDiff, {entries} files of 1 KiB", "tar -cf - | cat", "ms", "<= 1.5x")
                imp = Row(f"ImportLayer, {entries} files of 1 KiB", "tar -xf", "ms", "<= 1.5x")
                tarball = os.path.join(big, "layer.tar")
                subprocess.run(["tar", "-cf", tarball, "-C", big_upper, "."], check=True)
                for _ in range(args.reps):
                    export.baselines.append(median_of(1, lambda: subprocess.run(
                        f"tar -cf - -C {big_upper} . | cat >/dev/null", shell=True, check=True)) * 1000)
                    with profiled(empty, "export"):
                        export.ours.append(median_of(1, lambda: export_diff(bus, mount)) * 1000)
                    dest = os.path.join(big, "dest")
                    os.mkdir(dest)
                    imp.baselines.append(median_of(1, lambda dest=dest: subprocess.run(
                        ["tar", "-xf", tarball, "-C", dest], check=True)) * 1000)
                    shutil.rmtree(dest)
                    os.mkdir(dest)
                    with profiled(empty, "import"):
                        imp.ours.append(median_of(1, lambda dest=dest: import_layer(bus, tarball, dest)) * 1000)
                    shutil.rmtree(dest)
                rows += [export, imp]
            if wanted("diff") or wanted("layers"):
                bus.manager("Unmount", "oa{sv}", [mount, {}])
                bus.close()
        finally:
            empty.stop()

        # ---- the same daemon on dbus-fast (bench only) ------------------------------------
        if wanted("roundtrip") or wanted("throughput"):
            rows += on_dbus_fast(top, address, lowers, raw, upper, args, wanted)

        # ---- the library's floor: a service that does nothing but answer --------------------
        if wanted("floor"):
            for library in ("dbus-next", "dbus-fast"):
                floor = Floor(top, address, library)
                lat = Row(f"floor: Mount+Unmount doing nothing, {library}", "raw calls + 2 Ping", "ms",
                          "(uniond: <= 1.5x)")
                tput = Row(f"floor: throughput doing nothing, {library}, {args.clients} clients", "-",
                           "pairs/s", "(uniond: >= 1000)")
                try:
                    floor.start()
                except RuntimeError as e:
                    lat.failed = tput.failed = str(e)
                    rows += [lat, tput]
                    continue
                try:
                    bus = RawBus(address)
                    for rep in range(args.reps):
                        lat.baselines.append(lat_row.baselines[rep % len(lat_row.baselines)]
                                             if lat_row.baselines else float("nan"))
                        lat.ours.append(median_of(args.pairs, lambda bus=bus: bus_round_trip(bus, lowers, upper))
                                        * 1000)
                    bus.close()
                    rate, p99, errors, dcpu, ccpu, first = throughput(
                        address, floor, lowers, os.path.join(top, "tp"), args.clients, args.seconds)
                    tput.ours.append(rate)
                    tput.note = (f"p99 {p99 * 1000:.0f} ms, errors {errors}, CPU/pair: service "
                                 f"{sum(dcpu) * 1000:.2f} ms (user {dcpu[0] * 1000:.2f}), clients {ccpu * 1000:.2f} ms")
                finally:
                    floor.stop()
                rows += [lat, tput]

        # ---- with --live mounts to adopt --------------------------------------------------
        if wanted("start") or wanted("roundtrip"):
            print(f"  making {args.live} live mounts ...", flush=True)
            crowded = Daemon(top, address, "crowded")
            make_live_mounts(crowded.state, crowded.run, lowers, args.live)
            gmo = Row(f"GetManagedObjects of {args.live}, at the socket", "0 mounts", "ms", "<= 100 ms")
            lst = Row(f"ListMounts of {args.live}, at the socket", "0 mounts", "ms", "<= 100 ms")
            for _ in range(args.reps):
                try:
                    start_row.ours.append(crowded.start(timeout=120) * 1000)
                except RuntimeError as e:
                    start_row.failed = f"fails: {e}"
                    crowded.stop()
                    break
                bus = RawBus(address)
                for _ in range(5):
                    bus_round_trip(bus, lowers, upper)
                with profiled(crowded, "roundtrip-crowded"):
                    rt_row.ours.append(median_of(max(10, args.pairs // 4),
                                                 lambda bus=bus: bus_round_trip(bus, lowers, upper)) * 1000)
                # The kernel's own share: the raw calls with as many mounts live.
                raw_live = median_of(max(10, args.pairs // 4), lambda: raw_round_trip(*raw)) * 1000
                rt_row.note = (f"the raw calls with {args.live} live: {raw_live:.2f} ms "
                               f"(with 0: {statistics.median(raw_empty):.2f} ms)" if raw_empty else "")
                for row, member, interface in ((gmo, "GetManagedObjects", "org.freedesktop.DBus.ObjectManager"),
                                               (lst, "ListMounts", "org.uniond1.Manager")):
                    elapsed, size = timed_to_last_byte(bus, member, interface)
                    done, slowest, slowest_bus = slowest_ping_during(address, member, interface)
                    row.ours.append(min(elapsed, done) * 1000)
                    row.note = (f"{size / 1e6:.1f} MB; slowest answer meanwhile: Ping of uniond "
                                f"{slowest * 1000:.1f} ms, GetId of the bus {slowest_bus * 1000:.1f} ms")
                rss_row.ours.append(crowded.rss_mb())  # after the calls, with what they cached
                bus.close()
                crowded.stop()
            # The baselines: the same calls with no mounts.
            empty.start()
            bus = RawBus(address)
            for _ in range(max(len(gmo.ours), 1)):
                gmo.baselines.append(timed_to_last_byte(bus, "GetManagedObjects",
                                                        "org.freedesktop.DBus.ObjectManager")[0] * 1000)
                lst.baselines.append(timed_to_last_byte(bus, "ListMounts")[0] * 1000)
            bus.close()
            empty.stop()
            if start_row.failed:
                for row in (rt_row, rss_row, gmo, lst):
                    row.failed = "fails (no start)"
            rows = [start_row, rt_row, gmo, lst, rss_row, *rows]
    finally:
        bus_process.terminate()
        bus_process.wait()
        print(f"\nuniond bench/scale.py --live {args.live} --reps {args.reps}, {time.strftime('%Y-%m-%d %H:%M')}")
        print_table(rows)
        remove(top)


def remove(top: str) -> None:
    """Detach every mount made under ``top`` (top-most first), then remove the tree;
    a tree that still holds a mount is left alone rather than deleted through it."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(top + "/")]
    for point in reversed(points):
        try:
            syscalls.umount(point, lazy=True)
        except OSError:
            pass
    with open("/proc/self/mountinfo") as f:
        if any(top + "/" in line for line in f):
            print(f"mounts remain under {top}; not removing it", file=sys.stderr)
            return
    shutil.rmtree(top, ignore_errors=True)

if __name__ == "__main__":
    main()
