"""ExportDiff, ImportLayer and Commit as callers meet them: over the bus, with real fds."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading

import pytest
from dbus_next import Message, Variant
from harness import ROOT, CallError, PipeReader
from views import view

from uniond import constants

E = constants.ERROR_PREFIX


def call_with_fd(client, member, signature, body, fd):
    """``body`` holds 0 where the fd goes: dbus-next sends "h" as an index into unix_fds."""
    return client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                           member, signature, body, unix_fds=[fd])


def export(client, mount, path, **opts):
    with open(path, "wb") as f:
        options = {k: Variant("s", v) for k, v in opts.items()}
        return call_with_fd(client, "ExportDiff", "oha{sv}", [mount, 0, options], f.fileno())[0]


def import_layer(client, path, destdir, **opts):
    with open(path, "rb") as f:
        options = {k: Variant("b", v) for k, v in opts.items()}
        return call_with_fd(client, "ImportLayer", "hsa{sv}", [0, str(destdir), options], f.fileno())[0]


def commit(client, mount, destdir):
    return client.call("Commit", "osa{sv}", mount, str(destdir), {})[0]


def make_changes(merge):
    os.unlink(merge / "a")  # a lower file: a whiteout
    (merge / "d").write_text("added")
    os.link(merge / "d", merge / "d-link")
    os.symlink("../etc/passwd", merge / "s")
    os.setxattr(merge / "d", "user.note", b"\xff\x00binary")
    os.chmod(merge / "b", 0o600)
    (merge / "dir/sub").mkdir(parents=True)
    (merge / "dir/sub/f").write_bytes(os.urandom(300_000))
    os.chown(merge / "dir/sub/f", 1234, 5678)
    (merge / ("long-" + "x" * 150)).write_text("a name longer than ustar's 100 bytes")


def test_export_import_commit_round_trip(client, layers, tmp_path):
    t = layers
    (t / "image1/dir").mkdir()
    (t / "image1/dir/gone").write_text("hidden by an opaque directory")
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    make_changes(t / "merge")
    subprocess.run(["rm", "-rf", str(t / "merge/dir")], check=True)
    (t / "merge/dir").mkdir()  # re-created over a lower directory: opaque
    (t / "merge/dir/new").write_text("in the opaque directory")
    expected = view(t / "merge")

    size = export(client, path, tmp_path / "layer.tar")
    assert size == os.path.getsize(tmp_path / "layer.tar") and size % 10240 == 0
    gnu = subprocess.run(["tar", "-tvf", str(tmp_path / "layer.tar")], capture_output=True, text=True)
    assert gnu.returncode == 0 and gnu.stderr == "", gnu.stderr
    with tarfile.open(tmp_path / "layer.tar", errorlevel=2) as tf:
        names = tf.getnames()
        xattrs = tf.getmember("d").pax_headers["SCHILY.xattr.user.note"]
    assert names.index("dir") < names.index("dir/.wh..wh..opq") < names.index("dir/new"), "E1, E2"
    assert ".wh.a" in names and len(names) == len(set(names))
    assert xattrs.encode("utf-8", "surrogateescape") == b"\xff\x00binary"
    with tarfile.open(tmp_path / "layer.tar") as tf:
        assert tf.getmember("d-link").islnk() and tf.getmember("d-link").linkname == "d", "D7"

    gz = export(client, path, tmp_path / "layer.tar.gz", compression="gzip")
    assert gz < size and subprocess.run(["tar", "-tzf", str(tmp_path / "layer.tar.gz")],
                                        capture_output=True).stderr == b""

    for name, source in (("imported", tmp_path / "layer.tar"), ("imported-gz", tmp_path / "layer.tar.gz")):
        (tmp_path / name).mkdir()
        entries = import_layer(client, source, tmp_path / name)
        assert entries == len(names) - 1  # every entry but the opaque marker, which is an xattr
        assert stat.S_ISCHR(os.lstat(tmp_path / name / "a").st_mode), "E3: .wh.a is a 0/0 device"
        assert os.getxattr(tmp_path / name / "dir", "trusted.overlay.opaque") == b"y"
    (tmp_path / "committed").mkdir()
    assert commit(client, path, tmp_path / "committed") == len(names) - 1

    for layer in ("imported", "imported-gz", "committed"):
        ro = client.mount([tmp_path / layer, t / "image2", t / "image1"])
        assert view(client.props(ro)["Mountpoint"]) == expected, f"{layer} stacked shows the merged view"
        client.unmount(ro)


def test_export_streams_and_the_daemon_answers_meanwhile(client, layers):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (t / "merge/big").write_bytes(os.urandom(8 << 20))
    read_end, write_end = os.pipe()
    msg = Message(destination=constants.BUS_NAME, path=constants.MANAGER_PATH, interface=constants.MANAGER_INTERFACE,
                  member="ExportDiff", signature="oha{sv}", body=[path, 0, {}], unix_fds=[write_end])
    pending = asyncio.ensure_future(client.bus.call(msg), loop=client.loop)
    client.pump(0.3)
    os.close(write_end)  # the daemon holds its own copy now
    assert not pending.done(), "the export waits for a reader: the pipe is full"
    # The export cannot finish before the pipe is read: an answer now is an answer during it.
    assert client.list() == [path]
    assert not pending.done()
    with pytest.raises(CallError) as e:
        client.unmount(path)
    assert e.value.name == f"{E}.Busy", "a mount is not taken away from under its export"
    reader = PipeReader(read_end)
    reply = client.loop.run_until_complete(asyncio.wait_for(pending, 60))
    reader.join()
    received = reader.received
    os.close(read_end)
    assert reply.body == [len(received)]
    with tarfile.open(fileobj=io.BytesIO(bytes(received))) as tf:
        assert tf.extractfile("big").read() == (t / "upper/big").read_bytes()


def test_streams_that_never_end_hold_neither_other_calls_nor_the_stop(client, layers, daemon, tmp_path):
    """A caller may keep its end of the pipe open and silent for ever. More such imports
    and exports than the event loop's worker threads must not delay a Diff or a Commit,
    and the daemon still stops at once (found by tests/test_fuzz.py with an eventfd)."""
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (t / "merge/f").write_text("f")
    kept = []
    for i in range(2 * (os.cpu_count() or 1) + 8):  # more than asyncio's default pool
        r, w = os.pipe()
        kept += [r, w]
        if i % 2:
            member, body, fd = "ExportDiff", [path, 0, {}], w  # nobody reads, after the pipe is full
            (t / f"merge/big{i}").write_bytes(bytes(1 << 17))
        else:
            (tmp_path / f"dest{i}").mkdir()
            member, body, fd = "ImportLayer", [0, str(tmp_path / f"dest{i}"), {}], r  # nobody writes
        msg = Message(destination=constants.BUS_NAME, path=constants.MANAGER_PATH,
                      interface=constants.MANAGER_INTERFACE, member=member,
                      signature={"ExportDiff": "oha{sv}", "ImportLayer": "hsa{sv}"}[member], body=body, unix_fds=[fd])
        asyncio.ensure_future(client.bus.call(msg), loop=client.loop)
    client.pump(1)
    # The stuck streams never end: a Diff or Commit that waited for them would never
    # answer (the client gives up after 60 s), and a stop that waited would not return.
    assert ("A", "/f") in client.diff(path)
    (tmp_path / "c").mkdir()
    assert commit(client, path, tmp_path / "c") >= 1
    assert daemon.stop() == 0
    for fd in kept:
        os.close(fd)


def test_gdbus_passes_the_fd(client, layers, bus, tmp_path):
    """busctl (systemd 252) refuses "h" arguments; gdbus call sends its own fd N for "@h N"."""
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (t / "merge/n").write_text("n")
    gdbus = ["gdbus", "call", f"--address={bus.address}", "--dest", constants.BUS_NAME,
             "--object-path", constants.MANAGER_PATH, "--method"]
    with open(tmp_path / "layer.tar.gz", "wb") as f:  # the README's example
        out = subprocess.run(gdbus + [f"{constants.MANAGER_INTERFACE}.ExportDiff", path, "3",
                                      "{'compression': <'gzip'>}"],
                             capture_output=True, text=True, pass_fds=(3,), preexec_fn=lambda: os.dup2(f.fileno(), 3))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "layer.tar.gz").read_bytes()[:2] == b"\x1f\x8b"
    with open(tmp_path / "layer.tar", "wb") as f:
        out = subprocess.run(gdbus + [f"{constants.MANAGER_INTERFACE}.ExportDiff", path, "3", "{}"],
                             capture_output=True, text=True, pass_fds=(3,),
                             preexec_fn=lambda: os.dup2(f.fileno(), 3))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"(uint64 {os.path.getsize(tmp_path / 'layer.tar')},)"
    (tmp_path / "imp").mkdir()
    with open(tmp_path / "layer.tar", "rb") as f:
        out = subprocess.run(gdbus + [f"{constants.MANAGER_INTERFACE}.ImportLayer", "3", str(tmp_path / "imp"), "{}"],
                             capture_output=True, text=True, pass_fds=(3,), preexec_fn=lambda: os.dup2(f.fileno(), 3))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(uint64 1,)" and (tmp_path / "imp/n").read_text() == "n"


def test_errors(client, layers, tmp_path):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (tmp_path / "dest").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").touch()
    cases = [
        (lambda: export(client, f"{constants.MOUNT_PATH_PREFIX}/nope", tmp_path / "x.tar"), "NotFound", "nope"),
        (lambda: export(client, path, tmp_path / "x.tar", compression="lz4"), "InvalidArgument", "compression"),
        (lambda: call_with_fd(client, "ExportDiff", "oha{sv}", [path, 0, {"bogus": Variant("b", True)}],
                              os.open(t / "image1/a", os.O_RDONLY)), "InvalidArgument", "'bogus'"),
        (lambda: call_with_fd(client, "ExportDiff", "oha{sv}", [path, 0, {}], os.open(t / "image1/a", os.O_RDONLY)),
         "InvalidArgument", "reading only"),
        (lambda: client.call("ExportDiff", "oha{sv}", path, 0, {}), "InvalidArgument", "no file descriptor"),
        (lambda: call_with_fd(client, "ExportDiff", "oha{sv}", [path, 0, {}], os.eventfd(0)),
         "InvalidArgument", "not a file, a pipe"),
        (lambda: call_with_fd(client, "ExportDiff", "oha{sv}", [path, 0, {}], socket.socket(socket.AF_UNIX).detach()),
         "InvalidArgument", "stream of bytes"),
        (lambda: call_with_fd(client, "ImportLayer", "hsa{sv}", [0, str(tmp_path / "dest"), {}],
                              os.open(t / "image1/a", os.O_PATH)), "InvalidArgument", "O_PATH"),
        (lambda: call_with_fd(client, "ImportLayer", "hsa{sv}", [0, str(tmp_path / "dest"), {}],
                              socket.socket(socket.AF_UNIX).detach()), "InvalidArgument", "stream of bytes"),
        (lambda: commit(client, path, tmp_path / "full"), "InvalidArgument", "not empty"),
        (lambda: commit(client, path, t / "upper"), "InvalidArgument", "overlaps"),
        (lambda: commit(client, path, "relative"), "InvalidArgument", "relative"),
        (lambda: commit(client, f"{constants.MOUNT_PATH_PREFIX}/nope", tmp_path / "dest"), "NotFound", "nope"),
        (lambda: import_layer(client, t / "image1/a", tmp_path / "dest"), "InvalidArgument", "not a readable"),
        (lambda: import_layer(client, t / "image1/a", tmp_path / "missing"), "InvalidArgument", "does not exist"),
    ]
    for call, name, needle in cases:
        with pytest.raises(CallError) as e:
            call()
        assert e.value.name == f"{E}.{name}", e.value
        assert needle in e.value.text and "Traceback" not in e.value.text
    assert os.listdir(tmp_path / "dest") == []
    (t / "merge/.wh.lookalike").touch()  # a name every layer reader would take for a whiteout
    with pytest.raises(CallError) as e:
        export(client, path, tmp_path / "x.tar")
    assert e.value.name == f"{E}.InvalidArgument" and "'/.wh.lookalike'" in e.value.text
    assert client.list() == [path]


def test_no_descriptor_leaks_in_the_daemon(client, layers, daemon, tmp_path):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    export(client, path, tmp_path / "warm.tar")
    before = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    with open(t / "image1/a", "rb") as f, open(tmp_path / "x.tar", "wb") as out:
        for _ in range(20):
            # Descriptors attached to calls that take none, extra ones, and failing calls.
            client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                            "ListMounts", unix_fds=[f.fileno(), f.fileno()])
            client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                            "ExportDiff", "oha{sv}", [path, 1, {}], unix_fds=[f.fileno(), out.fileno()])
            with pytest.raises(CallError):
                call_with_fd(client, "ExportDiff", "oha{sv}", [path, 0, {"bogus": Variant("b", True)}], out.fileno())
            with pytest.raises(CallError):
                call_with_fd(client, "ImportLayer", "hsa{sv}", [0, "relative", {}], f.fileno())
    assert len(os.listdir(f"/proc/{daemon.pid}/fd")) == before


def test_commit_freezes_writers_or_copies_and_verifies(client, layers, tmp_path, daemon):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (t / "merge/f").write_text("one")
    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    assert commit(client, path, tmp_path / "c1") == 1  # frozen for the copy, then thawed
    (t / "merge/after").write_text("the mount is writable again")
    with open(t / "merge/open-for-writing", "w") as f:
        f.write("x")
        f.flush()
        # A file open for writing: the mount cannot be frozen, so Commit copies and verifies.
        assert commit(client, path, tmp_path / "c2") == 3
        f.write("still writable")
    assert (tmp_path / "c2/open-for-writing").read_text() == "x"
    assert sorted(os.listdir(tmp_path / "c2")) == ["after", "f", "open-for-writing"]


def test_commit_under_constant_writes_is_consistent_or_busy(client, layers, tmp_path):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    for i in range(200):
        (t / f"merge/f{i}").write_bytes(b"x" * 4096)
    stop = threading.Event()
    writing = threading.Event()

    def writer():
        with open(t / "merge/log", "a") as f:
            writing.set()
            n = 0
            while not stop.is_set():
                f.write(f"{n}\n")
                f.flush()
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    writing.wait(10)  # the file is open for writing before Commit tries to freeze the mount
    try:
        (tmp_path / "c").mkdir()
        try:
            entries = commit(client, path, tmp_path / "c")
        except CallError as e:
            assert e.name == f"{E}.Busy" and "kept changing" in e.text
            assert os.listdir(tmp_path / "c") == [], "a refused Commit leaves destdir empty"
        else:
            assert entries == len(os.listdir(tmp_path / "c"))
            lines = (tmp_path / "c/log").read_text().splitlines()
            assert lines == [str(i) for i in range(len(lines))], "the copy is one state of the file"
    finally:
        stop.set()
        thread.join()


# ---- hostile archives ---------------------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _hostile(outside: str) -> dict[str, bytes]:
    f = _entry
    info = f("big")  # a header claiming a 64 GiB file, then nothing
    info.size = 64 << 30
    huge = info.tobuf(tarfile.PAX_FORMAT) + bytes(1024)
    pax = f("p")
    pax.pax_headers = {"comment": "x" * (2 << 20)}
    negative = f("n", uid=-5)  # base-256 numbers: GNU tar writes them, negative ones too
    return {
        "dotdot": _tar((f("../escape"), b"x")),
        "dotdot-inner": _tar((f("a/../../escape"), b"x")),
        "absolute": _tar((f(f"{outside}/abs"), b"x")),
        "through-symlink": _tar((f("link", tarfile.SYMTYPE, outside), b""), (f("link/file"), b"x")),
        "through-symlink-dotdot": _tar((f("up", tarfile.SYMTYPE, ".."), b""), (f("up/escape"), b"x")),
        "hardlink-absolute": _tar((f("hl", tarfile.LNKTYPE, "/etc/passwd"), b"")),
        "hardlink-dotdot": _tar((f("hl", tarfile.LNKTYPE, "../outside/target"), b"")),
        "hardlink-through-symlink": _tar((f("link", tarfile.SYMTYPE, outside), b""),
                                         (f("hl", tarfile.LNKTYPE, "link/target"), b"")),
        "hardlink-forward": _tar((f("hl", tarfile.LNKTYPE, "later"), b""), (f("later"), b"x")),
        "device": _tar((f("null", tarfile.CHRTYPE, devmajor=1, devminor=3), b"")),
        "whiteout-device": _tar((f("wo", tarfile.CHRTYPE), b"")),
        "wh-empty": _tar((f(".wh."), b"")),
        "wh-dot": _tar((f("d/.wh.."), b"")),
        "wh-dotdot": _tar((f(".wh..."), b"")),
        "duplicate": _tar((f("a"), b"1"), (f("a"), b"2")),
        "dir-then-file": _tar((f("d", tarfile.DIRTYPE), b""), (f("d"), b"x")),
        "whiteout-and-file": _tar((f("x"), b"1"), (f(".wh.x"), b"")),
        "huge-entry": huge,
        "huge-pax-header": _tar((pax, b"")),
        "long-component": _tar((f("n" * 300), b"")),
        "not-a-tar": b"this is not a tar archive\n" * 100,
        "truncated": _tar((f("a"), b"y" * 5000))[:2048],
        # What the system calls cannot take (found by tests/test_fuzz.py): a NUL byte,
        # ids and times out of range, xattrs the kernel refuses, tarfile's own ValueError.
        "nul-in-name": _tar((f("a", pax_headers={"path": "a\0b"}), b"x")),
        "nul-in-symlink-target": _tar((f("s", tarfile.SYMTYPE, pax_headers={"linkpath": "t\0u"}), b"")),
        "nul-in-xattr-name": _tar((f("x", pax_headers={"SCHILY.xattr.user.a\0b": "v"}), b"x")),
        "uid-out-of-range": _tar((f("u", pax_headers={"uid": str(1 << 40)}), b"x")),
        "uid-negative": negative.tobuf(tarfile.GNU_FORMAT) + bytes(1024),
        "mtime-out-of-range": _tar((f("m", pax_headers={"mtime": "9" * 20}), b"x")),
        "dir-mtime-out-of-range": _tar((f("d", tarfile.DIRTYPE, pax_headers={"mtime": "-" + "9" * 20}), b"")),
        "xattr-name-empty": _tar((f("x", pax_headers={"SCHILY.xattr.user.": "v"}), b"x")),
        "xattr-name-too-long": _tar((f("x", pax_headers={"SCHILY.xattr.user." + "n" * 300: "v"}), b"x")),
        "xattr-on-fifo": _tar((f("p", tarfile.FIFOTYPE, pax_headers={"SCHILY.xattr.user.a": "v"}), b"")),
        "capability-garbage": _tar((f("c", pax_headers={"SCHILY.xattr.security.capability": "garbage"}), b"x")),
        "gzip-header-truncated": b"\x1f\x8b\x08\x04" + bytes(6),
        # A bad header after good ones: refused, no longer read as the archive's end.
        "garbage-after-first": _tar((f("a"), b"1"))[:1024] + b"not a header" * 100,
        "pax-header-then-end": _tar((f("a", pax_headers={"path": "b"}), b""))[:1024] + bytes(1024),
        "bad-sparse-map": _tar((f("s", pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                     "GNU.sparse.realsize": "10"}), b"garbage\n" * 10)),
    }


def test_hostile_archives_are_refused_and_leave_nothing(client, layers, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("must stay as it is")
    dest = tmp_path / "dest"
    dest.mkdir()
    for case, data in _hostile(str(outside)).items():
        (tmp_path / "layer.tar").write_bytes(data)
        with pytest.raises(CallError) as e:
            import_layer(client, tmp_path / "layer.tar", dest)
        assert e.value.name == f"{E}.InvalidArgument", (case, e.value)
        assert os.listdir(dest) == [], f"{case}: a refused layer leaves destdir empty"
        assert sorted(os.listdir(outside)) == ["target"], case
        assert (outside / "target").read_text() == "must stay as it is", case
        assert os.stat(outside / "target").st_nlink == 1, case
        assert not (tmp_path / "escape").exists() and not os.path.exists("/abs"), case


def test_docker_style_layers_are_accepted(client, layers, tmp_path):
    f = _entry
    data = _tar(
        (f("./etc/conf", mode=0o640, uid=7, gid=8, mtime=1_000_000), b"conf"),  # parent comes implicitly
        (f("./etc/.wh..wh..opq"), b""),
        (f("./etc", tarfile.DIRTYPE, mode=0o750, mtime=2_000_000), b""),  # the directory after its children
        (f(".wh..wh.plnk", tarfile.DIRTYPE), b""),  # AUFS bookkeeping, skipped
        (f(".wh..wh.plnk/123.456"), b""),
        (f("usr/.wh.lib"), b""),
        (f("bin", tarfile.SYMTYPE, "usr/bin"), b""),
        (f("null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
    )
    (tmp_path / "layer.tar.gz").write_bytes(__import__("gzip").compress(data))
    (tmp_path / "dest").mkdir()
    assert import_layer(client, tmp_path / "layer.tar.gz", tmp_path / "dest", devices=True) == 6
    d = tmp_path / "dest"
    st = os.stat(d / "etc/conf")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o640, 7, 8, 1_000_000)
    assert stat.S_IMODE(os.stat(d / "etc").st_mode) == 0o750 and os.stat(d / "etc").st_mtime == 2_000_000
    assert os.getxattr(d / "etc", "trusted.overlay.opaque") == b"y"
    assert os.lstat(d / "usr/lib").st_rdev == 0 and stat.S_ISCHR(os.lstat(d / "usr/lib").st_mode)
    assert os.readlink(d / "bin") == "usr/bin"
    assert os.lstat(d / "null").st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(d)) == ["bin", "etc", "null", "usr"]


# ---- what the random test does not reach ----------------------------------------------


def test_layer_edge_cases_round_trip(tmp_path):
    """Names that are not UTF-8 or longer than ustar holds, ids and times beyond its fields,
    devices, FIFOs, sockets and the xattr form of whiteouts (D2), in-process."""
    from socket import AF_UNIX, socket

    from views import view

    from uniond.layers import snapshot
    from uniond.layers import tar as layertar

    upper = tmp_path / "upper"
    upper.mkdir()
    odd = os.fsencode(str(upper)) + b"/caf\xe9-not-utf8"
    with open(odd, "wb") as f:
        f.write(b"latin-1 name")
    os.symlink("t" * 200, upper / "long-target")
    (upper / "big-ids").write_text("x")
    os.chown(upper / "big-ids", 3_000_000, 4_000_000)
    (upper / "old").write_text("x")
    os.utime(upper / "old", ns=(-1_500_000_000, -1_500_000_000))
    (upper / "whole-second").write_text("x")
    os.utime(upper / "whole-second", ns=(1_000_000_000, 1_000_000_000))
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket(AF_UNIX)
    sock.bind(str(upper / "sock"))
    (upper / "xwh").touch()
    os.setxattr(upper / "xwh", "trusted.overlay.whiteout", b"")
    (upper / "dir").mkdir()
    os.setxattr(upper / "dir", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "dir", "user.kept", b"k")
    os.setxattr(upper / "big-ids", "trusted.overlay.origin", b"never exported")  # D6

    with open(tmp_path / "layer.tar", "wb") as f:
        layertar.export_diff(str(upper), f.fileno())
    sock.close()
    gnu = subprocess.run(["tar", "-tvf", str(tmp_path / "layer.tar")], capture_output=True)
    assert gnu.returncode == 0 and gnu.stderr == b"", gnu.stderr
    with tarfile.open(tmp_path / "layer.tar", errorlevel=2) as tf:
        names = tf.getnames()
        assert tf.getmember("big-ids").uid == 3_000_000 and tf.getmember("big-ids").gid == 4_000_000
        assert not any("trusted" in k for m in tf for k in m.pax_headers)
    assert "sock" not in names and ".wh.xwh" in names and "dir/.wh..wh..opq" in names

    results = {}
    for how in ("imported", "committed"):
        dest = tmp_path / how
        dest.mkdir()
        if how == "imported":
            with open(tmp_path / "layer.tar", "rb") as f:
                layertar.import_layer(f.fileno(), str(dest), devices=True)
        else:
            snapshot.commit(str(upper), str(dest))
        assert stat.S_ISCHR(os.lstat(dest / "xwh").st_mode) and os.lstat(dest / "xwh").st_rdev == 0
        assert os.getxattr(dest / "dir", "trusted.overlay.opaque") == b"y"
        assert os.listxattr(dest / "big-ids") == []
        assert not (dest / "sock").exists()
        results[how] = view(dest)
        entries = results[how][0]
        assert entries["/old"].mtime_ns == -1_500_000_000
        assert entries["/whole-second"].mtime_ns == 1_000_000_000
        assert entries["/long-target"].content == "t" * 200
        assert entries["/null"].content == f"{stat.S_IFCHR}:{os.makedev(1, 3)}"
        assert os.fsdecode(b"/caf\xe9-not-utf8") in entries
        assert entries["/dir"].xattrs == (("user.kept", b"k"),)
    whiteout = f"{stat.S_IFCHR}:0"  # made at unpacking time: their mtimes differ
    same = [{p: e for p, e in r[0].items() if e.content != whiteout} for r in results.values()]
    assert same[0] == same[1]


_AS_USER_LAYERS = """
import os, sys
sys.path.insert(0, sys.argv[2])
from harness import CallError, Client
c = Client(sys.argv[1])
mount, tar, imported, committed = sys.argv[3:7]
calls = [
    ("ExportDiff", "oha{sv}", [mount, 0, {}], lambda: os.open(tar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)),
    ("ImportLayer", "hsa{sv}", [0, imported, {}], lambda: os.open(tar, os.O_RDONLY)),
    ("Commit", "osa{sv}", [mount, committed, {}], None),
]
for member, signature, body, opener in calls:
    fds = [opener()] if opener else []
    try:
        reply = c.call_raw("org.uniond1", "/org/uniond1", "org.uniond1.Manager", member, signature, body, fds)
    except CallError as e:
        print(e.name)
    else:
        print("ok", reply[0])
    for fd in fds:
        os.close(fd)
