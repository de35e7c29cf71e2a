"""Layers and images that travel: uniond against umoci, skopeo, podman and buildah.

Images are built by the peers, imported by uniond (ApplyLayer, ImportImage), mounted and
compared entry by entry with the peers' own renderings; uniond's exports (ExportLayer,
ExportImage) are read back by the peers and compared with the mount they came from;
digests are those the peers compute.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from dbus_next import Variant
from harness import CallError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import Peers, oci_manifest
from views import differences, view

from uniond import constants

E = constants.ERROR_PREFIX
MTIME = 1_600_000_000_123_456_789  # nanoseconds: tar's PAX records carry them


def _call(client, member, signature, body, path, mode="rb"):
    with open(path, mode) as f:
        return client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                               member, signature, body, unix_fds=[f.fileno()])


def _options(**opts):
    kinds = {bool: "b", str: "s", list: "as"}
    return {k: Variant(kinds[type(v)], v) for k, v in opts.items()}


def apply_layer(client, path, destdir, **opts):
    (info,) = _call(client, "ApplyLayer", "hsa{sv}", [0, str(destdir), _options(**opts)], path)
    return {k: v.value for k, v in info.items()}


def export_layer(client, mount, path, **opts):
    (info,) = _call(client, "ExportLayer", "oha{sv}", [mount, 0, _options(**opts)], path, "wb")
    return {k: v.value for k, v in info.items()}


def import_image(client, path, store, **opts):
    lowers, info = _call(client, "ImportImage", "hsa{sv}", [0, str(store), _options(**opts)], path)
    return lowers, {k: v.value for k, v in info.items()}


def export_image(client, mount, path, **opts):
    (info,) = _call(client, "ExportImage", "oha{sv}", [mount, 0, _options(**opts)], path, "wb")
    return {k: v.value for k, v in info.items()}


def _stamp(root, *paths):
    for p in paths:
        os.utime(root / p, ns=(MTIME, MTIME), follow_symlinks=False)


def fill_base(r):
    """Every kind of entry a layer carries."""
    (r / "etc/dir").mkdir(parents=True)
    (r / "etc/dir/file").write_text("one")
    os.chmod(r / "etc/dir", 0o750)
    os.setxattr(r / "etc/dir", "user.origin", b"the lower layer")
    (r / "tmp").mkdir()
    os.chmod(r / "tmp", 0o1777)
    (r / "todf").mkdir()
    (r / "todf/t").write_text("t")
    (r / "links").mkdir()
    (r / "links/h1").write_text("hard")
    os.link(r / "links/h1", r / "links/h2")
    (r / "links/h3").write_text("stays")
    os.link(r / "links/h3", r / "links/h4")
    os.mkfifo(r / "fifo")
    os.symlink("etc/dir/file", r / "link")
    (r / "owned").write_text("x")
    os.chown(r / "owned", 1234, 5678)
    os.chmod(r / "owned", 0o4750)
    os.setxattr(r / "owned", "user.binary", b"\xff\x00\x01")
    (r / "ünïcode-名前").write_text("u")
    (r / ("long-" + "x" * 150)).write_text("long")
    (r / "gone/sub").mkdir(parents=True)
    (r / "gone/sub/child").write_text("c")
    _stamp(r, "etc/dir/file", "todf/t", "links/h1", "links/h3", "fifo", "link", "owned", "ünïcode-名前",
           "long-" + "x" * 150, "gone/sub/child", "gone/sub", "gone", "etc/dir", "etc", "tmp", "todf", "links")


def change(r):
    """What umoci writes as todf + todf/.wh.t (fix 1) and leaves out parents for (fix 2)."""
    (r / "etc/dir/file").write_text("two")
    shutil.rmtree(r / "todf")
    (r / "todf").write_text("now a file")
    (r / "tmp/new").write_text("new")
    os.unlink(r / "links/h2")
    shutil.rmtree(r / "gone")
    _stamp(r, "etc/dir/file", "todf", "tmp/new", "etc/dir", "tmp", "links")


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """An image built by umoci in two layers, in an OCI layout and as an oci-archive."""
    p = Peers(tmp_path_factory.mktemp("peers"))
    layout = p.dir / "oci"
    p.umoci("init", "--layout", str(layout))
    p.umoci("new", "--image", f"{layout}:rich")
    for step in (fill_base, change):
        bundle = p.dir / "bundle"
        p.umoci("unpack", "--image", f"{layout}:rich", str(bundle))
        step(bundle / "rootfs")
        p.umoci("repack", "--image", f"{layout}:rich", str(bundle))
        shutil.rmtree(bundle)
    p.umoci("unpack", "--image", f"{layout}:rich", str(p.dir / "rendered"))
    p.skopeo("copy", f"oci:{layout}:rich", f"oci-archive:{p.dir / 'rich.tar'}")
    p.layout = layout
    p.rendered = p.dir / "rendered/rootfs"
    yield p
    p.close()


@pytest.fixture
def peers(tmp_path):
    p = Peers(tmp_path / "peers")
    yield p
    p.close()


def test_umoci_layers_apply_exactly(client, rich, tmp_path):
    """Fix 1 and 2: umoci's layers, applied one by one on their parents, show what umoci shows."""
    digest, manifest, config = oci_manifest(rich.layout, "rich")
    top = manifest["layers"][-1]
    with tarfile.open(fileobj=gzip.open(rich.layout / "blobs/sha256" / top["digest"][7:])) as tf:
        names = tf.getnames()
    assert "todf" in names and "todf/.wh.t" in names, "umoci writes a whiteout below the new file"
    assert "etc/dir" not in names and "tmp" not in names and "tmp/new" in names, "umoci leaves out parents"

    dirs = []
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        dest = tmp_path / f"layer{len(dirs)}"
        dest.mkdir()
        info = apply_layer(client, rich.layout / "blobs/sha256" / desc["digest"][7:], dest,
                           parents=[str(d) for d in reversed(dirs)],
                           expected_digest=desc["digest"], expected_diff_id=diff_id)
        assert (info["digest"], info["diff_id"], info["bytes"]) == (desc["digest"], diff_id, desc["size"])
        assert info["media_type"] == desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        dirs.append(dest)
    assert info["entries"] == len(names), "every tar member, whiteouts included"
    (tmp_path / "merge").mkdir()
    client.mount([str(d) for d in reversed(dirs)], "", tmp_path / "merge")
    assert not differences(view(tmp_path / "merge"), view(rich.rendered))
    assert stat.S_IMODE(os.stat(tmp_path / "merge/tmp").st_mode) == 0o1777

    # ImportLayer, whose signature is frozen, takes umoci's layer too; with no parents
    # to ask, a directory named only as a parent is 0755, root's, of the epoch.
    (tmp_path / "plain").mkdir()
    with open(rich.layout / "blobs/sha256" / top["digest"][7:], "rb") as f:
        client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                        "ImportLayer", "hsa{sv}", [0, str(tmp_path / "plain"), {}], unix_fds=[f.fileno()])
    st = os.stat(tmp_path / "plain/etc/dir")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o755, 0, 0)
    assert os.path.isfile(tmp_path / "plain/todf")


