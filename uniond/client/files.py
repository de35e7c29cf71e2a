"""The client's side of the descriptors the layer methods take, and measuring progress.

uniond reads and writes the descriptor it is sent, which shares its file offset with
the client's: for a regular file the client sees how far the daemon got by reading
that offset, without copying a byte itself. Pipes and sockets have no offset, so their
progress is not known (and a pipe is what a script passes, with no terminal to show a
bar on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")
Progress = Callable[[int, int | None], None]  # (bytes done, bytes in all or None)
FileOrFd = int | IO[bytes] | str | os.PathLike

Meter = Callable[[], tuple[int, int | None] | None]  # (done, total), or None when unknown


def compression_for(file_or_fd: Any) -> str:
    """gzip for a file named *.gz or *.tgz, zstd for *.zst or *.tzst, else none."""
    name = file_or_fd if isinstance(file_or_fd, str | os.PathLike) else getattr(file_or_fd, "name", "")
    name = os.fspath(name) if isinstance(name, str | os.PathLike) else ""
    if name.endswith((".gz", ".tgz")):
        return "gzip"
    return "zstd" if name.endswith((".zst", ".tzst")) else "none"


@contextlib.contextmanager
def _descriptor(file_or_fd: Any, flags: int) -> Iterator[int]:
    if isinstance(file_or_fd, int):
        yield file_or_fd
    elif hasattr(file_or_fd, "fileno"):
        if hasattr(file_or_fd, "flush"):
            file_or_fd.flush()  # what Python buffered goes before what uniond writes
        yield file_or_fd.fileno()
    else:
        fd = os.open(os.fspath(file_or_fd), flags | os.O_CLOEXEC, 0o666)
        try:
            yield fd
        finally:
            os.close(fd)


def writable(file_or_fd: Any) -> contextlib.AbstractContextManager[int]:
    """A descriptor to export into: an fd or file object as given, a path created or truncated."""
    return _descriptor(file_or_fd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)


def readable(file_or_fd: Any) -> contextlib.AbstractContextManager[int]:
    return _descriptor(file_or_fd, os.O_RDONLY)


def offset_meter(fd: int, reading: bool) -> Meter | None:
    """How far uniond has read (of the whole file) or written, for a regular file."""
    try:
        info = os.fstat(fd)
        start = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    total = info.st_size - start if reading else None
    return lambda: (os.lseek(fd, 0, os.SEEK_CUR) - start, total)


def tree_bytes(path: str) -> int:
    """Bytes in the regular files below ``path`` (what is readable of it)."""
    total = 0
    for top, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(top, name))
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
    return total


def tree_meter(dest: str, upper: str) -> Meter:
    """Commit's progress: bytes in destdir so far, of the bytes in the upper (when the
    client can read it)."""
    total: list[int | None] = []

    def measure() -> tuple[int, int | None]:
        if not total:
            total.append(tree_bytes(upper) if upper and os.access(upper, os.R_OK | os.X_OK) else None)
        return tree_bytes(dest), total[0]

    return measure


@contextlib.asynccontextmanager
async def watch(progress: Callable[[int, int | None], None] | None, meter: Meter | None,
                interval: float = 0.2) -> AsyncIterator[None]:
    """Report ``meter`` to ``progress`` every ``interval`` while the block runs, and once at its end."""
    if progress is None or meter is None:
        yield
        return

    async def report() -> None:
        measured = await asyncio.to_thread(meter)
        if measured is not None:
            progress(*measured)

    async def repeat() -> None:
        while True:
            await report()
            await asyncio.sleep(interval)

    task = asyncio.ensure_future(repeat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await report()


async def while_reading(call: Callable[[int], Awaitable[T]], sink: Callable[[bytes], None]) -> T:
    """``call(fd)`` with the write end of a new pipe, handing ``sink`` what arrives on the
    read end while the call runs (a pipe holds 64 KiB: a writer the client did not read
    would wait for ever), then the rest; answers the call's answer.

    The client's own write end is closed once the reply came, as it must stay open until
    the message carrying it has been sent; the daemon has closed its copy by then, so the
    read end reaches its end.
    """
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 1 << 16):
                sink(chunk)

    try:
        loop.add_reader(r, drain)
        try:
            answer = await call(w)
        finally:
            loop.remove_reader(r)
            os.close(w)
            w = -1
        os.set_blocking(r, True)
        while chunk := os.read(r, 1 << 16):
            sink(chunk)
        return answer
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def nul_records(record: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """A sink for ``while_reading`` that hands ``record`` each NUL-terminated record."""
    partial = bytearray()

    def feed(chunk: bytes) -> None:
        partial.extend(chunk)
        *whole, rest = bytes(partial).split(b"\0")
        partial[:] = rest
        for each in whole:
            record(each)

    return feed
