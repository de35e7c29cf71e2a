"""unionctl: uniond at a shell, in the manner of udisksctl (see unionctl(1)).

Every command is a few lines over ``uniond.client.Client`` (``clibase`` makes them,
``cli_images`` holds the ones that answer digests); click parses the
arguments, writes the help and the bash/zsh completion, and tqdm draws the progress
bar. ``main`` is the only place that turns errors into a line on stderr and an exit
code, so no traceback ever reaches a user.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click

from uniond import constants
from uniond.client import errors, render
from uniond.client.clibase import DIRECTORY, MOUNT, Session, cli, command, progress, typed_options


@command("mount", "unionctl mount /srv/image2 /srv/image1 --upper /srv/upper -o volatile=true")
@click.argument("lowers", nargs=-1, required=True, metavar="LOWER...", type=DIRECTORY)
@click.option("--upper", type=DIRECTORY, help="Writable layer (none: a read-only mount).")
@click.option("--mountpoint", type=DIRECTORY, help="Where to mount (none: uniond makes one).")
@click.option("-o", "--option", "pairs", multiple=True, metavar="KEY=VALUE",
              help="readonly, volatile, dev, suid (true/false), workdir, description, "
                   "bind (caller, unit, unit:NAME, session).")
@click.option("--description", help="Free text kept with the mount.")
def mount(s: Session, lowers: tuple[str, ...], upper: str | None, mountpoint: str | None,
          pairs: tuple[str, ...], description: str | None) -> None:
    """Mount LOWERs (top-most first) under an optional upper; prints the mountpoint
    (and, with --verbose, the id)."""
    options = typed_options(pairs)
    if description is not None:
        options["description"] = description
    m = s.client.mount(lowers, upper, mountpoint, **options)
    if s.json:
        render.emit_json(m.info.as_json())
    else:
        click.echo(f"{m.mountpoint}\t{m.id}" if s.verbose else m.mountpoint)


@command("unmount", "unionctl unmount /srv/merged --lazy")
@MOUNT
@click.option("--lazy", is_flag=True, help="Detach now even if in use (MNT_DETACH).")
def unmount(s: Session, name: str, lazy: bool) -> None:
    """Unmount a mount, named by id, object path or a path inside it."""
    m = s.client.find(name)
    m.unmount(lazy=lazy)
    if s.json:
        render.emit_json({"id": m.id, "path": m.path, "mountpoint": m.mountpoint, "unmounted": True})
    elif s.verbose:
        click.echo(f"unmounted {m.id} from {m.mountpoint}")


@command("diff", "unionctl diff /srv/merged")
@MOUNT
@click.option("-z", "--null", is_flag=True, help="End each line with NUL, not newline (for names with newlines).")
def diff(s: Session, name: str, null: bool) -> None:
    """What a mount changed, as `docker diff` prints it: A added, C changed, D deleted.

    Any number of changes (read through DiffInto as they come) and any name: a name
    that is not UTF-8 is printed as its bytes; in --json its "path" shows the bytes that are not UTF-8
    as \\xNN and "path_base64" holds the exact bytes."""
    m = s.client.find(name)
    changes = m.diff()
    if s.json:
        render.emit_json({"id": m.id, "path": m.path, "changes": [c.as_json() for c in changes]})
        return
    end = b"\0" if null else b"\n"
    out = sys.stdout.buffer
    for c in changes:
        out.write(c.kind.encode("ascii") + b" " + c.raw + end)
    out.flush()


@command("update", "unionctl update /srv/merged /srv/image3 /srv/image1")
@MOUNT
@click.argument("lowers", nargs=-1, required=True, metavar="LOWER...", type=DIRECTORY)
@click.option("-o", "--option", "pairs", multiple=True, metavar="KEY=VALUE", help="Update's options (none yet).")
def update(s: Session, name: str, lowers: tuple[str, ...], pairs: tuple[str, ...]) -> None:
    """Replace a mount's LOWERs (top-most first) without a moment where its mountpoint
    is empty (kernel 6.5 or later); the upper, mountpoint and id stay."""
    m = s.client.find(name).update(lowers, **typed_options(pairs))
    if s.json:
        render.emit_json(m.info.as_json())
    elif s.verbose:
        click.echo(f"updated {m.id}: {':'.join(m.lowerdirs)}")


@command("reload", "unionctl reload")
def reload(s: Session) -> None:
    """Apply edits of the declared mounts (mounts.d/*.toml) now, as `systemctl reload
    uniond` does: new files mount, removed ones unmount, changed ones are swapped."""
    s.client.reload()
    if s.json:
        render.emit_json({"reloaded": True})
    elif s.verbose:
        click.echo("reloaded")


@command("export", "unionctl export /srv/merged -o layer.tar.gz")
@MOUNT
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="The tar to write (default: stdout).")
@click.option("--compression", type=click.Choice(["none", "gzip", "zstd"]),
              help="Default: gzip for a name ending in .gz or .tgz, zstd for .zst or .tzst, else none.")
def export(s: Session, name: str, output: str | None, compression: str | None) -> None:
    """Write a mount's upper as a layer tar (Docker / OCI layer with whiteouts)."""
    if output is None:
        if sys.stdout.isatty():
            raise click.UsageError("not writing a tar to a terminal: give -o FILE or redirect stdout")
        if s.json:
            raise click.UsageError("--json needs -o FILE: stdout carries the tar")
    m = s.client.find(name)
    if output is None:
        sys.stdout.flush()
        written = m.export(sys.stdout.fileno(), compression or "none")
        return
    existed = os.path.exists(output)
    try:
        with progress("export") as bar:
            written = m.export(output, compression, progress=bar)
    except errors.UniondError:
        if not existed:  # no half-written tar left behind where there was nothing
            with contextlib.suppress(OSError):
                os.unlink(output)
        raise
    if s.json:
        render.emit_json({"id": m.id, "path": m.path, "output": os.path.abspath(output), "bytes": written})
    else:
        click.echo(f"{written} bytes written to {output}")


@command("import", "unionctl import layer.tar.gz /srv/layers/base")
@click.argument("source", metavar="FILE|-", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("destdir", type=DIRECTORY)
@click.option("--devices", is_flag=True, help="Allow device files in the layer (root only).")
def import_(s: Session, source: str, destdir: str, devices: bool) -> None:
    """Unpack a layer tar (plain, gzip or zstd; - reads stdin) into the empty DESTDIR."""
    with progress("import") as bar:
        if source == "-":
            entries = s.client.import_layer(sys.stdin.fileno(), destdir, devices=devices)
        else:
            entries = s.client.import_layer(source, destdir, devices=devices, progress=bar)
    if s.json:
        render.emit_json({"destdir": os.path.abspath(destdir), "entries": entries})
    else:
        click.echo(f"{entries} entries in {destdir}")


@command("commit", "unionctl commit /srv/merged /srv/layers/snapshot")
@MOUNT
@click.argument("destdir", type=DIRECTORY)
def commit(s: Session, name: str, destdir: str) -> None:
    """Copy a mount's upper, as one consistent state, into the empty DESTDIR."""
    m = s.client.find(name)
    with progress("commit") as bar:
        entries = m.commit(destdir, progress=bar)
    if s.json:
        render.emit_json({"id": m.id, "path": m.path, "destdir": os.path.abspath(destdir), "entries": entries})
    else:
        click.echo(f"{entries} entries in {destdir}")


@command("list", "unionctl list --json")
def list_(s: Session) -> None:
    """The mounts: id, mountpoint, layers (top-most first), upper, owner, created, and
    flags: declared=NAME (a mounts.d file), bound=WHAT (the bind option), detached
    (lazily unmounted, still in use)."""
    infos = [m.info for m in s.client.mounts()]
    if s.json:
        render.emit_json({"mounts": [i.as_json() for i in infos]})
    else:
        click.echo(render.table(infos))


@command("status", "unionctl status")
def status(s: Session) -> None:
    """The daemon's version, its mount count, and its unit's state when systemd runs it."""
    st = s.client.status()
    if s.json:
        render.emit_json(st.as_json())
        return
    click.echo(f"uniond {st.version} on {s.address or f'the {s.bus} bus'}")
    click.echo(f"mounts: {st.mounts}")
    if st.unit_active_state is None:
        click.echo(f"unit: {constants.SYSTEMD_UNIT} not known (systemd is not on this bus)")
    else:
        text = f", {st.unit_status_text}" if st.unit_status_text else ""
        click.echo(f"unit: {constants.SYSTEMD_UNIT} {st.unit_active_state} ({st.unit_sub_state}){text}")


@command("monitor", "unionctl monitor --json")
def monitor(s: Session) -> None:
    """Print MountAdded / MountRemoved as they come, until interrupted."""
    with s.client.events() as events:
        if s.verbose:
            click.echo("monitoring uniond's mounts; Ctrl-C stops", err=True)
        for event in events:
            if s.json:
                render.emit_json(event.as_json())
            else:
                click.echo(f"{event.event} {event.id} {event.mountpoint}")
                sys.stdout.flush()


_FLAGS = {"--json", "--system", "--user", "--no-user-interaction", "-v", "--verbose"}


# The commands that answer digests: ExportLayer, ApplyLayer, ImportImage, ExportImage.
from uniond.client import cli_images  # noqa: E402, F401  (importing it adds its commands to the group)


def _common_first(args: list[str]) -> list[str]:
    """`unionctl --json list` as `unionctl list --json`: the common options are the
    commands' own, so they may come before the command name too."""
    moved: list[str] = []
    rest = list(args)
    while rest and (rest[0] in _FLAGS or rest[0] == "--address" or rest[0].startswith("--address=")):
        moved.append(rest.pop(0))
        if moved[-1] == "--address" and rest:
            moved.append(rest.pop(0))
    if not moved or not rest or rest[0].startswith("-"):
        return list(args)
    return [rest[0], *moved, *rest[1:]]


def main(argv: list[str] | None = None) -> int:
    args = _common_first(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    try:
        result = cli.main(args=args, prog_name="unionctl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx else "unionctl"
        render.error("usage", f"{e.format_message()} (see {where} --help)", as_json)
        return render.EXIT_USAGE
    except click.ClickException as e:
        render.error("error", e.format_message(), as_json)
        return e.exit_code
    except (KeyboardInterrupt, click.Abort):
        return 0 if args[:1] == ["monitor"] else 130
    except errors.UniondError as e:
        render.error(e.dbus_name, str(e), as_json)
        return render.exit_code(e)
    except BrokenPipeError:
        # The reader left (`unionctl list | head -1`): nothing more to say, and nothing to
        # flush into the closed pipe at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return render.EXIT_FAILED
    except OSError as e:
        render.error("error", f"{e.filename}: {e.strerror}" if e.filename else str(e), as_json)
        return render.EXIT_FAILED
    except Exception as e:  # never a traceback: one line that says what went wrong
        render.error("error", f"{type(e).__name__}: {e}", as_json)
        return render.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
