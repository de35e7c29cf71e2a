"""Diff time with 1 lower against 10 lowers, each of 100,000 entries; and with one lower
of 1,000 entries against one of 100,000.

Run (as root, from the repository):
    unshare -m --propagation private .venv/bin/python bench/diff_lowers.py [/scratch/dir]

Every big lower holds 100 directories of 1,000 files (lowers 2-10 are hard-linked copies of
the first, which costs no time to build and changes nothing for Diff). The upper is
what a typical build changes: 1,000 files modified in 10 of those directories, 1,000
new files in the first of them, 100 whiteouts in another. Target: Diff's time independent of the
size of the lowers, so 10 lowers cost about what one does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from _util import best_of, make_tree, require_private_namespace

from uniond.layers import diff


def main() -> None:
    require_private_namespace()
    base = tempfile.mkdtemp(prefix="uniond-bench-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        lowers = [os.path.join(base, f"lower{i}") for i in range(10)]
        make_tree(lowers[0], 100, 999, 64)
        for lower in lowers[1:]:
            subprocess.run(["cp", "-al", lowers[0], lower], check=True)
        upper = os.path.join(base, "upper")
        for d in range(10):
            directory = os.path.join(upper, f"d{d:04d}")
            os.makedirs(directory)
            for f in range(100):
                with open(os.path.join(directory, f"f{f:05d}"), "wb") as out:
                    out.write(b"changed")
        make_tree(upper, 1, 1000, 64, prefix="new")
        os.makedirs(os.path.join(upper, "d0099"))
        for f in range(100):
            os.mknod(os.path.join(upper, "d0099", f"f{f:05d}"), 0o600 | 0o020000, 0)  # whiteouts (D2)
        small = os.path.join(base, "small")
        # A small lower holding just what the upper touches (1,111 entries), so that both
        # report the same changes and only the size of the lower differs.
        make_tree(small, 10, 100, 64)
        os.makedirs(os.path.join(small, "d0099"))
        for f in range(100):
            with open(os.path.join(small, "d0099", f"f{f:05d}"), "wb") as out:
                out.write(b"x" * 64)
        n = []
        tiny = best_of(5, lambda: n.append(len(diff.changes(upper, [small]))))
        one = best_of(5, lambda: n.append(len(diff.changes(upper, lowers[:1]))))
        ten = best_of(5, lambda: n.append(len(diff.changes(upper, lowers))))
        print("lower entries each:        100,100")
        print(f"changes reported:          {n[0]} (small lower), {n[5]} (1 lower), {n[-1]} (10 lowers)")
        print(f"Diff, 1 lower:             {one * 1000:8.1f} ms")
        print(f"Diff, 10 lowers:           {ten * 1000:8.1f} ms")
        print(f"ratio 10 lowers / 1:       {ten / one:8.2f}x   (target: about 1x, independent of lower size)")
        print(f"Diff, 1 lower of 1,111:    {tiny * 1000:8.1f} ms")
        print(f"ratio 100,100 / 1,111:     {one / tiny:8.2f}x   (lower size alone)")
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
