"""The marks uniond leaves on what it makes, so that a mount is recovered without the
journal (C4): the journal can be damaged or cut short by a full disk, the marks and the
kernel's table cannot both be wrong in the same way.

Two marks per mount, both written before the mount is made and holding its record:

- a file ``<runtime>/marks/<id>.json``. The runtime directory is a tmpfs that lives
  exactly as long as the mounts can (until the next boot), so it needs no fsync;
- a file ``.uniond-mount`` in every workdir the daemon creates: the proof that the
  directory is the daemon's to remove, and a second copy of the record, found through
  the ``workdir=`` option the kernel shows for the live overlay.

A daemon-made mountpoint is a mark of its own: ``<runtime>/mounts/<id>`` names its mount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os

from uniond.kernel import mountinfo
from uniond.mounts.records import MountRecord

log = logging.getLogger(__name__)

WORKDIR_MARKER = ".uniond-mount"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class Marks:
    def __init__(self, runtime_dir: str) -> None:
        self.directory = os.path.join(runtime_dir, "marks")

    def _path(self, mount_id: str) -> str:
        return os.path.join(self.directory, f"{mount_id}.json")

    def put(self, record: MountRecord) -> None:
        """Raises OSError: a mount that cannot be marked is not made.

        Written whole under a temporary name, then renamed: a mark is either the old
        record or the new one, never half of either. The directory is made when a
        write finds it missing, not checked per call."""
        tmp = self._path(record.id) + ".tmp"
        try:
            fd = os.open(tmp, _NEW_FILE, 0o600)
        except FileNotFoundError:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(tmp, _NEW_FILE, 0o600)
        try:
            _write(fd, record.encoded)
        finally:
            os.close(fd)
        os.replace(tmp, self._path(record.id))

    def refresh(self, record: MountRecord) -> None:
        """put, for a mount that is made already: a failure (a full disk) is logged, not
        raised, as the mark it had (or the journal) still recognises it."""
        try:
            self.put(record)
        except OSError as e:
            log.warning("mount %s: its mark could not be updated: %s", record.id, e)

    def drop(self, mount_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(mount_id))

    def load(self) -> dict[str, MountRecord]:
        found: dict[str, MountRecord] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return found
        for name in names:
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # a crash between writing and naming it: no mount yet
                continue
            record = _read(path)
            if record is not None and name == f"{record.id}.json":
                found[record.id] = record
        return found


def write_workdir_marker(workdir_fd: int, record: MountRecord) -> None:
    fd = os.open(WORKDIR_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=workdir_fd)
    try:
        _write(fd, record.encoded)
    finally:
        os.close(fd)


def _write(fd: int, data: bytes) -> None:
    """The whole of ``data``, or OSError (a short write: the filesystem is full)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def marked_workdirs(table: list[mountinfo.MountEntry]) -> dict[str, MountRecord]:
    """The records in the markers of the workdirs of the live overlays."""
    found: dict[str, MountRecord] = {}
    for entry in table:
        if entry.fstype != "overlay":
            continue
        for workdir in entry.option_values("workdir"):
            record = _read(os.path.join(workdir, WORKDIR_MARKER))
            if record is not None and record.spec.workdir == workdir:
                found[record.id] = record
    return found


def _read(path: str) -> MountRecord | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, encoding="utf-8") as f:
            return MountRecord.from_json(json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("mark %s unreadable, ignored: %s", path, e)
        return None
