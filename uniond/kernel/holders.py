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


def _mount_id_of_fdinfo(path: str) -> int:
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return 0


def _mount_id_of_link(link: str) -> int:
    """The mount a magic link (cwd, root, exe, map_files/*) leads into, through our own
    O_PATH descriptor of it: its path means nothing once the mount is detached."""
    fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
    try:
        return _mount_id_of_fdinfo(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def _mounts_used_by(pid: str) -> set[int]:
    base = f"/proc/{pid}"
    used: set[int] = set()
    try:
        fds = os.listdir(f"{base}/fdinfo")
    except OSError:
        fds = []
    for fd in fds:
        try:
            used.add(_mount_id_of_fdinfo(f"{base}/fdinfo/{fd}"))
        except (OSError, ValueError):
            continue
    links = [f"{base}/cwd", f"{base}/root", f"{base}/exe"]
    try:
        seen = set()
        for name in os.listdir(f"{base}/map_files"):
            # One mapping per file is enough: read where each range leads, open it once.
            try:
                target = os.readlink(f"{base}/map_files/{name}")
            except OSError:
                continue
            if target not in seen:
                seen.add(target)
                links.append(f"{base}/map_files/{name}")
    except OSError:
        pass
    for link in links:
        try:
            used.add(_mount_id_of_link(link))
        except (OSError, ValueError):
            continue
    return used


def holding(mnt_ids: set[int]) -> dict[int, list[Holder]]:
    """Who still holds each of ``mnt_ids`` (M12): after ``umount2(MNT_DETACH)`` a mount has
    no path any more, so its users are found by the mount id of their files, cwd, root,
    executable and mappings. A mount id missing from the answer is held by nobody."""
    found: dict[int, list[Holder]] = {}
    if not mnt_ids:
        return found
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        hits = _mounts_used_by(pid) & mnt_ids
        if not hits:
            continue
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                command = f.read().strip()
        except OSError:
            command = "?"
        for mnt_id in hits:
            found.setdefault(mnt_id, []).append(Holder(int(pid), command))
    return found
