"""Proof of fidelity: random work in a real merged view, then Diff, ExportDiff+ImportLayer
and Commit are checked against what a user sees.

Each example builds 2-3 random lowers, mounts them under an empty upper the way uniond
does (the engine, in this test process's private mount namespace), replays a random
sequence of operations in the merged view, and checks:

1. Diff equals an oracle computed from two kernel views alone, the merged view and
   the lowers-only view (tests/views.py: type, mode, owner, mtime, content, symlink
   target, user.* xattrs), without uniond/diff.py;
2. ImportLayer(ExportDiff) stacked on the same lowers, mounted read-only, shows
   exactly the merged view, hard-link groups included, and the tar reads back in GNU
   tar and tarfile without a complaint;
3. the same for Commit.

The 1,000 examples are fixed (derandomized), so every run checks the same ones. To look
for new failures, `./dev test -k property --hypothesis-profile=explore` (registered in
conftest.py); to replay such a run, add `--hypothesis-seed=N` with a seed of your choice.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from views import view, walk

from uniond.kernel import overlay as engine
from uniond.layers import diff, snapshot, stream
from uniond.layers import tar as layertar
from uniond.mounts.records import MountSpec

LEVELS = (("a", "b", "c", "d", "e"), ("x", "y", "z"), ("p", "q"))
PATHS = [
    "/".join(p)
    for p in [(a,) for a in LEVELS[0]]
    + [(a, b) for a in LEVELS[0] for b in LEVELS[1]]
    + [(a, b, c) for a in LEVELS[0] for b in LEVELS[1] for c in LEVELS[2]]
]
TARGETS = ("a", "x/p", "../c", "missing", "/nonexistent-uniond-target")  # never followed
PAST_NS = 1_600_000_000_123_456_789  # lowers are old; anything the test writes is newer

# ---- random lowers --------------------------------------------------------------------

_file = st.tuples(st.just("file"), st.binary(max_size=24), st.sampled_from([0o644, 0o600, 0o755]),
                  st.sampled_from([0, 1000]), st.sampled_from([None, b"v", b"\xff\x00"]))
_link = st.tuples(st.just("symlink"), st.sampled_from(TARGETS))


def _tree(level: int):
    names = st.sampled_from(LEVELS[level])
    if level == len(LEVELS) - 1:
        return st.dictionaries(names, st.one_of(_file, _link), max_size=2)
    child = st.one_of(_file, _link, st.tuples(st.just("dir"), st.sampled_from([0o755, 0o700]), _tree(level + 1)))
    return st.dictionaries(names, child, min_size=level == 0, max_size=4)


def _build(root: str, tree: dict) -> None:
    for name, node in tree.items():
        path = os.path.join(root, name)
        if node[0] == "file":
            _, data, mode, uid, xattr = node
            with open(path, "wb") as f:
                f.write(data)
            os.chown(path, uid, uid)
            os.chmod(path, mode)
            if xattr is not None:
                os.setxattr(path, "user.lower", xattr)
            os.utime(path, ns=(PAST_NS, PAST_NS))
        elif node[0] == "symlink":
            os.symlink(node[1], path)
            os.utime(path, ns=(PAST_NS, PAST_NS), follow_symlinks=False)
        else:
            os.mkdir(path)
            os.chmod(path, node[1])
            _build(path, node[2])
            os.utime(path, ns=(PAST_NS, PAST_NS))


# ---- random operations in the merged view ---------------------------------------------

# Each depth equally likely, so that operations often meet what the lowers hold.
_path = st.one_of(*(st.sampled_from([p for p in PATHS if p.count("/") == depth]) for depth in range(len(LEVELS))))
OPS = st.one_of(
    st.tuples(st.just("write"), _path, st.binary(max_size=40)),
    st.tuples(st.just("append"), _path, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), _path, st.integers(0, 12)),
    st.tuples(st.just("delete"), _path),
    st.tuples(st.just("rmdir"), _path),
    st.tuples(st.just("mkdir"), _path),
    st.tuples(st.just("replace"), _path),
    st.tuples(st.just("recreate-dir"), _path),
    st.tuples(st.just("rename"), _path, _path),
    st.tuples(st.just("chmod"), _path, st.sampled_from([0o600, 0o644, 0o700, 0o755, 0o4755])),
    st.tuples(st.just("chmod-same"), _path),
    st.tuples(st.just("chown"), _path, st.sampled_from([0, 1000, 1001])),
    st.tuples(st.just("symlink"), _path, st.sampled_from(TARGETS)),
    st.tuples(st.just("link"), _path, _path),
    st.tuples(st.just("setxattr"), _path, st.sampled_from(["user.a", "user.lower"]), st.binary(max_size=6)),
    st.tuples(st.just("rmxattr"), _path, st.sampled_from(["user.a", "user.lower"])),
    st.tuples(st.just("mkfifo"), _path),
)


def _through_symlink(root: str, rel: str) -> bool:
    """Operations never go through a symlink: its target may be outside the test."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        try:
            if stat.S_ISLNK(os.lstat(os.path.join(root, *parts[:i])).st_mode):
                return True
        except (FileNotFoundError, NotADirectoryError):
            return False
    return False


