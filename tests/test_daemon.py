"""uniond as its users meet it: a separate process on a real bus, real overlay mounts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest
from dbus_next import Variant
from harness import ROOT, CallError, is_mounted, run_as

from uniond import constants

E = constants.ERROR_PREFIX


def test_seed_example_merged_view_upper_and_diff(client, layers):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "c"]
    os.unlink(t / "merge/a")
    (t / "merge/d").touch()
    a = os.lstat(t / "upper/a")
    assert stat.S_ISCHR(a.st_mode) and a.st_rdev == 0, "deleting leaves a 0/0 whiteout in the upper"
    assert stat.S_ISREG(os.lstat(t / "upper/d").st_mode)
    assert os.path.exists(t / "image1/a"), "the lower is never touched"
    assert client.diff(path) == [("D", "/a"), ("A", "/d")]


def test_busctl_as_client(client, layers, bus):
    t = layers
    busctl = ["busctl", f"--address={bus.address}", "--json=short", "call", constants.BUS_NAME,
              constants.MANAGER_PATH, constants.MANAGER_INTERFACE]
    out = subprocess.run(busctl + ["Mount", "asssa{sv}", "2", str(t / "image2"), str(t / "image1"),
                                   str(t / "upper"), str(t / "merge"), "1", "description", "s", "via busctl"],
                         capture_output=True, text=True, check=True).stdout
    path = json.loads(out)["data"][0]
    assert path.startswith(constants.MOUNT_PATH_PREFIX + "/")
    (t / "merge/new").write_text("x")
    out = subprocess.run(busctl + ["Diff", "oa{sv}", path, "0"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["data"][0] == [["A", "/new"]]
    subprocess.run(busctl + ["Unmount", "oa{sv}", path, "0"], check=True)
    assert not is_mounted(t / "merge")
    assert (t / "upper/new").read_text() == "x"


def test_mount_object_properties_and_list(client, layers):
    t = layers
    before = time.time_ns() // 1000
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge", description="build 7")
    props = client.props(path)
    assert props["Id"] == path.rsplit("/", 1)[1]
    assert props["Mountpoint"] == str(t / "merge")
    assert props["LowerDirs"] == [str(t / "image2"), str(t / "image1")]
    assert props["UpperDir"] == str(t / "upper")
    assert os.path.dirname(props["WorkDir"]) == str(t), "the workdir goes beside the upper (M3)"
    assert props["ReadOnly"] is False
    assert props["Owner"] == 0
    assert before <= props["Created"] <= time.time_ns() // 1000
    assert {k: v.value for k, v in props["Options"].items()} == {"description": "build 7"}
    assert client.list() == [path]
    objects = client.managed_objects()
    assert list(objects) == [path]
    assert objects[path][constants.MOUNT_INTERFACE]["Mountpoint"].value == str(t / "merge")
    version = client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, "org.freedesktop.DBus.Properties",
                              "Get", "ss", [constants.MANAGER_INTERFACE, "Version"])[0].value
    assert version == constants.VERSION


def test_signals_are_sent_before_the_call_returns(client, layers):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    client.pump()
    added = [(m.member, m.path, m.body) for m in client.signals if m.member in ("MountAdded", "InterfacesAdded")]
    assert ("MountAdded", constants.MANAGER_PATH, [path, str(t / "merge")]) in added
    interfaces_added = [b for member, p, b in added if member == "InterfacesAdded"]
    assert interfaces_added and interfaces_added[0][0] == path
    assert all(p == constants.MANAGER_PATH for member, p, b in added), "ObjectManager signals come from its path"
    client.signals.clear()
    client.unmount(path)
    assert path not in client.list()
    client.pump()
    removed = [(m.member, m.body) for m in client.signals]
    assert ("MountRemoved", [path, str(t / "merge")]) in removed
    assert ("InterfacesRemoved", [path, [constants.MOUNT_INTERFACE]]) in removed


def test_unmount_removes_workdir_keeps_user_data(client, layers):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    workdir = client.props(path)["WorkDir"]
    assert os.path.isdir(workdir)
    (t / "merge/kept").write_text("data")
    client.unmount(path)
    assert not is_mounted(t / "merge")
    assert not os.path.exists(workdir)
    assert (t / "upper/kept").read_text() == "data"
    assert not [name for name in os.listdir(t) if "uniond-work" in name]
    with pytest.raises(CallError) as e:
        client.props(path)
    assert "UnknownObject" in e.value.name or "UnknownInterface" in e.value.name


def test_daemon_made_mountpoint_and_read_only_views(client, layers, daemon):
    t = layers
    one = client.mount([t / "image1"])  # one lower, read-only: a read-only bind (M4)
    mp = client.props(one)["Mountpoint"]
    assert mp.startswith(str(daemon.runtime_dir))
    assert sorted(os.listdir(mp)) == ["a", "b"]
    with pytest.raises(OSError):
        open(os.path.join(mp, "x"), "w")
    two = client.mount([t / "image2", t / "image1"])
    mp2 = client.props(two)["Mountpoint"]
    assert sorted(os.listdir(mp2)) == ["a", "b", "c"]
    assert client.props(two)["ReadOnly"] is True
    assert client.diff(two) == []
    client.unmount(one)
    client.unmount(two)
    assert not os.path.exists(mp) and not os.path.exists(mp2), "daemon-made mountpoints are removed"


def test_readonly_option_with_upper_shows_upper_changes(client, layers):
    t = layers
    rw = client.mount([t / "image1"], t / "upper", t / "merge")
    os.unlink(t / "merge/a")
    (t / "merge/z").touch()
    client.unmount(rw)
    ro = client.mount([t / "image1"], t / "upper", t / "merge", readonly=True)
    assert sorted(os.listdir(t / "merge")) == ["b", "z"]
    with pytest.raises(OSError):
        (t / "merge/new").touch()
    assert client.props(ro)["ReadOnly"] is True and client.props(ro)["WorkDir"] == ""
    assert client.diff(ro) == [("D", "/a"), ("A", "/z")]


@pytest.mark.parametrize(
    "case, expected, needle",
    [
        ("relative", "InvalidArgument", "relative"),
        ("missing", "InvalidArgument", "does not exist"),
        ("file", "InvalidArgument", "not a directory"),
        ("no_lowers", "InvalidArgument", "at least one"),
        ("unknown_option", "InvalidArgument", "'bogus'"),
        ("wrong_type", "InvalidArgument", "'readonly'"),
        ("upper_in_lower", "InvalidArgument", "overlap"),
        ("mountpoint_in_upper", "InvalidArgument", "overlap"),
        ("volatile_readonly", "InvalidArgument", "volatile"),
        ("workdir_other_fs", "InvalidArgument", "same filesystem"),
    ],
)
def test_mount_refuses_bad_input(client, layers, case, expected, needle):
    t = layers
    (t / "afile").touch()
    (t / "upper/sub").mkdir()
    (t / "image1/inner").mkdir()
    lowers, upper, mp, opts = [t / "image1"], t / "upper", t / "merge", {}
    if case == "relative":
        lowers = ["image1"]
    elif case == "missing":
        lowers = [t / "nope"]
    elif case == "file":
        upper = t / "afile"
    elif case == "no_lowers":
        lowers = []
    elif case == "unknown_option":
        opts = {"bogus": True}
    elif case == "wrong_type":
        opts = {"readonly": "yes"}
    elif case == "upper_in_lower":
        upper = t / "image1/inner"
    elif case == "mountpoint_in_upper":
        mp = t / "upper/sub"
    elif case == "volatile_readonly":
        upper, opts = "", {"volatile": True}
    elif case == "workdir_other_fs":
        (t / "otherfs").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(t / "otherfs")], check=True)
        opts = {"workdir": str(t / "otherfs")}
    with pytest.raises(CallError) as e:
        client.mount(lowers, upper, mp, **opts)
    assert e.value.name == f"{E}.{expected}"
    assert needle in e.value.text
    assert client.list() == [], "a refused Mount leaves nothing behind"
    assert not is_mounted(t / "merge")


def test_already_mounted_and_upper_in_use(client, layers):
    t = layers
    client.mount([t / "image1"], t / "upper", t / "merge")
    with pytest.raises(CallError) as e:
        client.mount([t / "image2"], "", t / "merge")
    assert e.value.name == f"{E}.AlreadyMounted"
    (t / "merge2").mkdir()
    with pytest.raises(CallError) as e:
        client.mount([t / "image2"], t / "upper", t / "merge2")
    assert e.value.name == f"{E}.InvalidArgument" and "already the upper" in e.value.text


def test_not_found_and_without_polkit_root_only(client, layers, bus, daemon):
    t = layers
    with pytest.raises(CallError) as e:
        client.unmount(f"{constants.MOUNT_PATH_PREFIX}/doesnotexist")
    assert e.value.name == f"{E}.NotFound"
    with pytest.raises(CallError) as e:
        client.diff("/some/other/object")
    assert e.value.name == f"{E}.NotFound"
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    # No polkit on this bus: an unprivileged user may call (bus policy) but neither
    # unmount root's mount nor mount anything: root only.
    out = run_as(65534, bus.address, [["unmount", path, {}], ["mount", [str(t / "image1")], {}],
                                      ["mount", [str(t / "image1")], {}]])
    assert [r[1] for r in out] == [f"{E}.NotAuthorized"] * 3
    assert "polkit is not running" in out[0][2]
    assert client.list() == [path]
    assert daemon.log().count("polkit is not on the bus") == 1, "logged once, not per call"


def test_busy_names_the_holder_and_lazy_detaches(client, layers):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    holder = subprocess.Popen(["sleep", "60"], cwd=t / "merge")
    try:
        with pytest.raises(CallError) as e:
            client.unmount(path)
        assert e.value.name == f"{E}.Busy"
        assert f"sleep (pid {holder.pid})" in e.value.text
        assert is_mounted(t / "merge") and client.list() == [path]
        client.unmount(path, lazy=True)
        # Detached: the object stays until its last user has gone (tests/test_detached.py).
        assert not is_mounted(t / "merge") and client.list() == [path]
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 12
    while client.list() != [] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.list() == []


def test_kernel_refusal_is_failed_without_traceback(client, layers):
    t = layers
    (t / "src/upper").mkdir(parents=True)
    (t / "ro").mkdir()
    subprocess.run(["mount", "--bind", str(t / "src"), str(t / "ro")], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(t / "ro")], check=True)
    with pytest.raises(CallError) as e:
        client.mount([t / "image2"], t / "ro/upper", t / "merge")  # an upper on a read-only mount
    assert e.value.name == f"{E}.Failed"
    assert "Traceback" not in e.value.text and "\n" not in e.value.text
    assert client.list() == []


def test_readiness_status_reload_and_stop(daemon, client, layers):
    t = layers
    ready = daemon.notify.wait_for("READY=1")
    assert "STATUS=0 mounts" in ready.split("\n")
    client.mount([t / "image1"], t / "upper", t / "merge")
    assert any("STATUS=1 mount" in m.split("\n") for m in daemon.notify.drain())
    mark = len(daemon.notify.drain())
    daemon.signal(signal.SIGHUP)
    reloading = daemon.notify.wait_for("RELOADING=1", since=mark)
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.split("\n"))
    daemon.notify.wait_for("READY=1", since=mark + 1)
    assert daemon.stop() == 0
    assert any("STOPPING=1" in m.split("\n") for m in daemon.notify.drain())
    assert is_mounted(t / "merge"), "stopping leaves mounts in place for their users"


def test_watchdog_pings_at_half_the_interval(daemon, layers):
    daemon.stop()
    daemon.extra_env = {"WATCHDOG_USEC": "400000"}
    daemon.start()
    mark = len(daemon.notify.drain())
    time.sleep(1.1)
    pings = [m for m in daemon.notify.drain()[mark:] if "WATCHDOG=1" in m.split("\n")]
    assert 3 <= len(pings) <= 8


def test_kill_9_then_restart_adopts_live_mounts(daemon, client, bus, layers):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge", description="survivor")
    (t / "merge/w").write_text("written before the crash")
    props = client.props(path)
    daemon.kill()
    assert is_mounted(t / "merge")
    daemon.start()
    assert client.list() == [path]
    assert client.props(path) == props
    assert client.diff(path) == [("A", "/w")]
    assert "1 adopted" in daemon.log()
    client.unmount(path)
    assert not os.path.exists(props["WorkDir"])


def test_mounts_removed_while_down_are_cleaned_and_upper_kept(daemon, client, layers):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    auto = client.mount([t / "image1"])
    workdir = client.props(path)["WorkDir"]
    auto_mp = client.props(auto)["Mountpoint"]
    os.unlink(t / "merge/a")
    (t / "merge/dir").mkdir()
    (t / "merge/dir/f").write_text("keep me")
    upper_before = sorted(os.path.relpath(os.path.join(d, f), t / "upper")
                          for d, dirs, files in os.walk(t / "upper") for f in dirs + files)
    daemon.kill()
    subprocess.run(["umount", str(t / "merge")], check=True)
    subprocess.run(["umount", auto_mp], check=True)
    daemon.start()
    assert client.list() == []
    assert not os.path.exists(workdir), "the stale workdir is cleaned"
    assert not os.path.exists(auto_mp), "the daemon-made mountpoint is removed"
    upper_after = sorted(os.path.relpath(os.path.join(d, f), t / "upper")
                         for d, dirs, files in os.walk(t / "upper") for f in dirs + files)
    assert upper_after == upper_before == ["a", "dir", "dir/f"]
    assert (t / "upper/dir/f").read_text() == "keep me"
    assert sorted(os.listdir(t / "image1")) == ["a", "b"]
    assert "2 cleaned" in daemon.log()


def test_cleanup_that_fails_is_kept_and_retried(daemon, client, layers):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    workdir = client.props(path)["WorkDir"]
    daemon.kill()
    subprocess.run(["umount", str(t / "merge")], check=True)
    (t / "users-file").write_text("x")
    os.rename(t / "users-file", os.path.join(workdir, "users-file"))  # not the daemon's to delete
    daemon.start()
    assert "1 kept for retry" in daemon.log()
    assert (os.path.join(workdir, "users-file"))
    os.unlink(os.path.join(workdir, "users-file"))
    daemon.stop()
    daemon.start()
    assert not os.path.exists(workdir)
    assert daemon.log().count("1 cleaned") == 1


def test_two_daemons_never_share_the_state(daemon, bus, tmp_path):
    from harness import Daemon, NotifySocket

    second = Daemon(bus=bus, state_dir=daemon.state_dir, runtime_dir=tmp_path / "run2",
                    notify=NotifySocket(tmp_path / "n2.sock"), log_path=tmp_path / "second.log")
    second.start(wait_ready=False)
    assert second.process.wait(timeout=15) != 0
    assert "another uniond holds the lock" in second.log()
    assert daemon.alive()


def test_bad_input_never_stops_the_daemon(client, daemon, layers):
    t = layers
    for args in (([], "", ""), (["/"], "/", "/"), ([str(t / "image1")] * 2, "", ""), (["\x01"], "", "")):
        with pytest.raises(CallError):
            client.mount(*args)
    with pytest.raises(CallError) as e:
        client.call("Mount", "asssa{sv}", [str(t / "image1")], "", "", {"readonly": Variant("a{sv}", {})})
    assert e.value.name == f"{E}.InvalidArgument"
    assert daemon.alive()
    assert client.list() == []


def _shape(element: ET.Element) -> tuple:
    return element.tag, sorted(element.attrib.items()), [_shape(child) for child in element]


def _interface_xml(xml: str, name: str) -> tuple:
    node = ET.fromstring(xml)
    (interface,) = [i for i in node.findall("interface") if i.get("name") == name]
    return _shape(interface)


@pytest.mark.parametrize("name", [constants.MANAGER_INTERFACE, constants.MOUNT_INTERFACE])
def test_checked_in_introspection_equals_live(client, layers, name):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    live = client.introspect(constants.MANAGER_PATH if name == constants.MANAGER_INTERFACE else path)
    checked_in = (ROOT / "dbus" / f"{name}.xml").read_text()
    assert _interface_xml(checked_in, name) == _interface_xml(live, name)
