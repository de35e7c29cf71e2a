"""Declared mounts: mounts.d files brought up before READY=1, kept up, and edited live."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from harness import Client, is_mounted, run_as
from test_update import Watcher

from uniond import constants
from uniond.mounts.declfiles import mount_id

E = constants.ERROR_PREFIX
NOBODY = 65534


def declare(directory, name: str, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.toml").write_text(text)


def toml(lowers, upper="", mountpoint="", options: str = "") -> str:
    lines = [f"lowerdirs = [{', '.join(repr(str(p)) for p in lowers)}]"]
    if upper:
        lines.append(f"upperdir = '{upper}'")
    if mountpoint:
        lines.append(f"mountpoint = '{mountpoint}'")
    if options:
        lines += ["", "[options]", options]
    return "\n".join(lines) + "\n"


def path_of(name: str) -> str:
    return f"{constants.MOUNT_PATH_PREFIX}/{mount_id(name)}"


def wait_until(predicate, seconds: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        time.sleep(0.1)
    return time.monotonic() - started


def check(daemon, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNTIME_DIRECTORY": str(daemon.runtime_dir), "STATE_DIRECTORY": str(daemon.state_dir)}
    return subprocess.run(
        [sys.executable, "-m", "uniond", "--check", "--config", str(daemon.config_path),
         "--mounts-dir", str(daemon.mounts_dir), *extra],
        capture_output=True, text=True, env=env, timeout=60,
    )


def test_declared_at_start_bad_files_skipped_and_check(daemon, bus, layers):
    t = layers
    daemon.stop()
    d = daemon.mounts_dir
    (t / "m2").mkdir()
    declare(d, "app", toml([t / "image2", t / "image1"], t / "upper", t / "merge", "description = 'the app'"))
    declare(d, "broken", "lowerdirs = ['/srv/a']\nupperdir = \nmountpoint = '/srv/m'\n")
    declare(d, "typo", f"lowerdirs = ['{t / 'image1'}']\nmountpont = '{t / 'm2'}'\n")
    declare(d, "wrongtype", f"lowerdirs = ['{t / 'image1'}']\n\n[options]\nreadonly = 'yes'\n")
    declare(d, "missing", f"# a lower that is not there\nlowerdirs = ['{t / 'nope'}']\nmountpoint = '{t / 'm2'}'\n")
    transient = daemon.runtime_dir / "mounts.d"
    declare(transient, "view", toml([t / "image2"], mountpoint=t / "m2"))

    daemon.start()
    client = Client(bus.address)
    try:
        paths = sorted(client.list())
        assert paths == sorted([path_of("app"), path_of("view")])
        props = client.props(path_of("app"))
        assert (props["Name"], props["Persistent"], props["Owner"]) == ("app", True, 0)
        assert props["LowerDirs"] == [str(t / "image2"), str(t / "image1")]
        assert client.props(path_of("view"))["Name"] == "view"
        assert sorted(os.listdir(t / "merge")) == ["a", "b", "c"]
        assert os.listdir(t / "m2") == ["c"]
        log = daemon.log()
        for needle in (f"{d / 'broken.toml'}:2: not valid TOML", f"{d / 'typo.toml'}:2: unknown key 'mountpont'",
                       f"{d / 'wrongtype.toml'}:4:", f"{d / 'missing.toml'}:2: lowerdirs[0]"):
            assert needle in log, (needle, log[-3000:])
        assert "Traceback" not in log
        # A mount made by a caller has neither name nor persistence.
        other = client.mount([t / "image1"])
        assert (client.props(other)["Name"], client.props(other)["Persistent"]) == ("", False)
    finally:
        client.close()

    out = check(daemon)
    assert out.returncode == 1
    for needle in (f"{d / 'broken.toml'}:2: not valid TOML", f"{d / 'typo.toml'}:2: unknown key 'mountpont'"):
        assert needle in out.stderr, out.stderr
    assert "readonly" in out.stderr and "Traceback" not in out.stderr
    for name in ("broken", "typo", "wrongtype", "missing"):
        (d / f"{name}.toml").unlink()
    out = check(daemon)
    assert out.returncode == 0, out.stderr
    assert "2 declared mounts good" in out.stderr
    declare(d, "outside", toml([t / "image1"], mountpoint="/usr/share"))
    out = check(daemon)
    assert out.returncode == 1 and f"{d / 'outside.toml'}:2: mountpoint" in out.stderr, out.stderr


def test_reload_applies_new_removed_and_changed_files(daemon, client, layers, tmp_path):
    t = layers
    d = daemon.mounts_dir
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "new").write_text("v2")
    (t / "m2").mkdir()
    declare(d, "app", toml([t / "image2", t / "image1"], t / "upper", t / "merge"))
    client.call("Reload")
    assert client.list() == [path_of("app")]
    (t / "merge/mine").write_text("kept")

    # A changed file (new lowers) swaps the stack under the same object, with no gap.
    watcher = Watcher(t / "merge", tmp_path / "stop")
    declare(d, "app", toml([v2, t / "image1"], t / "upper", t / "merge"))
    declare(d, "view", toml([t / "image2"], mountpoint=t / "m2"))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: path_of("view") in client.list(), 15)
    seen = watcher.stop()["seen"]
    assert () not in seen and ("a", "b", "mine", "new") in seen, seen
    assert client.props(path_of("app"))["LowerDirs"] == [str(v2), str(t / "image1")]
    assert (t / "merge/mine").read_text() == "kept"
    assert os.listdir(t / "m2") == ["c"]

    # A removed file unmounts; a moved mountpoint mounts anew under the same object.
    (d / "view.toml").unlink()
    declare(d, "app", toml([v2, t / "image1"], t / "upper", t / "m2"))
    client.call("Reload")
    assert client.list() == [path_of("app")]
    assert client.props(path_of("app"))["Mountpoint"] == str(t / "m2")
    assert not is_mounted(t / "merge")
    assert sorted(os.listdir(t / "m2")) == ["a", "b", "mine", "new"]
    log = daemon.log()
    assert "view.toml was removed" in log and "changed in place" in log

    # A file that turned bad is reported; its mount stays as it was.
    declare(d, "app", toml([v2, t / "image1"], t / "upper", t / "m2") + "oops = \n")
    client.call("Reload")
    assert client.list() == [path_of("app")] and is_mounted(t / "m2")
    assert f"{d / 'app.toml'}:4: not valid TOML" in daemon.log()


def test_lost_mount_comes_back_and_unmount_holds_until_reload(daemon, client, polkit, bus, layers):
    t = layers
    d = daemon.mounts_dir
    (t / "m2").mkdir()
    declare(d, "app", toml([t / "image2", t / "image1"], t / "upper", t / "merge"))
    declare(d, "view", toml([t / "image2"], mountpoint=t / "m2"))
    client.call("Reload")
    # An unprivileged user may not take a declared mount down: that is unmount-other.
    polkit.set_allowed([constants.ACTION_UNMOUNT_OWN])
    [result] = run_as(NOBODY, bus.address, [["unmount", path_of("view"), {}]])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_UNMOUNT_OTHER
    [result] = run_as(NOBODY, bus.address, [["call", "Reload", "", {}]])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_RELOAD

    client.unmount(path_of("view"))  # root: held down
    subprocess.run(["umount", str(t / "merge")], check=True)  # behind the daemon's back
    waited = wait_until(lambda: is_mounted(t / "merge"), 15)
    print(f"lost declared mount back after {waited:.1f} s")
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "c"]
    assert client.list() == [path_of("app")], "the unmounted one stays down"
    assert not is_mounted(t / "m2")
    # The hold ends when its file changes (picked up by the same periodic check) ...
    declare(d, "view", "# changed\n" + toml([t / "image2"], mountpoint=t / "m2"))
    wait_until(lambda: is_mounted(t / "m2"), 15)
    assert sorted(client.list()) == sorted([path_of("app"), path_of("view")])
    # ... or at a reload.
    client.unmount(path_of("view"))
    client.call("Reload")
    assert sorted(client.list()) == sorted([path_of("app"), path_of("view")])
    assert is_mounted(t / "m2")


def test_declared_mounts_are_adopted_after_a_restart(daemon, client, layers):
    t = layers
    declare(daemon.mounts_dir, "app", toml([t / "image2", t / "image1"], t / "upper", t / "merge"))
    client.call("Reload")
    before = client.props(path_of("app"))
    daemon.kill()
    daemon.start()
    client2 = Client(daemon.bus.address)
    try:
        assert client2.list() == [path_of("app")]
        assert client2.props(path_of("app"))["Created"] == before["Created"], "adopted, not mounted again"
    finally:
        client2.close()
    assert "adopted" in daemon.log()


def test_check_without_any_file_is_ok(daemon):
    out = check(daemon)
    assert out.returncode == 0 and "0 declared mounts good" in out.stderr
    daemon.config_path.write_text('log_level = "loud"\n')
    out = check(daemon)
    assert out.returncode == 1 and "log_level" in out.stderr


def test_busy_declared_mount_moved_comes_up_when_its_old_place_is_free(daemon, client, layers):
    t = layers
    d = daemon.mounts_dir
    (t / "m2").mkdir()
    declare(d, "app", toml([t / "image2", t / "image1"], t / "upper", t / "merge"))
    client.call("Reload")
    inside = subprocess.Popen(["sleep", "60"], cwd=t / "merge")
    try:
        # Moved to another mountpoint while a process sits in it: the old mount is
        # detached (the process keeps it), the new one waits for the upper to be free (M7).
        declare(d, "app", toml([t / "image2", t / "image1"], t / "upper", t / "m2"))
        client.call("Reload")
        assert not is_mounted(t / "merge") and not is_mounted(t / "m2")
        assert client.props(path_of("app"))["Detached"] is True
        assert sorted(os.listdir(f"/proc/{inside.pid}/cwd")) == ["a", "b", "c"]
    finally:
        inside.kill()
        inside.wait()
    wait_until(lambda: is_mounted(t / "m2"), 15)
    assert client.list() == [path_of("app")]
    props = client.props(path_of("app"))
    assert (props["Mountpoint"], props["Detached"]) == (str(t / "m2"), False)
