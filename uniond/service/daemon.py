"""Process life: arguments, configuration, start-up order, signals, and systemd.

Start-up order matters: the record is reconciled with the kernel and the adopted
mounts exported before the bus name is owned, and READY=1 follows only then, so no
caller ever sees a half-started daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import gc
import logging
import os
import resource
import signal
import subprocess
import sys
import time

from uniond import config as config_mod
from uniond import constants
from uniond.access.paths import Places
from uniond.errors import UniondError
from uniond.mounts import declfiles, detached
from uniond.mounts.declared import CHECK_INTERVAL, DeclaredMounts
from uniond.mounts.journal import StateStore
from uniond.mounts.layerops import LayerOperations
from uniond.mounts.manager import MountManager
from uniond.service import logs, privatebus
from uniond.service.bus import BusService, NameNotAllowed
from uniond.service.notify import Notifier

log = logging.getLogger("uniond")

STOP_GRACE_SECONDS = 3.0  # a stop waits this long for calls in flight (TimeoutStopSec is 90 s)


def _directory(variable: str, default: str) -> str:
    # systemd passes a colon-separated list when a unit names several directories.
    value = os.environ.get(variable, "")
    return value.split(":")[0] if value else default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="uniond", description="Union mounts over D-Bus.")
    parser.add_argument("--config", default=None, help=f"configuration file (default {constants.DEFAULT_CONFIG_PATH})")
    parser.add_argument(
        "--bus",
        choices=("auto", "system", "private"),
        default="auto",
        help="system: the system bus ($DBUS_SYSTEM_BUS_ADDRESS honoured); private: start a "
        "private bus with uniond's policy; auto (default): system if there is one, else private",
    )
    parser.add_argument(
        "--mounts-dir", default=None,
        help=f"declared mounts, one NAME.toml each (default {constants.DEFAULT_MOUNTS_DIRECTORY}; "
        f"$RUNTIME_DIRECTORY/{constants.MOUNTS_D} is read as well)",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="check the configuration and the declared mounts, then exit: 0 if all are good",
    )
    parser.add_argument("--version", action="version", version=constants.VERSION)
    return parser.parse_args(argv)


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config_path = args.config or constants.DEFAULT_CONFIG_PATH
        self.config = config_mod.load(self.config_path, required=args.config is not None)
        logs.setup(self.config.log_level)
        self.notifier = Notifier()
        self._status_pending = False  # a status line is to go at the end of this turn
        self.state_dir = _directory("STATE_DIRECTORY", constants.DEFAULT_STATE_DIRECTORY)
        self.runtime_dir = _directory("RUNTIME_DIRECTORY", constants.DEFAULT_RUNTIME_DIRECTORY)
        self.manager = MountManager(StateStore(self.state_dir), self.runtime_dir, self.config)
        self.declared = DeclaredMounts(self.manager, mounts_directories(args, self.runtime_dir))
        self._checker: asyncio.TimerHandle | None = None
        self.stop_event: asyncio.Event | None = None
        self.bus_process: subprocess.Popen | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def _bus_address(self) -> str | None:
        mode = self.args.bus
        if mode == "auto":
            has_system = "DBUS_SYSTEM_BUS_ADDRESS" in os.environ or os.path.exists(constants.SYSTEM_BUS_SOCKET)
            mode = "system" if has_system else "private"
        if mode == "system":
            return None
        self.bus_process, address = privatebus.start(os.path.join(self.runtime_dir, "bus"))
        log.info("on a private bus with uniond's policy (it ends with uniond); use it with:")
        log.info("  busctl --address=%s tree %s", address, constants.BUS_NAME)
        return address

    def status_line(self) -> str:
        n = len(self.manager.records)
        return f"{n} mount{'' if n == 1 else 's'}"

    def _reconcile_progress(self) -> None:
        self.notifier.extend_timeout(30)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.notifier.status("reconciling recorded mounts with the kernel")
        started = time.monotonic()
        report = self.manager.start(progress=self._reconcile_progress)
        log.info(
            "reconciled in %.1f ms: %d adopted, %d cleaned, %d kept for retry",
            (time.monotonic() - started) * 1000, len(report.adopted), len(report.cleaned), len(report.kept),
        )
        self.notifier.status("bringing up declared mounts")
        self._report_declared(self.declared.apply())
        self.notifier.status("connecting to the bus")
        service = BusService(self.manager, LayerOperations(self.manager), self._bus_address())
        service.on_reload = self.reload
        await service.connect()
        _release_start_memory()
        await self.manager.lifetimes.restore()  # bound mounts whose peer went meanwhile go
        self.manager.subscribe(self)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._start_watchdog(loop)
        self._start_checker(loop)
        detached_watch = asyncio.ensure_future(detached.watch(self.manager))
        self.notifier.ready(self.status_line())
        log.info("uniond %s ready on %s: %s", constants.VERSION, constants.BUS_NAME, self.status_line())

        disconnected = asyncio.ensure_future(service.wait_for_disconnect())
        stopped = asyncio.ensure_future(self.stop_event.wait())
        await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for timer in (self._watchdog, self._checker):
            if timer is not None:
                timer.cancel()
        detached_watch.cancel()
        if disconnected.done():
            # Retrieve the reason: asyncio would otherwise print it as a traceback.
            reason = disconnected.exception()
            why = f"{type(reason).__name__}: {reason}" if reason else "closed by the bus"
            log.error("lost the bus connection (%s); exiting so that systemd restarts uniond", why)
            stopped.cancel()
            await service.drain(0)  # nobody to answer: the calls in flight just end
            code = 1
        else:
            self.notifier.stopping()
            log.info("stopping; %s stay in place for the programs using them", self.status_line())
            disconnected.cancel()
            await service.drain(STOP_GRACE_SECONDS)
            service.disconnect()
            code = 0
        self.manager.store.close()
        if self.bus_process:
            self.bus_process.terminate()
            self.bus_process.wait(timeout=5)
        return code

    def _start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        interval = self.notifier.watchdog_interval()
        if not interval:
            return

        def ping() -> None:
            # Sent from the event loop itself: a stuck loop stops the pings.
            self.notifier.watchdog()
            self._watchdog = loop.call_later(interval, ping)

        ping()

    def _start_checker(self, loop: asyncio.AbstractEventLoop) -> None:
        def check() -> None:
            try:
                self.declared.check()
            except Exception:
                log.exception("checking the declared mounts failed")
            self._checker = loop.call_later(CHECK_INTERVAL, check)

        self._checker = loop.call_later(CHECK_INTERVAL, check)

    def _report_declared(self, outcome) -> None:
        if any(dataclasses.astuple(outcome)):
            log.info(
                "declared mounts: %d mounted, %d kept, %d changed, %d removed, %d failed",
                len(outcome.mounted), len(outcome.kept), len(outcome.swapped), len(outcome.removed),
                len(outcome.failed),
            )

    def reload(self) -> None:
        """SIGHUP, `systemctl reload` and the Manager's Reload() alike."""
        self.notifier.reloading()
        try:
            self.config = config_mod.load(self.config_path, required=self.args.config is not None)
            logs.setup(self.config.log_level)
            self.manager.configure(self.config)
            log.info("configuration reloaded from %s", self.config_path)
        except config_mod.ConfigError as e:
            log.error("reload failed, keeping the previous configuration: %s", e)
        self._report_declared(self.declared.apply(reload=True))
        self.notifier.ready(self.status_line())

    # MountListener: keep systemd's status line current.
    def mount_added(self, record) -> None:
        self._status_soon()

    def mount_removed(self, record) -> None:
        self._status_soon()

    def _status_soon(self) -> None:
        """Once per turn of the event loop, however many mounts came and went in it:
        each line is a message systemd reads, and a burst needs only the last."""
        if self._status_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.notifier.status(self.status_line())
            return
        self._status_pending = True
        loop.call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        self.notifier.status(self.status_line())


