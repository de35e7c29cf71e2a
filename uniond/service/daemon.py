"""Process life: arguments, configuration, start-up order, signals, and systemd.

Start-up order matters: the record is reconciled with the kernel and the adopted
mounts exported before the bus name is owned, and READY=1 follows only then, so no
caller ever sees a half-started daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import subprocess
import time

from uniond import config as config_mod
from uniond import constants
from uniond.errors import UniondError
from uniond.mounts.journal import StateStore
from uniond.mounts.layerops import LayerOperations
from uniond.mounts.manager import MountManager
from uniond.service import logs, privatebus
from uniond.service.bus import BusService
from uniond.service.notify import Notifier

log = logging.getLogger("uniond")


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
    parser.add_argument("--version", action="version", version=constants.VERSION)
    return parser.parse_args(argv)


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config_path = args.config or constants.DEFAULT_CONFIG_PATH
        self.config = config_mod.load(self.config_path, required=args.config is not None)
        logs.setup(self.config.log_level)
        self.notifier = Notifier()
        self.state_dir = _directory("STATE_DIRECTORY", constants.DEFAULT_STATE_DIRECTORY)
        self.runtime_dir = _directory("RUNTIME_DIRECTORY", constants.DEFAULT_RUNTIME_DIRECTORY)
        self.manager = MountManager(StateStore(self.state_dir), self.runtime_dir, self.config)
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
        log.info("no system bus: started a private bus with uniond's policy; use it with:")
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
        self.notifier.status("connecting to the bus")
        service = BusService(self.manager, LayerOperations(self.manager), self._bus_address())
        await service.connect()
        self.manager.subscribe(self)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._start_watchdog(loop)
        self.notifier.ready(self.status_line())
        log.info("uniond %s ready on %s: %s", constants.VERSION, constants.BUS_NAME, self.status_line())

        disconnected = asyncio.ensure_future(service.wait_for_disconnect())
        stopped = asyncio.ensure_future(self.stop_event.wait())
        await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if disconnected.done():
            # Retrieve the reason: asyncio would otherwise print it as a traceback.
            reason = disconnected.exception()
            why = f"{type(reason).__name__}: {reason}" if reason else "closed by the bus"
            log.error("lost the bus connection (%s); exiting so that systemd restarts uniond", why)
            stopped.cancel()
            code = 1
        else:
            self.notifier.stopping()
            log.info("stopping; %s stay in place for the programs using them", self.status_line())
            disconnected.cancel()
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

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            self.config = config_mod.load(self.config_path, required=self.args.config is not None)
            logs.setup(self.config.log_level)
            self.manager.configure(self.config)
            log.info("configuration reloaded from %s", self.config_path)
        except config_mod.ConfigError as e:
            log.error("reload failed, keeping the previous configuration: %s", e)
        self.notifier.ready(self.status_line())

    # MountListener: keep systemd's status line current.
    def mount_added(self, record) -> None:
        self.notifier.status(self.status_line())

    def mount_removed(self, record) -> None:
        self.notifier.status(self.status_line())

    def mount_changed(self, record, changed) -> None:
        pass  # the count is the same


def _raise_fd_limit() -> None:
    """A Mount holds each of its (up to 500) directories open while polkit decides, so
    the default soft limit of 1024 would let two large Mounts starve each other; the
    event loop uses epoll, so the hard limit is safe."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _raise_fd_limit()
    try:
        daemon = Daemon(args)
    except config_mod.ConfigError as e:
        logs.setup("info")
        log.error("bad configuration: %s", e)
        return 78  # EX_CONFIG
    try:
        return asyncio.run(daemon.run())
    except UniondError as e:
        log.error("%s", e)
        return 1
