"""Who keeps a mount busy (U2): processes whose cwd, root or open files are inside it.

"Target is busy" alone sends users hunting with lsof; naming the processes is what
they need to act.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"{self.command} (pid {self.pid})"


def _inside(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def _links(pid: str) -> list[str]:
    base = f"/proc/{pid}"
    names = [f"{base}/cwd", f"{base}/root"]
    try:
        names += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
    except OSError:
        pass
    targets = []
    for name in names:
        try:
            targets.append(os.readlink(name))
        except OSError:
            continue
    return targets


def find(mountpoint: str) -> list[Holder]:
    holders = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        targets = _links(pid)
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                targets += [line.split(None, 5)[-1].strip() for line in f if "/" in line]
        except OSError:
            pass
        if any(_inside(t, mountpoint) for t in targets):
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                    command = f.read().strip()
            except OSError:
                command = "?"
            holders.append(Holder(int(pid), command))
    return sorted(holders, key=lambda h: h.pid)