def test_apply_layer_refuses_a_layer_that_differs(client, rich, tmp_path):
    _, manifest, config = oci_manifest(rich.layout, "rich")
    desc = manifest["layers"][0]
    wrong = "sha256:" + "0" * 64
    for option, actual in (("expected_digest", desc["digest"]), ("expected_diff_id", config["rootfs"]["diff_ids"][0])):
        dest = tmp_path / option
        dest.mkdir()
        with pytest.raises(CallError) as e:
            apply_layer(client, rich.layout / "blobs/sha256" / desc["digest"][7:], dest, **{option: wrong})
        assert e.value.name == f"{E}.InvalidArgument"
        assert wrong in str(e.value) and actual in str(e.value), "both digests named"
        assert os.listdir(dest) == []


def test_image_from_skopeo_and_podman_shares_its_layers(client, rich, peers, tmp_path):
    """ImportImage of an oci-archive (skopeo) and of a docker save tar (podman): the same
    layers, stored once, mounted as umoci renders the image."""
    digest, manifest, config = oci_manifest(rich.layout, "rich")
    store = tmp_path / "store"
    store.mkdir()
    lowers, info = import_image(client, rich.dir / "rich.tar", store)
    assert info["digest"] == digest and json.loads(info["config"]) == config
    assert lowers == [str(store / "layers" / d[7:]) for d in reversed(config["rootfs"]["diff_ids"])]
    (tmp_path / "merge").mkdir()
    mount = client.mount(lowers, "", tmp_path / "merge")
    assert not differences(view(tmp_path / "merge"), view(rich.rendered))

    # The same image as podman and skopeo write it, zstd and docker save: into the same
    # store while its layers are mounted, stored once (keyed by diff_id).
    p = peers
    zstd = tmp_path / "zstd.tar"
    p.skopeo("copy", "--dest-compress-format", "zstd", f"oci:{rich.layout}:rich", f"oci-archive:{zstd}")
    _, zinfo = import_image(client, zstd, store)
    assert _ == lowers and zinfo["layers_stored"] == 0
    plain = _plain_image(p, tmp_path)
    p.podman("load", "-i", str(plain))
    image_id = p.podman("image", "inspect", "--format", "{{.Id}}", "localhost/plain:latest").strip()
    p.podman("save", "--format", "docker-archive", "-o", str(tmp_path / "docker.tar"), "localhost/plain:latest")
    dlowers, dinfo = import_image(client, tmp_path / "docker.tar", store)
    assert dinfo["digest"] == f"sha256:{image_id}", "a docker save tar's digest is the image id"
    olowers, oinfo = import_image(client, plain, store)
    assert olowers == dlowers and oinfo["layers_stored"] == 0
    (tmp_path / "docker.tar.gz").write_bytes(gzip.compress((tmp_path / "docker.tar").read_bytes()))
    assert import_image(client, tmp_path / "docker.tar.gz", store)[0] == dlowers, "`docker save | gzip` too"
    assert sorted(os.listdir(store / "layers")) == sorted({os.path.basename(x) for x in lowers + dlowers})
    client.unmount(mount)


