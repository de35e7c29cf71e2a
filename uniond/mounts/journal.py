"""The durable record of the mounts the daemon owns.

An append-only journal of JSON lines: a Mount costs one fdatasync for its intent and
nothing more (C1: ~0.4 ms; a full atomic replace costs two syncs and the speed target
leaves room for one). The journal is compacted by an atomic replace at start-up, when
the extra syncs cost nothing a caller waits for. It lives in the state directory so it
survives a reboot (C2), under an exclusive flock so two daemons never reconcile at once
(C6).

The journal is a help, not the truth (the kernel's table and the marks the daemon leaves
are, see reconcile): so a damaged journal never stops a start. Each line is read on its
own, an unreadable one is skipped, and a file with such lines is kept aside (hard-linked
to ``mounts.journal.damaged-<time>``, which costs no space) and logged with what was
lost. A write that fails (a full disk, EIO) is taken back whole, so no torn line ever
swallows the next record, and the caller learns that it was not recorded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time

from uniond.errors import Failed, NotRecorded
from uniond.mounts import crash
from uniond.mounts.records import MountRecord

log = logging.getLogger(__name__)

JOURNAL = "mounts.journal"
LOCK = "lock"
DAMAGED = JOURNAL + ".damaged-"
# Test-only: a simulated reboot (tests/test_journal.py). Never set by the unit or the package.
BOOT_ID_OVERRIDE = "UNIOND_TEST_BOOT_ID"


def boot_id() -> str:
    override = os.environ.get(BOOT_ID_OVERRIDE)
    if override:
        return override
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()


class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, JOURNAL)
        self._lock_fd = -1
        self._journal_fd = -1
        self._torn = False  # the file may end inside a line: start the next one afresh

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
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return records
        lines = data.split(b"\n")
        torn_tail = lines.pop()  # b"" when the file ends with a newline, as it should
        lost: list[str] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry, dict) or len(entry) != 1:
                    raise ValueError("not one put or drop")
                if "put" in entry:
                    record = MountRecord.from_json(entry["put"])
                    records[record.id] = record
                elif isinstance(entry.get("drop"), str):
                    records.pop(entry["drop"], None)
                else:
                    raise ValueError("not one put or drop")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                lost.append(f"line {number} ({e}): {line[:200]!r}")
        if torn_tail:
            # A crash in the middle of an append: expected, and the reason the intent is
            # synced before anything exists (C1). Its mount, if any, is found by its mark.
            self._torn = True  # until compacted, the next line must not be glued to it
            log.warning("state journal %s ends in a torn line, ignored: %r", self.path, torn_tail[:200])
        if lost:
            self._keep_aside(lost)
        return records

    def _keep_aside(self, lost: list[str]) -> None:
        aside = os.path.join(self.directory, DAMAGED + time.strftime("%Y%m%dT%H%M%S"))
        try:
            os.link(self.path, aside)
        except FileExistsError:
            pass
        except OSError as e:
            aside = f"(could not keep a copy: {e.strerror})"
        log.error(
            "state journal %s is damaged: %d unreadable line(s) skipped, kept for inspection as %s; "
            "their mounts are recovered from the kernel's table and uniond's marks. Lost: %s",
            self.path, len(lost), aside, "; ".join(lost[:20]),
        )

    def compact(self, records: dict[str, MountRecord]) -> bool:
        """Replace the journal with one line per live record (atomic, durable).

        On a full disk the old journal stays as it is (it still says the same, with
        more lines) and False is returned: a start must not need free space.
        """
        self.close()
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                for record in records.values():
                    _write_all(f.fileno(), put_line(record, keep=False))
                os.fsync(f.fileno())
            crash.point("reconcile.compacting")
            os.replace(tmp, self.path)
            _sync_directory(self.directory)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning(
                "state journal %s not compacted (%s); kept as it is, compacted at a later start",
                self.path, e.strerror or e,
            )
            return False
        self._torn = False
        return True

    def _open(self) -> int:
        if self._journal_fd < 0:
            self._journal_fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        return self._journal_fd

    def _append(self, data: bytes, durable: bool) -> None:
        """Append one whole line, or nothing: a short or failed write is cut off again.

        O_APPEND puts the line at the end without asking where that is; only a failure
        asks (fstat), to cut the file back to where this line began."""
        if self._torn:
            data = b"\n" + data
        try:
            fd = self._open()
        except OSError as e:
            raise NotRecorded(self._why(e)) from None
        written = 0
        try:
            written = _write_all(fd, data)
            if durable:
                os.fdatasync(fd)
        except OSError as e:
            try:
                written += getattr(e, "written", 0)
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                self._torn = False
            except OSError:
                self._torn = True
            raise NotRecorded(self._why(e)) from None
        self._torn = False

    def _why(self, e: OSError) -> str:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the state directory {self.directory} is full ({e.strerror}); free some space there"
        return f"the state journal {self.path} cannot be written ({e.strerror or e})"

    def intend(self, record: MountRecord, durable: bool = True) -> None:
        """Durably note a mount about to be made, before anything is created for it; with
        ``durable`` false the caller makes it durable with ``sync``, once for several Mounts.

        Raises NotRecorded: then nothing may be made, as a crash would orphan it."""
        self._append(put_line(record), durable=durable)

    def sync(self) -> None:
        """Make every line appended so far durable (safe from a thread of its own).

        Raises NotRecorded, as intend does."""
        try:
            os.fdatasync(self._open())
        except OSError as e:
            raise NotRecorded(self._why(e)) from None

    def update(self, record: MountRecord) -> bool:
        """Note a change the kernel already shows (a mount's id, a detach); not synced, as
        reconciliation finds the same from the kernel's table. False if not written."""
        return self._best_effort(put_line(record), record.id)

    def drop(self, mount_id: str) -> bool:
        """Forget a mount that is gone and cleaned; if this is lost, the next start finds
        the mount gone and cleans (nothing) again. False if not written."""
        return self._best_effort(_line({"drop": mount_id}), mount_id)

    def _best_effort(self, data: bytes, mount_id: str) -> bool:
        try:
            self._append(data, durable=False)
        except NotRecorded as e:
            log.warning("mount %s: not recorded in the journal: %s; reconciled at the next start", mount_id, e)
            return False
        return True

    def close(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1


def _line(entry: dict) -> bytes:
    return (json.dumps(entry) + "\n").encode()


def put_line(record: MountRecord, keep: bool = True) -> bytes:
    """The journal line that records ``record``: its JSON form (as its marks hold it,
    encoded once per record, unless not to be ``keep``t) inside {"put": ...}."""
    return b'{"put": ' + (record.encoded if keep else record.encode()) + b"}\n"


def _write_all(fd: int, data: bytes) -> int:
    """os.write may write less than asked (a disk filling up): that is an error here,
    which carries how much was written (``written``) so that it can be cut off again."""
    view = memoryview(data)
    done = 0
    while view:
        try:
            written = os.write(fd, view)
        except OSError as e:
            e.written = done  # type: ignore[attr-defined]
            raise
        if written <= 0:
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            e.written = done  # type: ignore[attr-defined]
            raise e
        done += written
        view = view[written:]
    return done


def _sync_directory(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

