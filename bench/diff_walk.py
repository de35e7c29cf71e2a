"""Diff of an upper with 100,000 entries against a bare os.scandir walk of that upper.

Run (as root, from the repository):
    unshare -m --propagation private .venv/bin/python bench/diff_walk.py [/scratch/dir]

The upper: 1,000 directories that also exist in the one lower, each holding 99 new
files (1 KiB), 1% of them whiteouts (0/0 devices). Target: Diff <= 1.2x the walk.
Two baselines are printed: the names-only walk (scandir, d_type) and the walk that
also lstat()s every entry, which any diff must do to see modes, sizes and mtimes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from _util import best_of, make_tree, names_walk, require_private_namespace

from uniond.layers import diff


def scandir_lstat_walk(path: str) -> int:
    n = 0
    with os.scandir(path) as it:
        for entry in it:
            n += 1
            entry.stat(follow_symlinks=False)
            if entry.is_dir(follow_symlinks=False):
                n += scandir_lstat_walk(entry.path)
    return n


def main() -> None:
    require_private_namespace()
    base = tempfile.mkdtemp(prefix="uniond-bench-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        lower, upper = os.path.join(base, "lower"), os.path.join(base, "upper")
        make_tree(lower, 1000, 1, 16, prefix="old")
        entries = make_tree(upper, 1000, 99, 1024)
        for d in range(0, 1000, 1):
            os.mknod(os.path.join(upper, f"d{d:04d}", "old00000"), 0o600 | 0o020000, 0)  # whiteout (D2)
            entries += 1
        assert names_walk(upper) == entries
        walk = best_of(5, lambda: names_walk(upper))
        walk_lstat = best_of(5, lambda: scandir_lstat_walk(upper))
        changes = []
        t = best_of(5, lambda: changes.append(len(diff.changes(upper, [lower]))))
        print(f"upper entries:             {entries}")
        print(f"changes reported:          {changes[-1]}")
        print(f"scandir walk (names):      {walk * 1000:8.1f} ms")
        print(f"scandir walk + lstat:      {walk_lstat * 1000:8.1f} ms")
        print(f"Diff:                      {t * 1000:8.1f} ms")
        print(f"ratio Diff / walk:         {t / walk:8.2f}x   (target <= 1.2x)")
        print(f"ratio Diff / walk+lstat:   {t / walk_lstat:8.2f}x")
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
