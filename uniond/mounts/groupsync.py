"""One journal sync for all the Mounts that arrive together.

C1 wants a Mount's intent durable before anything exists for it, and an fdatasync
costs the same for one line as for fifty. So each Mount writes its line and waits for
a sync that started after that write; Mounts that write while a sync runs share the
next one. The sync runs in a thread, so the event loop answers other callers meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor


class GroupSync:
    def __init__(self, sync: Callable[[], None], executor: Executor | None = None) -> None:
        self._sync = sync
        self._executor = executor
        self._running: asyncio.Future | None = None  # the sync under way
        self._next: asyncio.Future | None = None  # the one that starts when it ends

    async def durable(self, alone: bool = False) -> None:
        """Return once everything written before this call is on disk; ``alone`` (nobody
        else could join or is waiting) syncs right here, without a thread."""
        if alone and self._running is None and self._next is None:
            self._sync()
            return
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if self._running is None:
                self._start()
        waiting = self._next if self._next is not None else self._running
        assert waiting is not None
        await asyncio.shield(waiting)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        done, self._next = self._next, None
        assert done is not None
        self._running = done
        job = loop.run_in_executor(self._executor, self._sync)
        job.add_done_callback(lambda job: self._finish(done, job))

    def _finish(self, done: asyncio.Future, job: asyncio.Future) -> None:
        self._running = None
        error = job.exception()
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
        if self._next is not None:
            self._start()