def _plain_image(p: Peers, tmp_path):
    """An image podman's own storage takes (it refuses umoci's todf/.wh.t with vfs)."""
    layout = tmp_path / "plain-oci"
    p.umoci("init", "--layout", str(layout))
    p.umoci("new", "--image", f"{layout}:plain")
    p.umoci("unpack", "--image", f"{layout}:plain", str(tmp_path / "plain-bundle"))
    fill_base(tmp_path / "plain-bundle/rootfs")
    p.umoci("repack", "--image", f"{layout}:plain", str(tmp_path / "plain-bundle"))
    out = tmp_path / "plain.tar"
    p.skopeo("copy", f"oci:{layout}:plain", f"oci-archive:{out}:localhost/plain:latest")
    return out


def test_exports_are_read_back_by_the_peers(client, rich, peers, tmp_path):
    """ExportImage of a mount (its lowers plus its changes): skopeo and umoci unpack
    show the mount exactly, podman loads it with the same diff_ids; ExportLayer's
    digests are the blob's and the tar's."""
    p = peers
    store = tmp_path / "store"
    store.mkdir()
    lowers, info = import_image(client, _plain_image(p, tmp_path), store)
    for name in ("upper", "merge"):
        (tmp_path / name).mkdir()
    mount = client.mount(lowers, tmp_path / "upper", tmp_path / "merge")
    m = tmp_path / "merge"
    (m / "etc/dir/file").write_text("changed in the mount")
    shutil.rmtree(m / "gone")
    os.unlink(m / "links/h2")
    (m / "new").write_text("new")
    os.setxattr(m / "new", "user.k", b"v")
    expected = view(m)

    for compression in ("gzip", "zstd"):
        out = tmp_path / f"image-{compression}.tar"
        got = export_image(client, mount, out, compression=compression, config=info["config"],
                           name=f"localhost/exported:{compression}")
        assert got["bytes"] == os.path.getsize(out) and got["layers"] == len(lowers) + 1
        # skopeo checks every digest as it copies; umoci renders what it copied.
        layout = tmp_path / f"back-{compression}"
        p.skopeo("copy", f"oci-archive:{out}", f"oci:{layout}:back")
        digest, manifest, config = oci_manifest(layout, "back")
        assert digest == got["digest"]
        assert {m["mediaType"] for m in manifest["layers"]} == {f"application/vnd.oci.image.layer.v1.tar+{compression}"}
        if compression == "zstd":  # umoci 0.4.7 reads no zstd: skopeo decompresses it for umoci
            p.skopeo("copy", "--dest-compress", "--dest-compress-format", "gzip",
                     f"oci-archive:{out}", f"oci:{layout}-gzip:back")  # a layout of its own: no blob reused
        p.umoci("unpack", "--image", f"{layout}{'-gzip' if compression == 'zstd' else ''}:back",
                str(tmp_path / f"bundle-{compression}"))
        assert view(tmp_path / f"bundle-{compression}/rootfs") == expected, compression
        assert config["config"] == json.loads(info["config"])["config"]

    p.podman("load", "-i", str(tmp_path / "image-gzip.tar"))
    layers = json.loads(p.podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", "localhost/exported:gzip"))
    assert layers == config["rootfs"]["diff_ids"]
    rendered = Path(p.buildah("mount", p.buildah("from", "localhost/exported:gzip").strip()).strip())
    assert not differences(view(rendered), expected), "containers/storage shows the mount too"

    for compression, opener in (("none", open), ("gzip", gzip.open), ("zstd", None)):
        out = tmp_path / f"layer.{compression}"
        got = export_layer(client, mount, out, compression=compression)
        raw = out.read_bytes()
        assert got["digest"] == "sha256:" + hashlib.sha256(raw).hexdigest() and got["bytes"] == len(raw)
        if opener is not None:
            with opener(out, "rb") as f:
                assert got["diff_id"] == "sha256:" + hashlib.sha256(f.read()).hexdigest()
        assert got["diff_id"] == config["rootfs"]["diff_ids"][-1], "the same tar as ExportImage's top layer"
        dest = tmp_path / f"applied-{compression}"
        dest.mkdir()
        back = apply_layer(client, out, dest, expected_digest=got["digest"], expected_diff_id=got["diff_id"])
        assert back["entries"] == got["entries"] and back["media_type"] == got["media_type"]
    client.unmount(mount)


def test_hostile_image_archives_are_refused(client, rich, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    digest, manifest, _ = oci_manifest(rich.layout, "rich")
    with tarfile.open(rich.dir / "rich.tar") as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else b"") for m in tf.getmembers()]
    cases = {}
    # A layer blob whose bytes are not those its name promises.
    victim = "blobs/sha256/" + manifest["layers"][0]["digest"][7:]
    cases["bad blob"] = [(m, data[:-1] + bytes([data[-1] ^ 1]) if m.name == victim else data) for m, data in members]
    cases["no index"] = [(m, d) for m, d in members if m.name != "index.json"]
    cases["not a tar"] = None
    for case, content in cases.items():
        path = tmp_path / f"{case}.tar"
        if content is None:
            path.write_bytes(os.urandom(20000))
        else:
            with tarfile.open(path, "w") as tf:
                for m, data in content:
                    m.size = len(data)
                    tf.addfile(m, __import__("io").BytesIO(data))
        with pytest.raises(CallError) as e:
            import_image(client, path, store)
        assert e.value.name == f"{E}.InvalidArgument", (case, e.value)
        assert os.listdir(store / "layers") == [], f"{case}: nothing half-imported is left"
    with pytest.raises(CallError) as e:
        import_image(client, rich.dir / "rich.tar", store, expected_digest="sha256:" + "1" * 64)
    assert e.value.name == f"{E}.InvalidArgument" and digest in str(e.value)
    assert os.listdir(store / "layers") == []

    # A blob that claims the diff_id of a layer already stored must still be that layer.
    lowers, _ = import_image(client, rich.dir / "rich.tar", store)
    before = view(lowers[-1])
    _, _, config = oci_manifest(rich.layout, "rich")
    garbage = os.urandom(5000)
    with pytest.raises(CallError) as e:
        import_image(client, _oci_archive(tmp_path / "liar.tar", garbage, config["rootfs"]["diff_ids"][0]), store)
    assert e.value.name == f"{E}.InvalidArgument" and config["rootfs"]["diff_ids"][0] in str(e.value)
    assert view(lowers[-1]) == before and sorted(os.listdir(store / "layers")) == sorted(
        os.path.basename(x) for x in lowers)


