"""Who may do what: real unprivileged callers (setpriv) against uniond on a bus with its
real policy, and python-dbusmock's polkitd (on that same bus) deciding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from harness import ROOT, CallError, is_mounted, run_as

from uniond import constants

E = constants.ERROR_PREFIX
NOBODY = 65534


def _mount_call(t, **options):
    return ["mount", [str(t / "image2"), str(t / "image1")], str(t / "upper"), str(t / "merge"), options]


def test_own_directories_need_the_mount_action(client, polkit, bus, user_dirs):
    t = user_dirs
    polkit.set_allowed([constants.ACTION_MOUNT])
    [result] = run_as(NOBODY, bus.address, [_mount_call(t)])
    assert result[0] == "ok", result
    path = result[1]
    assert is_mounted(t / "merge")
    assert client.props(path)["Owner"] == NOBODY
    [call] = polkit.calls()
    assert call["action"] == constants.ACTION_MOUNT
    kind, subject = call["subject"]
    assert kind == "system-bus-name" and subject["name"].startswith(":")
    assert call["details"] == {
        "mountpoint": str(t / "merge"),
        "lowerdirs": f"{t / 'image2'}:{t / 'image1'}",
        "upperdir": str(t / "upper"),
    }
    assert call["flags"] == 1, "interactive authentication unless the caller rules it out"
    # The owner unmounts with unmount-own; the mock allows only mount: refused.
    [result] = run_as(NOBODY, bus.address, [["unmount", path, {}]])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_UNMOUNT_OWN
    assert polkit.calls()[-1]["details"]["owner"] == str(NOBODY)
    polkit.set_allowed([constants.ACTION_UNMOUNT_OWN])
    assert run_as(NOBODY, bus.address, [["unmount", path, {}]]) == [["ok", None]]
    assert not is_mounted(t / "merge")


def test_no_user_interaction_clears_the_flag(client, polkit, bus, user_dirs):
    t = user_dirs
    polkit.set_allowed([constants.ACTION_MOUNT])
    [result] = run_as(NOBODY, bus.address, [_mount_call(t, **{"auth.no_user_interaction": True})])
    assert result[0] == "ok"
    assert polkit.calls()[-1]["flags"] == 0
    assert client.props(result[1])["Options"] == {}, "the auth option is not part of the mount"


def test_directories_of_others_need_mount_any(client, polkit, bus, user_dirs, layers):
    t = user_dirs
    polkit.set_allowed([constants.ACTION_MOUNT])
    # A lower the caller cannot read (root's 0700 pytest tree).
    [result] = run_as(NOBODY, bus.address, [["mount", [str(layers / "image1")], "", str(t / "merge"), {}]])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_MOUNT_ANY
    # A mountpoint the caller does not own, though world-writable.
    (t / "shared").mkdir()
    os.chmod(t / "shared", 0o1777)
    [result] = run_as(NOBODY, bus.address, [["mount", [str(t / "image1")], "", str(t / "shared"), {}]])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_MOUNT_ANY
    assert client.list() == [] and not is_mounted(t / "shared")
    polkit.set_allowed([constants.ACTION_MOUNT_ANY])
    [result] = run_as(NOBODY, bus.address, [["mount", [str(t / "image1")], "", str(t / "shared"), {}]])
    assert result[0] == "ok" and is_mounted(t / "shared")


def test_challenge_and_dismissal_have_their_own_errors(client, polkit, bus, user_dirs):
    t = user_dirs
    polkit.answer(False, True)
    [result] = run_as(NOBODY, bus.address, [_mount_call(t, **{"auth.no_user_interaction": True})])
    assert result[:2] == ["error", f"{E}.NotAuthorizedCanObtain"]
    polkit.answer(False, True, {"polkit.dismissed": "true"})
    [result] = run_as(NOBODY, bus.address, [_mount_call(t)])
    assert result[:2] == ["error", f"{E}.NotAuthorizedDismissed"]
    assert client.list() == [] and not is_mounted(t / "merge")


def test_a_failing_polkit_means_not_authorized(client, polkit, bus, user_dirs, daemon):
    t = user_dirs
    polkit.answer_code(
        "raise dbus.exceptions.DBusException('no such subject', name='org.freedesktop.PolicyKit1.Error.Failed')"
    )
    [result] = run_as(NOBODY, bus.address, [_mount_call(t)])
    assert result[:2] == ["error", f"{E}.NotAuthorized"] and "polkit could not decide" in result[2]
    assert client.list() == [] and daemon.alive()


def test_root_never_asks_and_others_need_unmount_other(client, polkit, bus, layers, daemon):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    assert client.diff(path) == []
    assert polkit.calls() == [], "root is allowed without asking polkit"
    out = run_as(NOBODY, bus.address, [["unmount", path, {}], ["diff", path, {}]])
    assert [r[1] for r in out] == [f"{E}.NotAuthorized"] * 2
    assert [c["action"] for c in polkit.calls()] == [constants.ACTION_UNMOUNT_OTHER, constants.ACTION_EXPORT]
    assert polkit.calls()[0]["details"]["mount"] == path.rsplit("/", 1)[1]
    assert client.list() == [path]
    polkit.set_allowed([constants.ACTION_UNMOUNT_OTHER])
    assert run_as(NOBODY, bus.address, [["unmount", path, {}]]) == [["ok", None]]
    assert client.list() == [] and not is_mounted(t / "merge")
    assert "polkit is not on the bus" not in daemon.log()


def test_dev_and_suid_are_root_only(client, polkit, bus, user_dirs, layers):
    polkit.set_allowed([constants.ACTION_MOUNT, constants.ACTION_MOUNT_ANY])
    t = user_dirs
    out = run_as(NOBODY, bus.address, [_mount_call(t, dev=True), _mount_call(t, suid=True)])
    assert [r[1] for r in out] == [f"{E}.NotPermitted"] * 2
    assert polkit.calls() == [], "refused before asking anyone"
    path = client.mount([layers / "image1"], layers / "upper", layers / "merge", suid=True)
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == str(layers / "merge"))
    options = line.split()[5].split(",")
    assert "nosuid" not in options and "nodev" in options
    client.unmount(path)
    client.mount([layers / "image1"], layers / "upper", layers / "merge")
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == str(layers / "merge"))
    assert {"nosuid", "nodev"} <= set(line.split()[5].split(","))


def test_mounts_per_uid_are_limited(daemon, polkit, bus, user_dirs):
    daemon.stop()
    daemon.config_path.write_text("max_mounts_per_uid = 2\n")
    daemon.start()
    polkit.set_allowed([constants.ACTION_MOUNT])
    t = user_dirs
    calls = [["mount", [str(t / "image1"), str(t / "image2")], "", "", {}] for _ in range(3)]
    out = run_as(NOBODY, bus.address, calls)
    assert [r[0] for r in out] == ["ok", "ok", "error"]
    assert out[2][1] == f"{E}.NotPermitted" and "max_mounts_per_uid" in out[2][2]


def test_caller_that_leaves_during_authorization_gets_no_mount(client, polkit, bus, user_dirs, daemon):
    t = user_dirs
    polkit.answer_code("import time; time.sleep(1.5); ret = (True, False, {})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    leaver = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
         str(ROOT / "tests/as_user.py"), bus.address],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    leaver.stdin.write(json.dumps([_mount_call(t)]))
    leaver.stdin.close()
    time.sleep(0.7)
    leaver.kill()
    leaver.wait()
    time.sleep(1.5)
    assert client.list() == []
    assert not is_mounted(t / "merge")
    assert not [n for n in os.listdir(t) if "uniond-work" in n], "no workdir made either"
    assert "left the bus while being authorized" in daemon.log()
    assert daemon.alive()


def test_a_rename_during_authorization_cannot_redirect_the_mount(client, polkit, bus, user_dirs, tmp_path):
    """The directories are opened before polkit is asked and mounted through those
    descriptors: swapping the mountpoint for a symlink meanwhile changes nothing."""
    t = user_dirs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    polkit.answer_code("import time; time.sleep(1.0); ret = (True, False, {})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    caller = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
         str(ROOT / "tests/as_user.py"), bus.address],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    caller.stdin.write(json.dumps([_mount_call(t)]))
    caller.stdin.close()
    time.sleep(0.4)
    os.rename(t / "merge", t / "merge-moved")
    os.symlink(elsewhere, t / "merge")
    out = caller.stdout.read()
    caller.wait(timeout=30)
    [result] = json.loads(out)
    assert result[0] == "ok"
    assert not is_mounted(elsewhere)
    assert is_mounted(t / "merge-moved")
    assert sorted(os.listdir(t / "merge-moved")) == ["a", "c"]


def test_symlinks_in_caller_paths_are_refused(client, layers, tmp_path):
    t = layers
    os.symlink(t / "merge", t / "link")
    os.symlink("/etc", t / "etc-link")
    (t / "real").mkdir()
    os.symlink(t / "real", t / "dirlink")
    (t / "real/sub").mkdir()
    cases = [
        (([t / "image1"], t / "upper", t / "link"), "mountpoint", "is a symlink"),
        (([t / "etc-link"], "", ""), "lowerdirs[0]", "is a symlink"),
        (([t / "image1"], t / "etc-link", t / "merge"), "upperdir", "is a symlink"),
        (([t / "dirlink/sub"], "", ""), "lowerdirs[0]", "goes through a symlink"),
        (([f"{t}/image1/../image2"], "", ""), "lowerdirs[0]", "'..'"),
    ]
    for args, argument, needle in cases:
        with pytest.raises(CallError) as e:
            client.mount(*args)
        assert e.value.name == f"{E}.InvalidArgument"
        assert e.value.text.startswith(argument) and needle in e.value.text, e.value.text
    assert client.list() == []


def test_allowed_roots_bound_mountpoints_and_uppers(daemon, client, layers, tmp_path):
    t = layers
    for args, argument in [
        (([t / "image1"], "", "/etc"), "mountpoint"),
        (([t / "image1"], "", "/usr/share"), "mountpoint"),
        (([t / "image1"], "", "/"), "mountpoint"),
        (([t / "image1"], "/etc", t / "merge"), "upperdir"),
        (([t / "image1"], "", "/tmp"), "mountpoint"),
        (([t / "image1"], "", daemon.state_dir), "mountpoint"),
        (([t / "image1"], "", daemon.runtime_dir), "mountpoint"),
    ]:
        with pytest.raises(CallError) as e:
            client.mount(*args)
        assert e.value.name == f"{E}.InvalidArgument" and e.value.text.startswith(argument), e.value.text
    # Lowers are only read: they may be anywhere.
    path = client.mount(["/usr/share", "/etc"], "", "")
    client.unmount(path)
    daemon.stop()
    daemon.config_path.write_text('allowed_roots = ["/srv"]\n')
    daemon.start()
    with pytest.raises(CallError) as e:
        client.mount([t / "image1"], t / "upper", t / "merge")
    assert e.value.name == f"{E}.InvalidArgument" and "allowed root" in e.value.text
    daemon.stop()
    daemon.config_path.write_text(f'allowed_roots = ["{tmp_path}"]\n')
    daemon.start()
    client.mount([t / "image1"], t / "upper", t / "merge")
    assert is_mounted(t / "merge")


def test_reload_applies_allowed_roots(daemon, client, layers):
    t = layers
    daemon.config_path.write_text('allowed_roots = ["/srv"]\n')
    mark = len(daemon.notify.drain())
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("READY=1", since=mark + 1)
    with pytest.raises(CallError) as e:
        client.mount([t / "image1"], t / "upper", t / "merge")
    assert e.value.name == f"{E}.InvalidArgument" and "allowed root" in e.value.text


@pytest.mark.parametrize("bad", ['allowed_roots = ["/"]', 'allowed_roots = ["relative"]', 'allowed_roots = "/srv"',
                                 "max_mounts_per_uid = -1", 'max_mounts_per_uid = "many"'])
def test_bad_security_settings_stop_the_start(daemon, bad):
    daemon.stop()
    daemon.config_path.write_text(bad + "\n")
    daemon.start(wait_ready=False)
    assert daemon.process.wait(timeout=15) == 78
    assert "bad configuration" in daemon.log()


def test_own_workdir_option(client, layers):
    t = layers
    (t / "work").mkdir()
    path = client.mount([t / "image1"], t / "upper", t / "merge", workdir=str(t / "work"))
    assert client.props(path)["WorkDir"] == str(t / "work")
    (t / "merge/new").touch()
    client.unmount(path)
    assert (t / "upper/new").exists() and (t / "work").is_dir(), "a caller's workdir is kept"
    (t / "work/mine").touch()
    with pytest.raises(CallError) as e:
        client.mount([t / "image1"], t / "upper", t / "merge", workdir=str(t / "work"))
    assert e.value.name == f"{E}.InvalidArgument" and "must be empty" in e.value.text


def test_two_mounts_racing_for_one_mountpoint(client, polkit, bus, user_dirs):
    """Both pass the checks, then wait for polkit; the second finds the place taken."""
    t = user_dirs
    polkit.answer_code("import time; time.sleep(0.5); ret = (True, False, {})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    racers = []
    for lower in ("image1", "image2"):
        racer = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
             str(ROOT / "tests/as_user.py"), bus.address],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        racer.stdin.write(json.dumps([["mount", [str(t / lower)], "", str(t / "merge"), {}]]))
        racer.stdin.close()
        racers.append(racer)
    results = []
    for racer in racers:
        results.append(json.loads(racer.stdout.read())[0])
        racer.wait(timeout=30)
    assert sorted(r[0] for r in results) == ["error", "ok"], results
    assert [r[1] for r in results if r[0] == "error"] == [f"{E}.AlreadyMounted"]
    assert len(client.list()) == 1
    with open("/proc/self/mountinfo") as f:
        assert sum(1 for line in f if line.split()[4] == str(t / "merge")) == 1, "never stacked"


def test_unmount_cannot_be_redirected_through_a_swapped_parent(client, polkit, bus, user_dirs, layers):
    """The owner of a mount swaps its parent directory for a symlink to where another
    user's mount has the same name: Unmount still takes down only the owner's mount."""
    t = user_dirs
    polkit.set_allowed([constants.ACTION_MOUNT, constants.ACTION_UNMOUNT_OWN])
    (t / "x/merge").mkdir(parents=True)
    os.chown(t / "x", NOBODY, NOBODY)
    os.chown(t / "x/merge", NOBODY, NOBODY)
    lowers = [str(t / "image1"), str(t / "image2")]
    [mine] = run_as(NOBODY, bus.address, [["mount", lowers, "", str(t / "x/merge"), {}]])
    assert mine[0] == "ok", mine
    (layers / "victim/merge").mkdir(parents=True)
    theirs = client.mount([layers / "image1"], layers / "upper", layers / "victim/merge")
    os.rename(t / "x", t / "y")
    os.symlink(layers / "victim", t / "x")
    assert run_as(NOBODY, bus.address, [["unmount", mine[1], {}]]) == [["ok", None]]
    assert is_mounted(layers / "victim/merge"), "the other user's mount stays"
    assert not is_mounted(t / "y/merge"), "the caller's own (moved) mount is the one taken down"
    assert client.list() == [theirs]


def test_diff_reads_no_directory_swapped_in_for_a_parent(client, layers, tmp_path):
    t = layers
    (t / "p/upper").mkdir(parents=True)
    path = client.mount([t / "image1"], t / "p/upper", t / "merge")
    (t / "merge/mine").touch()
    (t / "secret/upper").mkdir(parents=True)
    (t / "secret/upper/private-name").touch()
    os.rename(t / "p", t / "p-moved")
    os.symlink(t / "secret", t / "p")
    with pytest.raises(CallError) as e:
        client.diff(path)
    assert e.value.name == f"{E}.Failed" and "private-name" not in e.value.text


def test_group_access_counts_with_the_callers_groups(client, polkit, bus, user_dirs):
    """A lower readable only through the group: the bus reports the caller's groups."""
    t = user_dirs
    polkit.set_allowed([constants.ACTION_MOUNT])
    (t / "grouplower").mkdir()
    os.chown(t / "grouplower", 0, 12345)
    os.chmod(t / "grouplower", 0o750)
    call = ["mount", [str(t / "grouplower"), str(t / "image1")], "", str(t / "merge"), {}]
    [result] = run_as(NOBODY, bus.address, [call], gid=12345)
    assert result[0] == "ok", result
    assert polkit.calls()[-1]["action"] == constants.ACTION_MOUNT
    client.unmount(result[1])
    [result] = run_as(NOBODY, bus.address, [call])
    assert result[:2] == ["error", f"{E}.NotAuthorized"]
    assert polkit.calls()[-1]["action"] == constants.ACTION_MOUNT_ANY
