"""The .deb, built once per test session with the README's documented command.

Both the package inspection and the end-to-end suite use the same build, so that the
package the e2e suite installs is the one whose contents were checked.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build-deb"


@functools.cache
def build() -> Path:
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{BUILD} failed:\n{result.stdout}\n{result.stderr}"
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb.is_file(), f"{BUILD} printed {deb}, which is not a file"
    return deb