def _oci_archive(path, layer: bytes, diff_id: str, twist=lambda what, document: document):
    """A well-formed OCI archive of one layer whose config claims ``diff_id``;
    ``twist(what, document)`` may change the config, manifest or index before it is hashed."""
    import io

    def digest(data):
        return "sha256:" + hashlib.sha256(data).hexdigest()

    config = json.dumps(twist("config", {"architecture": "amd64", "os": "linux",
                                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}})).encode()
    manifest = json.dumps(twist("manifest", {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer),
                    "size": len(layer)}]})).encode()
    index = json.dumps(twist("index", {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(manifest),
        "size": len(manifest)}]})).encode()
    with tarfile.open(path, "w") as tf:
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index),
                           *((f"blobs/sha256/{digest(b)[7:]}", b) for b in (layer, config, manifest))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_buildah_image_is_mounted_as_buildah_renders_it(client, peers, tmp_path):
    """An image built by buildah (from scratch), saved by podman as an oci-archive."""
    p = peers
    ctr = p.buildah("from", "scratch").strip()
    fill_base(Path(p.buildah("mount", ctr).strip()))
    p.buildah("commit", ctr, "localhost/built:latest")
    p.podman("save", "--format", "oci-archive", "-o", str(tmp_path / "built.tar"), "localhost/built:latest")
    image_id = p.podman("image", "inspect", "--format", "{{.Id}}", "localhost/built:latest").strip()
    rendered = Path(p.buildah("mount", p.buildah("from", "localhost/built:latest").strip()).strip())
    (tmp_path / "store").mkdir()
    lowers, info = import_image(client, tmp_path / "built.tar", tmp_path / "store")
    assert "sha256:" + hashlib.sha256(info["config"].encode()).hexdigest() == f"sha256:{image_id}"
    (tmp_path / "merge").mkdir()
    mount = client.mount(lowers, "", tmp_path / "merge")
    assert not differences(view(tmp_path / "merge"), view(rendered))
    client.unmount(mount)


