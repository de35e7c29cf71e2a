"""Shared helpers of the benchmark scripts: building trees and timing fairly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def require_private_namespace() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root inside `unshare -m` (see the top of this file)")
    try:
        parent = os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        return  # the parent is gone or not ours to inspect: nothing to compare with
    if os.readlink("/proc/self/ns/mnt") == parent:
        sys.exit("run inside a private mount namespace: unshare -m --propagation private ...")


def drop_caches() -> None:
    """Not used by default: warm caches measure the code, not the disk."""
    subprocess.run(["sync"], check=True)


def best_of(runs: int, fn: Callable[[], object]) -> float:
    """The fastest of ``runs`` runs, in seconds: the least disturbed by the machine."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_tree(root: str, dirs: int, files_per_dir: int, size: int = 0, prefix: str = "f") -> int:
    """``dirs`` directories of ``files_per_dir`` files of ``size`` bytes; returns the entry count."""
    data = os.urandom(size) if size else b""
    count = 0
    for d in range(dirs):
        directory = os.path.join(root, f"d{d:04d}")
        os.makedirs(directory, exist_ok=True)
        count += 1
        for f in range(files_per_dir):
            fd = os.open(os.path.join(directory, f"{prefix}{f:05d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            if data:
                os.write(fd, data)
            os.close(fd)
            count += 1
    return count


def names_walk(path: str) -> int:
    """Every entry below ``path``, by name only (d_type, no stat): the baseline a Diff
    is held against, as it is the least any walk of the upper must do."""
    n = 0
    with os.scandir(path) as it:
        for entry in it:
            n += 1
            if entry.is_dir(follow_symlinks=False):
                n += names_walk(entry.path)
    return n