def _write(path: str, data: bytes, flags: int) -> None:
    # O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of waiting forever.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def apply(root: str, op: tuple) -> None:
    kind, rel = op[0], op[1]
    if _through_symlink(root, rel) or (kind in ("rename", "link") and _through_symlink(root, op[2])):
        return
    path = os.path.join(root, rel)
    try:
        if kind == "write":
            _write(path, op[2], os.O_TRUNC)
        elif kind == "append":
            _write(path, op[2], os.O_APPEND)
        elif kind == "truncate":
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                os.ftruncate(fd, op[2])
            finally:
                os.close(fd)
        elif kind == "delete":
            _remove(path)
        elif kind == "rmdir":
            os.rmdir(path)
        elif kind == "mkdir":
            os.mkdir(path)
        elif kind == "replace":  # a directory by a file, anything else by a directory
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
            _remove(path)
            if is_dir:
                _write(path, b"was a directory", 0)
            else:
                os.mkdir(path)
        elif kind == "recreate-dir":  # deleted, then a directory again: opaque (D3)
            _remove(path)
            os.mkdir(path)
        elif kind == "rename":
            os.rename(path, os.path.join(root, op[2]))
        elif kind in ("chmod", "chmod-same"):
            st_ = os.lstat(path)
            if not stat.S_ISLNK(st_.st_mode):
                mode = op[2] if kind == "chmod" else stat.S_IMODE(st_.st_mode)
                os.chmod(path, mode)  # chmod-same: a copy-up without a change (D5)
        elif kind == "chown":
            os.chown(path, op[2], op[2], follow_symlinks=False)
        elif kind == "symlink":
            os.symlink(op[2], path)
        elif kind == "link":
            os.link(path, os.path.join(root, op[2]), follow_symlinks=False)
        elif kind == "setxattr":
            os.setxattr(path, op[2], op[3], follow_symlinks=False)
        elif kind == "rmxattr":
            os.removexattr(path, op[2], follow_symlinks=False)
        elif kind == "mkfifo":
            os.mkfifo(path)
    except OSError:
        pass  # not applicable in this state (ENOENT, EEXIST, EXDEV for lower directories, ...)


# ---- the oracle -----------------------------------------------------------------------


def oracle(merged: str, lowers_only: str, replaced: set[str]) -> list[tuple[str, str]]:
    """The Diff a user would write down from the two views.

    A view cannot tell a changed directory from one deleted and re-created (an opaque
    directory, D3), which Diff reports as D then A (D4); ``replaced`` names those,
    taken from the Diff under test and checked here: each must exist in both views
    and be a directory now, everything below it is new (A), and whatever the lowers
    had below it is gone without being listed. Deletions are listed at their top
    (`docker diff` style): below a deleted path, or below what is no longer a
    directory, nothing more is listed.
    """
    m = {p: e for p, (e, _) in walk(merged).items()}
    lo = {p: e for p, (e, _) in walk(lowers_only).items()}
    out: list[tuple[str, str]] = []
    for path in sorted(set(m) | set(lo)):
        parent = os.path.dirname(path)
        if any(path.startswith(r + "/") for r in replaced):
            if path in m:
                out.append(("A", path))
            continue
        if path in replaced:
            if path in m and path in lo and m[path].kind == "dir":
                out += [("D", path), ("A", path)]
            continue
        if path in m and path not in lo:
            out.append(("A", path))
        elif path in lo and path not in m:
            if parent == "/" or (parent in m and m[parent].kind == "dir"):
                out.append(("D", path))
        elif m[path] != lo[path]:
            out.append(("C", path))
    order = {"D": 0, "C": 1, "A": 2}
    return sorted(out, key=lambda c: (c[1], order[c[0]]))