"""


def _layer_calls_as_nobody(bus, mount, dirs):
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", _AS_USER_LAYERS,
         bus.address, str(ROOT / "tests"), mount, *(str(dirs / n) for n in ("layer.tar", "imported", "committed"))],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_an_upper_nested_deeper_than_the_recursion_limit_exports(tmp_path):
    """PATH_MAX lets a user nest directories about 2,000 deep; the export walks them
    without recursion (it used to fail with RecursionError past ~1,000), and GNU tar
    lists every level. The walk holds a descriptor per level: the daemon raises its
    soft descriptor limit to the hard one at start, as this test does."""
    import resource

    from uniond.layers import tar as layertar

    upper = tmp_path / "upper"
    upper.mkdir()
    depth = 1500
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits[1], limits[1]))
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.close(fd)
        with open(tmp_path / "layer.tar", "wb") as f:
            assert layertar.export_diff(str(upper), f.fileno()).entries == depth + 1
        gnu = subprocess.run(["tar", "-tf", str(tmp_path / "layer.tar")], capture_output=True, check=True)
        names = gnu.stdout.decode().splitlines()
        assert len(names) == depth + 1 and names[-1] == "d/" * depth + "f"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        _flatten(upper)


def _flatten(top) -> None:
    """Removes a chain of nested "d" directories level by level, each level's child moved
    up before it goes: shutil.rmtree (and so pytest's cleanup) recurses once per level."""
    top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top_fd)
            except FileNotFoundError:
                return
            try:
                with os.scandir(fd) as it:
                    names = [e.name for e in it]
                for name in names:
                    os.rename(name, f"up-{name}", src_dir_fd=fd, dst_dir_fd=top_fd)
            finally:
                os.close(fd)
            os.rmdir("d", dir_fd=top_fd)
            if "d" in names:
                os.rename("up-d", "d", src_dir_fd=top_fd, dst_dir_fd=top_fd)
    finally:
        os.close(top_fd)


