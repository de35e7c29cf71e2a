"""uniond against the real polkitd, in a container booted with real systemd (the recipe
in ../shared/systemd-in-a-container.md): the shipped actions file, real defaults, a real
rule matching the details, and a real unprivileged caller (uid 65534).

One boot runs tests/polkit_e2e/scenario.sh; the tests read what it wrote. If the
container cannot boot, every test here fails: nothing is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from harness import ROOT

from uniond import constants

E = constants.ERROR_PREFIX
HERE = ROOT / "tests" / "polkit_e2e"


@pytest.fixture(scope="module")
def results():
    work = Path(tempfile.mkdtemp(prefix="uniond-polkit-e2e-"))
    out = work / "out"
    out.mkdir()
    (work / "e2e").mkdir()
    for name in os.listdir(HERE):
        shutil.copy(HERE / name, work / "e2e" / name)
    # The interpreter running the tests (the venv of ./dev test, UNIOND_VENV honoured).
    (work / "e2e" / "env").write_text(f"SRC={ROOT}\nPY={sys.executable}\n")
    command = [
        "timeout", "180",
        "systemd-nspawn", "-D", "/", "--volatile=yes", "--boot", "--register=no", "--keep-unit",
        "-M", f"uniond-polkit-{os.getpid()}", "--console=pipe", "--private-network",
        # Throw-away writable layers over the host's: the policy files are installed there.
        "--overlay=+/usr::/usr", "--overlay=+/var::/var", "--overlay=+/etc::/etc",
        f"--bind={out}:/out",
        f"--bind-ro={work / 'e2e'}:/e2e",
        f"--bind-ro={ROOT}",
        *([] if Path(sys.prefix).is_relative_to(ROOT) else [f"--bind-ro={sys.prefix}"]),
        f"--bind-ro={work / 'e2e' / 'probe.service'}:/etc/systemd/system/uniond-polkit-probe.service",
        "systemd.unit=uniond-polkit-probe.service",
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    log = (out / "scenario.log").read_text() if (out / "scenario.log").exists() else ""
    assert run.returncode == 0, f"systemd-nspawn exited {run.returncode}:\n{(run.stdout + run.stderr)[-3000:]}"
    assert (out / "t-end").exists(), f"the scenario did not finish ({out}):\n{log[-3000:]}"
    yield {
        "calls": json.loads((out / "results.json").read_text()),
        "unmount_own": json.loads((out / "results2.json").read_text()),
        "uniond_log": (out / "uniond.log").read_text(),
        "polkit": (out / "polkit-status").read_text(),
    }
    shutil.rmtree(work)


def test_own_directories_are_mounted_and_unmounted_by_default(results):
    mine = results["calls"][0]
    assert mine[0] == "ok", mine
    assert results["unmount_own"] == [["ok", None]]
    assert "Exe=/usr/lib/polkit-1/polkitd" in results["polkit"], "the real polkitd answered"


def test_a_rule_can_match_the_details(results):
    assert results["calls"][1][:2] == ["error", f"{E}.NotAuthorized"]


def test_mount_any_and_unmount_other_need_an_administrator(results):
    unreadable_lower, foreign_mountpoint, unmount_root = results["calls"][2:5]
    assert unreadable_lower[:2] == ["error", f"{E}.NotAuthorizedCanObtain"]
    assert foreign_mountpoint[0] == "error"
    assert foreign_mountpoint[1] in (f"{E}.NotAuthorizedCanObtain", f"{E}.NotAuthorized")
    assert unmount_root[:2] == ["error", f"{E}.NotAuthorizedCanObtain"]
    listed = results["calls"][5]
    assert listed[0] == "ok" and len(listed[1]) == 2, "root's mount and the caller's own"
    assert "Traceback" not in results["uniond_log"]
