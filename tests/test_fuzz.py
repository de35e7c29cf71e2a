"""Hostile input for every method: each call gets one of uniond's own errors (or, when
the message cannot even name the method's signature, the bus library's), the daemon
stays up, never logs a traceback, and no mount appears outside the allowed roots.

The layer methods (ExportDiff, ImportLayer, Commit) also get descriptors of every kind
and hostile tars, and nothing may be written outside an empty destdir: a canary beside
it stays empty, a file outside stays as it was. UNIOND_FUZZ_EXAMPLES sets the examples
per strategy of the Mount/Unmount/Diff part, UNIOND_FUZZ_LAYER_EXAMPLES those of the
layer part (and the size of its unprivileged batch)."""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import random
import select
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from dbus_next import Message, Variant
from harness import ROOT, CallError, Client, is_mounted, run_as
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_layers import _hostile

from uniond import constants
from uniond.access.paths import canonical
from uniond.config import DEFAULT_ALLOWED_ROOTS
from uniond.kernel import mountinfo
from uniond.kernel import overlay as engine

# Hypothesis warns that a megabyte argument makes a long repr; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

E = constants.ERROR_PREFIX
UNIOND_ERRORS = {
    constants.ERROR_INVALID_ARGUMENT, constants.ERROR_NOT_FOUND, constants.ERROR_BUSY,
    constants.ERROR_ALREADY_MOUNTED, constants.ERROR_NOT_PERMITTED, constants.ERROR_FAILED,
    constants.ERROR_NOT_AUTHORIZED, constants.ERROR_NOT_AUTHORIZED_CAN_OBTAIN,
    constants.ERROR_NOT_AUTHORIZED_DISMISSED,
}
FUZZ = settings(
    max_examples=int(os.environ.get("UNIOND_FUZZ_EXAMPLES", "1500")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# D-Bus strings: UTF-8 without NUL (the bus drops a connection that sends others; see
# test_invalid_strings_never_reach_the_daemon).
dbus_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
object_paths = st.lists(st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True), max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)


def _variants(children):
    return st.one_of(
        st.builds(lambda v: Variant("s", v), dbus_text),
        st.builds(lambda v: Variant("b", v), st.booleans()),
        st.builds(lambda v: Variant("i", v), st.integers(-(2**31), 2**31 - 1)),
        st.builds(lambda v: Variant("u", v), st.integers(0, 2**32 - 1)),
        st.builds(lambda v: Variant("t", v), st.integers(0, 2**64 - 1)),
        st.builds(lambda v: Variant("x", v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: Variant("d", v), st.floats(allow_nan=False)),
        st.builds(lambda v: Variant("y", v), st.integers(0, 255)),
        st.builds(lambda v: Variant("o", v), object_paths),
        st.builds(lambda v: Variant("as", v), st.lists(dbus_text, max_size=4)),
        st.builds(lambda v: Variant("ai", v), st.lists(st.integers(-5, 5), max_size=4)),
        st.builds(lambda a, b: Variant("(si)", [a, b]), dbus_text, st.integers(-5, 5)),
        st.builds(lambda v: Variant("v", v), children),
        st.builds(lambda v: Variant("a{sv}", v), st.dictionaries(dbus_text, children, max_size=3)),
    )


variants = st.recursive(st.builds(lambda v: Variant("b", v), st.booleans()), _variants, max_leaves=8)
option_keys = st.one_of(
    st.sampled_from(["readonly", "volatile", "workdir", "description", "dev", "suid", "lazy",
                     "auth.no_user_interaction"]),
    dbus_text,
)
options = st.one_of(
    st.dictionaries(option_keys, variants, max_size=4),
    st.just({f"k{i}": Variant("b", True) for i in range(100)}),  # a huge dict
    st.just({"description": Variant("s", "x" * 100_000)}),
    st.just({"workdir": Variant("a{sv}", {"a": Variant("a{sv}", {"b": Variant("s", "/etc")})})}),
)


@pytest.fixture
def arena(layers, tmp_path, client):
    """Directories and traps for the fuzzer, and two live mounts whose object paths it may
    try on one another."""
    t = layers
    (t / "upper/sub").mkdir()
    (t / "afile").write_text("x")
    (t / "image1/inner").mkdir()
    (t / "w").mkdir()
    os.symlink("/etc", t / "etc-link")
    os.symlink(t / "image1", t / "image1-link")
    (t / "up2").mkdir()
    (t / "m2").mkdir()
    (t / "m3").mkdir()
    live = [client.mount([t / "image1"], t / "up2", t / "m2"), client.mount([t / "image2"])]
    paths = [str(t / n) for n in ("image1", "image2", "upper", "merge", "upper/sub", "image1/inner", "w", "m3",
                                  "afile", "etc-link", "image1-link", "etc-link/ssh", "nope", "up2", "m2")]
    paths += [f"{t}/image1/../image2", f"{t}//image1/.", "/etc", "/usr", "/", "/proc/self/fd/0", "/tmp", "/run",
              "/dev/shm", "/sys", "relative/path", "", "..", f"{t}/{'a' * 300}", "/" + "x" * 5000,
              "/" + "y" * (1 << 20), str(tmp_path / "state"), str(tmp_path / "run"), "/tmp/with,comma:colon\\back",
              "/tmp/new\nline"]
    return t, live, paths


def _assert_sane(client, daemon, before: set[int]) -> None:
    assert daemon.alive(), "the daemon must survive any input"
    roots = DEFAULT_ALLOWED_ROOTS
    for entry in mountinfo.read():
        if entry.mnt_id not in before:
            assert any(entry.mountpoint.startswith(r + "/") for r in roots), f"mount outside allowed roots: {entry}"


OUTCOMES: Counter[str] = Counter()


def _call(client, member, signature, *body):
    try:
        result = client.call(member, signature, *body)
        OUTCOMES[f"{member} ok"] += 1
        return "ok", result
    except CallError as e:
        assert e.name in UNIOND_ERRORS, f"{member}: {e.name}: {e.text[:200]}"
        assert "Traceback" not in e.text
        OUTCOMES[f"{member} {e.name.rsplit('.', 1)[1]}"] += 1
        return "error", e.name


def test_fuzz_every_method(daemon, client, arena):
    t, live, paths = arena
    before = {e.mnt_id for e in mountinfo.read()}
    path_s = st.one_of(st.sampled_from(paths), dbus_text, dbus_text.map(lambda s: "/" + s))
    lowers = st.one_of(
        st.lists(path_s, max_size=5),
        st.just([str(t / "image1")] * 10_000),
        st.just([str(t / "image1"), str(t / "image2")] * 251),
    )
    mount_objects = st.one_of(
        st.sampled_from(live + [constants.MANAGER_PATH, constants.MOUNT_PATH_PREFIX, constants.MOUNT_PATH_PREFIX + "/a",
                                constants.MOUNT_PATH_PREFIX + "/a/b", "/", constants.MOUNT_PATH_PREFIX + "/_"]),
        object_paths,
    )
    made: list[str] = []
    started = time.monotonic()

    def mount_and_unmount(low, upper, mountpoint, opts) -> None:
        """A Mount that succeeds must be inside the allowed roots; it is taken down at once."""
        outcome = _call(client, "Mount", "asssa{sv}", low, upper, mountpoint, opts)
        if outcome[0] == "ok":
            mp = client.props(outcome[1][0])["Mountpoint"]
            assert any(mp.startswith(r + "/") for r in DEFAULT_ALLOWED_ROOTS), mp
            made.append(outcome[1][0])
            client.unmount(outcome[1][0], lazy=True)
    counts = {"Mount": 0, "Unmount": 0, "Diff": 0, "ListMounts": 0}

    @FUZZ
    @given(
        method=st.sampled_from(["Mount", "Mount", "Mount", "Unmount", "Diff", "ListMounts"]),
        low=lowers, upper=path_s, mountpoint=path_s, opts=options, obj=mount_objects,
    )
    def one(method, low, upper, mountpoint, opts, obj):
        counts[method] += 1
        if method == "Mount":
            mount_and_unmount(low, upper, mountpoint, opts)
        elif method == "Unmount":
            if obj in live:
                opts = {**opts, "lazy": Variant("s", "yes")}  # a wrong type: the targets stay mounted
            _call(client, "Unmount", "oa{sv}", obj, opts)
        elif method == "Diff":
            _call(client, "Diff", "oa{sv}", obj, opts)
        else:
            assert set(live) <= set(_call(client, "ListMounts", "")[1][0])

    one()

    # Near-valid requests reach deeper: real layers with one trap among them.
    good_dirs = [str(t / n) for n in ("image1", "image2", "image1/inner")]
    near_lowers = st.lists(st.sampled_from(good_dirs), min_size=1, max_size=3).flatmap(
        lambda ls: st.one_of(st.just(ls), path_s.map(lambda p: [*ls, p]))
    )
    near_options = st.dictionaries(
        st.sampled_from(["readonly", "volatile", "description", "workdir", "dev", "suid",
                         "auth.no_user_interaction"]),
        st.one_of(st.builds(lambda v: Variant("b", v), st.booleans()),
                  st.builds(lambda v: Variant("s", v), st.sampled_from(paths[:12]))),
        max_size=3,
    )

    @FUZZ
    @given(
        low=near_lowers,
        upper=st.one_of(st.sampled_from(["", str(t / "upper"), str(t / "up2"), str(t / "w")]), path_s),
        mountpoint=st.one_of(st.sampled_from(["", str(t / "merge"), str(t / "m3"), str(t / "upper/sub")]), path_s),
        opts=near_options,
    )
    def near(low, upper, mountpoint, opts):
        counts["Mount"] += 1
        mount_and_unmount(low, upper, mountpoint, opts)

    near()
    _assert_sane(client, daemon, before)
    assert set(client.list()) == set(live), "the fuzz leaves the live mounts alone and nothing else behind"
    assert is_mounted(t / "m2")
    assert "Traceback" not in daemon.log()
    assert sum(counts.values()) >= 500, counts
    print(f"fuzz: {counts}, {len(made)} mounts made and unmounted, {time.monotonic() - started:.1f} s")
    print("fuzz outcomes:", dict(sorted(OUTCOMES.items())))


def test_fuzz_as_an_unprivileged_caller(daemon, bus, client, arena, polkit):
    """The same traps from uid 65534, with polkit allowing the plain mount action: in one
    process, many calls."""
    t, live, paths = arena
    polkit.set_allowed([constants.ACTION_MOUNT, constants.ACTION_UNMOUNT_OWN])
    before = {e.mnt_id for e in mountinfo.read()}
    short = [p for p in paths if len(p) < 10_000]
    calls = []
    for i, lower in enumerate(short):
        for j, target in enumerate(short[:: 1 + i % 4]):
            calls.append(["mount", [lower], short[(i + j) % len(short)], target, {}])
            calls.append(["mount", [lower, short[j]], "", target, {"dev": i % 2 == 0}])
    calls += [["unmount", p, {}] for p in live] + [["diff", p, {}] for p in live]
    out = run_as(65534, bus.address, calls)
    assert len(out) == len(calls) > 500
    for call, result in zip(calls, out, strict=True):
        if result[0] == "error":
            assert result[1] in UNIOND_ERRORS, (call, result)
        else:
            assert call[0] == "mount" and client.props(result[1])["Owner"] == 65534
    assert [r[1] for r in out[-2 * len(live):]] == [f"{E}.NotAuthorized"] * (2 * len(live))
    print(f"unprivileged fuzz: {len(calls)} calls:", dict(Counter(r[1] if r[0] == "error" else "ok" for r in out)))
    _assert_sane(client, daemon, before)
    assert "Traceback" not in daemon.log()


class _Corrupted(Message):
    """A message whose marshalled bytes are changed after the library checked them."""

    def __init__(self, *args, replace: tuple[bytes, bytes], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replace = replace

    def _marshall(self, negotiate_unix_fd=False):
        return super()._marshall(negotiate_unix_fd).replace(*self.replace)


@pytest.mark.parametrize("member", ["Mount", "ExportDiff", "ImportLayer", "Commit"])
@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\x00\x00"], ids=["non-utf8", "nul"])
def test_invalid_strings_never_reach_the_daemon(daemon, bus, client, layers, bad, member):
    """D-Bus strings and object paths must be UTF-8 without NUL: the bus drops a
    connection sending others before the daemon sees a byte, and the daemon carries on."""
    rogue = Client(bus.address)
    signature, body = {
        "Mount": ("asssa{sv}", [[str(layers / "image1")], "", "/tmp/QQ", {}]),
        "ExportDiff": ("oha{sv}", [constants.MOUNT_PATH_PREFIX + "/QQ", 0, {}]),
        "ImportLayer": ("hsa{sv}", [0, "/tmp/QQ", {}]),
        "Commit": ("osa{sv}", [constants.MOUNT_PATH_PREFIX + "/a", "/tmp/QQ", {}]),
    }[member]
    fds = [os.open("/dev/null", os.O_RDWR)] if "h" in signature else []
    msg = _Corrupted(destination=constants.BUS_NAME, path=constants.MANAGER_PATH,
                     interface=constants.MANAGER_INTERFACE, member=member, signature=signature,
                     body=body, unix_fds=fds, replace=(b"QQ", bad))
    with pytest.raises(EOFError):  # the bus closed the connection: no reply, no error reply
        rogue.loop.run_until_complete(asyncio.wait_for(rogue.bus.call(msg), 10))
    with pytest.raises(EOFError):
        rogue.loop.run_until_complete(rogue.bus.wait_for_disconnect())
    rogue.loop.close()
    for fd in fds:
        os.close(fd)
    assert daemon.alive() and client.list() == []
    assert "Traceback" not in daemon.log()


def test_wrong_signatures_are_refused_by_the_bus_library(daemon, client):
    for member, signature, body in [
        ("Mount", "sss", ["a", "b", "c"]),
        ("Mount", "asss", [[], "", ""]),
        ("Unmount", "s", ["/org/uniond1/mount/x"]),
        ("Diff", "oa{ss}", ["/org/uniond1/mount/x", {}]),
        ("ListMounts", "s", ["x"]),
        ("NoSuchMethod", "", []),
    ]:
        with pytest.raises(CallError) as e:
            client.call(member, signature, *body)
        assert e.value.name.startswith("org.freedesktop.DBus.Error."), e.value.name
    for member, signature, body in [
        ("Set", "ssv", [constants.MANAGER_INTERFACE, "Version", Variant("s", "9")]),
        ("Get", "ss", [constants.MANAGER_INTERFACE, "Nope"]),
        ("GetAll", "s", ["org.example.Nope"]),
    ]:
        with pytest.raises(CallError):
            client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, "org.freedesktop.DBus.Properties",
                            member, signature, body)
    assert daemon.alive()


# ---- the layer methods: ExportDiff, ImportLayer, Commit ------------------------------

LAYER_EXAMPLES = int(os.environ.get("UNIOND_FUZZ_LAYER_EXAMPLES", "200"))  # per strategy
LAYER_FUZZ = settings(
    max_examples=LAYER_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
LAYER_METHODS = {"ExportDiff": "oha{sv}", "ImportLayer": "hsa{sv}", "Commit": "osa{sv}"}

# Descriptors of every kind a caller could pass; see _Descriptors.
FD_KINDS = ["file-w", "file-rw", "file-append", "file-r", "etc-passwd-r", "dir", "opath", "socket",
            "socket-unconnected", "pipe-w", "pipe-w-closed", "pipe-r", "devnull", "devzero", "devfull",
            "eventfd", "epoll", "none", "bad-index", "two-fds"]


class _Descriptors:
    """The fds one call carries, made from a kind name, and what the daemon wrote to them.

    Pipes and sockets get a thread at their other end (a reader for an export, a writer
    of ``tar`` for an import), so no call can wait for a peer that never comes.
    """

    def __init__(self, kind: str, scratch: Path, tar: bytes, export: bool = False) -> None:
        self.kind = kind
        self.fds: list[int] = []
        self.ours: list[int] = []  # other ends, closed after the call
        self.threads: list[threading.Thread] = []
        self.received = bytearray()
        self.out = scratch / "out.tar"
        self.out.unlink(missing_ok=True)
        (scratch / "in.tar").write_bytes(tar)
        self.index = 0
        w_flags = os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        if kind == "file-w":
            self.fds = [os.open(self.out, os.O_WRONLY | w_flags, 0o644)]
        elif kind == "file-rw":
            self.fds = [os.open(self.out, os.O_RDWR | w_flags, 0o644)]
        elif kind == "file-append":
            self.fds = [os.open(self.out, os.O_WRONLY | os.O_APPEND | w_flags, 0o644)]
        elif kind == "file-r":
            self.fds = [os.open(scratch / "in.tar", os.O_RDONLY)]
        elif kind == "etc-passwd-r":
            self.fds = [os.open("/etc/passwd", os.O_RDONLY)]
        elif kind == "dir":
            self.fds = [os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)]
        elif kind == "opath":
            self.fds = [os.open(scratch / "in.tar", os.O_PATH)]
        elif kind == "socket":
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.fds = [theirs.detach()]
            self._peer(mine.detach(), None if export else tar)
        elif kind == "socket-unconnected":
            self.fds = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()]
        elif kind == "pipe-w":  # the daemon writes, a thread here reads
            r, w = os.pipe()
            self.fds = [w]
            self._peer(r, None)
        elif kind == "pipe-w-closed":  # nobody reads: EPIPE
            r, w = os.pipe()
            os.close(r)
            self.fds = [w]
        elif kind == "pipe-r":  # a thread here writes the tar, the daemon reads
            r, w = os.pipe()
            self.fds = [r]
            self._peer(w, tar)
        elif kind == "devnull":
            self.fds = [os.open("/dev/null", os.O_RDWR)]
        elif kind == "devzero":
            self.fds = [os.open("/dev/zero", os.O_RDWR)]
        elif kind == "devfull":
            self.fds = [os.open("/dev/full", os.O_RDWR)]
        elif kind == "eventfd":
            self.fds = [os.eventfd(0, os.EFD_NONBLOCK)]
        elif kind == "epoll":
            poller = select.epoll()
            self.fds = [os.dup(poller.fileno())]
            poller.close()
        elif kind == "none":
            self.index = 0  # an index, but no descriptor attached
        elif kind == "bad-index":
            self.fds = [os.open("/dev/null", os.O_RDWR)]
            self.index = 7
        elif kind == "two-fds":
            self.fds = [os.open("/dev/null", os.O_RDONLY), os.open(self.out, os.O_WRONLY | w_flags, 0o644)]
            self.index = 1
        else:
            raise AssertionError(kind)

    def _peer(self, fd: int, tar: bytes | None) -> None:
        self.ours.append(fd)

        def read() -> None:
            try:
                while chunk := os.read(fd, 1 << 16):
                    self.received.extend(chunk)
            except OSError:
                pass

        def write() -> None:
            try:
                view = memoryview(tar)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                pass  # the daemon closed its end without reading it all
            finally:
                if self.kind == "socket":
                    with contextlib.suppress(OSError):
                        socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_WR)  # EOF for the reader
                else:
                    os.close(fd)
                    self.ours.remove(fd)

        thread = threading.Thread(target=read if tar is None else write, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finish(self) -> bytes | None:
        """Close our ends and return what an export wrote, if this kind keeps it."""
        for fd in self.fds:
            os.close(fd)
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive(), f"{self.kind}: the other end never finished"
        for fd in self.ours:
            os.close(fd)
        if self.kind in ("file-w", "file-rw", "file-append", "two-fds"):
            return self.out.read_bytes()
        if self.kind in ("socket", "pipe-w"):
            return bytes(self.received)
        return None


class _LogTail:
    """The daemon's log since the last look: a traceback is caught at the call that made it."""

    def __init__(self, daemon) -> None:
        self.path = daemon.log_path
        self.offset = self.path.stat().st_size

    def assert_no_traceback(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            new = f.read()
        self.offset += len(new)
        assert b"Traceback" not in new, new.decode(errors="replace")[-3000:]


def _layer_call(client, member: str, body: list, fds: list[int]):
    try:
        reply = client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                                member, LAYER_METHODS[member], body, unix_fds=fds)
        OUTCOMES[f"{member} ok"] += 1
        return "ok", reply[0]
    except CallError as e:
        assert e.name in UNIOND_ERRORS, f"{member}: {e.name}: {e.text[:200]}"
        assert "Traceback" not in e.text
        OUTCOMES[f"{member} {e.name.rsplit('.', 1)[1]}"] += 1
        return "error", e.name


def _entries_below(root: Path) -> list[Path]:
    out = []
    for top, dirs, files in os.walk(root):  # never follows a symlink
        out += [Path(top, n) for n in dirs + files]
    return out


def _tree(root: Path) -> dict[str, tuple]:
    """What a directory holds, to compare before and after: names, types, sizes, mtimes."""
    out = {}
    for p in _entries_below(root):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink)
    return out


