"""Test-only: named points where the fault-injection harness (tests/test_faults.py)
makes the daemon kill itself, to prove that a crash at each step of an operation loses
and orphans nothing. Inert unless UNIOND_TEST_CRASH_AT names a point; never set by the
unit, the package or the configuration."""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("UNIOND_TEST_CRASH_AT", "")


def point(name: str) -> None:
    if _AT == name:
        os.kill(os.getpid(), signal.SIGKILL)
