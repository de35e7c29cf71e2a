"""What unionctl shows: tables and lines for people, JSON for programs, a progress bar on
a terminal, and every error as one line with its exit code.

Exit codes (unionctl(1), "EXIT STATUS"): 0 done, 1 failed, 2 usage, 3 not authorized
(polkit said no or would have to ask, NotPermitted, the bus refused), 4 not found,
5 busy.
"""

from __future__ import annotations

import datetime
import json
import pwd
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from uniond.client import errors
from uniond.client.values import MountInfo

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_AUTHORIZED, EXIT_NOT_FOUND, EXIT_BUSY = 1, 2, 3, 4, 5

_EXIT_CODES: dict[type, int] = {
    errors.NotAuthorized: EXIT_NOT_AUTHORIZED,
    errors.NotAuthorizedCanObtain: EXIT_NOT_AUTHORIZED,
    errors.NotAuthorizedDismissed: EXIT_NOT_AUTHORIZED,
    errors.NotPermitted: EXIT_NOT_AUTHORIZED,
    errors.NotFound: EXIT_NOT_FOUND,
    errors.Busy: EXIT_BUSY,
}


def exit_code(error: errors.UniondError) -> int:
    if isinstance(error, errors.BusError) and error.dbus_name == errors.ACCESS_DENIED:
        return EXIT_NOT_AUTHORIZED
    return _EXIT_CODES.get(type(error), EXIT_FAILED)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error(name: str, message: str, as_json: bool) -> None:
    """The one line on stderr: the error's name and the message (the daemon's, for uniond's errors)."""
    if as_json:
        print(json.dumps({"error": name, "message": one_line(message)}), file=sys.stderr)
    else:
        print(f"unionctl: {name}: {one_line(message)}", file=sys.stderr)


def emit_json(document: Any) -> None:
    print(json.dumps(document, sort_keys=True), flush=True)


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def local_time(info: MountInfo) -> str:
    return info.created.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(mounts: Sequence[MountInfo]) -> str:
    """``unionctl list``: id, mountpoint, layers (lowers, top-most first), upper, owner,
    created, flags (``MountInfo.flags``)."""
    rows = [("ID", "MOUNTPOINT", "LAYERS", "UPPER", "OWNER", "CREATED", "FLAGS")]
    for m in mounts:
        rows.append((m.id, m.mountpoint, ":".join(m.lowerdirs), m.upperdir or "-", owner_name(m.owner), local_time(m),
                     m.flags))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows]
    return "\n".join(lines)


def on_terminal() -> bool:
    """Progress is for a person watching: only when stdout and stderr are terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressBar:
    """A tqdm bar with bytes and rate on stderr, made at the first report (a call that
    fails before uniond starts shows none)."""

    def __init__(self, description: str, enabled: bool) -> None:
        self.description = description
        self.enabled = enabled
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            # shutil falls back to $COLUMNS/$LINES or 80x24 where a terminal reports no size
            # (0x0), in which tqdm would draw nothing.
            size = shutil.get_terminal_size()
            self.bar = tqdm(total=total, desc=self.description, unit="B", unit_scale=True,
                            file=sys.stderr, ncols=size.columns, nrows=size.lines, leave=True)
        if total is not None and total != self.bar.total:
            self.bar.total = total
        self.bar.update(max(done - self.bar.n, 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def iso_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
