"""Talking to systemd (sd_notify): readiness, status, watchdog, reload, stop."""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))  # systemd sets it once, at exec
        if self._notifier.socket is not None:
            # A manager that reads slowly must not freeze the event loop (and with it the
            # bus connection): a status line that does not fit is dropped instead.
            self._notifier.socket.setblocking(False)

    def send(self, *lines: str) -> None:
        if self._enabled:
            self._notifier.notify("\n".join(lines))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping; mounts stay in place")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of $WATCHDOG_USEC in seconds, if systemd asked this process for pings."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2 / 1_000_000