def test_zstd_for_the_frozen_methods_and_parents_that_hide(client, layers, tmp_path):
    """ExportDiff writes zstd and ImportLayer reads it by its magic; ApplyLayer's parents
    follow overlay: an opaque directory or a whiteout above hides what lies below."""
    t = layers
    for d in ("image1/etc/sub", "image2/etc", "image1/w"):
        (t / d).mkdir(parents=True)
    os.chmod(t / "image1/etc/sub", 0o700)
    os.chmod(t / "image1/w", 0o711)
    os.setxattr(t / "image2/etc", "trusted.overlay.opaque", b"y")  # hides image1/etc/sub
    os.mknod(t / "image2/w", stat.S_IFCHR, os.makedev(0, 0))  # a whiteout over image1's directory w
    path = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    (t / "merge/new").write_text("zstd")
    with open(tmp_path / "layer.zst", "wb") as f:
        size = client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE, "ExportDiff",
                               "oha{sv}", [path, 0, {"compression": Variant("s", "zstd")}], unix_fds=[f.fileno()])[0]
    assert (tmp_path / "layer.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd" and size == os.path.getsize(f.name)
    (tmp_path / "dest").mkdir()
    with open(tmp_path / "layer.zst", "rb") as f:
        client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE, "ImportLayer",
                        "hsa{sv}", [0, str(tmp_path / "dest"), {}], unix_fds=[f.fileno()])
    assert (tmp_path / "dest/new").read_text() == "zstd"

    f = tarfile.TarInfo
    layer = tmp_path / "parents.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("etc/sub/file", "w/file", "c/file"):
            tf.addfile(f(name))
    for case, parents, expected in (
        ("hidden above", [t / "image2", t / "image1"], {"etc/sub": 0o755, "w": 0o755}),
        ("nothing above", [t / "image1"], {"etc/sub": 0o700, "w": 0o711}),
    ):
        dest = tmp_path / case
        dest.mkdir()
        apply_layer(client, layer, dest, parents=[str(x) for x in parents])
        for rel, mode in expected.items():
            st = os.stat(dest / rel)
            assert stat.S_IMODE(st.st_mode) == mode, (case, rel)
    # c is a file in image2 and a directory nowhere: the layer's own default.
    assert os.stat(tmp_path / "hidden above/c").st_mtime_ns == 0