def test_layer_methods_need_their_polkit_actions(client, layers, bus, polkit, user_dirs):
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (t / "merge/d").write_text("added")
    for name in ("imported", "committed"):
        (user_dirs / name).mkdir()
    # polkit denies: nothing is written anywhere.
    assert _layer_calls_as_nobody(bus, path, user_dirs) == [f"{E}.NotAuthorized"] * 3
    assert [c["action"] for c in polkit.calls()] == [
        constants.ACTION_EXPORT, constants.ACTION_IMPORT, constants.ACTION_COMMIT,
    ]
    export_call, import_call, commit_call = polkit.calls()
    assert export_call["details"]["mount"] == path.rsplit("/", 1)[1]
    assert export_call["details"]["upperdir"] == str(t / "upper")
    assert export_call["details"]["compression"] == "none"
    assert import_call["details"] == {"destdir": str(user_dirs / "imported")}
    assert commit_call["details"]["destdir"] == str(user_dirs / "committed")
    assert os.path.getsize(user_dirs / "layer.tar") == 0
    assert os.listdir(user_dirs / "imported") == [] and os.listdir(user_dirs / "committed") == []
    # polkit allows: the same calls work for the unprivileged caller.
    polkit.set_allowed([constants.ACTION_EXPORT, constants.ACTION_IMPORT, constants.ACTION_COMMIT])
    results = _layer_calls_as_nobody(bus, path, user_dirs)
    assert [r.split()[0] for r in results] == ["ok"] * 3, results
    assert int(results[0].split()[1]) == os.path.getsize(user_dirs / "layer.tar")
    assert os.listdir(user_dirs / "imported") == ["d"] == os.listdir(user_dirs / "committed")
    assert (user_dirs / "imported/d").read_text() == "added"


