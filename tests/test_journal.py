"""The journal under damage and on a full disk: a start never fails for it, nothing
damaged is dropped silently, and a write is whole or not at all."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import CallError, is_mounted

from uniond import constants
from uniond.errors import NotRecorded
from uniond.mounts.journal import DAMAGED, StateStore
from uniond.mounts.records import MountRecord, MountSpec

E = constants.ERROR_PREFIX


def _record(mount_id: str, **spec) -> MountRecord:
    fields = {"lowerdirs": ("/l",), "upperdir": "/u", "workdir": "/w", "mountpoint": "/m", "readonly": False}
    return MountRecord(id=mount_id, spec=MountSpec(**{**fields, **spec}), owner=0, created_us=1, boot_id="b")


def _line(record: MountRecord) -> bytes:
    return (json.dumps({"put": record.to_json()}) + "\n").encode()


def _wrong(field: str, value) -> bytes:
    data = _record("x").to_json()
    where = data["spec"] if field in data["spec"] else data
    where[field] = value
    return (json.dumps({"put": data}) + "\n").encode()


DAMAGE = {
    "non-utf8": b'{"put": \xff\xfe}\n',
    "not-json": b"garbage\n",
    "workdir-int": _wrong("workdir", 5),
    "lowers-string": _wrong("lowerdirs", "/l"),
    "relative-workdir": _wrong("workdir", "w"),
    "owner-bool": _wrong("owner", True),
    "unknown-field": (json.dumps({"put": {**_record("y").to_json(), "evil": 1}}) + "\n").encode(),
    "drop-list": b'{"drop": ["a"]}\n',
    "json-list": b"[1, 2]\n",
    "nul-bytes": b"\x00" * 64 + b"\n",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_line_is_skipped_kept_aside_and_logged(tmp_path, kind, caplog):
    state = tmp_path / "state"
    state.mkdir()
    original = _line(_record("a")) + DAMAGE[kind] + _line(_record("b"))
    (state / "mounts.journal").write_bytes(original)
    store = StateStore(str(state))
    records = store.load()
    assert sorted(records) == ["a", "b"]
    (aside,) = [p for p in state.iterdir() if p.name.startswith(DAMAGED)]
    assert aside.read_bytes() == original
    assert "line 2" in caplog.text and str(aside) in caplog.text
    store.compact(records)
    assert sorted(StateStore(str(state)).load()) == ["a", "b"]
    assert aside.read_bytes() == original, "compaction leaves the copy alone"


@contextmanager
def _tmpfs(path: Path, size: str = "256k"):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(directory: Path, pad_journal: bool = True) -> Path:
    """Fill the filesystem to the last byte (and the journal's last page, unless told not)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    journal = directory / "mounts.journal"
    if pad_journal and journal.exists():
        # The last page of the journal has room too: fill it with blank lines (skipped).
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
        try:
            while os.write(fd, b"\n"):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
    return filler


def test_a_write_on_a_full_disk_is_whole_or_nothing(tmp_path):
    with _tmpfs(tmp_path / "state") as state:
        store = StateStore(str(state))
        store.lock()
        store.intend(_record("a"))
        long = "/" + "l" * 3000
        store.intend(_record("b", lowerdirs=(long,)))
        _fill(state, pad_journal=False)
        size = os.path.getsize(store.path)
        with pytest.raises(NotRecorded) as e:
            store.intend(_record("c", lowerdirs=(long,)))  # longer than the room left: a short write
        assert "is full" in str(e.value)
        assert os.path.getsize(store.path) == size, "the torn part is cut off again"
        # Short lines fill the last page of the journal, until one does not fit whole:
        # a drop is best effort, says so, and never raises.
        assert not all(store.drop("a") for _ in range(1000))
        store.close()
        records = StateStore(str(state)).load()
        assert sorted(records) == ["b"]
        assert not [p for p in state.iterdir() if p.name.startswith(DAMAGED)], "every line is whole"
        assert StateStore(str(state)).compact(records) is False, "no room to compact: kept as it is"
        assert sorted(StateStore(str(state)).load()) == ["b"]


def test_daemon_on_a_full_state_directory(daemon, client, layers):
    t = layers
    kept = client.mount([t / "image1"], t / "upper", t / "merge")
    daemon.stop()
    with _tmpfs(t / "full") as state:
        for name in os.listdir(daemon.state_dir):
            subprocess.run(["cp", "-a", str(daemon.state_dir / name), str(state)], check=True)
        daemon.state_dir = state
        filler = _fill(state)
        daemon.start()  # a start needs no free space
        assert client.list() == [kept]
        (t / "up2").mkdir()
        with pytest.raises(CallError) as e:
            client.mount([t / "image2"], t / "up2")
        assert e.value.name == f"{E}.Failed"
        assert "made none" in e.value.text and "is full" in e.value.text
        assert client.list() == [kept]
        assert not [n for n in os.listdir(t) if "uniond-work" in n and "up2" in n], "no workdir left"
        # An Unmount is finished even when its record cannot be dropped.
        client.unmount(kept)
        assert client.list() == [] and not is_mounted(t / "merge")
        assert kept not in client.managed_objects()
        daemon.kill()
        daemon.start()
        assert client.list() == []
        os.unlink(filler)
        path = client.mount([t / "image2"], t / "up2")
        assert client.list() == [path]
        client.unmount(path)
        daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log
    assert "not recorded in the journal" in log


def test_after_a_power_cut_records_of_the_old_boot_are_cleaned_never_adopted(daemon, client, layers):
    """A simulated reboot: the boot id is new, the journal's last line (written, not
    synced) is torn. Nothing of the old boot is adopted: not a mount someone else made
    at a recorded mountpoint, not even a mount whose kernel id matches its record (ids
    start again after a boot); the synced intents still name every workdir to clean."""
    t = layers
    (t / "upper2").mkdir()
    gone = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    survivor = client.mount([t / "image1"], t / "upper2", volatile=True)
    workdirs = {p: client.props(p)["WorkDir"] for p in (gone, survivor)}
    survivor_mp = client.props(survivor)["Mountpoint"]
    (t / "merge/written").write_text("synced by its writer")
    os.sync()
    daemon.kill()
    subprocess.run(["umount", str(t / "merge")], check=True)
    journal = daemon.state_dir / "mounts.journal"
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) - 40])  # the last completion line, torn
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(t / "merge")], check=True)  # someone else's, at boot
    daemon.extra_env = {"UNIOND_TEST_BOOT_ID": "00000000-0000-4000-8000-000000000001"}
    daemon.start()
    assert client.list() == [], "nothing of the old boot is adopted"
    assert is_mounted(t / "merge") and is_mounted(survivor_mp), "nor unmounted"
    assert not os.path.exists(workdirs[gone])
    assert os.path.exists(workdirs[survivor]), "a workdir still in use is kept for a later start"
    subprocess.run(["umount", str(t / "merge")], check=True)
    subprocess.run(["umount", survivor_mp], check=True)
    daemon.stop()
    daemon.start()
    assert not os.path.exists(workdirs[survivor]) and not os.path.exists(survivor_mp)
    assert (t / "upper/written").read_text() == "synced by its writer"
    log = daemon.log()
    assert "was volatile" in log and "Traceback" not in log


def test_a_torn_last_line_never_swallows_the_next_record_even_uncompacted(tmp_path):
    with _tmpfs(tmp_path / "state") as state:
        (state / "mounts.journal").write_bytes(_line(_record("a")) + b'{"put": {"id": "torn')
        _fill(state, pad_journal=False)
        store = StateStore(str(state))
        assert sorted(store.load()) == ["a"]
        assert store.compact({"a": _record("a")}) is False  # no room for the new file
        store.intend(_record("b"))  # fits in the journal's last page
        store.close()
        assert sorted(StateStore(str(state)).load()) == ["a", "b"]