def _pax(key: str, value: str) -> bytes:
    """One PAX record, its length field counting itself."""
    body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
    n = len(body)
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _tar_strategy(canary: str, outside: str):
    """Small tars with hostile members, built with tarfile (then maybe compressed,
    truncated or corrupted): escapes by '..', absolute names, symlinks and hard links
    towards ``canary`` and ``outside``, whiteout names, NULs, bad PAX records, odd types."""
    components = st.sampled_from(["a", "d", "l", "f", ".", "..", "", ".wh.", ".wh..", ".wh...", ".wh.a", ".wh.d",
                                  ".wh..wh..opq", ".wh..wh.plnk", "caf\udce9", "x\x00y", "n" * 256, " ", "\n"])
    names = st.one_of(
        st.lists(components, min_size=1, max_size=4).map("/".join),
        st.sampled_from(["../canary/esc", "a/../../canary/esc", "./../esc", f"{canary}/abs", "/etc/uniond-fuzz-esc",
                         "l/esc", "up/canary/esc", "./", "/", "", "d/" * 2100 + "deep", "a" * 5000]),
    )
    kinds = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                             tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
                             tarfile.GNUTYPE_SPARSE, tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, b"Z"])
    linknames = st.sampled_from(["", "a", "d", "f", "d/f", "..", "/", "../canary", canary, f"{outside}/target",
                                 "../outside/target", "/etc/passwd", "l/target", "up/outside/target", "x\x00y",
                                 "t" * 5000])
    data = st.sampled_from([b"", b"x", b"y" * 5000, _pax("path", "../canary/pax-esc"), _pax("uid", "-1"),
                            _pax("size", "99999999999"), b"garbage", bytes(512)])
    pax = st.dictionaries(
        st.sampled_from(["mtime", "uid", "gid", "size", "path", "linkpath", "SCHILY.xattr.user.x", "SCHILY.xattr.user.",
                         "SCHILY.xattr.trusted.overlay.opaque", "SCHILY.xattr.trusted.overlay.redirect",
                         "SCHILY.xattr.security.capability", "GNU.sparse.major", "GNU.sparse.map", "hdrcharset"]),
        st.sampled_from(["y", "", "-1", "0", "1.5", "-1.5", "1e999", "9" * 20, "../canary/pax", f"{canary}/pax",
                         "a\x00b", "BINARY", "0,5,10,5"]),
        max_size=2,
    )
    member = st.tuples(names, kinds, linknames, data, st.sampled_from([0, 0o644, 0o7777, 0o4755]),
                       st.sampled_from([0, 65534, 1 << 31, (1 << 32) - 2]),
                       st.sampled_from([0, 1, 7, (1 << 21) - 1]), pax)
    prefixes = st.sampled_from([
        [],
        [("l", tarfile.SYMTYPE, "../canary")],
        [("l", tarfile.SYMTYPE, canary)],
        [("up", tarfile.SYMTYPE, "..")],
        [("d", tarfile.DIRTYPE, "")],
        [("f", tarfile.REGTYPE, ""), ("h", tarfile.LNKTYPE, "f")],
    ])

    def build(prefix, members, fmt, compression, cut, flip):
        members = [(n, k, ln, b"", 0o755, 0, 0, {}) for n, k, ln in prefix] + members
        for attempt_fmt in (fmt, tarfile.PAX_FORMAT, None):
            if attempt_fmt is None:
                raw = b"".join(m[3] for m in members) or b"garbage"
                break
            buf = io.BytesIO()
            try:
                with tarfile.open(fileobj=buf, mode="w", format=attempt_fmt) as tf:
                    for name, kind, linkname, payload, mode, uid, dev, headers in members:
                        info = tarfile.TarInfo(name)
                        info.type, info.linkname, info.mode = kind, linkname, mode
                        info.uid = info.gid = uid
                        info.devmajor, info.devminor = dev, dev
                        info.size = len(payload)
                        if attempt_fmt == tarfile.PAX_FORMAT:
                            info.pax_headers = headers
                        tf.addfile(info, io.BytesIO(payload) if payload else None)
            except (ValueError, UnicodeError, OverflowError):
                continue
            raw = buf.getvalue()
            break
        if flip is not None:
            at = int(flip[0] * (len(raw) - 1))
            raw = raw[:at] + bytes([flip[1]]) + raw[at + 1:]
        raw = {"none": raw, "gzip": gzip.compress(raw), "bz2": bz2.compress(raw), "xz": lzma.compress(raw)}[compression]
        return raw if cut is None else raw[: int(cut * len(raw))]

    return st.builds(
        build, prefixes, st.lists(member, max_size=5),
        st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]),
        st.sampled_from(["none", "none", "gzip", "bz2", "xz"]),
        st.one_of(st.none(), st.none(), st.floats(0, 1)),
        st.one_of(st.none(), st.none(), st.tuples(st.floats(0, 1), st.integers(0, 255))),
    )