def test_devices_in_a_layer_are_roots_only(client, bus, polkit, user_dirs):
    polkit.set_allowed([constants.ACTION_IMPORT])
    (user_dirs / "dest").mkdir()
    (user_dirs / "layer.tar").write_bytes(b"")
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from harness import CallError, Client\n"
        "from dbus_next import Variant\n"
        "c = Client(sys.argv[1]); fd = os.open(sys.argv[3], os.O_RDONLY)\n"
        "try: c.call_raw('org.uniond1', '/org/uniond1', 'org.uniond1.Manager', 'ImportLayer', 'hsa{sv}',"
        " [0, sys.argv[4], {'devices': Variant('b', True)}], [fd])\n"
        "except CallError as e: print(e.name, e.text)\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script,
         bus.address, str(ROOT / "tests"), str(user_dirs / "layer.tar"), str(user_dirs / "dest")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.stdout.startswith(f"{E}.NotPermitted devices:"), (out.stdout, out.stderr)
    assert polkit.calls() == [], "refused before polkit is asked"


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar", "pax-0.0", "pax-0.1"])
def test_layers_written_by_gnu_tar_import_exactly(tmp_path, fmt):
    """Every header form GNU tar writes, sparse files (-S) in each of its sparse forms."""
    from views import view

    from uniond.layers import tar as layertar

    src = tmp_path / "src"
    (src / "dir/sub").mkdir(parents=True)
    (src / "dir/sub/f").write_bytes(os.urandom(5000))
    with open(src / "dir/sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"middle")
        f.truncate(5 << 20)  # a hole at the end too
    (src / "dir/g").write_text("g")
    os.link(src / "dir/g", src / "g-link")
    os.symlink("dir/sub/f", src / "s")
    os.chown(src / "dir/g", 1000, 1001)
    os.chmod(src / "dir/sub", 0o750)
    for path in (src / "dir/sub/f", src / "dir/sub", src / "dir"):
        os.utime(path, (1_700_000_000, 1_700_000_000))  # whole seconds: every format keeps them
    os.utime(src / "s", (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    os.utime(src / "dir/g", (1_700_000_000, 1_700_000_000))
    os.utime(src / "dir/sparse", (1_700_000_000, 1_700_000_000))
    layer = tmp_path / "layer.tar"
    fmt, _, sparse = fmt.partition("-")
    holes = [] if fmt == "ustar" else ["-S", *([f"--sparse-version={sparse}"] if sparse else [])]  # ustar has none
    subprocess.run(["tar", f"--format={fmt}", *holes, "-cf", str(layer), "-C", str(src), "."], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    with open(layer, "rb") as f:
        layertar.import_layer(f.fileno(), str(dest))
    assert view(dest) == view(src)