def _release_start_memory() -> None:
    """Reading the journal and the kernel's table of 10,000 mounts leaves megabytes that
    were freed but stay with the process (malloc keeps them for reuse); they are handed
    back once, after the start, so that the daemon's size is what it holds."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to hand back this way


def _raise_fd_limit() -> None:
    """A Mount holds each of its (up to 500) directories open while polkit decides, so
    the default soft limit of 1024 would let two large Mounts starve each other; the
    event loop uses epoll, so the hard limit is safe."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mounts_directories(args: argparse.Namespace, runtime_dir: str) -> tuple[str, str]:
    return (args.mounts_dir or constants.DEFAULT_MOUNTS_DIRECTORY, os.path.join(runtime_dir, constants.MOUNTS_D))


def check(args: argparse.Namespace) -> int:
    """`uniond --check`: what the daemon would say of its configuration and declared
    mounts, without starting (for administrators and ExecReload=)."""
    if sys.stderr.isatty():
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    else:
        logs.setup("info")
    bad = 0
    path = args.config or constants.DEFAULT_CONFIG_PATH
    try:
        config = config_mod.load(path, required=args.config is not None)
    except config_mod.ConfigError as e:
        log.error("bad configuration: %s", e)
        config, bad = config_mod.Config(), 1
    state_dir = _directory("STATE_DIRECTORY", constants.DEFAULT_STATE_DIRECTORY)
    runtime_dir = _directory("RUNTIME_DIRECTORY", constants.DEFAULT_RUNTIME_DIRECTORY)
    found, problems = declfiles.read(mounts_directories(args, runtime_dir))
    places = Places.of(config.allowed_roots, (state_dir, runtime_dir))
    problems += [p for p in (declfiles.check_places(d, places) for d in found.values()) if p is not None]
    for problem in problems:
        log.error("declared mount skipped: %s", problem)
    bad += len(problems)
    good = len(found) - len({p.path for p in problems if p.path in {d.path for d in found.values()}})
    log.info("%s: %d declared mount%s good, %d problem%s", "ok" if not bad else "not ok", good,
             "" if good == 1 else "s", bad, "" if bad == 1 else "s")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        return check(args)
    _raise_fd_limit()
    try:
        daemon = Daemon(args)
    except config_mod.ConfigError as e:
        logs.setup("info")
        log.error("bad configuration: %s", e)
        return 78  # EX_CONFIG
    try:
        return asyncio.run(daemon.run())
    except NameNotAllowed as e:
        log.error("%s", e)
        return NameNotAllowed.exit_code
    except UniondError as e:
        log.error("%s", e)
        return 1
