"""The durable record of the mounts the daemon owns.

An append-only journal of JSON lines: a Mount costs one fdatasync for its intent and
nothing more (C1: ~0.4 ms; a full atomic replace costs two syncs and the speed target
leaves room for one). The journal is compacted by an atomic replace at start-up, when
the extra syncs cost nothing a caller waits for. It lives in the state directory so it
survives a reboot (C2), under an exclusive flock so two daemons never reconcile at once
(C6).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os

from uniond.errors import Failed
from uniond.mounts.records import MountRecord

log = logging.getLogger(__name__)

JOURNAL = "mounts.journal"
LOCK = "lock"


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()


class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, JOURNAL)
        self._lock_fd = -1
        self._journal_fd = -1

    def lock(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Failed(
                f"another uniond holds the lock on {self.directory}; stop it first"
            ) from None
        self._lock_fd = fd

    def load(self) -> dict[str, MountRecord]:
        records: dict[str, MountRecord] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return records
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                if "put" in entry:
                    record = MountRecord.from_json(entry["put"])
                    records[record.id] = record
                else:
                    records.pop(entry["drop"], None)
            except (ValueError, KeyError, TypeError) as e:
                # A torn last line after a crash is expected; anything else is logged.
                log.warning("state journal %s line %d unreadable, ignored: %s", self.path, number, e)
        return records

    def compact(self, records: dict[str, MountRecord]) -> None:
        """Replace the journal with one line per live record (atomic, durable)."""
        self.close()
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records.values():
                f.write(json.dumps({"put": record.to_json()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._journal_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _append(self, entry: dict, durable: bool) -> None:
        if self._journal_fd < 0:
            self._journal_fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        os.write(self._journal_fd, (json.dumps(entry) + "\n").encode())
        if durable:
            os.fdatasync(self._journal_fd)

    def intend(self, record: MountRecord, durable: bool = True) -> None:
        """Durably note a mount about to be made, before anything is created for it;
        with ``durable`` false the caller syncs (``sync``), once for several Mounts."""
        self._append({"put": record.to_json()}, durable=durable)

    def sync(self) -> None:
        """Make every line appended so far durable (safe from a thread of its own)."""
        if self._journal_fd >= 0:
            os.fdatasync(self._journal_fd)

    def update(self, record: MountRecord) -> None:
        self._append({"put": record.to_json()}, durable=False)

    def drop(self, mount_id: str) -> None:
        self._append({"drop": mount_id}, durable=False)

    def close(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
