"""unionctl: uniond at a shell, in the manner of udisksctl (see unionctl(1)).

Every command is a few lines over ``uniond.client.Client``; click parses the
arguments, writes the help and the bash/zsh completion, and tqdm draws the progress
bar. ``main`` is the only place that turns errors into a line on stderr and an exit
code, so no traceback ever reaches a user.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
from click.shell_completion import CompletionItem

from uniond import constants
from uniond.client import errors, render
from uniond.client.sync import Client

# Options whose value is a boolean (true/false); the rest are strings.
BOOLEAN_OPTIONS = {"readonly", "volatile", "dev", "suid"}


@dataclass
class Session:
    """The options every command takes, and the client made from them when first needed."""

    json: bool = False
    address: str | None = None
    bus: str = "system"
    interactive: bool = True
    verbose: bool = False
    _client: Client | None = field(default=None, repr=False)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.address, bus=self.bus, interactive=self.interactive)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


_COMMON = [
    click.option("--json", "json_output", is_flag=True, help="Print one JSON document (JSON lines for monitor)."),
    click.option("--address", metavar="ADDRESS", help="The D-Bus address uniond is on, e.g. unix:path=/run/x."),
    click.option("--system", "bus", flag_value="system", default=True, help="Use the system bus (the default)."),
    click.option("--user", "bus", flag_value="user", help="Use the session bus of the user."),
    click.option("--no-user-interaction", is_flag=True, help="Never let polkit ask for a password."),
    click.option("-v", "--verbose", is_flag=True, help="Say more."),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(constants.VERSION, prog_name="unionctl")
def cli() -> None:
    """Ask uniond for union mounts, their changes and their layers.

    \b
    Example:
      unionctl mount /srv/image2 /srv/image1 --upper /srv/upper
    """


def command(name: str, example: str) -> Callable[[Callable[..., None]], click.Command]:
    """A unionctl command: the common options, a Session as first argument, an example in --help."""

    def wrap(fn: Callable[..., None]) -> click.Command:
        @functools.wraps(fn)
        def run(json_output: bool, address: str | None, bus: str, no_user_interaction: bool, verbose: bool,
                **kwargs: Any) -> None:
            session = Session(json_output, address, bus, not no_user_interaction, verbose)
            try:
                fn(session, **kwargs)
            finally:
                session.close()

        # The command's own options first in --help, then the common ones.
        own = run.__dict__.pop("__click_params__", [])
        for option in reversed(_COMMON):
            run = option(run)
        run.__click_params__ = [*run.__click_params__, *own]  # type: ignore[attr-defined]
        doc = (fn.__doc__ or "").rstrip() + f"\n\n\b\nExample:\n  {example}\n"
        return cli.command(name, help=doc)(run)

    return wrap


def complete_mount(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Ids and mountpoints of the live mounts; paths when nothing matches."""
    try:
        with Client(ctx.params.get("address"), bus=ctx.params.get("bus") or "system") as client:
            infos = [m.info for m in client.mounts()]
    except Exception:  # completion must never print an error in the middle of a command line
        infos = []
    found = [CompletionItem(name) for i in infos for name in (i.id, i.mountpoint) if name.startswith(incomplete)]
    return found or [CompletionItem(incomplete, type="dir")]


MOUNT = click.argument("name", metavar="ID|MOUNTPOINT", shell_complete=complete_mount)
DIRECTORY = click.Path(file_okay=False)


def typed_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """-o key=value, typed by the option: true/false for the boolean ones."""
    typed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"-o {pair!r}: give KEY=VALUE, e.g. -o readonly=true")
        if key in BOOLEAN_OPTIONS or (key not in ("workdir", "description") and value in ("true", "false")):
            if value not in ("true", "false"):
                raise click.UsageError(f"-o {key}: {value!r} is not true or false")
            typed[key] = value == "true"
        else:
            typed[key] = value
    return typed


@command("mount", "unionctl mount /srv/image2 /srv/image1 --upper /srv/upper -o volatile=true")
@click.argument("lowers", nargs=-1, required=True, metavar="LOWER...", type=DIRECTORY)
@click.option("--upper", type=DIRECTORY, help="Writable layer (none: a read-only mount).")
@click.option("--mountpoint", type=DIRECTORY, help="Where to mount (none: uniond makes one).")
@click.option("-o", "--option", "pairs", multiple=True, metavar="KEY=VALUE",
              help="readonly, volatile, dev, suid (true/false), workdir, description.")
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
def diff(s: Session, name: str) -> None:
    """What a mount changed, as `docker diff` prints it: A added, C changed, D deleted."""
    m = s.client.find(name)
    changes = m.diff()
    if s.json:
        render.emit_json({"id": m.id, "path": m.path, "changes": [c.as_json() for c in changes]})
    else:
        for c in changes:
            click.echo(f"{c.kind} {c.path}")


@contextlib.contextmanager
def progress(description: str) -> Iterator[render.ProgressBar]:
    bar = render.ProgressBar(description, render.on_terminal())
    try:
        yield bar
    finally:
        bar.close()


@command("export", "unionctl export /srv/merged -o layer.tar.gz")
@MOUNT
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="The tar to write (default: stdout).")
@click.option("--compression", type=click.Choice(["none", "gzip"]),
              help="Default: gzip for a name ending in .gz or .tgz, else none.")
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
    """Unpack a layer tar (plain or gzip; - reads stdin) into the empty DESTDIR."""
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
    """The mounts: id, mountpoint, layers (top-most first), upper, owner, created."""
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