def test_bad_arguments_get_named_errors(client, daemon, layers, tmp_path):
    """Each refusal names what to fix, and the daemon carries on without a traceback."""
    t = layers
    mount = client.mount([t / "image2", t / "image1"], t / "upper", t / "merge")
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tf:
        tf.addfile(tarfile.TarInfo("f"))
    archive = tmp_path / "deep.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("index.json", b"[" * 100_000), ("oci-layout", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, __import__("io").BytesIO(data))
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    (tmp_path / "store").mkdir()
    (tmp_path / "dest").mkdir()
    dest, store = tmp_path / "dest", tmp_path / "store"
    cases = [
        ("ApplyLayer", lambda: apply_layer(client, layer, dest, parents="not a list"), "InvalidArgument", "parents"),
        ("ApplyLayer", lambda: apply_layer(client, layer, dest, parents=[str(tmp_path / "nope")]),
         "InvalidArgument", "parents[0]"),
        ("ApplyLayer", lambda: apply_layer(client, layer, dest, expected_digest="md5:00"),
         "InvalidArgument", "expected_digest"),
        ("ApplyLayer", lambda: apply_layer(client, layer, tmp_path / "full"), "InvalidArgument", "not empty"),
        ("ExportLayer", lambda: _call(client, "ExportLayer", "oha{sv}", [mount, 0, {}], layer, "rb"),
         "InvalidArgument", "reading only"),
        ("ExportLayer", lambda: export_layer(client, mount, tmp_path / "o", compression="lz4"),
         "InvalidArgument", "compression"),
        ("ImportImage", lambda: import_image(client, layer, tmp_path / "nope"), "InvalidArgument", "does not exist"),
        ("ImportImage", lambda: import_image(client, layer, t / "upper"), "InvalidArgument", "overlaps"),
        ("ImportImage", lambda: import_image(client, layer, t / "image1"), "InvalidArgument", "lowerdirs[1]"),
        ("ImportImage", lambda: import_image(client, layer, store), "InvalidArgument", "index.json"),
        ("ImportImage", lambda: import_image(client, archive, store), "InvalidArgument", "nests too deep"),
        ("ExportImage", lambda: export_image(client, mount, tmp_path / "o", config="[1]"),
         "InvalidArgument", "config"),
        ("ExportImage", lambda: export_image(client, constants.MOUNT_PATH_PREFIX + "/0000", tmp_path / "o"),
         "NotFound", ""),
    ]
    for member, call, name, words in cases:
        with pytest.raises(CallError) as e:
            call()
        assert e.value.name == f"{E}.{name}" and words in str(e.value), (member, words, e.value)
    assert os.listdir(dest) == [] and os.listdir(store / "layers") == []
    assert daemon.alive() and "Traceback" not in daemon.log()


# ---- hostile archives, in-process: every refusal is InvalidArgument and leaves no partial ----


def _valid_layer() -> bytes:
    import io

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind in (("d", tarfile.DIRTYPE), ("d/f", tarfile.REGTYPE), ("d/.wh.g", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tf.addfile(info)
    return out.getvalue()


@settings(max_examples=int(os.environ.get("UNIOND_FUZZ_LAYER_EXAMPLES", "200")), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_image_archives(tmp_path, data):
    from uniond.errors import InvalidArgument
    from uniond.layers import image
    from uniond.layers.store import Store

    layer = _valid_layer()
    if data.draw(st.booleans()):
        layer = gzip.compress(layer, mtime=0)
    diff_id = "sha256:" + hashlib.sha256(_valid_layer()).hexdigest()
    victim = data.draw(st.sampled_from(["none", "config", "manifest", "index"]))
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                               lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                               max_leaves=6)

    def twist(what, document):
        if what != victim:
            return document
        if not data.draw(st.booleans()):
            return data.draw(json_values)  # the whole document
        node = document
        while True:  # down to a random place, which gets a random value
            key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            child = node[key]
            if not isinstance(child, (dict, list)) or not child or not data.draw(st.booleans()):
                node[key] = data.draw(json_values)
                return document
            node = child

    archive = bytearray(_oci_archive(tmp_path / "a.tar", layer, diff_id, twist).read_bytes())
    for _ in range(data.draw(st.integers(0, 3))):
        how = data.draw(st.sampled_from(["flip", "cut", "zero", "keep"]))
        at = data.draw(st.integers(0, len(archive) - 1))
        if how == "flip":
            archive[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            del archive[at:]
        elif how == "zero":
            archive[at:at + 512] = bytes(min(512, len(archive) - at))
        if not archive:
            break
    root = tmp_path / f"store-{os.urandom(4).hex()}"
    root.mkdir()
    store = Store(str(root))
    try:
        import io

        result = image.import_image(io.BytesIO(bytes(archive)), store)
    except InvalidArgument:
        result = None
    finally:
        store.close()
    left = os.listdir(root / "layers")
    if result is None:
        assert left == [], "a refused archive leaves nothing in the store"
    else:  # a flip that tarfile does not notice (a header's padding, a mode bit)
        assert left == [diff_id[7:]] and result.lowerdirs == (diff_id,)
    shutil.rmtree(root)


_AS_NOBODY = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from dbus_next import Variant
from harness import CallError, Client
c = Client(sys.argv[1])
out = []
for member, signature, body, path, mode in json.loads(sys.argv[3]):
    fd = os.open(path, os.O_RDONLY if mode == "r" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    body = [{k: Variant("as" if isinstance(v, list) else "s", v) for k, v in x.items()} if isinstance(x, dict) else x
            for x in body]
    try:
        reply = c.call_raw("org.uniond1", "/org/uniond1", "org.uniond1.Manager", member, signature, body, [fd])
        out.append(["ok"])
    except CallError as e:
        out.append([e.name, e.text])
    os.close(fd)
print(json.dumps(out))
"""


def _as_nobody(bus, calls):
    import subprocess
    import sys

    from harness import ROOT

    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                           _AS_NOBODY, bus.address, str(ROOT / "tests"), json.dumps(calls)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_new_methods_as_an_unprivileged_caller(client, layers, bus, polkit, user_dirs, rich):
    """The polkit actions of ExportDiff and ImportLayer; parents the caller cannot list refused."""
    t, u = layers, user_dirs
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (t / "merge/d").write_text("added")
    shutil.copy(rich.dir / "rich.tar", u / "rich.tar")
    for name in ("applied", "store", "secret", "open"):
        (u / name).mkdir()
        os.chown(u / name, 65534, 65534)
    os.chown(u / "secret", 0, 0)
    os.chmod(u / "secret", 0o700)
    calls = [
        ["ExportLayer", "oha{sv}", [path, 0, {}], str(u / "layer.tar"), "w"],
        ["ApplyLayer", "hsa{sv}", [0, str(u / "applied"), {"parents": [str(u / "open")]}], str(u / "layer.tar"), "r"],
        ["ImportImage", "hsa{sv}", [0, str(u / "store"), {}], str(u / "rich.tar"), "r"],
        ["ExportImage", "oha{sv}", [path, 0, {}], str(u / "image.tar"), "w"],
    ]
    assert [r[0] for r in _as_nobody(bus, calls)] == [f"{E}.NotAuthorized"] * 4
    assert [c["action"] for c in polkit.calls()] == [constants.ACTION_EXPORT, constants.ACTION_IMPORT,
                                                      constants.ACTION_IMPORT, constants.ACTION_EXPORT]
    assert os.listdir(u / "applied") == [] and os.listdir(u / "store") == []
    polkit.set_allowed([constants.ACTION_EXPORT, constants.ACTION_IMPORT])
    assert _as_nobody(bus, calls) == [["ok"]] * 4
    assert (u / "applied/d").read_text() == "added" and len(os.listdir(u / "store/layers")) == 2
    calls[1][2][2] = {"parents": [str(u / "secret")]}
    (refused,) = _as_nobody(bus, [calls[1]])
    assert refused[0] == f"{E}.NotPermitted" and "parents[0]" in refused[1]


def test_a_half_imported_layer_never_looks_complete(client, daemon, tmp_path):
    """While a layer streams in, the store shows only a partial; a partial left by a
    daemon that died goes at the next import."""
    import threading
    import time

    big = tmp_path / "big"
    with tarfile.open(big, "w") as tf, open("/dev/zero", "rb") as zero:
        info = tarfile.TarInfo("data")
        info.size = 4 << 20
        tf.addfile(info, zero)
    layer = big.read_bytes()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    archive = _oci_archive(tmp_path / "a.tar", layer, diff_id).read_bytes()
    store = tmp_path / "store"
    (store / "layers/.partial-1-0123456789ab").mkdir(parents=True)  # pid 1 is not the daemon
    r, w = os.pipe()
    seen = []

    def feed():
        half = archive.index(layer[:512]) + len(layer) // 2
        os.write(w, archive[:half])
        for _ in range(500):
            names = os.listdir(store / "layers")
            if any(n.startswith(".partial-") and n != ".partial-1-0123456789ab" for n in names):
                seen.append(sorted(names))
                break
            time.sleep(0.01)
        with os.fdopen(w, "wb") as f:
            f.write(archive[half:])

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        lowers, _ = client.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                                    "ImportImage", "hsa{sv}", [0, str(store), {}], unix_fds=[r])
    finally:
        writer.join()
        os.close(r)
    assert seen and all(n.startswith(".partial-") for n in seen[0]), seen
    assert sorted(os.listdir(store / "layers")) == [".digests", diff_id[7:]]
    assert lowers == [str(store / "layers" / diff_id[7:])]
    assert os.path.getsize(store / "layers" / diff_id[7:] / "data") == 4 << 20
    # Imported again: the stored layer is recognised by its blob's digest and only hashed;
    # a blob that is not what its name says is still refused.
    again, info = import_image(client, tmp_path / "a.tar", store)
    assert again == lowers and info["layers_stored"] == 0
    assert f"is the stored layer {diff_id}; hashed, not unpacked" in daemon.log()
    bad = bytearray(archive)
    at = archive.index(layer[:512]) + 600
    bad[at] ^= 1
    (tmp_path / "bad.tar").write_bytes(bad)
    with pytest.raises(CallError) as e:
        import_image(client, tmp_path / "bad.tar", store)
    assert e.value.name == f"{E}.InvalidArgument" and "its name says otherwise" in str(e.value)


def test_a_store_whose_layers_others_can_write_is_refused(client, rich, tmp_path):
    store = tmp_path / "store"
    (store / "layers").mkdir(parents=True)
    os.chown(store / "layers", 65534, 65534)
    with pytest.raises(CallError) as e:
        import_image(client, rich.dir / "rich.tar", store)
    assert e.value.name == f"{E}.InvalidArgument" and "not the daemon's own" in str(e.value)
    assert os.listdir(store / "layers") == []
