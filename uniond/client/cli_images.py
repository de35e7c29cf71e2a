"""unionctl's commands for layers and images that travel: what a manifest needs of a
layer (ExportLayer, ApplyLayer) and whole OCI / ``docker save`` images (ImportImage,
ExportImage). Named as the D-Bus methods are, verb first as ``export`` and ``import``.

The digests are ``sha256:<hex>`` as manifests write them; ``--json`` gives the same
field names as ``LayerInfo``, ``ImageInfo`` and ``ExportedImage`` (unionctl(1), "JSON").
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import click

from uniond.client import errors, render
from uniond.client.clibase import DIRECTORY, MOUNT, Session, command, progress

SOURCE = click.argument("source", metavar="FILE|-", type=click.Path(dir_okay=False, allow_dash=True))
OUTPUT = click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The file to write.")
EXPECT_DIGEST = click.option("--expect-digest", metavar="sha256:HEX",
                             help="Refuse the input unless its digest is this (as a manifest gives it).")
DEVICES = click.option("--devices", is_flag=True, help="Allow device files in the layers (root only).")


@contextlib.contextmanager
def removed_on_error(output: str) -> Iterator[None]:
    """No half-written file left behind where there was nothing, when uniond refuses."""
    existed = os.path.exists(output)
    try:
        yield
    except errors.UniondError:
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(output)
        raise


def echo_digests(diff_id: str, digest: str, media_type: str) -> None:
    click.echo(f"diff_id: {diff_id}\ndigest: {digest}\nmedia_type: {media_type}")


@command("export-layer", "unionctl export-layer /srv/merged -o layer.tar.zst")
@MOUNT
@OUTPUT
@click.option("--compression", type=click.Choice(["none", "gzip", "zstd"]),
              help="Default: gzip for a name ending in .gz or .tgz, zstd for .zst or .tzst, else none.")
def export_layer(s: Session, name: str, output: str, compression: str | None) -> None:
    """Write a mount's upper as a layer tar, as `export` does, and print what an image
    manifest needs of it: diff_id (sha256 of the tar), digest (of the file as written)
    and media type."""
    m = s.client.find(name)
    with removed_on_error(output), progress("export-layer") as bar:
        layer = m.export_layer(output, compression, progress=bar)
    if s.json:
        render.emit_json({"id": m.id, "path": m.path, "output": os.path.abspath(output), **layer.as_json()})
    else:
        click.echo(f"{layer.bytes} bytes, {layer.entries} entries written to {output}")
        echo_digests(layer.diff_id, layer.digest, layer.media_type)


@command("apply-layer", "unionctl apply-layer layer.tar.gz /srv/layers/app --parent /srv/layers/base "
                        "--expect-digest sha256:4f1e...")
@SOURCE
@click.argument("destdir", type=DIRECTORY)
@click.option("--parent", "parents", multiple=True, type=DIRECTORY, metavar="DIR",
              help="A layer it will sit on, top-most first (repeat): parent directories the tar "
                   "leaves out take their metadata from these.")
@EXPECT_DIGEST
@click.option("--expect-diff-id", metavar="sha256:HEX", help="Refuse the layer unless its diff_id is this.")
@DEVICES
def apply_layer(s: Session, source: str, destdir: str, parents: tuple[str, ...], expect_digest: str | None,
                expect_diff_id: str | None, devices: bool) -> None:
    """Unpack a layer tar (plain, gzip or zstd; - reads stdin) into the empty DESTDIR,
    as `import` does, checking its digests; prints its entries, diff_id and digest. A
    layer that does not match --expect-digest/--expect-diff-id is refused (exit 1) and
    DESTDIR left empty."""
    checks = {"parents": parents, "expected_digest": expect_digest, "expected_diff_id": expect_diff_id,
              "devices": devices}
    with progress("apply-layer") as bar:
        if source == "-":
            layer = s.client.apply_layer(sys.stdin.fileno(), destdir, **checks)
        else:
            layer = s.client.apply_layer(source, destdir, progress=bar, **checks)
    if s.json:
        render.emit_json({"destdir": os.path.abspath(destdir), **layer.as_json()})
    else:
        click.echo(f"{layer.entries} entries in {destdir}")
        echo_digests(layer.diff_id, layer.digest, layer.media_type)


@command("import-image", "unionctl mount $(unionctl import-image app.tar /srv/images) --upper /srv/app/upper")
@SOURCE
@click.argument("store", type=DIRECTORY)
@EXPECT_DIGEST
@DEVICES
def import_image(s: Session, source: str, store: str, expect_digest: str | None, devices: bool) -> None:
    """Unpack an image (an OCI archive, `skopeo copy ... oci-archive:FILE`, or a `docker
    save` tar; - reads stdin) into STORE, each layer once. Prints the layers' directories,
    top-most first, one a line, ready for `unionctl mount`; and the image's digest (the
    manifest's, or a docker save tar's image id) on stderr."""
    with progress("import-image") as bar:
        if source == "-":
            image = s.client.import_image(sys.stdin.fileno(), store, expected_digest=expect_digest, devices=devices)
        else:
            image = s.client.import_image(source, store, expected_digest=expect_digest, devices=devices,
                                          progress=bar)
    if s.json:
        render.emit_json({"store": os.path.abspath(store), **image.as_json()})
        return
    for lowerdir in image.lowerdirs:
        click.echo(lowerdir)
    click.echo(f"image {image.digest}: {image.layers} layers, {image.layers_stored} new in {store}", err=True)


@command("export-image", "unionctl export-image /srv/merged -o app2.tar --name localhost/app:2")
@MOUNT
@OUTPUT
@click.option("--compression", type=click.Choice(["none", "gzip", "zstd"]), help="Of the layers (default gzip).")
@click.option("--config", "config_file", type=click.File("r"), metavar="FILE",
              help="An image config (JSON) to start from, e.g. import-image's: its Env, Entrypoint, ... are kept.")
@click.option("--name", "image_name", metavar="REF", help="The name the archive gives the image, e.g. localhost/app:2.")
def export_image(s: Session, name: str, output: str, compression: str | None, config_file: click.utils.LazyFile | None,
                 image_name: str | None) -> None:
    """Write a mount's lowers (bottom-most first) and its upper as a new OCI image archive,
    which `skopeo copy oci-archive:FILE ...` and `podman load` read; prints its digest."""
    config = config_file.read() if config_file is not None else None
    m = s.client.find(name)
    with removed_on_error(output), progress("export-image") as bar:
        image = m.export_image(output, compression=compression, config=config, name=image_name,
                               progress=bar)
    if s.json:
        render.emit_json({"id": m.id, "path": m.path, "output": os.path.abspath(output), **image.as_json()})
    else:
        click.echo(f"{image.bytes} bytes, {image.layers} layers written to {output}")
        click.echo(f"digest: {image.digest}")
