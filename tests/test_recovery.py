"""Recovery without the journal (C4): the kernel's table and the marks uniond leaves
bring back every live mount it made, whatever happened to the journal."""

from __future__ import annotations

import os

import pytest
from harness import is_mounted

KINDS = {
    "rw-overlay": lambda t: ([t / "image2", t / "image1"], t / "upper"),
    "ro-overlay": lambda t: ([t / "image2", t / "image1"], ""),
    "one-lower-bind": lambda t: ([t / "image1"], ""),
}


def _mount_all(client, t):
    made = {}
    for kind, args in KINDS.items():
        lowers, upper = args(t)
        made[kind + "-auto"] = client.mount(lowers, upper)
        mountpoint = t / f"mp-{kind}"
        mountpoint.mkdir()
        if upper:
            upper = t / "upper2"
            upper.mkdir()
        made[kind] = client.mount(lowers, upper, mountpoint)
    return made


@pytest.mark.parametrize("damage", ["journal-deleted", "journal-garbled", "journal-and-runtime-marks-gone"])
def test_every_live_mount_is_recovered_without_the_journal(daemon, client, layers, damage):
    t = layers
    made = _mount_all(client, t)
    props = {path: client.props(path) for path in made.values()}
    daemon.kill()
    journal = daemon.state_dir / "mounts.journal"
    if damage == "journal-garbled":
        journal.write_bytes(b"\xff" * 100 + b"\n" + os.urandom(300))
    else:
        journal.unlink()
    if damage == "journal-and-runtime-marks-gone":
        for name in os.listdir(daemon.runtime_dir / "marks"):
            os.unlink(daemon.runtime_dir / "marks" / name)
    daemon.start()
    listed = set(client.list())
    if damage == "journal-and-runtime-marks-gone":
        # Only a daemon-made workdir carries a mark of its own: the rw overlays.
        expected = {made["rw-overlay"], made["rw-overlay-auto"]}
    else:
        expected = set(made.values())
    assert listed == expected
    for path in expected:
        assert client.props(path) == props[path]
    for path in expected:
        client.unmount(path)
    for path in expected:
        p = props[path]
        assert not is_mounted(p["Mountpoint"])
        assert not p["WorkDir"] or not os.path.exists(p["WorkDir"])
    assert sorted(os.listdir(t / "image1")) == ["a", "b"]
    assert "Traceback" not in daemon.log()
