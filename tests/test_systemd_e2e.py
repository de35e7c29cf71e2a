"""uniond as an installed package under real systemd 252 (PID 1 in a container).

One container boot (`systemd-nspawn --boot`, the recipe in
../shared/systemd-in-a-container.md) installs the .deb offline and runs
tests/e2e/scenario.sh as a oneshot unit; the scenario writes what systemctl, busctl
and the journal said to a bound directory, and the tests below assert on it here.
If the container cannot boot, every test here fails: nothing is skipped.
UNIOND_E2E_KEEP=1 keeps the results directory (scenario.log, journal.json, ...); it is
also kept when the container fails.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import debpkg
import pytest

E2E = Path(__file__).resolve().parent / "e2e"
BOOT_TIMEOUT = 180


@dataclass
class Scenario:
    out: Path
    boot_seconds: float
    nspawn_log: str

    def text(self, name: str) -> str:
        path = self.out / name
        assert path.exists(), f"the scenario wrote no {name}; see {self.out}/scenario.log:\n{self.log_tail()}"
        return path.read_text().strip()

    def json(self, name: str):
        return json.loads(self.text(name))

    def show(self, name: str) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.text(name).split("|") if "=" in item)

    def log_tail(self) -> str:
        path = self.out / "scenario.log"
        return "\n".join(path.read_text().splitlines()[-30:]) if path.exists() else self.nspawn_log[-3000:]

    @functools.cached_property
    def _journal(self) -> list[dict]:
        entries = [json.loads(line) for line in self.text("journal.json").splitlines()]
        return [e for e in entries if isinstance(e.get("MESSAGE"), str)]

    def journal(self) -> list[dict]:
        return self._journal

    def steps(self) -> dict[str, list[dict]]:
        """Journal entries grouped by the scenario step that was running."""
        groups: dict[str, list[dict]] = {"boot": []}
        current = "boot"
        for entry in self.journal():
            if entry.get("SYSLOG_IDENTIFIER") == "e2e" and entry["MESSAGE"].startswith("STEP "):
                current = entry["MESSAGE"][5:]
                groups[current] = []
            else:
                groups[current].append(entry)
        return groups

    def uniond_lines(self, step: str | None = None) -> list[dict]:
        """The daemon's own lines, by their identifier (`journalctl -t uniond`): with PID 1
        at debug level, journald files some of them under init.scope (see scenario.sh)."""
        entries = self.steps()[step] if step else self.journal()
        return [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "uniond"]

    def systemd_lines(self, step: str) -> list[str]:
        return [e["MESSAGE"] for e in self.steps()[step] if e.get("_PID") == "1" and e.get("UNIT") == "uniond.service"]


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    deb = debpkg.build()
    work = Path(tempfile.mkdtemp(prefix="uniond-e2e-"))
    out = work / "out"
    out.mkdir()
    name = f"uniond-e2e-{os.getpid()}"
    command = [
        "timeout", str(BOOT_TIMEOUT),
        "systemd-nspawn", "-D", "/", "--volatile=yes", "--boot", "--register=no", "--keep-unit",
        "-M", name, "--console=pipe", "--private-network",
        # The host's /usr, /var and /etc as throw-away writable layers: dpkg's database and
        # the installed dependencies are there, and nothing reaches the host.
        "--overlay=+/usr::/usr", "--overlay=+/var::/var", "--overlay=+/etc::/etc",
        f"--bind={out}:/out",
        f"--bind-ro={deb}:/deb/{deb.name}",
        f"--bind-ro={E2E}:/e2e",
        f"--bind-ro={E2E / 'probe.service'}:/etc/systemd/system/e2e-probe.service",
        "systemd.unit=e2e-probe.service",
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    s = Scenario(out, seconds, result.stdout + result.stderr)
    # On failure the results stay in `out` for a look.
    assert result.returncode == 0, f"systemd-nspawn exited {result.returncode} ({out}):\n{s.nspawn_log[-3000:]}"
    assert (out / "t-end").exists(), f"the scenario did not finish ({out}):\n{s.log_tail()}"
    begin, end = float(s.text("t-begin")), float(s.text("t-end"))
    print(f"container boot to poweroff: {seconds:.1f} s; scenario: {end - begin:.1f} s")
    yield s
    if os.environ.get("UNIOND_E2E_KEEP"):
        print(f"e2e results kept in {out}")
    else:
        shutil.rmtree(work)


def mount_id(path: str) -> str:
    return path.rsplit("/", 1)[1]


def test_package_installs_offline_enabled_and_running(scenario):
    assert scenario.text("install.rc") == "0", scenario.text("install.log")[-2000:]
    assert scenario.text("which-uniond") == "/usr/bin/uniond"
    assert scenario.text("enabled") == "enabled"
    assert scenario.show("after-install")["ActiveState"] == "active"
    assert scenario.text("dirs").splitlines() == ["700 root", "755 root"]
    assert "org.uniond1" in scenario.text("activatable").split()
    # polkit knows the installed actions (their defaults are issue 5's business).
    assert "org.uniond1.mount:" in scenario.text("pkaction") and "implicit active:" in scenario.text("pkaction")
    # The installed unit as systemd reads it: no unknown option, no missing binary.
    assert (scenario.text("verify.rc"), scenario.text("verify")) == ("0", "")


def test_active_only_after_ready(scenario):
    samples = [dict(i.split("=", 1) for i in line.split("|") if "=" in i)
               for line in scenario.text("start-samples").splitlines()]
    # What systemd showed while uniond started: activating with uniond's own status
    # text, then active with the mount count it sent along with READY=1.
    assert samples[-1]["ActiveState"] == "active" and samples[-1]["SubState"] == "running"
    assert samples[-1]["StatusText"] == "0 mounts"
    starting = [s for s in samples if s["ActiveState"] == "activating"]
    assert starting, f"systemd never showed uniond activating: {samples}"
    assert all(s["SubState"] == "start" for s in starting)
    assert {s["StatusText"] for s in starting} <= {"", "reconciling recorded mounts with the kernel",
                                                    "connecting to the bus"}
    times = dict(line.split("=", 1) for line in scenario.text("start-times").splitlines())
    assert times["Type"] == "notify"
    to_ready_ms = (int(times["ActiveEnterTimestampMonotonic"]) - int(times["ExecMainStartTimestampMonotonic"])) / 1000
    print(f"time to READY: {to_ready_ms:.0f} ms")
    assert to_ready_ms > 20, "active as soon as started: systemd did not wait for READY=1"
    received = [m for m in scenario.systemd_lines("start") if "Got notification message" in m]
    assert any("READY=1" in m for m in received), scenario.systemd_lines("start")


def test_mount_diff_and_visible_outside_the_service(scenario):
    path = scenario.text("mount-a")
    assert re.fullmatch(r"/org/uniond1/mount/[0-9a-f]+", path)
    assert scenario.text("visible-here") == "overlay"
    assert scenario.text("visible-pid1") == "1"
    assert scenario.text("visible-unit").splitlines() == ["one", "three"]
    assert scenario.json("diff.json")["data"][0] == [["D", "/a"], ["A", "/d"]]


def test_busy_names_a_holder_of_another_user(scenario):
    busy = scenario.text("busy")
    assert "is busy" in busy, busy
    assert f"sleep (pid {scenario.text('holder-pid')})" in busy


def test_reload_rereads_the_configuration(scenario):
    for name in ("reload-warning", "reload-bad", "reload-info"):
        assert scenario.text(f"{name}.rc") == "0"
        assert scenario.show(f"after-{name}")["ActiveState"] == "active"
        received = [m for m in scenario.systemd_lines(name) if "Got notification message" in m]
        assert any("RELOADING=1" in m for m in received), (name, scenario.systemd_lines(name))
        assert any("READY=1" in m for m in received), (name, received)
    b = mount_id(scenario.text("mount-b"))
    # log_level = "warning": the Mount that followed logged nothing at info level.
    assert not [e for e in scenario.uniond_lines("reload-warning") if b in e["MESSAGE"]]
    bad = [e for e in scenario.uniond_lines("reload-bad") if "reload failed" in e["MESSAGE"]]
    assert bad and bad[0]["PRIORITY"] == "3" and "log_level" in bad[0]["MESSAGE"]
    assert any("configuration reloaded" in e["MESSAGE"] for e in scenario.uniond_lines("reload-info"))


def test_packaged_unionctl_sees_the_unit_and_names_a_mount_by_a_path_in_it(scenario):
    status = scenario.json("unionctl-status.json")
    assert status["unit"]["name"] == "uniond.service"
    assert (status["unit"]["active_state"], status["unit"]["sub_state"]) == ("active", "running")
    assert status["mounts"] == 1 and status["version"] == "0.1.0"
    diff = scenario.json("unionctl-diff.json")
    assert diff["path"] == scenario.text("mount-a")
    assert diff["changes"] == [{"kind": "D", "path": "/a"}, {"kind": "A", "path": "/d"}]


def test_declared_mount_follows_its_file_on_reload(scenario):
    assert scenario.text("check.rc") == "0", scenario.text("check.out")
    assert "1 declared mount good" in scenario.text("check.out")
    assert scenario.text("reload-declared.rc") == "0"
    assert scenario.text("declared-content") == "d"
    assert scenario.text("declared-name") == "e2e"
    assert scenario.text("declared-after-removal.rc") == "1", "still mounted after its file was removed"
    d = mount_id(scenario.text("mount-d"))
    lines = [e["MESSAGE"] for e in scenario.uniond_lines("declared")]
    assert any(m.startswith(f"mount {d}: declared mount 'e2e' is up") for m in lines), lines
    assert any(m.startswith(f"mount {d}: unmounted /srv/e2e/dm") and "e2e.toml was removed" in m for m in lines), lines


def test_mount_bound_to_a_unit_goes_when_the_unit_stops(scenario):
    assert scenario.text("bound-start.rc") == "0"
    assert scenario.text("bound-while-running") == "u"
    assert scenario.text("bound-to-u") == "unit:e2e-bound.service"
    assert scenario.text("bound-to-v") == "unit:e2e-named.service"
    assert scenario.text("bound-u-gone.rc") == "0", "still mounted 10 s after its unit stopped"
    assert scenario.text("bound-v-while-named-runs.rc") == "0", "the mount bound by name went too early"
    assert scenario.text("bound-v-gone.rc") == "0"
    u, v = mount_id(scenario.text("mount-u")), mount_id(scenario.text("mount-v"))
    lines = [e["MESSAGE"] for e in scenario.uniond_lines("bound-unit")]
    assert any(m.startswith(f"mount {u}: unmounted /srv/e2e/um (bound to unit:e2e-bound.service: its unit")
               for m in lines), lines
    assert any(m.startswith(f"mount {v}: unmounted /srv/e2e/vm") for m in lines), lines
    assert sorted(scenario.json("list-after-bound.json")["data"][0]) == sorted(
        [scenario.text("mount-a"), scenario.text("mount-b")])


def test_kill_restarts_adopts_live_mounts_and_cleans_gone_ones(scenario):
    assert scenario.text("kill-restarted.rc") == "0", scenario.show("after-kill")
    old, new = scenario.text("kill-pids").split()
    assert old != new
    assert scenario.json("list-after-kill.json")["data"][0] == [scenario.text("mount-a")]
    assert scenario.text("a-after-kill") == "overlay"
    assert scenario.text("workdir-b-after-kill") == "absent"
    a, b = mount_id(scenario.text("mount-a")), mount_id(scenario.text("mount-b"))
    lines = [e["MESSAGE"] for e in scenario.uniond_lines("kill")]
    assert any(m.startswith(f"mount {a}: adopted") for m in lines), lines
    # b's mountpoint was the caller's: the line says it was left, not that it was cleaned.
    assert any(m.startswith(f"mount {b}: gone; removed the workdir ") and m.endswith(
        "left the caller's mountpoint /srv/e2e/bm") for m in lines), lines


def test_hung_daemon_is_restarted_by_the_watchdog(scenario):
    assert scenario.text("watchdog-usec") == "3s"
    before, after = scenario.text("watchdog-restarts-while-alive").split()
    assert before == after, "restarted while it was alive and pinging"
    assert scenario.text("watchdog-restarted.rc") == "0", scenario.show("after-watchdog")
    old, new = scenario.text("watchdog-pids").split()
    assert old != new
    assert any("Watchdog timeout" in m for m in scenario.systemd_lines("watchdog"))
    begin, end = map(float, scenario.text("watchdog-wall").split())
    print(f"SIGSTOP to restarted: {end - begin:.1f} s (WatchdogSec=3s)")
    assert scenario.json("list-after-watchdog.json")["data"][0] == [scenario.text("mount-a")]


def test_stop_sends_stopping_and_leaves_mounts(scenario):
    assert scenario.text("stop.rc") == "0"
    after = scenario.show("after-stop")
    assert (after["ActiveState"], after["Result"]) == ("inactive", "success")
    assert scenario.text("a-after-stop") == "overlay"
    received = [m for m in scenario.systemd_lines("stop") if "Got notification message" in m]
    assert any("STOPPING=1" in m for m in received), scenario.systemd_lines("stop")


def test_dbus_activation_starts_the_stopped_service(scenario):
    assert scenario.show("before-activation")["ActiveState"] == "inactive"
    assert scenario.json("activation.json")["data"][0] == [scenario.text("mount-a")]
    assert scenario.show("after-activation")["ActiveState"] == "active"
    bus = [e["MESSAGE"] for e in scenario.steps()["activation"] if e.get("_COMM") == "dbus-daemon"]
    assert any("Activating via systemd" in m and "org.uniond1" in m for m in bus), bus


def test_reinstall_restarts_and_adopts(scenario):
    assert scenario.text("reinstall.rc") == "0", scenario.text("reinstall.log")[-2000:]
    old, new = scenario.text("reinstall-pids").split()
    assert old != new and new != "0"
    assert scenario.show("after-reinstall")["StatusText"] == "1 mount"
    assert scenario.json("list-after-reinstall.json")["data"][0] == [scenario.text("mount-a")]


def test_unmount_takes_the_mount_down_and_keeps_the_layers(scenario):
    assert scenario.text("unmount-a.rc") == "0", scenario.text("unmount-a.err")
    assert scenario.text("a-after-unmount") == ""
    # merge is empty again; the upper keeps the change (d, and the whiteout of a).
    listing = sorted(scenario.text("dirs-after-unmount").split("\n\n"))
    assert listing == ["/srv/e2e/l1:\na\nb", "/srv/e2e/merge:", "/srv/e2e/upper:\na\nd"], listing
    assert scenario.json("list-after-unmount.json")["data"][0] == []


def test_purge_removes_the_service_but_not_the_mounts(scenario):
    assert scenario.text("purge.rc") == "0"
    assert scenario.text("after-purge-loadstate") == "not-found"
    assert "org.uniond1" not in scenario.text("after-purge-activatable").split()
    assert re.fullmatch(r"/run/uniond/mounts/[0-9a-f]+", scenario.text("mountpoint-e"))
    assert scenario.text("e-after-purge") == "three"
    assert scenario.text("after-purge-dirs") == ""
    assert "No such file" in scenario.text("after-purge-dirs.err")


def test_journal_keeps_priorities_and_mount_ids(scenario):
    lines = scenario.uniond_lines()
    assert lines
    assert all(not e["MESSAGE"].startswith("<") for e in lines), "a <N> prefix reached the journal"
    priorities = {e["PRIORITY"] for e in lines}
    assert {"6", "4", "3"} <= priorities, priorities
    c = mount_id(scenario.text("mount-c"))
    assert scenario.text("unmount-c.rc") == "0", scenario.text("unmount-c.err")
    behind = [e for e in lines if "already unmounted behind" in e["MESSAGE"]]
    assert behind and behind[0]["PRIORITY"] == "4" and behind[0]["MESSAGE"].startswith(f"mount {c}:")
    # Every line that names one of the scenario's mountpoints or mount objects names the mount id.
    ids = [mount_id(scenario.text(n)) for n in ("mount-a", "mount-b", "mount-c", "mount-d", "mount-u", "mount-v")]
    for e in lines:
        message = e["MESSAGE"]
        if "/srv/e2e/" in message or "/org/uniond1/mount/" in message:
            assert any(i in message for i in ids), message


def test_journalctl_u_shows_the_daemon_lines_with_priorities(scenario):
    entries = [json.loads(line) for line in scenario.text("journal-u.json").splitlines()]
    own = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "uniond"]
    ready = [e for e in own if e["MESSAGE"].startswith("uniond 0.1.0 ready on org.uniond1")]
    assert ready, [e["MESSAGE"] for e in own]
    assert ready[-1]["PRIORITY"] == "6" and ready[-1]["_SYSTEMD_UNIT"] == "uniond.service"


def test_hardening_keeps_exposure_low(scenario):
    security = scenario.text("security")
    level = re.search(r"Overall exposure level for uniond.service: ([0-9.]+)", security)
    assert level, security
    print(f"systemd-analyze security: {level.group(0)}")
    # 9.6 before the hardening, 4.2 with it: weakening the unit shows here.
    assert float(level.group(1)) <= 4.5, security

