"""The proof that nothing is lost and nothing orphaned, whatever happens to the daemon:
uniond killed at every named step of Mount, Unmount, Commit, ImportLayer and
reconciliation and at UNIOND_FAULT_KILLS random moments (default 100) under load, its
journal damaged in eight ways, its state directory filled, its bus killed; checked
after every restart (tests/faults.py says what is checked). The long run (1,000 kills
and more) is bench/faults.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from faults import campaign


def test_no_file_lost_no_mount_orphaned_whatever_happens_to_the_daemon():
    kills = int(os.environ.get("UNIOND_FAULT_KILLS", "100"))
    base = Path(tempfile.mkdtemp(prefix="uniond-faults-"))
    figures = campaign(base, kills=kills, seed=int(os.environ.get("UNIOND_FAULT_SEED", "10")))
    print(figures.summary())
    if not figures.violations:
        shutil.rmtree(base)  # kept for inspection otherwise
    assert figures.kills >= kills
    assert figures.files_written > 0 and figures.mounts > 0
    assert not figures.violations, figures.summary()
