"""Scale as a caller meets it (issue 14): DiffInto for Diffs of any size and any name,
a daemon that adopts many live mounts at once, and GetManagedObjects that says what
each object says of itself. Speed is measured by bench/scale.py, never here."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess

import pytest
from dbus_next import Message
from harness import CallError, PipeReader

from uniond import constants
from uniond.kernel import syscalls
from uniond.layers import stream

E = constants.ERROR_PREFIX


def diff_into(client, mount, fd) -> int:
    return client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                           "DiffInto", "oha{sv}", [mount, 0, {}], unix_fds=[fd])[0]


def records(data: bytes) -> list[tuple[str, bytes]]:
    """KIND SPACE PATH NUL records, each checked for its form."""
    assert data == b"" or data.endswith(b"\0"), "every record ends with a NUL"
    out = []
    for record in data.split(b"\0")[:-1]:
        kind, space, path = record[:1], record[1:2], record[2:]
        assert kind in (b"A", b"C", b"D") and space == b" " and path.startswith(b"/"), record
        out.append((kind.decode(), path))
    return out


ODD_NAMES = [b"with space", b"new\nline", b"back\\slash", b"tab\there", b"colon:comma,", b"\xff\xfe-not-utf8"]


def test_diff_into_a_file_gives_every_change_with_its_bytes(client, layers, tmp_path):
    t = layers
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    os.unlink(t / "merge/a")
    os.chmod(t / "merge/b", 0o600)
    (t / "merge/dir/sub").mkdir(parents=True)
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(t / "merge/dir/sub"), name), "w") as f:
            f.write("x")

    out = tmp_path / "changes.bin"
    with open(out, "wb") as f:
        count = diff_into(client, path, f.fileno())
    got = records(out.read_bytes())
    assert count == len(got)
    expected = {("D", b"/a"), ("C", b"/b"), ("A", b"/dir"), ("A", b"/dir/sub")}
    expected |= {("A", b"/dir/sub/" + name) for name in ODD_NAMES}
    assert set(got) == expected and len(got) == len(expected)

    # Diff cannot carry a name that is not UTF-8 and says what to use instead.
    with pytest.raises(CallError) as e:
        client.diff(path)
    assert e.value.name == f"{E}.Failed" and "DiffInto" in e.value.text and "UTF-8" in e.value.text
    os.unlink(os.path.join(os.fsencode(t / "merge/dir/sub"), ODD_NAMES[-1]))
    with open(out, "wb") as f:
        count = diff_into(client, path, f.fileno())
    assert sorted((kind, p.encode()) for kind, p in client.diff(path)) == sorted(records(out.read_bytes()))
    assert count == len(client.diff(path)), "the same entries as Diff"


def test_diff_into_a_pipe_ends_when_the_call_returns(client, layers):
    """The daemon closes its copy of the fd before it replies: the reader sees the end."""
    t = layers
    # More than the pipe holds, even widened to 1 MiB (about 1.1 MiB of records): the
    # daemon must stream.
    long = "x" * 200
    for i in range(5000):
        (t / "upper" / f"file-{i:05d}-{long}").write_text("")
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    read_end, write_end = os.pipe()
    reader = PipeReader(read_end)
    msg = Message(destination=constants.BUS_NAME, path=constants.MANAGER_PATH, interface=constants.MANAGER_INTERFACE,
                  member="DiffInto", signature="oha{sv}", body=[path, 0, {}], unix_fds=[write_end])
    pending = asyncio.ensure_future(client.bus.call(msg), loop=client.loop)
    client.pump(0.05)
    os.close(write_end)  # dbus-next has sent it; only the daemon's copy is left
    reply = client.loop.run_until_complete(asyncio.wait_for(pending, 60))
    reader.join(30)
    assert not reader.is_alive(), "the pipe reached its end: nobody holds its write end any more"
    assert fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) == stream.PIPE_SIZE, "widened to stream faster"
    os.close(read_end)
    got = records(bytes(reader.received))
    assert reply.body == [5000] and len(got) == 5000
    assert {p for _, p in got} == {f"/file-{i:05d}-{long}".encode() for i in range(5000)}
    assert client.list() == [path], "the daemon is well"


def test_diff_too_large_for_a_message_points_to_diff_into(client, layers, tmp_path):
    t = layers
    # Deep paths, so that few entries pass the bus's 32 MiB: 14 directories of 250
    # bytes and names of 200 make paths of ~3,700 bytes; 9,500 of them take ~35 MiB.
    deep = t / "upper"
    for level in range(14):
        deep = deep / f"{level:02d}".ljust(250, "d")
    deep.mkdir(parents=True)
    fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
    try:
        for i in range(9500):
            os.close(os.open(f"{i:05d}".ljust(200, "n"), os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    with pytest.raises(CallError) as e:
        client.diff(path)
    assert e.value.name == f"{E}.Failed" and "DiffInto" in e.value.text and "one D-Bus message" in e.value.text
    out = tmp_path / "changes.bin"
    with open(out, "wb") as f:
        count = diff_into(client, path, f.fileno())
    assert count == 9500 + 14 == len(records(out.read_bytes()))
    assert client.list() == [path], "the daemon answered the error and is well"


def test_diff_into_refuses_a_descriptor_it_cannot_write(client, layers, tmp_path):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (tmp_path / "ro").write_text("")
    with open(tmp_path / "ro", "rb") as f, pytest.raises(CallError) as e:
        diff_into(client, path, f.fileno())
    assert e.value.name == f"{E}.InvalidArgument" and "reading only" in e.value.text
    with pytest.raises(CallError) as e:
        client.call("DiffInto", "oha{sv}", constants.MOUNT_PATH_PREFIX + "/nosuch", 0, {})
    assert e.value.name in (f"{E}.InvalidArgument", f"{E}.NotFound")


def test_managed_objects_say_what_each_object_says(client, layers, tmp_path):
    t = layers
    (tmp_path / "upper2").mkdir()
    (tmp_path / "merge2").mkdir()
    paths = [
        client.mount([t / "image2", t / "image1"], t / "upper", t / "merge", description="naïve ✓"),
        client.mount([t / "image1"], tmp_path / "upper2", tmp_path / "merge2", readonly=True),
        client.mount([t / "image2"]),
    ]
    client.pump()
    objects = client.managed_objects()
    assert sorted(objects) == sorted(paths)
    signalled = {m.body[0]: m.body[1] for m in client.signals if m.member == "InterfacesAdded"}
    for path in paths:
        props = client.props(path)
        listed = {k: v.value for k, v in objects[path][constants.MOUNT_INTERFACE].items()}
        announced = {k: v.value for k, v in signalled[path][constants.MOUNT_INTERFACE].items()}
        assert listed == props == announced
        assert list(objects[path]) == [constants.MOUNT_INTERFACE]
    assert {k: v.value for k, v in objects[paths[0]][constants.MOUNT_INTERFACE]["Options"].value.items()} == {
        "description": "naïve ✓"}


def test_restart_adopts_a_thousand_live_mounts(daemon, client, layers):
    """A start announces nothing before its name is owned (nobody could listen) and so
    cannot choke on its own signals; GetManagedObjects then shows every adopted mount."""
    t = layers
    lowers = [str(t / "image2"), str(t / "image1")]

    async def mount_many(n):
        # In flights of 100: the test's own dbus-next client has the writer bug that
        # uniond works around (EAGAIN on a full socket buffer is fatal to it).
        calls = [client.bus.call(Message(
            destination=constants.BUS_NAME, path=constants.MANAGER_PATH, interface=constants.MANAGER_INTERFACE,
            member="Mount", signature="asssa{sv}", body=[lowers, "", "", {}])) for _ in range(n)]
        return [reply.body[0] for reply in await asyncio.gather(*calls)]

    made = []
    for _ in range(10):
        made += client.loop.run_until_complete(mount_many(100))
    objects = client.managed_objects()
    mountpoints = [objects[p][constants.MOUNT_INTERFACE]["Mountpoint"].value for p in made]
    try:
        daemon.kill()
        daemon.start()
        assert "1000 adopted" in daemon.log()
        assert sorted(client.list()) == sorted(made)
        objects = client.managed_objects()
        assert sorted(objects) == sorted(made)
        props = client.props(made[500])
        assert props == {k: v.value for k, v in objects[made[500]][constants.MOUNT_INTERFACE].items()}
        assert props["Mountpoint"] == mountpoints[500]
        path = client.mount([t / "image1"], t / "upper", t / "merge")
        client.unmount(path)
        for path in made[:10]:
            client.unmount(path)
        assert len(client.list()) == 990
    finally:
        daemon.stop()
        for mountpoint in mountpoints[10:]:  # umount(8) would read the whole table per target
            syscalls.umount(mountpoint, lazy=True)


def test_an_upper_used_by_a_foreign_overlay_is_refused(client, layers, tmp_path):
    """M7 is checked against the kernel, also for overlays uniond did not make."""
    t = layers
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={t / 'image1'},upperdir={t / 'upper'},workdir={tmp_path / 'work'}",
                    str(tmp_path / "elsewhere")], check=True)
    try:
        client.mount([t / "image2"])  # something learnt before the foreign mount
        with pytest.raises(CallError) as e:
            client.mount([t / "image2"], t / "upper", t / "merge")
        assert e.value.name == f"{E}.InvalidArgument" and str(tmp_path / "elsewhere") in e.value.text
    finally:
        subprocess.run(["umount", str(tmp_path / "elsewhere")], check=True)
    path = client.mount([t / "image2"], t / "upper", t / "merge")
    assert client.props(path)["UpperDir"] == str(t / "upper"), "once it is gone, the upper is free"


def test_messages_packed_by_hand_equal_dbus_nexts():
    """uniond packs the messages it sends most (replies, errors, signals) itself; dbus-next's
    own marshaller is the oracle, byte for byte."""
    from dbus_next.constants import MessageFlag, MessageType

    from uniond.service import wire

    cases = [
        Message(path="/org/uniond1", interface="org.uniond1.Manager", member="MountAdded",
                message_type=MessageType.SIGNAL, signature="os", body=["/org/uniond1/mount/ab", "/tmp/x y"]),
        Message(message_type=MessageType.METHOD_RETURN, reply_serial=12, destination=":1.9", signature="o",
                body=["/org/uniond1/mount/abc"]),
        Message(message_type=MessageType.METHOD_RETURN, reply_serial=12, destination=":1.9"),
        Message(message_type=MessageType.ERROR, reply_serial=1, destination=":1.9", error_name=f"{E}.Failed",
                signature="s", body=["naïve ✓ \n text"]),
        Message(message_type=MessageType.METHOD_RETURN, reply_serial=3, destination=":1.2", signature="aot",
                body=[["/a/b", "/c"], 2**40 + 5]),
        Message(message_type=MessageType.SIGNAL, path="/org/uniond1", interface="org.freedesktop.DBus.ObjectManager",
                member="InterfacesRemoved", signature="oas", body=["/o", ["org.uniond1.Mount"]],
                flags=MessageFlag.NO_REPLY_EXPECTED),
        Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", member="Hello"),
        Message(message_type=MessageType.METHOD_RETURN, reply_serial=3, destination=":1.2", signature="hb",
                body=[0, True], unix_fds=[1]),
    ]
    for serial, msg in enumerate(cases, 1):
        msg.serial = serial
        for fds in (False, True):
            assert wire.pack(msg, fds) == msg._marshall(negotiate_unix_fd=fds), (msg.member, msg.signature)
    assert wire.pack(Message(path="/", member="M", signature="a{sv}", body=[{}]), False) is None, "left to dbus-next"


@pytest.mark.parametrize("upper_name", ["upper", "up per,odd"])
def test_uppers_in_use_are_found_by_mount_id_and_by_mountinfo(tmp_path, upper_name):
    """M7's kernel side both ways: listmount/statmount, and mountinfo where a seccomp
    filter (systemd 252's) or an older kernel refuses those calls."""
    from uniond.kernel.mounttable import OverlayUppers

    for name in ("lower", upper_name, "work", "merge"):
        (tmp_path / name).mkdir()
    upper = str(tmp_path / upper_name)
    by_id, by_table = OverlayUppers(), OverlayUppers()
    by_table._fallback = True
    assert by_id.user_of(upper) is None and by_table.user_of(upper) is None
    fs = syscalls.fsopen("overlay")
    for key, path in (("lowerdir+", tmp_path / "lower"), ("upperdir", upper), ("workdir", tmp_path / "work")):
        syscalls.fsconfig_string(fs, key, str(path))
    syscalls.fsconfig_create(fs)
    mnt = syscalls.fsmount(fs, 0)
    syscalls.move_mount(mnt, str(tmp_path / "merge"))
    os.close(mnt)
    os.close(fs)
    try:
        assert by_id.user_of(upper) == by_table.user_of(upper) == str(tmp_path / "merge")
        assert by_id.user_of(str(tmp_path / "lower")) is None and by_table.user_of(str(tmp_path / "lower")) is None
    finally:
        syscalls.umount(str(tmp_path / "merge"))
    assert by_id.user_of(upper) is None and by_table.user_of(upper) is None, "gone once unmounted"


def test_mountinfo_is_read_again_only_after_the_table_changed(tmp_path):
    """The fallback's cache (no listmount): the same text while nothing changed, the new
    mount in it as soon as one is made, and gone again once it is unmounted."""
    from uniond.kernel.mounttable import ChangedTable

    table = ChangedTable(watch=False)
    first = table.text()
    assert table.text() is first, "read again although nothing changed"
    (tmp_path / "merge").mkdir()
    merge = str(tmp_path / "merge")
    subprocess.run(["mount", "-t", "tmpfs", "changed-table", merge], check=True)
    try:
        assert f" {merge} " in table.text()
        again = table.text()
        assert table.text() is again
    finally:
        syscalls.umount(merge)
    assert f" {merge} " not in table.text()


def test_a_pipe_handed_over_is_widened_and_a_file_left_alone(tmp_path):
    """Its reader loses nothing: the pipe only holds more."""
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < stream.PIPE_SIZE
        stream.widen_pipe(w)
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == stream.PIPE_SIZE
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "file", "wb") as f:
        stream.widen_pipe(f.fileno())
        f.write(b"x")
    assert (tmp_path / "file").read_bytes() == b"x"
