"""What the layer operations are using right now, shared by the manager and them.

Exports and Commits read a mount's upper in worker threads, so Unmount must see them
(Busy rather than pulling the mount away mid-copy); two calls must never fill one
destdir. Both kinds of claim live here, under one lock, so that neither the manager nor
the layer operations reach into the other.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from uniond.access.paths import inside
from uniond.errors import Busy

T = TypeVar("T")


class Claims:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()  # mount id -> running exports/commits
        self._destdirs: set[str] = set()  # being filled by ImportLayer or Commit

    @contextmanager
    def using(self, mount_id: str, find: Callable[[], T]) -> Iterator[T]:
        """Holds ``mount_id`` against Unmount and yields what ``find`` returns, called
        under the lock (it raises NotFound for a mount that has gone meanwhile)."""
        with self._lock:
            found = find()
            self._in_use[mount_id] += 1
        try:
            yield found
        finally:
            with self._lock:
                self._in_use[mount_id] -= 1
                if not self._in_use[mount_id]:
                    del self._in_use[mount_id]

    def in_use(self, mount_id: str) -> bool:
        with self._lock:
            return bool(self._in_use[mount_id])

    @contextmanager
    def destdir(self, path: str) -> Iterator[None]:
        with self._lock:
            if any(inside(path, d) or inside(d, path) for d in self._destdirs):
                raise Busy(f"destdir {path!r} is already being filled by another call")
            self._destdirs.add(path)
        try:
            yield
        finally:
            with self._lock:
                self._destdirs.discard(path)