@pytest.fixture
def layer_arena(arena, client, tmp_path):
    """The arena, with odd entries in a live upper, a mount whose upper no layer can carry
    (a '.wh.' name), an empty destdir with an empty canary beside it and a file outside
    that a hostile layer may try to reach."""
    t, live, paths = arena
    m2 = t / "m2"  # live[0]: [image1] + up2
    (m2 / "odd/deep").mkdir(parents=True)
    os.mkfifo(m2 / "odd/fifo")
    os.symlink("/etc", m2 / "odd/etc-link")
    (m2 / "odd/f").write_text("f")
    os.link(m2 / "odd/f", m2 / "odd/f-link")
    os.setxattr(m2 / "odd/f", "user.note", b"\xff\x00")
    os.utime(m2 / "odd/f", ns=(-1_500_000_000, -1_500_000_000))
    with open(os.fsencode(str(m2)) + b"/odd/caf\xe9", "wb") as f:
        f.write(b"not utf-8")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(m2 / "odd/sock"))
    sock.close()
    os.unlink(m2 / "a")  # a whiteout
    for name in ("up3", "m4", "dests/dest", "dests/canary", "outside", "scratch"):
        (t / name).mkdir(parents=True)
    (t / "up3/.wh.lookalike").touch()
    live = [*live, client.mount([t / "image2"], t / "up3", t / "m4")]
    (t / "outside/target").write_text("must stay as it is")
    os.symlink(t / "dests/dest", t / "dest-link")
    os.symlink(t / "dests/canary", t / "canary-link")
    workdir = client.props(live[0])["WorkDir"]
    ro_mountpoint = client.props(live[1])["Mountpoint"]
    traps = [*paths, str(t / "dests/dest"), str(t / "dests"), f"{t}/dests/../dests/dest",
             f"{t}//dests/./dest/", str(t / "dest-link"), str(t / "canary-link"), str(t / "dest-link/sub"), workdir,
             workdir + "/work", str(Path(workdir).parent), ro_mountpoint, str(tmp_path / "run/mounts"),
             str(tmp_path / "state/mounts.journal"), str(tmp_path / "state/new"), str(m2 / "odd"),
             str(t / "up2/odd"), str(t / "up3"), str(t / "m4"), str(t / "outside"), "/etc/uniond", "/var/lib/uniond",
             "/home", "/srv", "/tmp/" + "z" * 255]
    # Where a layer may legitimately land: empty directories below an allowed root,
    # outside every mount's layers and the daemon's own directories.
    free = {str(t / n) for n in ("dests/dest", "merge", "w", "m3", "upper/sub")}
    return SimpleNamespace(t=t, live=live, traps=traps, free=free, dest=t / "dests/dest", canary=t / "dests/canary",
                           outside=t / "outside", scratch=t / "scratch")


