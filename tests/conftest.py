"""Fixtures: every test that mounts runs as root in the private mount namespace that
the README's test command creates (unshare -m), under pytest's temporary directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import Bus, Client, Daemon, NotifySocket, PolkitMock
from hypothesis import HealthCheck, settings

pytest_plugins = ["dbusmock.pytest_fixtures"]


def _in_private_mount_namespace() -> bool:
    # The README's command runs pytest under `unshare --mount`, whose parent is the shell.
    return os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")


@pytest.fixture(scope="session", autouse=True)
def _guard() -> None:
    if os.geteuid() != 0:
        pytest.exit("the tests mount real overlays: run them as root (see README)", returncode=2)
    if not _in_private_mount_namespace():
        pytest.exit("run the tests in a private mount namespace: use the README's test command", returncode=2)


@pytest.fixture
def bus():
    # Outside pytest's private (0700) temporary tree, so unprivileged callers reach it too.
    directory = tempfile.mkdtemp(prefix="uniond-test-bus-")
    os.chmod(directory, 0o755)
    b = Bus(Path(directory))
    yield b
    b.stop()
    shutil.rmtree(directory)


@pytest.fixture
def daemon(tmp_path, bus):
    """A started uniond; stopped (SIGTERM) at the end, its mounts taken down."""
    d = Daemon(
        bus=bus,
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        notify=NotifySocket(tmp_path / "notify.sock"),
        log_path=tmp_path / "uniond.log",
    )
    d.start()
    yield d
    d.stop()
    d.notify.close()
    # Leave nothing mounted below the test's directory.
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f if line.split()[4].startswith(str(tmp_path))]
    for target in reversed(targets):
        subprocess.run(["umount", "-l", target], check=False)


@pytest.fixture
def client(daemon, bus):
    c = Client(bus.address)
    yield c
    c.close()


@pytest.fixture
def polkit(bus):
    """python-dbusmock's polkitd on the test bus; denies everything until told otherwise."""
    mock = PolkitMock(bus.address)
    yield mock
    mock.stop()


@pytest.fixture
def user_dirs():
    """Directories owned by the unprivileged test user (65534), in a world-searchable
    place: pytest's own temporary tree is root's alone (0700)."""
    directory = Path(tempfile.mkdtemp(prefix="uniond-test-user-"))
    os.chmod(directory, 0o755)
    for name in ("image1", "image2", "upper", "merge"):
        (directory / name).mkdir()
    (directory / "image1/a").write_text("a")
    (directory / "image2/c").write_text("c")
    for path in [directory, *directory.iterdir()]:
        os.chown(path, 65534, 65534)
    yield directory
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f if line.split()[4].startswith(str(directory))]
    for target in reversed(targets):
        subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(directory)


@pytest.fixture
def layers(tmp_path):
    """The seed's example: image1 with a and b, image2 with c, an empty upper and merge."""
    for name in ("image1", "image2", "upper", "merge"):
        (tmp_path / name).mkdir()
    for path in ("image1/a", "image1/b", "image2/c"):
        (tmp_path / path).write_text(path)
    return tmp_path



# `--hypothesis-profile=explore` makes tests/test_layers_property.py draw new examples
# instead of its fixed ones (replay such a run with --hypothesis-seed=N). No profile is
# loaded here: other tests keep their own settings.
settings.register_profile("explore", max_examples=1000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
