"""What every unionctl command is made of: the click group, the common options, the
Session that holds the client, naming a mount, and the progress bar.

A module of its own so that the commands can live in more than one module (``cli``,
``cli_images``) and still join the one group, also under ``python -m uniond.client.cli``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
from click.shell_completion import CompletionItem

from uniond import constants
from uniond.client import render
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
    Examples:
      unionctl mount /srv/image2 /srv/image1 --upper /srv/upper --mountpoint /srv/merged
      unionctl diff /srv/merged
      unionctl update /srv/merged /srv/image3 /srv/image1
      unionctl list --json
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
        doc = inspect.cleandoc(fn.__doc__ or "") + f"\n\n\b\nExample:\n  {example}\n"
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


@contextlib.contextmanager
def progress(description: str) -> Iterator[render.ProgressBar]:
    bar = render.ProgressBar(description, render.on_terminal())
    try:
        yield bar
    finally:
        bar.close()
