"""Declared mounts: the mounts.d files made true at start, on reload and when one is lost.

At start (before READY=1) every declared mount is brought up, or adopted when the
journal and the kernel still have it. A reload (SIGHUP, ``systemctl reload``, the
Manager's ``Reload()``) applies edits: a new file mounts, a removed file unmounts, a
changed file swaps the mount in place (same object path): beneath the old stack when
only the lowers changed (the Update path, no gap), otherwise by unmounting and
mounting again. A bad file is logged with its name, line and reason and skipped; a
mount whose file turned bad keeps running as it was. A declared mount found gone is
mounted again by ``check``, which the daemon runs every few seconds. An Unmount by
an administrator holds: the mount stays down until its file changes or the daemon is
reloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from uniond.errors import UniondError
from uniond.kernel import mountinfo, syscalls
from uniond.mounts import declfiles, reconcile
from uniond.mounts import update as updating
from uniond.mounts.declfiles import Declaration
from uniond.mounts.manager import MountManager
from uniond.mounts.records import MountRecord

log = logging.getLogger(__name__)

CHECK_INTERVAL = 5.0  # seconds between checks for lost declared mounts (the promise: 15 s)


@dataclass(frozen=True)
class Outcome:
    mounted: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    swapped: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


class DeclaredMounts:
    def __init__(self, manager: MountManager, directories: Sequence[str]) -> None:
        self.manager = manager
        self.directories = tuple(directories)
        self.declarations: dict[str, Declaration] = {}
        self._held: dict[str, str] = {}  # name -> digest of its file when an admin unmounted it
        self._busy = False  # our own removals are no admin's Unmount
        self._pending: set[str] = set()  # declared, not up: tried again at every check
        manager.subscribe(self)

    def _ours(self) -> dict[str, MountRecord]:
        """The declared mounts on their mountpoints (a detached one is on its way out)."""
        return {r.name: r for r in self.manager.records.values() if r.persistent and not r.detached}

    def apply(self, reload: bool = False) -> Outcome:
        """Make the mounts agree with the files; a reload also ends every hold."""
        found, problems = declfiles.read(self.directories)
        for problem in problems:
            log.error("declared mount skipped: %s", problem)
        if reload:
            self._held.clear()
        self._pending &= set(found)
        bad = declfiles.bad_names(problems)
        current = self._ours()
        outcome: dict[str, list[str]] = {k.name: [] for k in dataclasses.fields(Outcome)}
        for name, record in current.items():
            if name not in found and name not in bad:
                self._remove(record, f"its file {name}{declfiles.SUFFIX} was removed")
                outcome["removed"].append(name)
        for name, declaration in found.items():
            if name in self._held:
                continue
            record = current.get(name)
            if record is None:
                kind = "mounted" if self._mount(declaration) else "failed"
            elif _same(record, declaration):
                kind = "kept"
            else:
                kind = "swapped" if self._swap(record, declaration) else "failed"
            outcome[kind].append(name)
        self.declarations = {n: d for n, d in found.items()}
        return Outcome(**{k: tuple(v) for k, v in outcome.items()})

    def check(self) -> None:
        """Mount again each declared mount found gone (not one an admin unmounted)."""
        table: set[int] | None = None
        for name, record in self._ours().items():
            if _alive(record):
                continue
            if table is None:
                table = {e.mnt_id for e in mountinfo.read()}
            if record.mnt_id in table:
                continue  # still mounted, only covered or moved: not lost
            log.warning("mount %s: declared mount %r is gone from %s; mounting it again",
                        record.id, name, record.spec.mountpoint)
            self._remove(record, "it was unmounted behind the daemon's back")
            declaration = self.declarations.get(name)
            if declaration is not None and name not in self._held:
                self._mount(declaration)
        for name in sorted(self._pending - set(self._held)):
            if name in self.declarations and name not in self._ours():
                self._mount(self.declarations[name], again=True)
        for name, digest in list(self._held.items()):
            declaration = self.declarations.get(name)
            changed = _digest(declaration.path) if declaration else None
            if declaration is not None and changed not in (digest, None):
                del self._held[name]
                log.info("declared mount %r: its file changed, so it is mounted again", name)
                fresh, problems = declfiles.read([_directory_of(declaration.path)])
                for problem in problems:
                    log.error("declared mount skipped: %s", problem)
                if name in fresh:
                    self.declarations[name] = fresh[name]
                    self._mount(fresh[name])

    # MountListener: an administrator's Unmount of a declared mount holds it down. A
    # lazy one of a busy mount detaches it first (told as a change); the detached
    # record's removal later is only its last user leaving.
    def mount_removed(self, record: MountRecord) -> None:
        if record.persistent and not record.detached and not self._busy:
            self._hold(record)

    def mount_changed(self, record: MountRecord, changed: tuple[str, ...] = ()) -> None:
        if record.persistent and record.detached and not self._busy:
            self._hold(record)

    def _hold(self, record: MountRecord) -> None:
        declaration = self.declarations.get(record.name)
        self._held[record.name] = declaration.digest if declaration else ""
        log.info("declared mount %r held down until its file changes or uniond is reloaded", record.name)

    # ---- doing ---------------------------------------------------------------

    def _mount(self, declaration: Declaration, again: bool = False) -> bool:
        """Mount it; on failure say why (once: ``again`` retries are quiet) and keep
        trying at every check, e.g. until a lower's disk is there or the detached
        previous mount of the name has lost its last user."""
        text = _text(declaration.path)
        try:
            record = self.manager.mount_declared(
                declaration.request(), declfiles.mount_id(declaration.name), declaration.name
            )
        except UniondError as e:
            problem = declfiles.Problem(declaration.path, declfiles.argument_line(text, str(e)), str(e))
            log.log(logging.DEBUG if again else logging.ERROR, "declared mount skipped: %s", problem)
            self._pending.add(declaration.name)
            return False
        self._pending.discard(declaration.name)
        log.info("mount %s: declared mount %r is up at %s", record.id, declaration.name, record.spec.mountpoint)
        return True

    def _remove(self, record: MountRecord, reason: str) -> None:
        self._busy = True
        try:
            if record.id in self.manager.records:
                self.manager.remove(record.id, f"declared mount {record.name!r}: {reason}")
            elif reconcile.cleanup(self.manager.store, record):
                pass
        except UniondError as e:
            log.error("mount %s: declared mount %r could not be unmounted: %s", record.id, record.name, e)
        finally:
            self._busy = False

    def _swap(self, record: MountRecord, declaration: Declaration) -> bool:
        """Only the lowers (or the description) changed: the Update path, no gap.
        Anything else changes the mount's place or upper (or the kernel cannot mount
        beneath): unmount, then mount."""
        wanted = declaration.request()
        same_place = (
            syscalls.kernel_version() >= updating.BENEATH_SINCE
            and _canonical(wanted.upperdir) == record.spec.upperdir
            and (_canonical(wanted.mountpoint) or record.spec.mountpoint) == record.spec.mountpoint
            and {k: v for k, v in wanted.options.items() if k != "description"}
            == {k: v for k, v in record.options.items() if k != "description"}
        )
        if same_place:
            try:
                with contextlib.ExitStack() as held:
                    lowers = updating.open_lowers(self.manager, held, record, wanted.lowerdirs)
                    new = dataclasses.replace(
                        record,
                        spec=dataclasses.replace(record.spec, lowerdirs=tuple(h.path for h in lowers)),
                        options=dict(wanted.options),
                        description=wanted.options.get("description", ""),
                    )
                    updating.swap(self.manager, record, new, tuple(h.fd for h in lowers))
            except UniondError as e:
                text = _text(declaration.path)
                problem = declfiles.Problem(declaration.path, declfiles.argument_line(text, str(e)), str(e))
                log.error("declared mount %r not changed, it stays as it was: %s", declaration.name, problem)
                return False
            log.info("mount %s: declared mount %r changed in place", record.id, declaration.name)
            return True
        self._remove(record, "its file changed where it mounts; mounting it anew")
        return self._mount(declaration)


def _same(record: MountRecord, declaration: Declaration) -> bool:
    wanted = declaration.request()
    return (
        record.spec.lowerdirs == tuple(_canonical(p) for p in wanted.lowerdirs)
        and record.spec.upperdir == _canonical(wanted.upperdir)
        and (not wanted.mountpoint or record.spec.mountpoint == _canonical(wanted.mountpoint))
        and record.options == wanted.options
    )


def _canonical(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p and p != ".") if path else ""


def _alive(record: MountRecord) -> bool:
    try:
        return syscalls.mount_identity(record.spec.mountpoint) == (record.mnt_id, True)
    except OSError:
        return False


def _text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(1 << 20)).hexdigest()
    except OSError:
        return None


def _directory_of(path: str) -> str:
    return os.path.dirname(path)
