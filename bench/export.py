"""ExportDiff against `tar -cf - -C upper .`, both into a pipe drained by cat(1).

Run (as root, from the repository):
    unshare -m --propagation private .venv/bin/python bench/export.py [/scratch/dir]

Two uppers: 100,000 small files (1 KiB, in 1,000 directories), and 1 GiB in 64 files of
16 MiB. ExportDiff runs in this process, through the same function the daemon runs in
its worker thread (the D-Bus call around it costs about a millisecond). Caches are warm
in both. Target: ExportDiff <= 1.2x tar.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from _util import best_of, make_tree, require_private_namespace

from uniond.layers import tar as layertar


def tar(upper: str) -> None:
    subprocess.run(f"tar -cf - -C {upper} . | cat >/dev/null", shell=True, check=True)


def export(upper: str, compression: str = "none") -> None:
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert cat.stdin is not None
    layertar.export_diff(upper, cat.stdin.fileno(), compression)
    cat.stdin.close()
    cat.wait()


def main() -> None:
    require_private_namespace()
    base = tempfile.mkdtemp(prefix="uniond-bench-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        small, big = os.path.join(base, "small"), os.path.join(base, "big")
        entries = make_tree(small, 1000, 99, 1024)
        make_tree(big, 1, 64, 16 << 20)
        for name, upper in ((f"{entries} entries of 1 KiB", small), ("1 GiB in 64 files", big)):
            base_t = best_of(3, lambda upper=upper: tar(upper))
            ours = best_of(3, lambda upper=upper: export(upper))
            print(f"{name}:")
            print(f"  tar -cf - -C upper .       {base_t * 1000:8.1f} ms")
            print(f"  ExportDiff                 {ours * 1000:8.1f} ms")
            print(f"  ratio ExportDiff / tar     {ours / base_t:8.2f}x   (target <= 1.2x)")
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
