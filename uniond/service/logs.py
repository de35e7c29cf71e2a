"""Logging to stderr with sd-daemon priority prefixes ("<6>...").

journald reads the prefix and keeps each line's level, so `journalctl -p warning`
works without the daemon linking to libsystemd.
"""

from __future__ import annotations

import logging
import sys

from uniond.config import LEVELS

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class PriorityFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # A multi-line message (a traceback) keeps its priority on every line.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def setup(level: str) -> None:
    # No line shows them: each record would otherwise ask for its pid, thread and
    # process names (a system call and two lookups per line, two lines per Mount).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+; ignored before
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PriorityFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
