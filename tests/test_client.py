"""unionctl and uniond.client against a real daemon on a real bus: unionctl as a
subprocess (as root, and as uid 65534 with python-dbusmock's polkit), the library in
both its sync and async forms.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard
from harness import ROOT, is_mounted

from uniond import constants
from uniond.client import AsyncClient, Busy, Client, InvalidArgument, NotFound

UNIONCTL = [sys.executable, "-m", "uniond.client.cli"]
E = constants.ERROR_PREFIX


def unionctl(bus, *args, uid=None, input=None, stdout=subprocess.PIPE, check=None, env=None):
    """Run unionctl; ``check`` is the exit code expected."""
    command = [*UNIONCTL, *map(str, args)]
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    environment = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address, "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run(command, input=input, stdout=stdout, stderr=subprocess.PIPE, env=environment,
                            timeout=60, cwd="/")
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    if check is not None:
        assert result.returncode == check, (args, result.returncode, stderr)
    return result


def out(result) -> str:
    return result.stdout.decode()


def one_error_line(result, name: str, needle: str) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"unionctl: {name}: ") and needle in lines[0], lines
    return lines[0]


def test_every_command_as_root(daemon, bus, layers, tmp_path):
    t = layers
    monitor = subprocess.Popen([*UNIONCTL, "monitor", "--json", "-v", "--address", bus.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert b"monitoring" in monitor.stderr.readline()  # subscribed
    status = json.loads(out(unionctl(bus, "status", "--json", check=0)))
    assert status == {"version": constants.VERSION, "mounts": 0, "unit": None}
    assert "mounts: 0" in out(unionctl(bus, "status", check=0))

    made = json.loads(out(unionctl(bus, "mount", t / "image2", t / "image1", "--upper", t / "upper",
                                   "--mountpoint", t / "merge", "-o", "volatile=true", "--description", "my build",
                                   "--json", check=0)))
    assert made["mountpoint"] == str(t / "merge") and is_mounted(t / "merge")
    assert made["lowerdirs"] == [str(t / "image2"), str(t / "image1")] and made["upperdir"] == str(t / "upper")
    assert made["options"] == {"volatile": True, "description": "my build"} and made["owner"] == 0
    assert made["path"] == f"{constants.MOUNT_PATH_PREFIX}/{made['id']}" and made["readonly"] is False
    # A read-only view, uniond's mountpoint, named relative to the working directory.
    result = subprocess.run([*UNIONCTL, "mount", "image1", "-v"], capture_output=True, cwd=t, timeout=60,
                            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address, "PYTHONPATH": str(ROOT)})
    view_mp, view_id = result.stdout.decode().strip().split("\t")
    assert is_mounted(view_mp) and sorted(os.listdir(view_mp)) == ["a", "b"]

    # Completion offers the live mounts' ids and mountpoints (bash asks the command itself).
    completed = out(unionctl(bus, env={"_UNIONCTL_COMPLETE": "bash_complete", "COMP_WORDS": "unionctl diff ",
                                       "COMP_CWORD": "2"}, check=0)).split()
    assert {f"plain,{made['id']}", f"plain,{t / 'merge'}", f"plain,{view_id}"} <= set(completed), completed
    listed = json.loads(out(unionctl(bus, "list", "--json", check=0)))["mounts"]
    assert [m["id"] for m in listed] == [made["id"], view_id]
    table = out(unionctl(bus, "list", check=0)).splitlines()
    assert table[0].split() == ["ID", "MOUNTPOINT", "LAYERS", "UPPER", "OWNER", "CREATED", "FLAGS"]
    assert table[1].split()[:5] == [made["id"], str(t / "merge"), f"{t}/image2:{t}/image1", str(t / "upper"), "root"]
    assert table[2].split()[3:5] == ["-", "root"]

    os.unlink(t / "merge/a")
    (t / "merge/sub").mkdir()
    # By id, object path, mountpoint and a path inside: the same mount.
    for name in (made["id"], made["path"], t / "merge", t / "merge/sub", "--json"):
        if name == "--json":
            diff = json.loads(out(unionctl(bus, "diff", "--json", t / "merge/b", check=0)))
            assert diff == {"id": made["id"], "path": made["path"],
                            "changes": [{"kind": "D", "path": "/a"}, {"kind": "A", "path": "/sub"}]}
        else:
            assert out(unionctl(bus, "diff", name, check=0)) == "D /a\nA /sub\n"

    # export: to a file (gzip by its name), and to stdout when it is a pipe.
    exported = json.loads(out(unionctl(bus, "export", t / "merge", "-o", tmp_path / "l.tar.gz", "--json", check=0)))
    assert exported["bytes"] == os.path.getsize(tmp_path / "l.tar.gz") > 0
    with tarfile.open(tmp_path / "l.tar.gz", "r:gz") as tf:
        assert sorted(tf.getnames()) == [".wh.a", "sub"]
    piped = unionctl(bus, "export", made["id"], check=0).stdout
    with tarfile.open(fileobj=io.BytesIO(piped)) as tf:
        assert sorted(tf.getnames()) == [".wh.a", "sub"]

    # import: from a file and from stdin (a pipe); commit into a directory.
    for name in ("from-file", "from-pipe", "committed"):
        (tmp_path / name).mkdir()
    assert out(unionctl(bus, "import", tmp_path / "l.tar.gz", tmp_path / "from-file", check=0)).startswith("2 entries")
    imported = json.loads(out(unionctl(bus, "import", "-", tmp_path / "from-pipe", "--json", input=piped, check=0)))
    assert imported == {"destdir": str(tmp_path / "from-pipe"), "entries": 2}
    committed = json.loads(out(unionctl(bus, "commit", t / "merge", tmp_path / "committed", "--json", check=0)))
    assert committed["entries"] == 2
    for name in ("from-file", "from-pipe", "committed"):
        assert sorted(os.listdir(tmp_path / name)) == ["a", "sub"]
        assert os.stat(tmp_path / name / "a").st_rdev == 0  # a whiteout: a 0/0 device

    gone = json.loads(out(unionctl(bus, "unmount", t / "merge/sub", "--json", check=0)))
    assert gone == {"id": made["id"], "path": made["path"], "mountpoint": str(t / "merge"), "unmounted": True}
    assert not is_mounted(t / "merge")
    unionctl(bus, "unmount", view_mp, check=0)
    monitor.terminate()
    events = [json.loads(line) for line in monitor.communicate(timeout=10)[0].decode().splitlines()]
    assert [(e["event"], e["id"]) for e in events] == [
        ("MountAdded", made["id"]), ("MountAdded", view_id), ("MountRemoved", made["id"]), ("MountRemoved", view_id)]
    assert events[0] == {"event": "MountAdded", "id": made["id"], "path": made["path"], "mountpoint": str(t / "merge")}


def test_errors_are_one_line_with_their_exit_code(daemon, bus, layers, tmp_path):
    t = layers
    one_error_line(unionctl(bus, "diff", "nosuch", check=4), f"{E}.NotFound", "'nosuch' is neither a mount id")
    one_error_line(unionctl(bus, "unmount", f"{constants.MOUNT_PATH_PREFIX}/0123", check=4), f"{E}.NotFound", "0123")
    one_error_line(unionctl(bus, "mount", t / "missing", check=1), f"{E}.InvalidArgument", "lowerdirs[0]")
    unionctl(bus, "mount", t / "image1", "--upper", t / "upper", "--mountpoint", t / "merge", check=0)
    # Busy names the process holding the mount.
    holder = subprocess.Popen(["sleep", "60"], cwd=t / "merge")
    try:
        one_error_line(unionctl(bus, "unmount", t / "merge", check=5), f"{E}.Busy", f"sleep (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    one_error_line(unionctl(bus, "mount", t / "image2", "--mountpoint", t / "merge", check=1),
                   f"{E}.AlreadyMounted", str(t / "merge"))
    # A read-only view has no upper: nothing to export or commit, and uniond says so.
    view = out(unionctl(bus, "mount", t / "image2", check=0)).strip()
    (tmp_path / "dest").mkdir()
    one_error_line(unionctl(bus, "export", view, "-o", tmp_path / "x.tar", check=1), f"{E}.InvalidArgument", "no upper")
    one_error_line(unionctl(bus, "commit", view, tmp_path / "dest", check=1), f"{E}.InvalidArgument", "no upper")
    # --json: the error line is a JSON document naming the error.
    result = unionctl(bus, "--json", "diff", "nosuch", check=4)
    assert json.loads(result.stderr) == {"error": f"{E}.NotFound", "message": json.loads(result.stderr)["message"]}
    # Usage: exit 2, one line that points at --help.
    for args, needle in [(["mount"], "Missing argument"), (["mount", t / "image1", "-o", "readonly=maybe"],
                         "not true or false"), (["frobnicate"], "No such command")]:
        one_error_line(unionctl(bus, *args, check=2), "usage", needle)
    refused = json.loads(unionctl(bus, "export", view, "--json", check=2).stderr)
    assert refused["error"] == "usage" and "--json needs -o FILE" in refused["message"]
    # No bus there: the bus's error name, exit 1.
    one_error_line(unionctl(bus, "list", "--address", f"unix:path={tmp_path}/none", check=1),
                   "org.freedesktop.DBus.Error.NoServer", "cannot connect")
    help_text = out(unionctl(bus, "export", "--help", check=0))
    assert "Example:" in help_text and "unionctl export /srv/merged -o layer.tar.gz" in help_text


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_layers_and_images_round_trip(daemon, bus, layers, tmp_path):
    """export-layer / apply-layer with digests, export-image / import-image into a store,
    and the imported image mounted: the same files as the mount it came from."""
    t = layers
    made = json.loads(out(unionctl(bus, "mount", t / "image2", t / "image1", "--upper", t / "upper",
                                   "--mountpoint", t / "merge", "--json", check=0)))
    os.unlink(t / "merge/a")
    (t / "merge/new").write_text("new")

    # export-layer: zstd by the name; the digests are the file's and the tar's.
    layer = json.loads(out(unionctl(bus, "export-layer", t / "merge", "-o", tmp_path / "l.tar.zst", "--json",
                                    check=0)))
    blob = (tmp_path / "l.tar.zst").read_bytes()
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    assert layer == {"id": made["id"], "path": made["path"], "output": str(tmp_path / "l.tar.zst"),
                     "bytes": len(blob), "entries": 2, "digest": sha256(blob), "diff_id": sha256(tar),
                     "media_type": "application/vnd.oci.image.layer.v1.tar+zstd"}
    text = out(unionctl(bus, "export-layer", made["id"], "-o", tmp_path / "l.tar", check=0)).splitlines()
    plain = (tmp_path / "l.tar").read_bytes()
    assert text == [f"{len(plain)} bytes, 2 entries written to {tmp_path / 'l.tar'}", f"diff_id: {sha256(plain)}",
                    f"digest: {sha256(plain)}", "media_type: application/vnd.oci.image.layer.v1.tar"]

    # apply-layer checks the digest a manifest promises, from a file and from stdin.
    for name in ("applied", "piped", "refused"):
        (tmp_path / name).mkdir()
    applied = json.loads(out(unionctl(bus, "apply-layer", tmp_path / "l.tar.zst", tmp_path / "applied",
                                      "--parent", t / "image2", "--parent", t / "image1",
                                      "--expect-digest", layer["digest"], "--json", check=0)))
    assert applied == {"destdir": str(tmp_path / "applied"), **{k: layer[k] for k in
                       ("bytes", "entries", "digest", "diff_id", "media_type")}}
    assert sorted(os.listdir(tmp_path / "applied")) == ["a", "new"] and os.stat(tmp_path / "applied/a").st_rdev == 0
    piped = out(unionctl(bus, "apply-layer", "-", tmp_path / "piped", "--expect-diff-id", layer["diff_id"],
                         input=blob, check=0)).splitlines()
    assert piped[:2] == [f"2 entries in {tmp_path / 'piped'}", f"diff_id: {layer['diff_id']}"]
    wrong = "sha256:" + "0" * 64
    refused = unionctl(bus, "apply-layer", tmp_path / "l.tar.zst", tmp_path / "refused", "--expect-digest", wrong,
                       check=1)
    line = one_error_line(refused, f"{E}.InvalidArgument", wrong)
    assert layer["digest"] in line and os.listdir(tmp_path / "refused") == []

    # export-image: the lowers and the upper as an OCI archive; import-image puts it in a store.
    image = json.loads(out(unionctl(bus, "export-image", t / "merge", "-o", tmp_path / "img.tar",
                                    "--name", "localhost/t:1", "--json", check=0)))
    assert image["bytes"] == os.path.getsize(tmp_path / "img.tar") and image["layers"] == 3
    assert image["digest"].startswith("sha256:") and json.loads(image["config"])["rootfs"]["type"] == "layers"
    (tmp_path / "store").mkdir()
    imported = json.loads(out(unionctl(bus, "import-image", tmp_path / "img.tar", tmp_path / "store",
                                       "--expect-digest", image["digest"], "--json", check=0)))
    assert imported["digest"] == image["digest"] and imported["store"] == str(tmp_path / "store")
    assert (imported["layers"], imported["layers_stored"], len(imported["lowerdirs"])) == (3, 3, 3)
    assert all(d.startswith(f"{tmp_path / 'store'}/") for d in imported["lowerdirs"])
    # Again, from stdin, as text: the lowerdirs on stdout, the digest on stderr; nothing new stored.
    again = unionctl(bus, "import-image", "-", tmp_path / "store", input=(tmp_path / "img.tar").read_bytes(), check=0)
    assert out(again).splitlines() == imported["lowerdirs"]
    assert again.stderr.decode() == f"image {image['digest']}: 3 layers, 0 new in {tmp_path / 'store'}\n"
    view = out(unionctl(bus, "mount", *imported["lowerdirs"], check=0)).strip()
    assert sorted(os.listdir(view)) == sorted(os.listdir(t / "merge")) == ["b", "c", "new"]
    assert all(Path(view, n).read_text() == (t / "merge" / n).read_text() for n in ("b", "c", "new"))
    one_error_line(unionctl(bus, "import-image", tmp_path / "img.tar", tmp_path / "store", "--expect-digest", wrong,
                            check=1), f"{E}.InvalidArgument", wrong)
    unionctl(bus, "unmount", view, check=0)

    # The older export/import take zstd too (by the name .tar.zst).
    unionctl(bus, "export", t / "merge", "-o", tmp_path / "e.tar.zst", check=0)
    assert (tmp_path / "e.tar.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    (tmp_path / "e").mkdir()
    imported_zstd = out(unionctl(bus, "import", tmp_path / "e.tar.zst", tmp_path / "e", check=0))
    assert imported_zstd == f"2 entries in {tmp_path / 'e'}\n"
    for command in ("export-layer", "apply-layer", "import-image", "export-image"):
        help_text = out(unionctl(bus, command, "--help", check=0))
        assert "Example:" in help_text and f"unionctl {command} " in help_text


def test_unprivileged_user_with_polkit(daemon, bus, polkit, user_dirs, layers, tmp_path):
    u = user_dirs
    polkit.set_allowed([constants.ACTION_MOUNT, constants.ACTION_UNMOUNT_OWN])
    mp = out(unionctl(bus, "mount", u / "image2", u / "image1", "--upper", u / "upper", "--mountpoint", u / "merge",
                      uid=65534, check=0)).strip()
    assert mp == str(u / "merge") and is_mounted(mp)
    listed = json.loads(out(unionctl(bus, "list", "--json", uid=65534, check=0)))["mounts"]
    assert [(m["mountpoint"], m["owner"]) for m in listed] == [(mp, 65534)]
    assert out(unionctl(bus, "diff", mp, uid=65534, check=0)) == ""
    # polkit says no to an export: exit 3, the daemon's message.
    one_error_line(unionctl(bus, "export", mp, "-o", "/dev/null", uid=65534, check=3), f"{E}.NotAuthorized",
                   constants.ACTION_EXPORT)
    root_mount = out(unionctl(bus, "mount", layers / "image1", check=0)).strip()
    one_error_line(unionctl(bus, "unmount", root_mount, uid=65534, check=3), f"{E}.NotAuthorized",
                   constants.ACTION_UNMOUNT_OTHER)
    polkit.answer(False, True)  # would be allowed after authentication, which is ruled out
    one_error_line(unionctl(bus, "unmount", root_mount, "--no-user-interaction", uid=65534, check=3),
                   f"{E}.NotAuthorizedCanObtain", "")
    assert polkit.calls()[-1]["flags"] == 0  # no user interaction
    polkit.answer_code("ret = (args[1] in self.allowed or self.allow_unknown, False, {})")
    unionctl(bus, "unmount", u / "merge", uid=65534, check=0)
    assert not is_mounted(mp)


def test_progress_bar_on_a_terminal_only(daemon, bus, layers, tmp_path):
    t = layers
    unionctl(bus, "mount", t / "image1", "--upper", t / "upper", "--mountpoint", t / "merge", check=0)
    with open(t / "merge/big", "wb") as f:
        f.write(os.urandom(4 << 20))
    command = " ".join([*UNIONCTL, "export", str(t / "merge"), "-o", str(tmp_path / "l.tar")])
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    screen = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, env=env, timeout=60,
                            cwd="/").stdout.decode()
    # An export's size is known only at its end: bytes so far and the rate.
    assert re.search(r"export: 4\.\d\dMB \[00:\d\d, [\d.]+[kMG]?B/s\]", screen), screen
    assert f"bytes written to {tmp_path / 'l.tar'}" in screen
    # The digest commands draw the same bar, reading as writing (a file's size is known).
    command = " ".join([*UNIONCTL, "apply-layer", str(tmp_path / "l.tar"), str(tmp_path / "applied")])
    (tmp_path / "applied").mkdir()
    screen = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, env=env, timeout=60,
                            cwd="/").stdout.decode()
    assert re.search(r"apply-layer: 100%\|.*\| 4\.\d\dM/4\.\d\dM", screen), screen
    assert f"entries in {tmp_path / 'applied'}" in screen
    quiet = unionctl(bus, "export", t / "merge", "-o", tmp_path / "l2.tar", check=0)
    assert b"B/s" not in quiet.stderr and quiet.stderr == b""


def test_library_sync(daemon, bus, layers, tmp_path):
    t = layers
    with Client(bus.address) as client:
        events = client.events()
        with client.mount([t / "image2", t / "image1"], t / "upper", t / "merge", description="lib") as m:
            assert m.mountpoint == str(t / "merge") and m.options == {"description": "lib"}
            assert events.get(timeout=10).as_json() == {"event": "MountAdded", "id": m.id, "path": m.path,
                                                        "mountpoint": m.mountpoint}
            (t / "merge/new").write_text("x")
            assert client.find(t / "merge/new").id == client.find(m.id).id == client.find(m.path).id == m.id
            assert [(c.kind, c.path) for c in m.diff()] == [("A", "/new")]
            with open(tmp_path / "l.tar", "wb") as f:
                assert m.export(f) == os.path.getsize(tmp_path / "l.tar")
            (tmp_path / "imp").mkdir()
            (tmp_path / "snap").mkdir()
            seen = []
            assert client.import_layer(tmp_path / "l.tar", tmp_path / "imp", progress=lambda d, n: seen.append((d, n)))
            assert seen[-1][0] == seen[-1][1] == os.path.getsize(tmp_path / "l.tar")
            assert m.commit(tmp_path / "snap") == 1 and os.listdir(tmp_path / "snap") == ["new"]
            # The digest methods answer typed values; parents may be Paths.
            layer = m.export_layer(tmp_path / "l.tgz")
            assert layer.media_type.endswith("+gzip") and layer.entries == 1
            assert layer.digest == sha256((tmp_path / "l.tgz").read_bytes()) != layer.diff_id
            (tmp_path / "applied").mkdir()
            assert client.apply_layer(tmp_path / "l.tgz", tmp_path / "applied", parents=[t / "image2", t / "image1"],
                                      expected_digest=layer.digest) == layer
            holder = subprocess.Popen(["sleep", "60"], cwd=t / "merge")
            try:
                with pytest.raises(Busy, match=f"sleep \\(pid {holder.pid}\\)"):
                    m.unmount()
            finally:
                holder.kill()
                holder.wait()
        assert not is_mounted(t / "merge") and client.mounts() == []
        assert events.get(timeout=10).event == "MountRemoved"
        with pytest.raises(NotFound):
            client.find(t / "merge")
        with pytest.raises(InvalidArgument, match="lowerdirs"):
            client.mount([t / "nowhere"])
        view = client.mount([t / "image1"])
        with pytest.raises(InvalidArgument, match="no upper"):
            view.export(tmp_path / "x.tar")
        view.unmount()


def test_library_async(daemon, bus, layers, tmp_path):
    t = layers

    async def main() -> list[str]:
        async with AsyncClient(bus.address) as client:
            events = await client.events()
            mounts = await asyncio.gather(*(client.mount([t / "image1"]) for _ in range(3)))
            assert sorted(m.id for m in await client.mounts()) == sorted(m.id for m in mounts)
            assert (await client.status()).mounts == 3
            r, w = os.pipe()  # an export into a pipe the service reads itself
            reader = threading.Thread(target=lambda: received.append(os.read(r, 1 << 20)))
            received: list[bytes] = []
            reader.start()
            upper = await client.mount([t / "image2"], t / "upper", t / "merge")
            (t / "merge/f").write_text("f")
            await upper.export(w, "gzip")
            os.close(w)
            reader.join()
            os.close(r)
            assert received[0][:2] == b"\x1f\x8b"
            for m in [*mounts, upper]:
                await m.unmount()
            return [(await events.get(timeout=10)).event for _ in range(8)]

    assert asyncio.run(main()) == ["MountAdded"] * 4 + ["MountRemoved"] * 4


def test_update_reload_diff_of_any_name_and_flags(daemon, bus, layers, tmp_path):
    t = layers
    (t / "image3").mkdir()
    (t / "image3/e").write_text("e")
    made = json.loads(out(unionctl(bus, "mount", t / "image2", t / "image1", "--upper", t / "upper",
                                   "--mountpoint", t / "merge", "--json", check=0)))
    assert (made["name"], made["persistent"], made["bound_to"], made["detached"]) == ("", False, "", False)
    # Update: new lowers under the same id and mountpoint, the merged view changed with them.
    updated = json.loads(out(unionctl(bus, "update", t / "merge", t / "image3", t / "image1", "--json", check=0)))
    assert updated["id"] == made["id"] and updated["lowerdirs"] == [str(t / "image3"), str(t / "image1")]
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "e"]
    one_error_line(unionctl(bus, "update", made["id"], t / "nowhere", check=1), f"{E}.InvalidArgument", "nowhere")
    assert sorted(os.listdir(t / "merge")) == ["a", "b", "e"]

    # Diff through DiffInto: a name that is not UTF-8 comes out as its bytes, and in JSON escaped.
    os.close(os.open(os.fsencode(t / "merge") + b"/caf\xe9", os.O_CREAT | os.O_WRONLY, 0o644))
    os.unlink(t / "merge/a")
    assert unionctl(bus, "diff", made["id"], check=0).stdout == b"D /a\nA /caf\xe9\n"
    assert unionctl(bus, "diff", "-z", made["id"], check=0).stdout == b"D /a\0A /caf\xe9\0"
    changes = json.loads(out(unionctl(bus, "diff", "--json", t / "merge", check=0)))["changes"]
    assert changes == [{"kind": "D", "path": "/a"},
                       {"kind": "A", "path": "/caf\\xe9", "path_base64": base64.b64encode(b"/caf\xe9").decode()}]
    with Client(bus.address) as client:
        m = client.find(t / "merge")
        assert [c.raw for c in m.diff()] == [b"/a", b"/caf\xe9"]
        with open(tmp_path / "records", "wb") as f:
            assert m.diff_into(f) == 2
        assert sorted((tmp_path / "records").read_bytes().split(b"\0")) == [b"", b"A /caf\xe9", b"D /a"]
        # Far more than a pipe holds (64 KiB): read while the daemon writes, none lost.
        (t / "merge/many").mkdir()
        for i in range(3000):
            (t / "merge/many" / f"{i:05}{'x' * 120}").touch()
        many = m.diff()
        assert len(many) == 3003 and many[3].path == f"/many/00000{'x' * 120}"
        assert len(unionctl(bus, "diff", made["id"], check=0).stdout.splitlines()) == 3003

        # FLAGS and the JSON fields: bound to this client's connection, and detached while in use.
        bound = client.mount([t / "image1"], bind="caller")
        holder = subprocess.Popen(["sleep", "60"], cwd=m.mountpoint)
        try:
            m.unmount(lazy=True)
            listed = {i["id"]: i for i in json.loads(out(unionctl(bus, "list", "--json", check=0)))["mounts"]}
            assert listed[bound.id]["bound_to"].startswith("caller::1.") and not listed[bound.id]["detached"]
            assert listed[made["id"]]["detached"] is True and listed[made["id"]]["bound_to"] == ""
            table = out(unionctl(bus, "list", check=0)).splitlines()
            assert [row.split()[-1] for row in table] == ["FLAGS", "detached", f"bound={bound.bound_to}"]
        finally:
            holder.kill()
            holder.wait()

    # Reload as root: a new mounts.d file comes up, flagged as declared.
    (daemon.mounts_dir).mkdir(parents=True, exist_ok=True)
    (daemon.mounts_dir / "app.toml").write_text(f"lowerdirs = ['{t / 'image2'}']\n")
    assert json.loads(out(unionctl(bus, "reload", "--json", check=0))) == {"reloaded": True}
    listed = json.loads(out(unionctl(bus, "list", "--json", check=0)))["mounts"]
    assert [(i["name"], i["persistent"]) for i in listed if i["name"]] == [("app", True)]
    assert "declared=app" in out(unionctl(bus, "list", check=0))


def test_completion_scripts_shipped_equal_generated(bus):
    for shell, path in [("bash", "packaging/completions/unionctl"), ("zsh", "packaging/completions/_unionctl")]:
        generated = subprocess.run([str(Path(sys.executable).parent / "unionctl")], capture_output=True,
                                   env={**os.environ, "_UNIONCTL_COMPLETE": f"{shell}_source"}, check=True).stdout
        assert (ROOT / path).read_bytes() == generated, f"regenerate {path} (see README)"


def test_no_uniond_on_the_bus_says_so(bus):
    result = unionctl(bus, "status", check=1)
    one_error_line(result, "org.freedesktop.DBus.Error.ServiceUnknown", "uniond is not running on this bus")