def _untouched(a) -> None:
    """Nothing was written beside destdir, nor reached through it."""
    assert os.listdir(a.canary) == [], "nothing lands beside destdir"
    assert sorted(os.listdir(a.t / "dests")) == ["canary", "dest"]
    assert os.listdir(a.outside) == ["target"]
    assert (a.outside / "target").read_text() == "must stay as it is"
    assert os.stat(a.outside / "target").st_nlink == 1
    assert not os.path.lexists("/etc/uniond-fuzz-esc") and not os.path.lexists(a.t / "esc")


def _check_layer_written(a, dest: Path, entries: int, devices: bool) -> None:
    made = _entries_below(dest)
    assert len(made) == entries, (entries, made)
    for p in made:
        st = os.lstat(p)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            assert devices or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), f"a device without devices=true: {p}"
    engine.empty_directory(str(dest))


def test_fuzz_layer_methods(daemon, client, layer_arena, tmp_path):
    """ExportDiff, ImportLayer and Commit as root: hostile arguments, fds of every kind,
    then hostile layers into an empty destdir."""
    a = layer_arena
    t, live = a.t, a.live
    before = {e.mnt_id for e in mountinfo.read()}
    lowers_before = {n: _tree(t / n) for n in ("image1", "image2", "up2", "up3")}
    gone = client.mount([t / "image2"])
    client.unmount(gone)  # an object path that was a mount
    mount_objects = st.one_of(
        st.sampled_from(live),
        st.sampled_from([gone, constants.MANAGER_PATH, constants.MOUNT_PATH_PREFIX, "/",
                         constants.MOUNT_PATH_PREFIX + "/a/b", constants.MOUNT_PATH_PREFIX + "/_",
                         constants.MOUNT_PATH_PREFIX + "/" + "a" * (1 << 20)]),
        object_paths,
    )
    free = a.free
    destdirs = st.one_of(st.sampled_from(sorted(free)), st.sampled_from(a.traps), dbus_text,
                         dbus_text.map(lambda s: "/" + s))
    valid_tar = _tar_bytes([("f", tarfile.REGTYPE, "", b"x"), ("d", tarfile.DIRTYPE, "", b""),
                            ("d/.wh.gone", tarfile.REGTYPE, "", b""), ("s", tarfile.SYMTYPE, "../../etc", b"")])
    tar_bodies = {  # by name, so that a failing example reads short
        "valid": valid_tar, "valid-gzip": gzip.compress(valid_tar), "truncated": valid_tar[:700], "empty": b"",
        "gzip-magic-only": b"\x1f\x8b" + b"x" * 100, "random": random.Random(5).randbytes(3000),
        "dotdot": _tar_bytes([("../canary/esc", tarfile.REGTYPE, "", b"x")]),
    }
    tars = st.sampled_from(sorted(tar_bodies))
    layer_options = st.one_of(
        st.just({}),
        options,
        st.dictionaries(
            st.sampled_from(["compression", "devices", "auth.no_user_interaction"]),
            st.one_of(variants, st.builds(lambda v: Variant("s", v), st.sampled_from(
                ["none", "gzip", "GZIP", "lz4", "", "x" * 5000, "gzip\n"])),
                st.builds(lambda v: Variant("b", v), st.booleans())),
            max_size=3,
        ),
    )
    counts: Counter[str] = Counter()
    started = time.monotonic()
    log = _LogTail(daemon)

    # Half the calls are near-valid, with one thing wrong at most, to reach past the first check.
    near_options = st.dictionaries(
        st.sampled_from(["compression", "devices", "auth.no_user_interaction"]),
        st.one_of(st.builds(lambda v: Variant("s", v), st.sampled_from(["none", "gzip"])),
                  st.builds(lambda v: Variant("b", v), st.booleans())),
        max_size=2,
    ).map(lambda d: {k: v for k, v in d.items() if (k == "compression") == (v.signature == "s")})

    @LAYER_FUZZ
    @given(method=st.sampled_from(sorted(LAYER_METHODS)), near=st.booleans(), data=st.data())
    def arguments(method, near, data):
        counts[method] += 1
        obj = data.draw(st.sampled_from(live) if near else mount_objects, "obj")
        kind = data.draw(st.sampled_from(FD_KINDS), "kind")
        dest = data.draw(st.sampled_from(sorted(free)) if near else destdirs, "dest")
        opts = data.draw(near_options if near else layer_options, "opts")
        tar = tar_bodies[data.draw(tars, "tar")]
        fds = _Descriptors(kind, a.scratch, tar, export=method == "ExportDiff")
        body = {"ExportDiff": [obj, fds.index, opts], "ImportLayer": [fds.index, dest, opts],
                "Commit": [obj, dest, opts]}[method]
        try:
            outcome, value = _layer_call(client, method, body, fds.fds)
        finally:
            written = fds.finish()
        log.assert_no_traceback()
        if outcome == "error" and value == constants.ERROR_FAILED:
            # Only the caller's own fd can make a layer call fail: a reader gone, a full device.
            assert method == "ExportDiff" and kind in ("pipe-w-closed", "devfull"), (method, kind, obj, dest)
        if outcome == "ok":
            if method == "ExportDiff":
                assert obj in live
                if written is not None:
                    assert len(written) == value
                    with tarfile.open(fileobj=io.BytesIO(written), mode="r:*") as tf:
                        assert all(not m.name.startswith("/") and ".." not in m.name.split("/") for m in tf)
            else:
                assert canonical("destdir", dest) in free, f"{method} wrote into {dest!r}"
                devices = getattr(opts.get("devices"), "value", False) is True
                _check_layer_written(a, Path(canonical("destdir", dest)), value, devices)
        for d in free:
            assert os.listdir(d) == [], f"{d} is left empty by a refused {method}"
        _untouched(a)

    arguments()

    @LAYER_FUZZ
    @example(tar=_device_tar(1 << 12, 0), kind="file-r", devices=True, no_interaction=True)  # beyond mknod(2)
    @example(tar=_device_tar(0, 1 << 20), kind="pipe-r", devices=True, no_interaction=False)
    @given(tar=_tar_strategy(str(a.canary), str(a.outside)), kind=st.sampled_from(["file-r", "pipe-r", "socket"]),
           devices=st.booleans(), no_interaction=st.booleans())
    def layers(tar, kind, devices, no_interaction):
        counts["ImportLayer (hostile layer)"] += 1
        fds = _Descriptors(kind, a.scratch, tar)
        opts = {"devices": Variant("b", devices), "auth.no_user_interaction": Variant("b", no_interaction)}
        try:
            outcome, value = _layer_call(client, "ImportLayer", [fds.index, str(a.dest), opts], fds.fds)
        finally:
            fds.finish()
        log.assert_no_traceback()
        if outcome == "ok":
            _check_layer_written(a, a.dest, value, devices)
        else:
            assert value == constants.ERROR_INVALID_ARGUMENT, "a hostile layer is an invalid argument"
            assert os.listdir(a.dest) == [], "a refused layer leaves destdir empty"
        _untouched(a)

    layers()
    _assert_sane(client, daemon, before)
    assert set(client.list()) == set(live)
    assert {n: _tree(t / n) for n in ("image1", "image2", "up2", "up3")} == lowers_before, "layers are only read"
    (t / "m2/still-writable").write_text("Commit made the mount writable again")
    os.unlink(t / "m2/still-writable")
    assert "Traceback" not in daemon.log()
    elapsed = time.monotonic() - started
    assert sum(counts.values()) >= 200 and elapsed < 120, (counts, elapsed)
    print(f"layer fuzz: {dict(counts)}, {elapsed:.1f} s")
    print("layer fuzz outcomes:", {k: v for k, v in sorted(OUTCOMES.items()) if k.split()[0] in LAYER_METHODS})


