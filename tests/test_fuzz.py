"""Hostile input for every method (Mount, Unmount, Diff, ListMounts, ExportDiff,
ImportLayer, Commit): each call gets one of uniond's own errors (or, when the message
cannot even name the method's signature, the bus library's), the daemon stays up, never
logs a traceback, no mount appears outside the allowed roots, and no layer is written
outside its destdir."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import shutil
import socket
import tarfile
import time
from collections import Counter

import pytest
from dbus_next import Message, Variant
from harness import CallError, Client, is_mounted, run_as
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uniond import constants, mountinfo
from uniond.config import DEFAULT_ALLOWED_ROOTS

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


LAYER_FUZZ = settings(FUZZ, max_examples=int(os.environ.get("UNIOND_FUZZ_LAYER_EXAMPLES", "400")))

_TAR_NAMES = ["a", "a/b", "d/", "..", "../x", "a/../../x", "/etc/uniond-fuzz", "./a", ".wh.a", ".wh..wh..opq",
              "a/.wh..wh..opq", ".wh.", ".wh..", "d/.wh.f", "x" * 300, "a//b", "link/inside", ".", "a/./b", "link"]
_TAR_KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
              tarfile.FIFOTYPE, tarfile.CONTTYPE, b"Z"]


def _tar_bytes(members, outside: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, size, link, mode, uid in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid = kind, mode, uid
            info.linkname = outside if link == "OUTSIDE" else link
            info.size = size if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return buffer.getvalue()


def _tree(root, filled=frozenset()) -> list[tuple[str, tuple[str, ...], int]]:
    """Names and sizes below ``root``, leaving out the daemon's own directories and the
    destdirs the fuzz filled (``filled``; the pool of fresh ones is ``dests``)."""
    out = []
    for directory, dirs, files in os.walk(root):
        if directory == str(root):
            dirs[:] = [d for d in dirs if d not in ("state", "run", "dests")]
        if directory in filled:
            dirs[:], files = [], []
        for name in files:
            if directory == str(root) and name in ("fuzz-fd", "uniond.log"):
                continue  # the test's file behind the fds it passes; the daemon's log
            out.append((os.path.join(directory, name), (), os.lstat(os.path.join(directory, name)).st_size))
        out.append((directory, tuple(sorted(dirs)), 0))
    return sorted(out)


def _without(tree, filled):
    """``tree`` as _tree(root, filled) would see it: entries below a filled destdir left out."""
    return [e for e in tree if not any(e[0].startswith(d + "/") for d in filled)]


def test_fuzz_layer_methods(daemon, client, arena, tmp_path):
    """ExportDiff, ImportLayer and Commit with hostile fds, destdirs, options and archives:
    each gets a uniond error or succeeds, and nothing is written outside the destdir."""
    t, live, paths = arena
    (t / "merge/changed").write_text("c")  # something to export from the writable live mount
    (t / "dests").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside"  # a symlink target no layer may write into
    outside.mkdir()
    (t / "full").mkdir()
    (t / "full/f").write_text("f")
    before_tree = _tree(t)
    before = {e.mnt_id for e in mountinfo.read()}
    fresh = iter(range(10**9))

    def new_dest() -> str:
        path = t / "dests" / str(next(fresh))
        path.mkdir()
        return str(path)

    destdirs = st.one_of(
        st.builds(new_dest),  # a legitimate one: empty, allowed
        st.sampled_from(paths + [str(t / "full"), str(t / "dests"), str(t / "m2"), str(t / "up2/x")]),
        dbus_text,
    )
    mount_objects = st.one_of(st.sampled_from(live), object_paths)
    members = st.lists(
        st.tuples(
            st.one_of(st.sampled_from(_TAR_NAMES), dbus_text.filter(bool)),
            st.sampled_from(_TAR_KINDS),
            st.integers(0, 3000),
            st.sampled_from(["", "a", "/etc", "OUTSIDE", "..", "../../..", "link", "a/b", "/etc/passwd"]),
            st.sampled_from([0o644, 0o755, 0o4755, 0o7777, 0]),
            st.sampled_from([0, 1000, 2**21 - 1]),
        ),
        max_size=6,
    )
    archives = st.one_of(
        st.builds(lambda m: _tar_bytes(m, str(outside)), members),
        st.builds(lambda m, cut: _tar_bytes(m, str(outside))[:cut], members, st.integers(0, 4000)),  # truncated
        st.builds(lambda m: gzip.compress(_tar_bytes(m, str(outside))), members),
        st.binary(max_size=3000),  # garbage
        st.just(b"\0" * 10240),  # only end-of-archive blocks: an empty layer
    )
    layer_options = st.one_of(
        options,
        st.dictionaries(st.sampled_from(["compression", "devices", "auth.no_user_interaction"]),
                        st.one_of(st.builds(lambda v: Variant("s", v), st.sampled_from(["none", "gzip", "zstd", ""])),
                                  st.builds(lambda v: Variant("b", v), st.booleans())), max_size=2),
    )
    # What the caller's fd is: (how to open it, what the method can use it for)
    fd_kinds = st.sampled_from(["file-w", "file-r", "dir", "socket", "devnull", "pipe-no-reader", "none"])

    def open_fd(kind: str, data: bytes) -> int | None:
        if kind in ("file-w", "file-r"):
            path = tmp_path / "fuzz-fd"
            path.write_bytes(data)
            return os.open(path, os.O_WRONLY if kind == "file-w" else os.O_RDONLY)
        if kind == "dir":
            return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        if kind == "socket":
            a, b = socket.socketpair()
            b.close()
            return a.detach()
        if kind == "devnull":
            return os.open("/dev/null", os.O_RDWR)
        if kind == "pipe-no-reader":
            r, w = os.pipe()
            os.close(r)
            return w
        return None

    counts: Counter[str] = Counter()
    filled: set[str] = set()
    layers_of_live = [str(t / n) for n in ("image1", "image2", "up2", "m2")]
    layers_of_live += [client.props(p)["Mountpoint"] for p in live]

    def check_filled(dest: str) -> None:
        """A successful ImportLayer or Commit wrote into an allowed, non-layer directory."""
        assert not any(dest == d or dest.startswith(d + "/") or d.startswith(dest + "/") for d in layers_of_live), dest
        assert any(dest.startswith(r + "/") for r in DEFAULT_ALLOWED_ROOTS), dest
        filled.add(dest)

    def call_with(member, signature, body, fd):
        fds = [fd] if fd is not None else []
        try:
            reply = client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                                    member, signature, body, unix_fds=fds)
            counts[f"{member} ok"] += 1
            return reply
        except CallError as e:
            assert e.name in UNIOND_ERRORS, f"{member}: {e.name}: {e.text[:200]}"
            assert "Traceback" not in e.text
            counts[f"{member} {e.name.rsplit('.', 1)[1]}"] += 1
            return None
        finally:
            for f in fds:
                os.close(f)

    @LAYER_FUZZ
    @given(method=st.sampled_from(["ExportDiff", "ImportLayer", "ImportLayer", "Commit"]), obj=mount_objects,
           dest=destdirs, opts=layer_options, archive=archives, fd_kind=fd_kinds)
    def one(method, obj, dest, opts, archive, fd_kind):
        if method == "ExportDiff":
            call_with("ExportDiff", "oha{sv}", [obj, 0, opts], open_fd(fd_kind, b""))
        elif method == "ImportLayer":
            reply = call_with("ImportLayer", "hsa{sv}", [0, dest, opts], open_fd(fd_kind, archive))
            if reply is not None:
                check_filled(dest)
        else:
            reply = call_with("Commit", "osa{sv}", [obj, dest, opts], None)
            if reply is not None:
                check_filled(dest)

    one()

    # Near-valid calls reach deeper: a readable tar of hostile members into a fresh destdir.
    @LAYER_FUZZ
    @given(members=members, devices=st.booleans(), gz=st.booleans(),
           compression=st.sampled_from(["none", "gzip"]), commit=st.booleans())
    def near(members, devices, gz, compression, commit):
        archive = _tar_bytes(members, str(outside))
        archive = gzip.compress(archive) if gz else archive
        dest = new_dest()
        if call_with("ImportLayer", "hsa{sv}", [0, dest, {"devices": Variant("b", devices)}],
                     open_fd("file-r", archive)) is not None:
            check_filled(dest)
        else:
            assert os.listdir(dest) == [], "a refused layer leaves destdir empty"
        if commit:
            dest = new_dest()
            if call_with("Commit", "osa{sv}", [live[0], dest, {}], None) is not None:
                check_filled(dest)
        else:
            call_with("ExportDiff", "oha{sv}", [live[0], 0, {"compression": Variant("s", compression)}],
                      open_fd("file-w", b""))

    near()
    _assert_sane(client, daemon, before)
    assert _tree(t, frozenset(filled)) == _without(before_tree, filled), "nothing changed outside the destdirs"
    assert os.listdir(outside) == [], "nothing written through a symlink out of a layer"
    assert not os.path.exists("/etc/uniond-fuzz")
    assert set(client.list()) == set(live) and is_mounted(t / "m2")
    assert "Traceback" not in daemon.log()
    assert {k.split()[0] for k in counts if k.endswith(" ok")} == {"ExportDiff", "ImportLayer", "Commit"}, counts
    print(f"layer fuzz: {sum(counts.values())} calls:", dict(sorted(counts.items())))
    shutil.rmtree(outside)


class _Corrupted(Message):
    """A message whose marshalled bytes are changed after the library checked them."""

    def __init__(self, *args, replace: tuple[bytes, bytes], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replace = replace

    def _marshall(self, negotiate_unix_fd=False):
        return super()._marshall(negotiate_unix_fd).replace(*self.replace)


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\x00\x00"], ids=["non-utf8", "nul"])
def test_invalid_strings_never_reach_the_daemon(daemon, bus, client, layers, bad):
    """D-Bus strings must be UTF-8 without NUL: the bus drops a connection sending
    others before the daemon sees a byte, and the daemon carries on."""
    rogue = Client(bus.address)
    msg = _Corrupted(destination=constants.BUS_NAME, path=constants.MANAGER_PATH,
                     interface=constants.MANAGER_INTERFACE, member="Mount", signature="asssa{sv}",
                     body=[[str(layers / "image1")], "", "/tmp/QQ", {}], replace=(b"QQ", bad))
    with pytest.raises(EOFError):  # the bus closed the connection: no reply, no error reply
        rogue.loop.run_until_complete(asyncio.wait_for(rogue.bus.call(msg), 10))
    with pytest.raises(EOFError):
        rogue.loop.run_until_complete(rogue.bus.wait_for_disconnect())
    rogue.loop.close()
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