# ---- the property ---------------------------------------------------------------------


def _tar_reads_cleanly(path: str) -> None:
    with tarfile.open(path, errorlevel=2) as tf:
        names = [m.name for m in tf]
    assert len(names) == len(set(names)), "E2: no duplicate paths"
    gnu = subprocess.run(["tar", "-tvf", path], capture_output=True, text=True)
    assert gnu.returncode == 0 and gnu.stderr == "", gnu.stderr


_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]
FIXED = settings(derandomize=True, max_examples=1000, deadline=None, database=None,
                 suppress_health_check=_SLOW_IS_FINE)
EXPLORE = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=_SLOW_IS_FINE)
EXPLORING = getattr(settings, "_current_profile", None) == "explore"  # --hypothesis-profile=explore


@(EXPLORE if EXPLORING else FIXED)
@given(lower_trees=st.lists(_tree(0), min_size=2, max_size=3), ops=st.lists(OPS, max_size=25))
def test_diff_export_import_and_commit_are_exact(lower_trees, ops):
    base = tempfile.mkdtemp(prefix="uniond-property-")
    mounted: list[str] = []
    try:
        d = {name: os.path.join(base, name) for name in
             ("upper", "work", "merged", "lowers-only", "imported", "committed", "view-imported", "view-committed")}
        for path in d.values():
            os.mkdir(path)
        lowers = []
        for i, tree in enumerate(lower_trees):
            lowers.append(os.path.join(base, f"lower{i}"))
            os.mkdir(lowers[-1])
            _build(lowers[-1], tree)

        def mount(spec: MountSpec) -> None:
            engine.mount(spec)
            mounted.append(spec.mountpoint)

        mount(MountSpec(tuple(lowers), d["upper"], d["work"], d["merged"], readonly=False))
        mount(MountSpec(tuple(lowers), "", "", d["lowers-only"], readonly=True))
        for op in ops:
            apply(d["merged"], op)
        merged_view = view(d["merged"])

        # (1) Diff against the oracle.
        got = diff.changes(d["upper"], lowers)
        replaced = {p for k, p in got if k == "D" and ("A", p) in got}
        assert got == oracle(d["merged"], d["lowers-only"], replaced)
        # DiffInto's records (diff.write_into): the same changes, in the walk's order.
        with open(os.path.join(base, "records"), "wb+") as f:
            count = diff.write_into(d["upper"], lowers, stream.Sink(f.fileno()))
            f.seek(0)
            records = f.read().split(b"\0")
        assert records.pop() == b"" and count == len(records)
        assert sorted((r[:1].decode(), os.fsdecode(r[2:])) for r in records) == sorted(got)

        # (2) ImportLayer(ExportDiff), stacked on the same lowers.
        tar = os.path.join(base, "layer.tar")
        with open(tar, "wb") as f:
            written = layertar.export_diff(d["upper"], f.fileno()).bytes
        assert written == os.path.getsize(tar)
        _tar_reads_cleanly(tar)
        with open(tar, "rb") as f:
            layertar.import_layer(f.fileno(), d["imported"])
        mount(MountSpec((d["imported"], *lowers), "", "", d["view-imported"], readonly=True))
        assert view(d["view-imported"]) == merged_view

        # (3) Commit, stacked the same way.
        snapshot.commit(d["upper"], d["committed"])
        mount(MountSpec((d["committed"], *lowers), "", "", d["view-committed"], readonly=True))
        assert view(d["view-committed"]) == merged_view
    finally:
        for mountpoint in reversed(mounted):
            engine.unmount(mountpoint, lazy=True)
        shutil.rmtree(base)
