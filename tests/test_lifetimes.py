"""Mounts bound to their caller's connection or session go when it ends (the unit case
runs under PID-1 systemd in tests/test_systemd_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from harness import ROOT, CallError, Client, LogindMock, is_mounted

from uniond import constants

E = constants.ERROR_PREFIX


class BoundClient:
    """A real client process holding a mount bound to it."""

    def __init__(self, address: str, bind: str, mountpoint, *lowers) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "bound_client.py"), address, bind, str(mountpoint),
             *map(str, lowers)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        self.result = json.loads(self.process.stdout.readline())

    @property
    def path(self) -> str:
        assert self.result[0] == "ok", self.result
        return self.result[1]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def wait_gone(client: Client, path: str, mountpoint, seconds: float = 10) -> float:
    started = time.monotonic()
    while path in client.list() or is_mounted(mountpoint):
        assert time.monotonic() - started < seconds, f"{path} still there after {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture
def logind(bus):
    mock = LogindMock(bus.address)
    yield mock
    mock.stop()


def test_mount_bound_to_its_caller_goes_when_the_caller_is_killed(client, bus, daemon, layers, tmp_path):
    t = layers
    (t / "m2").mkdir()
    holder = BoundClient(bus.address, "caller", t / "merge", t / "image2", t / "image1")
    other = BoundClient(bus.address, "caller", t / "m2", t / "image1")
    props = client.props(holder.path)
    assert props["BoundTo"].startswith("caller::1.")
    assert {k: v.value for k, v in props["Options"].items()} == {"bind": "caller"}
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "c"]
    unbound = client.mount([t / "image1"])
    assert client.props(unbound)["BoundTo"] == ""
    client.signals.clear()
    holder.kill()
    waited = wait_gone(client, holder.path, t / "merge")
    print(f"caller killed -> mount removed in {waited * 1000:.0f} ms")
    client.pump()
    assert ("MountRemoved", [holder.path, str(t / "merge")]) in [(m.member, m.body) for m in client.signals]
    mount_id = holder.path.rsplit("/", 1)[1]
    lines = [line for line in daemon.log().splitlines() if f"mount {mount_id}: unmounted" in line]
    assert lines and f"bound to {props['BoundTo']}: its caller" in lines[0] and "left the bus" in lines[0]
    assert sorted(client.list()) == sorted([other.path, unbound])
    other.kill()
    wait_gone(client, other.path, t / "m2")


def test_busy_bound_mount_is_detached_lazily(client, bus, daemon, layers):
    t = layers
    holder = BoundClient(bus.address, "caller", t / "merge", t / "image2", t / "image1")
    inside = subprocess.Popen(["sleep", "60"], cwd=t / "merge")
    try:
        holder.kill()
        started = time.monotonic()
        while not client.props(holder.path)["Detached"]:
            assert time.monotonic() - started < 10, "not detached after its caller was killed"
            time.sleep(0.05)
        # Off the mountpoint at once; the process inside keeps its whole view.
        assert not is_mounted(t / "merge") and os.listdir(t / "merge") == []
        assert sorted(os.listdir(f"/proc/{inside.pid}/cwd")) == ["a", "b", "c"]
        assert "busy, detaching it lazily" in daemon.log()
    finally:
        inside.kill()
        inside.wait()
    wait_gone(client, holder.path, t / "merge")  # the object goes with the last user


def test_binding_survives_a_restart_unless_the_peer_went(client, bus, daemon, layers):
    t = layers
    (t / "m2").mkdir()
    stays = BoundClient(bus.address, "caller", t / "merge", t / "image2", t / "image1")
    goes = BoundClient(bus.address, "caller", t / "m2", t / "image1")
    bound_to = client.props(stays.path)["BoundTo"]
    daemon.stop()
    goes.kill()  # while uniond is not running
    daemon.start()
    again = Client(bus.address)
    try:
        assert again.list() == [stays.path]
        assert again.props(stays.path)["BoundTo"] == bound_to
        assert not is_mounted(t / "m2") and is_mounted(t / "merge")
        assert "while uniond was not running" in daemon.log()
        stays.kill()
        wait_gone(again, stays.path, t / "merge")
    finally:
        again.close()


def test_session_binding_ends_with_the_session(client, bus, logind, layers):
    t = layers
    (t / "m2").mkdir()
    logind.add_session("c1")
    logind.add_session("c2")
    logind.every_pid_in("c1")
    one = BoundClient(bus.address, "session", t / "merge", t / "image2", t / "image1")
    logind.every_pid_in("c2")
    two = BoundClient(bus.address, "session", t / "m2", t / "image1")
    assert client.props(one.path)["BoundTo"] == "session:c1"
    assert client.props(two.path)["BoundTo"] == "session:c2"
    logind.close_session("c1")  # logout, processes left: State "closing"
    wait_gone(client, one.path, t / "merge")
    assert client.list() == [two.path]
    logind.remove_session("c2")  # SessionRemoved
    wait_gone(client, two.path, t / "m2")
    # The client processes are still alive: it was the session that ended.
    assert one.process.poll() is None and two.process.poll() is None
    one.kill()
    two.kill()


def test_bind_refusals(client, bus, logind, layers):
    t = layers
    logind.every_pid_in(None)
    cases = [
        ("session", f"{E}.InvalidArgument", "runs in no session"),
        ("unit", f"{E}.Failed", "systemd is not on the bus"),
        ("unit:", f"{E}.InvalidArgument", "is not one of"),
        ("caller:x", f"{E}.InvalidArgument", "is not one of"),
        ("forever", f"{E}.InvalidArgument", "is not one of"),
    ]
    for word, name, needle in cases:
        with pytest.raises(CallError) as e:
            client.mount([t / "image1"], "", t / "merge", bind=word)
        assert e.value.name == name and needle in e.value.text, (word, e.value)
    assert client.list() == [] and not is_mounted(t / "merge")
