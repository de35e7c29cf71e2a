"""The engine, Diff and the journal without the bus: real overlays, in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from uniond.kernel import overlay as engine
from uniond.layers import diff
from uniond.mounts.journal import StateStore
from uniond.mounts.records import MountRecord, MountSpec


@pytest.fixture
def overlay(tmp_path):
    """A writable overlay of two lowers: lower1 (top) over lower2, yielding (paths, diff)."""
    p = {n: tmp_path / n for n in ("lower1", "lower2", "upper", "work", "merged")}
    for d in p.values():
        d.mkdir()
    (p["lower2"] / "dir").mkdir()
    (p["lower2"] / "dir/old").write_text("old")
    (p["lower2"] / "dir/sub").mkdir()
    (p["lower2"] / "dir/sub/deep").write_text("deep")
    (p["lower1"] / "file").write_text("file")
    (p["lower1"] / "exe").write_text("#!/bin/sh\n")
    os.chmod(p["lower1"] / "exe", 0o755)
    spec = MountSpec((str(p["lower1"]), str(p["lower2"])), str(p["upper"]), str(p["work"]), str(p["merged"]),
                     readonly=False)
    engine.mount(spec)
    try:
        yield p["merged"], lambda: diff.changes(spec.upperdir, spec.lowerdirs)
    finally:
        engine.unmount(spec.mountpoint)


def test_copy_up_without_a_real_change_is_no_change(overlay):
    merged, changes = overlay
    os.chmod(merged / "exe", 0o700)
    os.chmod(merged / "exe", 0o755)  # D5: chmod back
    assert changes() == []
    os.chmod(merged / "exe", 0o700)
    assert changes() == [("C", "/exe")]


def test_modify_add_delete_in_a_lower_only_directory(overlay):
    merged, changes = overlay
    (merged / "dir/old").write_text("new content")
    (merged / "dir/sub/added").write_text("x")
    os.unlink(merged / "dir/sub/deep")
    assert changes() == [("C", "/dir/old"), ("C", "/dir/sub"), ("A", "/dir/sub/added"), ("D", "/dir/sub/deep")]


def test_replaced_directory_is_deleted_then_added_and_hides_the_lower(overlay):
    merged, changes = overlay
    shutil.rmtree(merged / "dir")
    (merged / "dir").mkdir()
    (merged / "dir/fresh").write_text("f")
    assert diff.is_opaque(str(merged.parent / "upper/dir"))
    assert changes() == [("D", "/dir"), ("A", "/dir"), ("A", "/dir/fresh")]


def test_type_change_file_to_directory(overlay):
    merged, changes = overlay
    os.unlink(merged / "file")
    (merged / "file").mkdir()
    (merged / "file/inside").write_text("i")
    # The new directory is opaque over the lower file: D4 reports it deleted, then added.
    assert changes() == [("D", "/file"), ("A", "/file"), ("A", "/file/inside")]


def test_read_only_mount_of_one_layer_is_a_read_only_bind(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only/x").write_text("x")
    (tmp_path / "mp").mkdir()
    spec = MountSpec((str(tmp_path / "only"),), "", "", str(tmp_path / "mp"), readonly=True)
    engine.mount(spec)
    try:
        assert (tmp_path / "mp/x").read_text() == "x"
        with pytest.raises(OSError):
            (tmp_path / "mp/y").write_text("y")
        assert engine.is_mount_root(str(tmp_path / "mp"))
    finally:
        engine.unmount(str(tmp_path / "mp"))
    assert not engine.is_mount_root(str(tmp_path / "mp"))


def test_clear_workdir_removes_only_kernel_entries(tmp_path):
    work = tmp_path / "w"
    (work / "work/incompat").mkdir(parents=True)
    (work / "work/incompat/volatile").mkdir()
    os.chmod(work / "work", 0)  # C5: the kernel leaves mode 000
    engine.clear_workdir(str(work), remove_dir=True)
    assert not work.exists()
    (work / "work").mkdir(parents=True)
    (work / "mine").write_text("user data")
    with pytest.raises(OSError):
        engine.clear_workdir(str(work), remove_dir=True)
    assert (work / "mine").read_text() == "user data"
    assert not (work / "work").exists()


def test_clear_workdir_never_crosses_a_mount(tmp_path):
    work = tmp_path / "w"
    (work / "work/inner").mkdir(parents=True)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/file").write_text("keep")
    subprocess.run(["mount", "--bind", str(tmp_path / "precious"), str(work / "work/inner")], check=True)
    try:
        with pytest.raises(OSError):
            engine.clear_workdir(str(work), remove_dir=True)
    finally:
        subprocess.run(["umount", str(work / "work/inner")], check=True)
    assert (tmp_path / "precious/file").read_text() == "keep"


def test_empty_directory_keeps_the_root_follows_no_symlink_and_crosses_no_mount(tmp_path):
    """A failed ImportLayer or Commit is undone by it (C4): what the caller may have
    put below its destdir is removed as it is, never followed or crossed."""
    root, outside = tmp_path / "dest", tmp_path / "outside"
    (root / "a/b").mkdir(parents=True)
    (root / "a/b/f").write_text("x")
    os.chmod(root / "a", 0)  # as a tar may leave it
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (root / "link").symlink_to(outside)
    engine.empty_directory(str(root))
    assert root.is_dir() and not list(root.iterdir())
    assert (outside / "keep").read_text() == "keep"
    (root / "inner").mkdir()
    subprocess.run(["mount", "--bind", str(outside), str(root / "inner")], check=True)
    try:
        with pytest.raises(OSError):
            engine.empty_directory(str(root))
    finally:
        subprocess.run(["umount", str(root / "inner")], check=True)
    assert (outside / "keep").read_text() == "keep"


def _record(mount_id: str) -> MountRecord:
    return MountRecord(id=mount_id, spec=MountSpec(("/l",), "/u", "/w", "/m", readonly=False),
                       owner=0, created_us=1, boot_id="b")


def test_journal_replays_puts_and_drops_and_survives_a_torn_line(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    store.lock()
    store.intend(_record("a"))
    store.intend(_record("b"))
    store.drop("a")
    store.close()
    with open(store.path, "a") as f:
        f.write('{"put": {"id": "c", "spec"')  # a crash in the middle of a line
    again = StateStore(str(tmp_path / "state"))
    records = again.load()
    assert list(records) == ["b"] and records["b"] == _record("b")
    again.compact(records)
    lines = open(again.path).read().splitlines()
    assert [json.loads(line)["put"]["id"] for line in lines] == ["b"]


def test_diff_of_an_upper_made_by_other_tools(tmp_path):
    """Uppers not written by this kernel: xattr whiteouts (D2), FIFOs, devices, sockets (D8)."""
    import socket

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "x-dir", lower / "plain-dir", upper / "x-dir", upper / "plain-dir"):
        d.mkdir(parents=True)
    (lower / "x-dir/gone").write_text("g")
    (lower / "wh").write_text("w")
    # D2's newer form: an empty file with the whiteout xattr, in a directory marked "x".
    os.setxattr(upper / "x-dir", "trusted.overlay.opaque", b"x")
    (upper / "x-dir/gone").touch()
    os.setxattr(upper / "x-dir/gone", "trusted.overlay.whiteout", b"")
    (upper / "x-dir/empty").touch()
    # The same xattr outside an "x" directory is no whiteout (the kernel ignores it too).
    (upper / "plain-dir/zero").touch()
    os.setxattr(upper / "plain-dir/zero", "trusted.overlay.whiteout", b"")
    os.mknod(upper / "wh", 0o600 | 0o020000, 0)  # the classic 0/0 whiteout
    os.mknod(upper / "null", 0o600 | 0o020000, os.makedev(1, 3))  # a device, not a whiteout
    os.mkfifo(upper / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(upper / "sock"))  # sockets are not part of a layer
    assert diff.changes(str(upper), [str(lower)]) == [
        ("A", "/fifo"), ("A", "/null"), ("C", "/plain-dir"), ("A", "/plain-dir/zero"), ("D", "/wh"),
        ("C", "/x-dir"), ("A", "/x-dir/empty"), ("D", "/x-dir/gone"),
    ]
