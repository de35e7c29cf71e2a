"""The long fault-injection run: uniond killed (SIGKILL) at every named step and at N
random moments under load (default 1,000), its journal damaged, its state directory
filled, its bus killed; checked after every restart. Prints the figures: kills,
mounts, files written and verified, faults tried, violations by kind.

Run as root from the repository (after `sudo ./dev test` made .venv), in a private
mount namespace:

    sudo unshare --mount --propagation private .venv/bin/python bench/faults.py [KILLS] [SEED]

tests/test_faults.py runs the same campaign with 100 random kills in CI; what is
checked is written in tests/faults.py.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faults import campaign  # noqa: E402


def main() -> int:
    kills = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    base = Path(tempfile.mkdtemp(prefix="uniond-faults-"))
    started = time.monotonic()
    figures = campaign(base, kills=kills, seed=seed)
    print(f"seed {seed}, {time.monotonic() - started:.0f} s")
    print(figures.summary())
    if figures.violations:
        print(f"kept for inspection: {base} (uniond.log)")
        return 1
    shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
