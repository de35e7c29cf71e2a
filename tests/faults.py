"""Fault injection: uniond killed (SIGKILL) at random moments and at each named step of
its operations, its journal damaged, its state directory filled, its bus killed — and
after every restart, the checks a user would make.

Used by tests/test_faults.py (a short run in CI) and bench/faults.py (the long run,
which prints the figures). Everything is real: the daemon is its own process on a
private dbus-daemon, the mounts are real overlays and bind mounts, files are written
(and fsync'd) through the merged views by this process, and the state directory is a
small tmpfs of its own so that it can be filled.

The named steps are the test-only points of uniond/mounts/crash.py: a daemon started
with UNIOND_TEST_CRASH_AT=<step> kills itself there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dbus_next import Message, MessageType, Variant
from harness import Bus, CallError, Daemon, NotifySocket

from uniond import constants
from uniond.kernel import mountinfo

MOUNT_STEPS = ("mount.intended", "mount.workdir-made", "mount.marked", "mount.attached", "mount.recorded")
UNMOUNT_STEPS = ("unmount.marker-dropped", "unmount.unmounted", "cleanup.workdir-cleared")
COMMIT_STEPS = ("commit.frozen", "commit.copied")
IMPORT_STEPS = ("import.claimed", "import.written")
UPDATE_STEPS = ("update.intended", "update.beneath", "update.replaced")
RECONCILE_STEPS = ("reconcile.loaded", "reconcile.cleaned", "reconcile.compacting")
MOUNT_KINDS = ("rw", "ro", "bind")
JOURNAL_DAMAGE = ("truncated", "non-utf8", "wrong-type", "deleted", "emptied", "random-bytes", "duplicated",
                  "reordered")
LOG_FAULTS = ("Traceback", "Future exception was never retrieved", "Exception in callback")
CALL_TIMEOUT = 30.0


@dataclass
class Figures:
    kills: int = 0  # SIGKILLs, random and at named steps
    named_steps: int = 0
    mounts: int = 0  # Mounts answered with an object
    files_written: int = 0  # fsync'd through a merged view, acknowledged
    files_verified: int = 0  # checks of a written file's content in its upper
    checks: int = 0
    faults: Counter = field(default_factory=Counter)
    violations: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)

    def violation(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.details) < 50:
            self.details.append(f"{kind}: {detail}")

    def summary(self) -> str:
        lines = [
            f"kills: {self.kills} (random {self.kills - self.named_steps}, at named steps {self.named_steps})",
            f"mounts made: {self.mounts}",
            f"files written through merged views (fsync'd): {self.files_written}",
            f"file checks (content verified in its upper): {self.files_verified}",
            f"restarts checked: {self.checks}",
            "faults tried: " + (", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"),
            "violations: " + (", ".join(f"{k} {v}" for k, v in sorted(self.violations.items())) or "0"),
        ]
        return "\n".join(lines + self.details)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files + dirs):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            h.update(f"{os.path.relpath(path, root)} {st.st_mode} {st.st_size} {st.st_mtime_ns}\n".encode())
            if os.path.isfile(path):
                h.update(Path(path).read_bytes())
    return h.hexdigest()


class World:
    """One daemon, its bus, its layers and what was written through its mounts."""

    def __init__(self, base: Path, seed: int = 0, state_size: str = "1m") -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.figures = Figures()
        self.lowers = [base / f"image{i}" for i in range(3)]
        for i, lower in enumerate(self.lowers):
            (lower / "dir").mkdir(parents=True)
            for j in range(5):
                (lower / f"file{j}").write_text(f"image {i} file {j}\n")
            (lower / "dir/deep").write_text(f"deep {i}\n")
        self.uppers = [base / "uppers" / f"u{i}" for i in range(6)]
        self.mountpoints = [base / "mp" / f"m{i}" for i in range(6)]
        for d in self.uppers + self.mountpoints:
            d.mkdir(parents=True)
        (base / "dest").mkdir()
        self.tar = base / "layer.tar"
        self._make_tar()
        self.lower_digest = _digest(base / "image0") + _digest(base / "image1") + _digest(base / "image2")
        self.files: dict[Path, bytes] = {}
        self.serial = 0
        state = base / "state"
        state.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={state_size},mode=0700", "tmpfs", str(state)],
                       check=True)
        self.bus_dirs: list[str] = []
        self.bus = self._new_bus()
        self.daemon = Daemon(bus=self.bus, state_dir=state / "uniond", runtime_dir=base / "run",
                             notify=NotifySocket(base / "notify.sock"), log_path=base / "uniond.log")
        self.loop = asyncio.new_event_loop()
        # This client's own calls die with the bus it kills: nothing to report.
        self.loop.set_exception_handler(lambda loop, context: None)
        self.log_seen = 0
        try:
            self.daemon.start()
            self.client = self._connect()
        except BaseException:
            self.close()
            raise

    # ---- plumbing ----------------------------------------------------------------

    def _new_bus(self) -> Bus:
        directory = tempfile.mkdtemp(prefix="uniond-faults-bus-")
        self.bus_dirs.append(directory)
        return Bus(Path(directory))

    def _connect(self):
        from dbus_next.aio import MessageBus

        async def connect() -> MessageBus:
            return await MessageBus(bus_address=self.bus.address, negotiate_unix_fd=True).connect()

        return self.loop.run_until_complete(connect())

    def _make_tar(self) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for i in range(20):
                data = f"imported {i}\n".encode() * 50
                info = tarfile.TarInfo(f"f{i}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        self.tar.write_bytes(buffer.getvalue())

    def call(self, member: str, signature: str = "", body: list | None = None, fds: list[int] | None = None,
             path: str = constants.MANAGER_PATH, interface: str = constants.MANAGER_INTERFACE) -> list:
        msg = Message(destination=constants.BUS_NAME, path=path, interface=interface, member=member,
                      signature=signature, body=body or [], unix_fds=fds or [])
        reply = self.loop.run_until_complete(asyncio.wait_for(self.client.call(msg), CALL_TIMEOUT))
        if reply.message_type == MessageType.ERROR:
            raise CallError(reply.error_name, reply.body[0] if reply.body else "")
        return reply.body

    def props(self, path: str) -> dict:
        body = self.call("GetAll", "s", [constants.MOUNT_INTERFACE], path=path,
                         interface="org.freedesktop.DBus.Properties")
        return {k: v.value for k, v in body[0].items()}

    def list(self) -> list[str]:
        return self.call("ListMounts")[0]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.daemon.stop()
        self.daemon.notify.close()
        with contextlib.suppress(Exception):
            self.client.disconnect()
            self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        with contextlib.suppress(Exception):
            self.daemon.kill()
        with contextlib.suppress(Exception):
            self.bus.stop()
        for target in reversed([e.mountpoint for e in mountinfo.read() if e.mountpoint.startswith(str(self.base))]):
            subprocess.run(["umount", "-l", target], check=False)
        for directory in self.bus_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    # ---- operations (each may meet a dying daemon: any error is an unknown outcome) ----

    def _free_mountpoint(self) -> Path | None:
        table = {e.mountpoint for e in mountinfo.read()}
        free = [m for m in self.mountpoints if str(m) not in table]
        return self.rng.choice(free) if free else None

    def mount(self, kind: str | None = None, auto: bool | None = None) -> str | None:
        kind = kind or self.rng.choice(MOUNT_KINDS)
        auto = self.rng.random() < 0.5 if auto is None else auto
        mountpoint = "" if auto else self._free_mountpoint()
        if mountpoint is None:
            return None
        lowers = [str(p) for p in self.rng.sample(self.lowers, 1 if kind == "bind" else 2)]
        upper = ""
        if kind == "rw":
            used = {self.props(p)["UpperDir"] for p in self.list()}
            free = [u for u in self.uppers if str(u) not in used]
            if not free:
                return None
            upper = str(self.rng.choice(free))
        path = self.call("Mount", "asssa{sv}", [lowers, upper, str(mountpoint), {}])[0]
        self.figures.mounts += 1
        if kind == "rw":
            self.write(path)
        return path

    def write(self, path: str | None = None) -> None:
        if path is None:
            rw = [p for p in self.list() if not self.props(p)["ReadOnly"]]
            if not rw:
                return
            path = self.rng.choice(rw)
        props = self.props(path)
        if props["ReadOnly"] or props.get("Detached"):
            return
        self.serial += 1
        name = f"w{self.serial}"
        data = f"{name} {self.rng.random()}\n".encode() * self.rng.randint(1, 200)
        fd = os.open(os.path.join(props["Mountpoint"], name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.files[Path(props["UpperDir"]) / name] = data
        self.figures.files_written += 1

    def unmount(self, path: str | None = None, lazy: bool = False) -> None:
        if path is None:
            listed = self.list()
            if not listed:
                return
            path = self.rng.choice(listed)
        self.call("Unmount", "oa{sv}", [path, {"lazy": Variant("b", lazy)}])

    def commit(self, path: str | None = None) -> None:
        if path is None:
            listed = self.list()
            if not listed:
                return
            path = self.rng.choice(listed)
        self.serial += 1
        dest = self.base / "dest" / f"c{self.serial}"
        dest.mkdir()
        self.call("Commit", "osa{sv}", [path, str(dest), {}])

    def update(self, path: str | None = None) -> None:
        """Update an overlay's lowers to another pair (a bind view stays as it is)."""
        if path is None:
            overlays = [p for p in self.list() if len(self.props(p)["LowerDirs"]) > 1]
            if not overlays:
                return
            path = self.rng.choice(overlays)
        props = self.props(path)
        if props.get("Detached") or len(props["LowerDirs"]) < 2:
            return
        current = list(props["LowerDirs"])
        choices = [[str(a), str(b)] for a in self.lowers for b in self.lowers if a != b]
        lowers = self.rng.choice([c for c in choices if c != current])
        self.call("Update", "oasa{sv}", [path, lowers, {}])
        self.figures.faults["update"] += 1

    def import_layer(self) -> None:
        self.serial += 1
        dest = self.base / "dest" / f"i{self.serial}"
        dest.mkdir()
        with open(self.tar, "rb") as f:
            self.call("ImportLayer", "hsa{sv}", [0, str(dest), {}], fds=[f.fileno()])

    def random_operation(self) -> None:
        operation = self.rng.choices(
            [self.mount, self.write, self.unmount, self.commit, self.import_layer, self.update, self.list],
            weights=[5, 3, 3, 1, 1, 1, 1],
        )[0]
        if operation is self.unmount:
            self.unmount(lazy=self.rng.random() < 0.1)
        else:
            operation()

    # ---- faults ----------------------------------------------------------------

    def restart(self, env: dict[str, str] | None = None, wait_ready: bool = True) -> None:
        if self.daemon.alive():
            self.daemon.kill()
        self.daemon.extra_env = env or {}
        self.daemon.start(wait_ready=wait_ready)

    def random_kill(self, max_delay: float = 0.3) -> None:
        """SIGKILL at a random moment while a client works (one time in ten, while the
        daemon starts and reconciles)."""
        delay = self.rng.uniform(0, max_delay)
        if self.rng.random() < 0.1:
            self.daemon.kill()
            self.daemon.start(wait_ready=False)
            delay = self.rng.uniform(0, 0.15)  # a Python start and reconciliation take about that
            self.figures.faults["random kill during start"] += 1
        pid = self.daemon.pid
        killer = threading.Timer(delay, lambda: os.kill(pid, signal.SIGKILL))
        killer.start()
        deadline = time.monotonic() + 10
        while self.daemon.alive() and time.monotonic() < deadline:
            with contextlib.suppress(CallError, OSError, asyncio.TimeoutError):
                self.random_operation()
        killer.join()
        self.daemon.process.wait(timeout=15)
        self.figures.kills += 1
        self.figures.faults["random kill"] += 1
        self.restart()
        self.check()

    def crash_at(self, step: str, kind: str = "rw", auto: bool = True) -> None:
        """Start a daemon that kills itself at ``step``, make it get there, restart, check."""
        self.unmount_everything()  # a free upper and mountpoint for the step, and a check
        reconciling = step in RECONCILE_STEPS
        if reconciling:
            # Give reconciliation something to clean: a mount taken away behind its back.
            path = self.mount("rw", auto=False)
            mountpoint = self.props(path)["Mountpoint"]
            self.daemon.stop()
            subprocess.run(["umount", mountpoint], check=True)
        self.restart({"UNIOND_TEST_CRASH_AT": step}, wait_ready=not reconciling)
        with contextlib.suppress(CallError, OSError, asyncio.TimeoutError):
            if step in MOUNT_STEPS:
                self.mount(kind, auto)
            elif step in UNMOUNT_STEPS:
                path = self.mount(kind, auto)
                self.unmount(path, lazy=kind == "lazy")
            elif step in COMMIT_STEPS:
                self.commit(self.mount("rw", auto))
            elif step in IMPORT_STEPS:
                self.import_layer()
            elif step in UPDATE_STEPS:
                self.update(self.mount(kind, auto))
        try:
            self.daemon.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.figures.violation("step-not-reached", f"{step} ({kind})")
        self.figures.kills += 1
        self.figures.named_steps += 1
        self.figures.faults[f"kill at {step}"] += 1
        self.restart()
        self.check()

    def damage_journal(self, how: str) -> None:
        self.daemon.kill()
        journal = self.daemon.state_dir / "mounts.journal"
        data = journal.read_bytes() if journal.exists() else b""
        lines = data.splitlines(keepends=True)
        if how == "truncated" and data:
            journal.write_bytes(data[: self.rng.randrange(len(data))])
        elif how == "non-utf8" and data:
            at = self.rng.randrange(len(data))
            journal.write_bytes(data[:at] + b"\xff\xfe" + data[at:])
        elif how == "wrong-type" and lines:
            entry = json.loads(lines[-1])
            if "put" in entry:
                entry["put"]["spec"]["workdir"] = 5
            journal.write_bytes(data + (json.dumps(entry) + "\n").encode())
        elif how == "deleted" and journal.exists():
            journal.unlink()
        elif how == "emptied":
            journal.write_bytes(b"")
        elif how == "random-bytes" and data:
            at = self.rng.randrange(len(data))
            journal.write_bytes(data[:at] + os.urandom(64) + data[at + 64 :])
        elif how == "duplicated":
            journal.write_bytes(data + data)
        elif how == "reordered":
            self.rng.shuffle(lines)
            journal.write_bytes(b"".join(lines))
        self.figures.faults[f"journal {how}"] += 1
        self.restart()
        self.check()

    def fill_state(self) -> Path:
        """Fill the state tmpfs to the last byte, the journal's last page too."""
        filler = self.daemon.state_dir.parent / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * chunk):
                        pass
        finally:
            os.close(fd)
        journal = self.daemon.state_dir / "mounts.journal"
        if journal.exists():
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
            try:
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\n"):
                        pass
            finally:
                os.close(fd)
        return filler

    def disk_full(self, kills: int = 3) -> None:
        """Mounts fail cleanly, Unmounts finish, kills and starts work, while the state is full."""
        filler = self.fill_state()
        self.figures.faults["state directory full"] += 1
        for _ in range(3):
            with contextlib.suppress(CallError, OSError, asyncio.TimeoutError):
                self.random_operation()
        self.check()
        for _ in range(kills):
            self.random_kill()
        filler.unlink()
        self.check()

    def kill_bus(self) -> None:
        """The bus dies under load: uniond exits (for systemd to restart it) and a start
        on a new bus adopts everything."""
        pid = self.bus.process.pid
        killer = threading.Timer(self.rng.uniform(0, 0.2), lambda: os.kill(pid, signal.SIGKILL))
        killer.start()
        deadline = time.monotonic() + 5
        while self.bus.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(CallError, OSError, asyncio.TimeoutError, Exception):
                self.random_operation()
        killer.join()
        self.bus.process.wait()
        try:
            code = self.daemon.process.wait(timeout=15)
            if code != 1:
                self.figures.violation("bus-loss-exit", f"exit code {code}")
        except subprocess.TimeoutExpired:
            self.figures.violation("bus-loss-exit", "uniond did not exit after losing its bus")
            self.daemon.kill()
        self.figures.faults["bus killed"] += 1
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.bus = self._new_bus()
        self.daemon.bus = self.bus
        self.daemon.start()
        self.client = self._connect()
        self.check()

    # ---- the checks --------------------------------------------------------------

    def _ours_in_table(self) -> list[mountinfo.MountEntry]:
        places = (str(self.base / "mp") + "/", str(self.base / "run" / "mounts") + "/")
        return [e for e in mountinfo.read() if e.mountpoint.startswith(places)]

    def check(self, everything_unmounted: bool = False) -> None:
        f = self.figures
        f.checks += 1
        table = self._ours_in_table()
        at = Counter(e.mountpoint for e in table)
        tops = {e.mountpoint: e for e in table}
        for mountpoint, n in at.items():
            if n > 1:
                f.violation("doubled", f"{n} mounts at {mountpoint}")
        listed = self.list()
        managed = set(self.call("GetManagedObjects", path=constants.MANAGER_PATH,
                                interface="org.freedesktop.DBus.ObjectManager")[0])
        if set(listed) != managed - {constants.MANAGER_PATH}:
            f.violation("object-mismatch", f"ListMounts {sorted(listed)} != GetManagedObjects {sorted(managed)}")
        named = set()
        for path in listed:
            props = self.props(path)
            if props.get("Detached"):
                continue
            named.add(props["Mountpoint"])
            if props["Mountpoint"] not in at:
                f.violation("object-without-mount", f"{path} at {props['Mountpoint']}")
            elif not props["ReadOnly"] and os.statvfs(props["Mountpoint"]).f_flag & os.ST_RDONLY:
                f.violation("left-read-only", f"{path} at {props['Mountpoint']}")
            else:
                entry = tops[props["Mountpoint"]]
                shown = entry.option_values("lowerdir")
                if props["UpperDir"] and props["ReadOnly"]:
                    shown = shown[1:]
                if entry.fstype == "overlay" and shown != list(props["LowerDirs"]):
                    f.violation("stack-mismatch", f"{path}: LowerDirs {props['LowerDirs']}, the kernel {shown}")
        for mountpoint in at:
            if mountpoint not in named:
                f.violation("orphaned", f"a mount at {mountpoint} that no object names")
        for path, data in self.files.items():
            f.files_verified += 1
            try:
                if path.read_bytes() != data:
                    f.violation("file-changed", str(path))
            except OSError as e:
                f.violation("file-lost", f"{path}: {e}")
        if _digest(self.base / "image0") + _digest(self.base / "image1") + _digest(self.base / "image2") \
                != self.lower_digest:
            f.violation("layer-touched", "a lower changed")
        log = self.daemon.log()
        for word in LOG_FAULTS:
            if word in log[self.log_seen :]:
                f.violation("traceback", log[self.log_seen :][log[self.log_seen :].index(word) :][:500])
        self.log_seen = len(log)
        if everything_unmounted:
            self._check_nothing_left()

    def stop_and_check_log(self) -> None:
        if self.daemon.stop() != 0:
            self.figures.violation("stop", "uniond did not exit 0 on SIGTERM")
        log = self.daemon.log()[self.log_seen :]
        for word in LOG_FAULTS:
            if word in log:
                self.figures.violation("traceback", f"in the log of the last stop: {log[log.index(word):][:500]}")

    def unmount_everything(self) -> None:
        for path in self.list():
            try:
                self.unmount(path)
            except CallError as e:
                self.figures.violation("unmount-failed", f"{path}: {e}")
        self.check(everything_unmounted=True)

    def _check_nothing_left(self) -> None:
        f = self.figures
        for upper_parent in {u.parent for u in self.uppers}:
            for name in os.listdir(upper_parent):
                if ".uniond-work-" in name:
                    f.violation("workdir-left", str(upper_parent / name))
        for sub in ("mounts", "marks"):
            directory = self.base / "run" / sub
            for name in os.listdir(directory) if directory.exists() else ():
                f.violation(f"{sub[:-1]}-left", str(directory / name))
        for entry in self._ours_in_table():
            f.violation("orphaned", f"{entry.mountpoint} still mounted after everything was unmounted")


