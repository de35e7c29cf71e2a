"""Reading declared mounts: one TOML file per named mount in mounts.d directories.

``/etc/uniond/mounts.d/NAME.toml`` (and the runtime directory's ``mounts.d`` for
transient ones) holds Mount's own words: ``lowerdirs`` (top-most first), ``upperdir``
(optional), ``mountpoint`` (optional: "" or absent lets uniond make one) and an
``[options]`` table with Mount's option keys. A file that cannot be used is reported
with its name, line and reason and skipped; the others are still read. The daemon
and ``uniond --check`` read files through this module alone, so both say the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from uniond.access import paths
from uniond.access.paths import Places
from uniond.errors import InvalidArgument
from uniond.mounts import options
from uniond.mounts.plan import MAX_LOWERS, MountRequest

SUFFIX = ".toml"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_KEYS = {"lowerdirs", "upperdir", "mountpoint", "options"}
# Mount's options, except those a file has no use for: nobody to ask, no caller to bind to.
DECLARED_OPTIONS = {k: v for k, v in options.MOUNT_OPTIONS.items() if k not in options.AUTH_OPTIONS and k != "bind"}


@dataclass(frozen=True)
class Declaration:
    name: str
    path: str
    lowerdirs: tuple[str, ...]
    upperdir: str
    mountpoint: str
    options: dict[str, Any] = field(default_factory=dict)
    digest: str = ""  # of the file's bytes: a changed file is a changed mount

    def request(self) -> MountRequest:
        return MountRequest(self.lowerdirs, self.upperdir, self.mountpoint, dict(self.options))


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class BadFile(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def mount_id(name: str) -> str:
    """A declared mount keeps its object path across restarts, reboots and edits."""
    return hashlib.sha256(f"uniond declared mount {name}".encode()).hexdigest()[:12]


def line_of(text: str, key: str) -> int:
    """The line where ``key`` is set (1 if it cannot be found), for messages."""
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 1


def argument_line(text: str, message: str) -> int:
    """The line of the argument a Mount error names first (``lowerdirs[2]: ...``)."""
    match = re.match(r"(?:\w+: )?(?:option )?'?([a-z_.]+)", message)
    return line_of(text, match.group(1)) if match else 1


def parse(path: str, data: bytes) -> Declaration:
    name = os.path.basename(path)[: -len(SUFFIX)]
    text = data.decode("utf-8", errors="replace")

    def bad(line: int, reason: str) -> BadFile:
        return BadFile(Problem(path, line, reason))

    if not _NAME.fullmatch(name):
        raise bad(1, f"{name!r} is no mount name: use letters, digits and _ . @ - (at most 64)")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad(1, f"not UTF-8 text ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        found = re.search(r"\(at line (\d+), column \d+\)", str(e))
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise bad(int(found.group(1)) if found else 1, f"not valid TOML: {reason}") from None
    for key in table:
        if key not in _KEYS:
            raise bad(line_of(text, key), f"unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
    lowers = table.get("lowerdirs")
    if lowers is None:
        raise bad(1, "lowerdirs is missing: give the lower directories, top-most first")
    if not isinstance(lowers, list) or not all(isinstance(p, str) for p in lowers) or not lowers:
        raise bad(line_of(text, "lowerdirs"), "lowerdirs must be a non-empty array of strings")
    if len(lowers) > MAX_LOWERS:
        raise bad(line_of(text, "lowerdirs"), f"lowerdirs: {len(lowers)} given; the kernel stacks at most {MAX_LOWERS}")
    words: dict[str, str] = {}
    for key in ("upperdir", "mountpoint"):
        value = table.get(key, "")
        if not isinstance(value, str):
            raise bad(line_of(text, key), f"{key} must be a string")
        words[key] = value
    opts = table.get("options", {})
    if not isinstance(opts, dict):
        raise bad(line_of(text, "options"), "options must be a table: [options]")
    try:
        for i, p in enumerate(lowers):
            paths.canonical(f"lowerdirs[{i}]", p)
        for key, value in words.items():
            if value:
                paths.canonical(key, value)
        opts = options.check(name, opts, DECLARED_OPTIONS)
    except InvalidArgument as e:
        raise bad(argument_line(text, str(e)), str(e)) from None
    return Declaration(
        name=name, path=path, lowerdirs=tuple(lowers), upperdir=words["upperdir"], mountpoint=words["mountpoint"],
        options=opts, digest=hashlib.sha256(data).hexdigest(),
    )


def check_places(declaration: Declaration, places: Places) -> Problem | None:
    """What ``uniond --check`` adds to a file's own checks: is it allowed where it
    mounts and writes (the daemon finds the same when it mounts)."""
    text = ""
    try:
        for key, value in (("upperdir", declaration.upperdir), ("mountpoint", declaration.mountpoint),
                           ("workdir", declaration.options.get("workdir", ""))):
            if value:
                places.placed(key, value)
    except InvalidArgument as e:
        with open(declaration.path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
        return Problem(declaration.path, argument_line(text, str(e)), str(e))
    return None


def read(directories: Iterable[str]) -> tuple[dict[str, Declaration], list[Problem]]:
    """Every declaration in ``directories``; for one name, the first directory wins
    (/etc before the runtime directory, as systemd orders its own)."""
    found: dict[str, Declaration] = {}
    problems: list[Problem] = []
    shadowed: set[str] = set()
    for directory in directories:
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
        except FileNotFoundError:
            continue
        except OSError as e:
            problems.append(Problem(directory, 0, f"cannot be read: {e.strerror}"))
            continue
        for file_name in names:
            path = os.path.join(directory, file_name)
            name = file_name[: -len(SUFFIX)]
            if name in found or name in shadowed:
                continue  # the earlier directory's file of that name wins
            shadowed.add(name)
            try:
                with open(path, "rb") as f:
                    found[name] = parse(path, f.read(1 << 20))
            except BadFile as e:
                problems.append(e.problem)
            except OSError as e:
                problems.append(Problem(path, 0, f"cannot be read: {e.strerror}"))
    return found, problems


def bad_names(problems: Iterable[Problem]) -> set[str]:
    """The mount names whose file is there but unusable (kept as they are on reload)."""
    return {os.path.basename(p.path)[: -len(SUFFIX)] for p in problems if p.path.endswith(SUFFIX)}
