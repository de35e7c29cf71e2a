"""ImportImage and ExportImage against the OCI tools, on the same image.

Run (as root, from the repository):
    unshare -m --propagation private .venv/bin/python bench/images.py [/scratch/dir]

The image is built by umoci in three layers (10,000 files of 1 KiB in 100 directories
plus 8 files of 8 MiB; then 1,000 of them changed and 100 deleted; then 2,000 added)
and written by skopeo as an oci-archive (gzip layers). Rows:

- ImportImage (the daemon's function, in this process, reading the archive from a
  pipe into an empty store, then again into the store that holds its layers)
  against `umoci unpack` of the same image from its layout (which also unpacks
  every layer, on top of each other) and `skopeo copy
  oci-archive: oci:` (which only moves the blobs, unpacking nothing).
- ExportImage of a mount of those layers (gzip, and uncompressed) into a pipe against
  `skopeo copy oci: oci-archive:` (which only moves finished blobs) and `umoci repack`
  of one changed file (which tars and gzips only the new layer).

Times are the best of 3 with warm caches; ratios are against the baselines measured
in the same run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from _util import make_tree, require_private_namespace

from uniond.layers import image, image_export
from uniond.layers.store import Store
from uniond.layers.stream import Source


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def best(setup, fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def build(base: str) -> tuple[str, str]:
    layout, bundle = os.path.join(base, "oci"), os.path.join(base, "bundle")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:bench")
    rootfs = os.path.join(bundle, "rootfs")
    for step in range(3):
        run("umoci", "unpack", "--image", f"{layout}:bench", bundle)
        if step == 0:
            make_tree(rootfs, 100, 100, 1024)
            make_tree(os.path.join(rootfs, "big"), 1, 8, 8 << 20)
        elif step == 1:
            for d in range(10):
                for f in range(100):
                    with open(os.path.join(rootfs, f"d{d:04d}", f"f{f:05d}"), "wb") as out:
                        out.write(os.urandom(1024))
            shutil.rmtree(os.path.join(rootfs, "d0099"))
        else:
            make_tree(os.path.join(rootfs, "added"), 20, 100, 1024)
        run("umoci", "repack", "--image", f"{layout}:bench", bundle)
        shutil.rmtree(bundle)
    archive = os.path.join(base, "bench.tar")
    run("skopeo", "--insecure-policy", "copy", f"oci:{layout}:bench", f"oci-archive:{archive}")
    return layout, archive


def import_image(archive: str, store_dir: str) -> list[str]:
    cat = subprocess.Popen(["cat", archive], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    store = Store(store_dir)
    try:
        result = image.import_image(Source(cat.stdout.fileno()), store)
    finally:
        store.close()
        cat.stdout.close()
        cat.wait()
    return [os.path.join(store_dir, "layers", d[7:]) for d in result.lowerdirs]


def export_image(dirs: list[str], compression: str) -> None:
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert cat.stdin is not None
    image_export.export_image(dirs, cat.stdin.fileno(), compression)
    cat.stdin.close()
    cat.wait()


def row(name: str, baseline: str, base_t: float, ours: float) -> None:
    print(f"  {name:<34} {ours * 1000:9.1f} ms   {baseline:<40} {base_t * 1000:9.1f} ms   ratio {ours / base_t:6.2f}x")


def main() -> None:
    require_private_namespace()
    base = tempfile.mkdtemp(prefix="uniond-bench-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        layout, archive = build(base)
        store, bundle, copied = (os.path.join(base, n) for n in ("store", "unpacked", "copied"))

        def fresh(*paths: str) -> None:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
            os.mkdir(store)

        print(f"image: {os.path.getsize(archive) / (1 << 20):.1f} MiB oci-archive, 3 gzip layers")
        ours = best(lambda: fresh(store), lambda: import_image(archive, store))
        umoci = best(lambda: fresh(store, bundle), lambda: run("umoci", "unpack", "--image", f"{layout}:bench", bundle))
        skopeo = best(lambda: fresh(store, copied),
                      lambda: run("skopeo", "--insecure-policy", "copy", f"oci-archive:{archive}", f"oci:{copied}:x"))
        row("ImportImage", "umoci unpack", umoci, ours)
        row("ImportImage", "skopeo copy oci-archive: oci:", skopeo, ours)
        fresh(store)
        import_image(archive, store)
        again = best(lambda: None, lambda: import_image(archive, store))
        row("ImportImage again (layers stored)", "skopeo copy oci-archive: oci:", skopeo, again)

        fresh(store)
        lowers = import_image(archive, store)
        dirs = list(reversed(lowers))
        out = os.path.join(base, "out.tar")
        copy = ("skopeo", "--insecure-policy", "copy", f"oci:{layout}:bench", f"oci-archive:{out}")
        for compression in ("gzip", "none"):
            ours = best(lambda: None, lambda c=compression: export_image(dirs, c))
            skopeo = best(lambda: os.path.exists(out) and os.unlink(out), lambda: run(*copy))
            row(f"ExportImage ({compression})", "skopeo copy oci: oci-archive:", skopeo, ours)

        def change() -> None:
            shutil.rmtree(bundle, ignore_errors=True)
            run("umoci", "unpack", "--image", f"{layout}:bench", bundle)
            with open(os.path.join(bundle, "rootfs", "changed"), "w") as f:
                f.write("x")

        repack = best(change, lambda: run("umoci", "repack", "--image", f"{layout}:bench", bundle))
        ours = best(lambda: None, lambda: export_image(dirs, "gzip"))
        row("ExportImage (gzip)", "umoci repack (one new layer)", repack, ours)
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