def campaign(base: Path, kills: int, seed: int = 0, rounds_between_cleanups: int = 20) -> Figures:
    """Every named step, every kind of journal damage, a full disk, a lost bus, and
    ``kills`` random kills; everything unmounted and checked every so often."""
    world = World(base, seed)
    try:
        for step in MOUNT_STEPS:
            # Only a writable mount gets a workdir made for it; each kind with a
            # daemon-made and with a caller's mountpoint.
            kinds = ("rw",) if step == "mount.workdir-made" else MOUNT_KINDS
            for kind in kinds:
                for auto in (True, False):
                    world.crash_at(step, kind, auto)
        for step in UNMOUNT_STEPS:
            # Only a daemon-made workdir has a marker to drop.
            for kind in ("rw",) if step == "unmount.marker-dropped" else ("rw", "bind"):
                world.crash_at(step, kind, auto=kind == "rw")
        for step in COMMIT_STEPS + IMPORT_STEPS + RECONCILE_STEPS:
            world.crash_at(step)
        for step in UPDATE_STEPS:
            for kind in ("rw", "ro"):
                world.crash_at(step, kind, auto=kind == "rw")
                # The journal lost after such a restart: the marks alone must know the stack.
                world.damage_journal("emptied")
        world.unmount_everything()
        for i in range(kills):
            world.random_kill()
            if i % rounds_between_cleanups == rounds_between_cleanups - 1:
                world.unmount_everything()
            if i % 50 == 10:
                world.damage_journal(JOURNAL_DAMAGE[(i // 50) % len(JOURNAL_DAMAGE)])
            if i % 250 == 125:
                world.disk_full(kills=2)
        for how in JOURNAL_DAMAGE:
            for _ in range(3):
                world.mount()
            world.damage_journal(how)
        world.disk_full()
        world.kill_bus()
        world.unmount_everything()
        world.stop_and_check_log()
    finally:
        world.close()
    return world.figures