def _device_tar(major: int, minor: int) -> bytes:
    info = tarfile.TarInfo("dev")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, major, minor
    return info.tobuf(tarfile.USTAR_FORMAT) + bytes(1024)


def _tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, linkname, payload in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, linkname, len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


# Run as uid 65534: layer calls with descriptors the caller opens itself. stdin: a JSON
# list of [member, body, fd kind, path], with options as {key: [signature, value]}.
_AS_NOBODY = """
import json, os, select, socket, sys, threading
sys.path.insert(0, sys.argv[2])
from dbus_next import Variant
from harness import CallError, Client
SIGNATURES = {"ExportDiff": "oha{sv}", "ImportLayer": "hsa{sv}", "Commit": "osa{sv}"}
client = Client(sys.argv[1])

def descriptors(kind, path):
    if kind == "none":
        return [], [], 0
    if kind == "read":
        return [os.open(path, os.O_RDONLY)], [], 0
    if kind == "write":
        return [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)], [], 0
    if kind == "dir":
        return [os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)], [], 0
    if kind == "opath":
        return [os.open(path, os.O_PATH)], [], 0
    if kind == "socket-unconnected":
        return [socket.socket(socket.AF_UNIX).detach()], [], 0
    if kind == "socket":  # the layer at ``path`` comes through a socket, from a thread here
        mine, theirs = socket.socketpair()
        def feed():
            try:
                with open(path, "rb") as f:
                    mine.sendall(f.read())
                mine.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        thread = threading.Thread(target=feed)
        thread.start()
        return [theirs.detach()], [(thread, mine)], 0
    if kind == "pipe-closed":
        r, w = os.pipe()
        os.close(r)
        return [w], [], 0
    if kind == "eventfd":
        return [os.eventfd(0)], [], 0
    if kind == "epoll":
        poller = select.epoll()
        fd = os.dup(poller.fileno())
        poller.close()
        return [fd], [], 0
    if kind == "bad-index":
        return [os.open("/dev/null", os.O_RDWR)], [], 3
    raise ValueError(kind)

out = []
for member, body, kind, path in json.load(sys.stdin):
    fds, peers, index = descriptors(kind, path)
    body = [index if a == "FD" else {k: Variant(*v) for k, v in a.items()} if isinstance(a, dict) else a
            for a in body]
    try:
        reply = client.call_raw("org.uniond1", "/org/uniond1", "org.uniond1.Manager", member,
                                SIGNATURES[member], body, fds)
        out.append(["ok", reply[0]])
    except CallError as e:
        out.append(["error", e.name, e.text[:300]])
    finally:
        for fd in fds:
            os.close(fd)
        for thread, sock in peers:
            thread.join(30)
            sock.close()
client.close()
print(json.dumps(out))
"""


