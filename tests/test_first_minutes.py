"""What a new user meets in the first ten minutes (issue 11): a system bus without
uniond's policy, a private bus left behind by `kill -9`, alarming bus noise, calls
with the wrong signature, and messages that must say exactly what is wrong.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import CallError, NotifySocket

from uniond.service import privatebus


def _uniond(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "uniond", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def shared_tmp():
    """Reachable by the private bus's own user (pytest's tmp_path is root's alone)."""
    directory = tempfile.mkdtemp(prefix="uniond-test-first-")
    os.chmod(directory, 0o755)
    yield Path(directory)
    shutil.rmtree(directory)


def test_a_system_bus_without_the_policy_gives_one_line_and_exit_77(tmp_path, shared_tmp):
    empty = tmp_path / "empty.conf"
    empty.write_text('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
                     ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n<busconfig/>\n')
    process, address = privatebus.start(str(shared_tmp / "bus"), policy=empty)
    try:
        daemon = _uniond(["--bus", "system", "--config", "/dev/null"],
                         {"DBUS_SYSTEM_BUS_ADDRESS": address, "STATE_DIRECTORY": str(tmp_path / "state"),
                          "RUNTIME_DIRECTORY": str(tmp_path / "run")})
        _, stderr = daemon.communicate(timeout=30)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert daemon.returncode == 77, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("<3>")]
    assert len(errors) == 1 and "org.uniond1.conf is not installed" in errors[0], stderr
    assert "/etc/dbus-1/system.d/" in errors[0] and "Traceback" not in stderr
    assert "private bus" not in stderr.replace("--bus private", ""), "uniond never falls back by itself"


def test_private_bus_ends_with_uniond_even_on_kill_9_and_is_quiet(tmp_path, shared_tmp):
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"STATE_DIRECTORY": str(tmp_path / "state"), "RUNTIME_DIRECTORY": str(shared_tmp / "run"),
           "NOTIFY_SOCKET": notify.path}
    env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    for _attempt in range(2):  # the second start finds the first one's socket file
        daemon = _uniond(["--bus", "private", "--config", "/dev/null"], env)
        notify.wait_for("READY=1", since=len(notify.drain()))
        bus_pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(daemon.pid), "dbus-daemon"],
                                                   capture_output=True, text=True).stdout.split()]
        assert len(bus_pids) == 1
        status = Path(f"/proc/{bus_pids[0]}/status").read_text()
        assert "\nUid:\t0\t" not in status, "the private bus does not run as root"
        daemon.kill()
        daemon.wait(timeout=10)
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{bus_pids[0]}/stat")
        while stat.exists() and stat.read_text().split()[2] != "Z":  # gone, or dead and not yet reaped
            assert time.monotonic() < deadline, "the private bus outlived its uniond"
            time.sleep(0.05)
        stderr = daemon.stderr.read()
        assert "fd limit" not in stderr, stderr
        assert "busctl --address=unix:path=" in stderr
    notify.close()


def test_wrong_signature_names_the_one_that_works(client):
    for member, signature, body, needle in [
        ("Mount", "sss", ["a", "b", "c"], "'asssa{sv}' (as lowerdirs, s upperdir, s mountpoint, a{sv} options)"),
        ("ExportDiff", "oa{sv}", ["/org/uniond1/mount/x", {}], "'oha{sv}' (o mount, h fd, a{sv} options)"),
        ("ListMounts", "s", ["x"], "takes signature '' ()"),
    ]:
        with pytest.raises(CallError) as e:
            client.call(member, signature, *body)
        assert e.value.name == "org.freedesktop.DBus.Error.InvalidArgs"
        assert needle in e.value.text and f"not '{signature}'" in e.value.text, e.value.text


def test_allowed_roots_message_says_strictly_below(client, layers):
    with pytest.raises(CallError) as e:
        client.mount([layers / "image1"], "", "/tmp")
    assert "'/tmp' is not strictly below any allowed root (" in e.value.text


def test_restart_log_says_what_was_cleaned(daemon, client, layers):
    t = layers
    client.mount([t / "image1"], t / "upper", t / "merge")
    auto = client.mount([t / "image2"])
    auto_mp = client.props(auto)["Mountpoint"]
    daemon.signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    subprocess.run(["umount", str(t / "merge")], check=True)
    subprocess.run(["umount", auto_mp], check=True)
    daemon.start()
    lines = [line for line in daemon.log().splitlines() if ": gone; " in line]
    assert any(f"left the caller's mountpoint {t / 'merge'}" in line and "removed the workdir" in line
               for line in lines), lines
    assert any(f"removed the mountpoint {auto_mp} it had made" in line for line in lines), lines
    assert not any("daemon-made" in line for line in lines)
