"""What the daemon's live mounts hold, indexed: which mount has which writable upper,
workdir and mountpoint, and how many mounts each uid owns.

A Mount checks all four against every live mount (M7, quotas); with 10,000 mounts a
walk over the records per check was a cost proportional to the table, so the manager
keeps this index in step with its records instead.
"""

from __future__ import annotations

from collections import Counter

from uniond.mounts.records import MountRecord


class Holdings:
    def __init__(self) -> None:
        self.uppers: dict[str, str] = {}  # writable upper -> mount id
        self.workdirs: dict[str, str] = {}
        self.mountpoints: dict[str, str] = {}
        self.owned: Counter[int] = Counter()
        # Lazily unmounted, still in use (M12): upper and workdir held, mountpoint free.
        self.detached: dict[str, MountRecord] = {}

    def add(self, record: MountRecord) -> None:
        spec = record.spec
        if spec.upperdir and not spec.readonly:
            self.uppers[spec.upperdir] = record.id
        if spec.workdir:
            self.workdirs[spec.workdir] = record.id
        if record.detached:
            self.detached[record.id] = record
        else:
            self.mountpoints[spec.mountpoint] = record.id
        self.owned[record.owner] += 1

    def remove(self, record: MountRecord) -> None:
        spec = record.spec
        self.detached.pop(record.id, None)
        for index, key in ((self.uppers, spec.upperdir), (self.workdirs, spec.workdir),
                           (self.mountpoints, spec.mountpoint)):
            if index.get(key) == record.id:
                del index[key]
        self.owned[record.owner] -= 1
        if self.owned[record.owner] <= 0:
            del self.owned[record.owner]