def _as_nobody(bus, calls: list) -> list:
    run = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", _AS_NOBODY,
         bus.address, str(ROOT / "tests")],
        input=json.dumps(calls), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out) == len(calls)
    return out


def test_fuzz_layer_methods_as_an_unprivileged_caller(daemon, bus, client, layer_arena, polkit, user_dirs):
    """uid 65534 sends the same traps with descriptors it opened itself, first with polkit
    denying the layer actions, then allowing them: hostile layers are refused either way,
    and nothing lands outside an empty destdir."""
    a = layer_arena
    live = a.live
    u = user_dirs
    polkit.set_allowed([constants.ACTION_MOUNT])
    own = run_as(65534, bus.address, [["mount", [str(u / "image1")], str(u / "upper"), str(u / "merge"), {}]])[0]
    assert own[0] == "ok", own
    own = own[1]
    (u / "merge/made-by-nobody").write_text("x")
    for name in ("dests", "out", "tars"):
        (u / name).mkdir()
    (u / "canary").mkdir()
    (u / "outside").mkdir()
    (u / "outside/target").write_text("must stay as it is")
    os.symlink("/etc", u / "etc-link")
    os.symlink(u / "dests", u / "dests-link")
    for p in (u / "dests", u / "out", u / "canary", u / "etc-link", u / "dests-link"):
        os.chown(p, 65534, 65534, follow_symlinks=False)
    hostile = _hostile(str(u / "outside")) | {
        "canary-dotdot": _tar_bytes([("../canary/esc", tarfile.REGTYPE, "", b"x")]),
        "canary-symlink": _tar_bytes([("l", tarfile.SYMTYPE, "../canary", b""), ("l/esc", tarfile.REGTYPE, "", b"x")]),
        "device": _tar_bytes([("null", tarfile.CHRTYPE, "", b"")]),
        "garbage": random.Random(7).randbytes(5000),
    }
    del hostile["huge-pax-header"]  # 2 MiB, sent twice per phase: covered by test_layers
    valid = _tar_bytes([("f", tarfile.REGTYPE, "", b"x"), ("d/.wh.gone", tarfile.REGTYPE, "", b"")])
    for name, data in [*hostile.items(), ("valid", valid)]:
        (u / "tars" / f"{name}.tar").write_bytes(data)
    fresh = iter(range(10_000))

    def new_dest() -> str:
        d = u / "dests" / f"d{next(fresh)}"
        d.mkdir()
        os.chown(d, 65534, 65534)
        return str(d)

    objects = [*live, own, constants.MANAGER_PATH, constants.MOUNT_PATH_PREFIX + "/nope", "/"]
    def spelling_of_a_free_dir(path: str) -> bool:
        with contextlib.suppress(Exception):
            return canonical("destdir", path) in a.free
        return False

    # Each call that may succeed gets a fresh destdir, so the results can be checked after the batch.
    traps = [*(p for p in a.traps if not spelling_of_a_free_dir(p)), str(u / "upper"), str(u / "merge"),
             str(u / "image1"), str(u / "etc-link"),
             str(u / "dests-link"), str(u / "outside"), str(u / "dests") + "/../canary", str(u)]
    kinds = ["write", "read", "dir", "opath", "socket-unconnected", "pipe-closed", "eventfd", "epoll", "none",
             "bad-index"]
    opts_choices = [{}, {"compression": ["s", "gzip"]}, {"compression": ["b", True]}, {"devices": ["b", True]},
                    {"devices": ["s", "yes"]}, {"auth.no_user_interaction": ["b", True]}, {"bogus": ["i", 1]}]
    rng = random.Random(11)

    def calls() -> tuple[list, dict[int, str]]:
        out, expect = [], {}
        for name in sorted(hostile):
            expect[len(out)] = name
            out.append(["ImportLayer", ["FD", new_dest(), {}], rng.choice(["read", "socket"]),
                        str(u / "tars" / f"{name}.tar")])
        expect[len(out)] = "valid"
        out.append(["ImportLayer", ["FD", new_dest(), {}], "socket", str(u / "tars/valid.tar")])
        def path(kind: str) -> str:  # an output of its own for each call
            return str(u / f"out/layer-{len(out)}.tar") if kind == "write" else str(u / "tars/valid.tar")

        def pick(good: list, anything: list):  # half the time a choice that should work
            return rng.choice(good if rng.random() < 0.5 else anything)

        good_opts = [{}, {"auth.no_user_interaction": ["b", True]}]
        for obj in objects:
            for kind in kinds:
                out.append(["ExportDiff", [obj, "FD", pick([*good_opts, {"compression": ["s", "gzip"]}], opts_choices)],
                            kind, path(kind)])
        for _ in range(max(LAYER_EXAMPLES // 5, 10)):
            kind = pick(["read", "socket"], kinds)
            out.append(["ImportLayer", ["FD", pick([new_dest()], traps), pick(good_opts, opts_choices)], kind,
                        path(kind)])
            out.append(["Commit", [pick([*live, own], objects), pick([new_dest()], traps),
                                   pick(good_opts, opts_choices)], "none", ""])
        return out, expect

    before = {e.mnt_id for e in mountinfo.read()}
    results = {}
    for phase, allowed in (("denied", []), ("allowed", [constants.ACTION_EXPORT, constants.ACTION_IMPORT,
                                                        constants.ACTION_COMMIT])):
        polkit.set_allowed(allowed)
        batch, expect = calls()
        out = _as_nobody(bus, batch)
        for (member, body, kind, path), result in zip(batch, out, strict=True):
            OUTCOMES[f"{member} {'ok' if result[0] == 'ok' else result[1].rsplit('.', 1)[1]} (uid 65534)"] += 1
            if result[0] == "error":
                assert result[1] in UNIOND_ERRORS, (phase, member, body, kind, result)
                assert "Traceback" not in result[2]
                if result[1] == constants.ERROR_FAILED:  # only a reader that went away
                    assert member == "ExportDiff" and kind == "pipe-closed", (member, body, kind, result)
                continue
            assert phase == "allowed", (member, body, kind, result)
            if member == "ExportDiff":
                assert body[0] in (*live, own) and kind == "write"
                assert os.path.getsize(path) == result[1]
            else:
                dest = Path(body[1])
                assert dest.parent == u / "dests", (member, body, result)
                assert len(_entries_below(dest)) == result[1]
                engine.empty_directory(str(dest))
        for i, name in expect.items():
            wanted = "ok" if phase == "allowed" and name == "valid" else (
                constants.ERROR_NOT_AUTHORIZED if phase == "denied" else constants.ERROR_INVALID_ARGUMENT)
            assert out[i][0] == "ok" if wanted == "ok" else out[i][1] == wanted, (phase, name, out[i])
        results[phase] = Counter(r[0] if r[0] == "ok" else r[1].rsplit(".", 1)[1] for r in out)
        for d in (u / "dests").iterdir():
            assert os.listdir(d) == [], f"{phase}: {d} stays empty after a refused call"
        assert os.listdir(u / "canary") == [] and os.listdir(u / "outside") == ["target"]
        assert (u / "outside/target").read_text() == "must stay as it is"
        assert os.stat(u / "outside/target").st_nlink == 1
        _untouched(a)
    print("unprivileged layer fuzz:", {p: dict(c) for p, c in results.items()})
    assert results["allowed"]["ok"] >= 10 and results["allowed"]["InvalidArgument"] >= len(hostile)
    _assert_sane(client, daemon, before)
    assert set(client.list()) == {*live, own}
    assert "Traceback" not in daemon.log()
