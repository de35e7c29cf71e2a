"""M7's lookup (is this directory some overlay's upper?) with many live overlays, the
three ways the daemon can answer it:

    sudo unshare -m --propagation private .venv/bin/python bench/mounttable.py [--live 10000]

  by id        listmount/statmount (kernel 6.8+, outside a seccomp filter that refuses them)
  re-read      mountinfo read for every lookup (what the fallback did before)
  on change    mountinfo read again only after the table changed (the fallback now, as
               under systemd 252's SystemCallFilter=); "after a change" adds one
               mount+umount before each lookup, as a Mount following an Unmount meets it

Each is timed with 0 live overlays (the baseline) and with --live, in one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from _util import require_private_namespace

from uniond.kernel import mountinfo, syscalls
from uniond.kernel.mounttable import ChangedTable, OverlayUppers


def overlay(lower: str, target: str) -> None:
    fs = syscalls.fsopen("overlay")
    try:
        syscalls.fsconfig_string(fs, "lowerdir+", lower)
        syscalls.fsconfig_string(fs, "lowerdir+", lower + "2")
        syscalls.fsconfig_create(fs)
        mnt = syscalls.fsmount(fs, 0)
        syscalls.move_mount(mnt, target)
        os.close(mnt)
    finally:
        os.close(fs)


def median_ms(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def measure(top: str, n: int) -> dict[str, float]:
    upper = os.path.join(top, "not-an-upper")
    by_id, on_change = OverlayUppers(), OverlayUppers()
    on_change._fallback = True
    on_change._table = ChangedTable(watch=False)
    by_id.user_of(upper)
    on_change.user_of(upper)
    scratch = os.path.join(top, "scratch")

    def reread() -> None:
        with open(mountinfo.MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            assert f"upperdir={upper}" not in f.read()

    def changed() -> None:
        subprocess_free_change(scratch)
        on_change.user_of(upper)

    def change_only() -> None:
        subprocess_free_change(scratch)

    figures = {
        "by id": median_ms(200, lambda: by_id.user_of(upper)),
        "re-read": median_ms(50, reread),
        "on change, unchanged": median_ms(200, lambda: on_change.user_of(upper)),
    }
    figures["on change, after a change"] = median_ms(50, changed) - median_ms(50, change_only)
    return figures


def subprocess_free_change(target: str) -> None:
    overlay(os.path.join(os.path.dirname(target), "lower"), target)
    syscalls.umount(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=int, default=10000)
    args = parser.parse_args()
    require_private_namespace()
    top = tempfile.mkdtemp(prefix="uniond-mounttable-", dir="/tmp")
    made: list[str] = []
    try:
        for name in ("lower", "lower2", "scratch", "live"):
            os.mkdir(os.path.join(top, name))
        base = measure(top, 0)
        for i in range(args.live):
            target = os.path.join(top, "live", f"m{i:05d}")
            os.mkdir(target)
            overlay(os.path.join(top, "lower"), target)
            made.append(target)
        crowded = measure(top, args.live)
        print(f"| lookup | 0 live | {args.live} live | ratio |\n|---|---|---|---|")
        for key, value in base.items():
            print(f"| {key} | {value:.3f} ms | {crowded[key]:.3f} ms | {crowded[key] / max(value, 1e-6):.2f}x |")
    finally:
        for target in reversed(made):
            syscalls.umount(target, lazy=True)
        with open(mountinfo.MOUNTINFO) as f:
            remain = top + "/" in f.read()
        if remain:
            print(f"mounts remain under {top}; not removing it", file=sys.stderr)
        else:
            shutil.rmtree(top)


if __name__ == "__main__":
    main()
