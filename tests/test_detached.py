"""Lazy Unmount keeps the detached overlay whole for the processes still inside it (M12),
and cleans up after the last of them has gone — also across a restart of the daemon."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from harness import CallError, is_mounted

from uniond import constants

E = constants.ERROR_PREFIX


def _shell_inside(directory) -> subprocess.Popen:
    """A shell whose cwd is in the mount, that appends to f and removes g when told."""
    return subprocess.Popen(
        ["sh", "-c", "read go; echo appended >> f && rm -f g && echo ok; read stop"],
        cwd=directory, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def _wait_gone(client, path, timeout=12.0) -> float:
    started = time.monotonic()
    while path in client.list():
        assert time.monotonic() - started < timeout, f"{path} still listed after {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - started


def test_lazy_unmount_keeps_the_detached_overlay_working(client, layers, daemon):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    workdir = client.props(path)["WorkDir"]
    (t / "merge/f").write_text("before\n")
    (t / "merge/g").write_text("to remove")
    shell = _shell_inside(t / "merge")
    try:
        client.unmount(path, lazy=True)
        assert not is_mounted(t / "merge")
        # The object stays, says so, and is listed everywhere.
        assert client.list() == [path]
        assert client.props(path)["Detached"] is True
        objects = client.managed_objects()
        assert objects[path][constants.MOUNT_INTERFACE]["Detached"].value is True
        assert os.path.isdir(workdir)
        # The shell inside keeps working: append and rm through the detached overlay.
        shell.stdin.write("go\n")
        shell.stdin.flush()
        assert shell.stdout.readline().strip() == "ok"
        # Its upper and workdir stay claimed: a new Mount gets Busy naming the shell.
        for kwargs in ({}, {"workdir": workdir}):
            with pytest.raises(CallError) as e:
                client.mount([t / "image2"], t / "upper", **kwargs)
            assert e.value.name == f"{E}.Busy", e.value.text
            assert f"sh (pid {shell.pid})" in e.value.text
        (t / "upper2").mkdir()
        with pytest.raises(CallError) as e:
            client.mount([t / "image2"], t / "upper2", workdir=workdir)
        assert e.value.name == f"{E}.Busy"
        # An Unmount without lazy says who still holds it; with lazy it is already done.
        with pytest.raises(CallError) as e:
            client.unmount(path)
        assert e.value.name == f"{E}.Busy" and f"sh (pid {shell.pid})" in e.value.text
        client.unmount(path, lazy=True)
        # The mountpoint it left may be mounted on again.
        other = client.mount([t / "image2"], "", t / "merge")
        client.unmount(other)
    finally:
        shell.stdin.close()
        shell.wait(timeout=10)
    waited = _wait_gone(client, path)
    assert waited < 10
    assert not os.path.exists(workdir)
    assert (t / "upper/f").read_text() == "before\nappended\n"
    assert not (t / "upper/g").exists()
    client.pump()
    removed = [m.body for m in client.signals if m.member == "MountRemoved"]
    assert [path, str(t / "merge")] in removed
    assert "Traceback" not in daemon.log()
    # Now the upper is free again.
    client.unmount(client.mount([t / "image2"], t / "upper", t / "merge"))


def test_detached_mount_survives_a_restart_and_is_cleaned_after(client, layers, daemon):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper")
    props = client.props(path)
    shell = _shell_inside(props["Mountpoint"])
    try:
        client.unmount(path, lazy=True)
        daemon.kill()
        daemon.start()
        assert client.list() == [path]
        assert client.props(path)["Detached"] is True
        assert os.path.isdir(props["WorkDir"]) and os.path.isdir(props["Mountpoint"])
        shell.stdin.write("go\n")
        shell.stdin.flush()
        assert shell.stdout.readline().strip() == "ok"
        assert (t / "upper/f").read_text() == "appended\n"
    finally:
        shell.stdin.close()
        shell.wait(timeout=10)
    _wait_gone(client, path)
    assert not os.path.exists(props["WorkDir"])
    assert not os.path.exists(props["Mountpoint"]), "the daemon-made mountpoint is removed"
    assert "Traceback" not in daemon.log()


def test_a_crash_right_after_the_lazy_detach_still_spares_its_users(client, layers, daemon):
    """Killed between umount2(MNT_DETACH) and the record saying "detached": the next
    start finds the mount in no table but held by a process, and adopts it as detached."""
    t = layers
    daemon.stop()
    daemon.extra_env = {"UNIOND_TEST_CRASH_AT": "unmount.unmounted"}
    daemon.start()
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    workdir = client.props(path)["WorkDir"]
    shell = _shell_inside(t / "merge")
    try:
        with pytest.raises(CallError):
            client.unmount(path, lazy=True)  # the daemon dies on the way
        daemon.process.wait(timeout=10)
        daemon.extra_env = {}
        daemon.start()
        assert not is_mounted(t / "merge")
        assert client.list() == [path] and client.props(path)["Detached"] is True
        shell.stdin.write("go\n")
        shell.stdin.flush()
        assert shell.stdout.readline().strip() == "ok"
        assert os.path.isdir(workdir)
    finally:
        shell.stdin.close()
        shell.wait(timeout=10)
    _wait_gone(client, path)
    assert not os.path.exists(workdir)
    assert (t / "upper/f").read_text() == "appended\n"
