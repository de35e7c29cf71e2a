"""Update: a live mount's lowers replaced with no empty moment, the upper never shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from dbus_next import Variant
from harness import ROOT, CallError, is_mounted

from uniond import constants

E = constants.ERROR_PREFIX


def update(client, path: str, lowers, **options) -> None:
    opts = {k: Variant("b", v) for k, v in options.items()}
    client.call("Update", "oasa{sv}", path, [str(p) for p in lowers], opts)


class Watcher:
    """Another process listing the mountpoint as fast as it can."""

    def __init__(self, directory, stop_file) -> None:
        self.stop_file = stop_file
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "watcher.py"), str(directory), str(stop_file)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout.readline().strip() == "started"

    def stop(self) -> dict:
        self.stop_file.touch()
        out, _ = self.process.communicate(timeout=30)
        result = json.loads(out)
        return {"listings": result["listings"], "errors": result["errors"],
                "seen": {tuple(names): n for names, n in result["seen"]}}


def layer(tmp_path, name: str, *files: str):
    d = tmp_path / name
    d.mkdir()
    for f in files:
        (d / f).write_text(f"{name}/{f}")
    return d


def test_update_never_shows_an_empty_mountpoint(client, layers, tmp_path):
    t = layers
    v1 = layer(tmp_path, "v1", "app", "one")
    v2 = layer(tmp_path, "v2", "app", "two")
    path = client.mount([v1, t / "image1"], t / "upper", t / "merge")
    watcher = Watcher(t / "merge", tmp_path / "stop")
    time.sleep(0.2)
    for _ in range(10):
        update(client, path, [v2, t / "image1"])
        update(client, path, [v1, t / "image1"])
    time.sleep(0.2)
    result = watcher.stop()
    print(f"watcher: {result['listings']} listings during 20 Updates")
    assert result["errors"] == {}
    assert set(result["seen"]) == {("a", "app", "b", "one"), ("a", "app", "b", "two")}, result["seen"]
    assert () not in result["seen"]
    assert result["seen"][("a", "app", "b", "two")] > 0


def test_update_keeps_object_upper_and_properties_and_signals(client, layers, tmp_path):
    t = layers
    v2 = layer(tmp_path, "v2", "new")
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge", description="app")
    (t / "merge/mine").write_text("kept")
    before = client.props(path)
    client.signals.clear()
    update(client, path, [v2, t / "image1"])
    after = client.props(path)
    assert after["LowerDirs"] == [str(v2), str(t / "image1")]
    assert {k: v for k, v in after.items() if k != "LowerDirs"} == {
        k: v for k, v in before.items() if k != "LowerDirs"
    }
    assert client.list() == [path]
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "mine", "new"]
    assert (t / "merge/mine").read_text() == "kept"
    (t / "merge/later").write_text("written through the new stack")
    assert (t / "upper/later").read_text() == "written through the new stack"
    client.pump()
    changed = [m for m in client.signals if m.member == "PropertiesChanged" and m.path == path]
    assert changed, [m.member for m in client.signals]
    interface, values, _ = changed[-1].body
    assert interface == constants.MOUNT_INTERFACE
    assert values["LowerDirs"].value == [str(v2), str(t / "image1")]
    # One overlay at the mountpoint, on the same upper: the old one is gone.
    with open("/proc/self/mountinfo") as f:
        at = [line for line in f if line.split()[4] == str(t / "merge")]
    assert len(at) == 1 and f"upperdir={t / 'upper'}" in at[0]
    client.unmount(path)
    assert not is_mounted(t / "merge")
    assert not [name for name in os.listdir(t) if "uniond-work" in name]


def test_update_read_only_and_one_layer_mounts(client, layers, tmp_path):
    t = layers
    v2 = layer(tmp_path, "v2", "z")
    path = client.mount([t / "image1"])  # a read-only bind of one layer (M4)
    mp = client.props(path)["Mountpoint"]
    update(client, path, [v2, t / "image1"])
    assert sorted(os.listdir(mp)) == ["a", "b", "z"]
    update(client, path, [v2])
    assert os.listdir(mp) == ["z"]
    assert client.props(path)["ReadOnly"] is True


def test_old_stack_is_read_only_for_those_still_inside(client, layers, tmp_path):
    t = layers
    v2 = layer(tmp_path, "v2", "new")
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    # A process sitting in the old overlay (its cwd there) while the stack changes.
    inside = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; sys.stdin.readline()\n"
         "try:\n open('x', 'w'); print('wrote')\nexcept OSError as e: print(e.errno)\n"
         "print(sorted(os.listdir('.')))"],
        cwd=t / "merge", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    update(client, path, [v2, t / "image1"])
    out, _ = inside.communicate("go\n", timeout=10)
    errno_line, listing = out.splitlines()
    assert errno_line == "30", "the old overlay is read-only (EROFS), so the upper has one writer (M7)"
    assert listing == "['a', 'b']", "the old view stays whole for whoever is still in it"
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "new"]
    (t / "merge/y").write_text("y")  # the new stack is writable


def test_update_refusals_leave_the_mount_as_it_was(client, layers, tmp_path):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    cases = [
        ([tmp_path / "missing"], "InvalidArgument", "lowerdirs[0]"),
        ([], "InvalidArgument", "at least one"),
        (["relative"], "InvalidArgument", "lowerdirs[0]"),
        ([t / "image1", t / "image1"], "InvalidArgument", "twice"),
        ([t / "upper"], "InvalidArgument", "overlap"),
        ([t / f"l{i}" for i in range(501)], "InvalidArgument", "at most 500"),
    ]
    for lowers, name, needle in cases:
        with pytest.raises(CallError) as e:
            update(client, path, lowers)
        assert e.value.name == f"{E}.{name}", (lowers[:2], e.value)
        assert needle in e.value.text
    with pytest.raises(CallError) as e:
        client.call("Update", "oasa{sv}", path, [str(t / "image1")], {"lazy": Variant("b", True)})
    assert e.value.name == f"{E}.InvalidArgument" and "unknown option 'lazy'" in e.value.text
    with pytest.raises(CallError) as e:
        update(client, constants.MOUNT_PATH_PREFIX + "/nosuch", [t / "image1"])
    assert e.value.name == f"{E}.NotFound"
    assert client.props(path)["LowerDirs"] == [str(t / "image2"), str(t / "image1")]
    (t / "merge/still-writable").write_text("x")


def test_kernel_refusal_is_failed_and_the_old_mount_stays_writable(client, layers, tmp_path):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    # A lower inside an overlay that is itself stacked on an overlay: the kernel stacks
    # filesystems at most two deep, so the new stack would be three.
    deep = tmp_path / "deep"
    for name in ("l", "m1", "m2"):
        (deep / name).mkdir(parents=True)
    (deep / "l/sub").mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={deep / 'l'}:{t / 'image1'}",
                    str(deep / "m1")], check=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={deep / 'm1'}:{t / 'image2'}",
                    str(deep / "m2")], check=True)
    with pytest.raises(CallError) as e:
        update(client, path, [deep / "m2/sub", t / "image1"])
    assert e.value.name == f"{E}.Failed", e.value
    assert "kernel refused" in e.value.text and "\n" not in e.value.text
    assert client.props(path)["LowerDirs"] == [str(t / "image2"), str(t / "image1")]
    (t / "merge/still-writable").write_text("x")
    assert (t / "upper/still-writable").exists()


def test_update_asks_polkit_like_mount_and_unmount(client, polkit, bus, user_dirs, layers):
    from harness import run_as

    t, nobody = user_dirs, 65534
    polkit.set_allowed([constants.ACTION_MOUNT])
    [(ok, path)] = run_as(nobody, bus.address, [["mount", [str(t / "image1")], str(t / "upper"), str(t / "merge"), {}]])
    assert ok == "ok"
    # The owner, with lowers it can read: the mount action, with the new lowers as details.
    [result] = run_as(nobody, bus.address, [["call", "Update", "oasa{sv}", path, [str(t / "image2")], {}, {}]])
    assert result[0] == "ok", result
    call = polkit.calls()[-1]
    assert call["action"] == constants.ACTION_MOUNT and call["details"]["lowerdirs"] == str(t / "image2")
    # A lower the caller cannot read: mount-any, refused; the mount stays as it was.
    [result] = run_as(nobody, bus.address, [["call", "Update", "oasa{sv}", path, [str(layers / "image1")], {}, {}]])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_MOUNT_ANY
    assert client.props(path)["LowerDirs"] == [str(t / "image2")]
    # Someone else's mount: unmount-other first.
    root_mount = client.mount([layers / "image1"], layers / "upper", layers / "merge")
    [result] = run_as(nobody, bus.address, [["call", "Update", "oasa{sv}", root_mount, [str(t / "image2")], {}, {}]])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_UNMOUNT_OTHER


def test_update_with_a_file_open_for_writing_is_busy(client, layers):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    writer = subprocess.Popen([sys.executable, "-c", "import sys; f = open('w', 'w'); sys.stdin.read()"],
                              cwd=t / "merge", stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not (t / "upper/w").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(CallError) as e:
            update(client, path, [t / "image2"])
        assert e.value.name == f"{E}.Busy" and f"(pid {writer.pid})" in e.value.text, e.value
    finally:
        writer.communicate("", timeout=10)
    assert client.props(path)["LowerDirs"] == [str(t / "image1")]
    (t / "merge/still-writable").write_text("x")
    update(client, path, [t / "image2"])
    assert sorted(os.listdir(t / "merge")) == ["c", "still-writable", "w"]


def test_updated_mount_is_adopted_with_its_new_lowers_after_a_crash(daemon, client, layers, tmp_path):
    t = layers
    v2 = layer(tmp_path, "v2", "new")
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    update(client, path, [v2, t / "image1"])
    props = client.props(path)
    daemon.kill()
    daemon.start()
    assert client.list() == [path]
    assert client.props(path) == props
    assert "1 adopted" in daemon.log()
    update(client, path, [t / "image2", t / "image1"])  # its mount id was recorded too
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "c"]
