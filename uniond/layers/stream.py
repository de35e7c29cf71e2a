"""The file descriptor a caller hands over with ExportDiff or ImportLayer.

It may be a file, a pipe or a socket, blocking or not, and its other end may go away:
this module makes all of those behave like one stream.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import select
import stat

from uniond.errors import Failed, InvalidArgument, UniondError

CHUNK = 1 << 20

# What read(2) and write(2) answer for a descriptor that carries no byte stream: an
# eventfd or epoll fd, an unconnected or listening socket, a datagram socket too small
# for a piece of the layer, an O_PATH descriptor. The caller passed the wrong kind.
_NOT_A_STREAM = {errno.EINVAL, errno.EBADF, errno.ENOTCONN, errno.EDESTADDRREQ, errno.EMSGSIZE,
                 errno.EOPNOTSUPP, errno.EISDIR}


def _stream_error(e: OSError, done: str) -> UniondError:
    """One line for the caller, never a traceback: the fd is the caller's own."""
    text = e.strerror or str(e)
    if e.errno == errno.EPIPE:
        return Failed("the reader of the layer closed its end before the end")
    if e.errno in _NOT_A_STREAM:
        return InvalidArgument(f"fd: cannot be {done} as a stream of bytes ({text}); pass a file, a pipe or a socket")
    return Failed(f"fd: the layer could not be {done}: {text}")


def _wait(fd: int, events: int) -> None:
    """A caller may hand over a non-blocking pipe; wait instead of failing."""
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


def check_fd(fd: int, writing: bool) -> None:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        st = os.fstat(fd)
    except OSError:
        raise InvalidArgument("fd: not an open file descriptor") from None
    if flags & os.O_PATH:
        raise InvalidArgument("fd: opened with O_PATH, so it can be neither read nor written")
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument("fd: is a directory; pass a file or a pipe")
    if not stat.S_IFMT(st.st_mode):  # an eventfd, epoll fd, timerfd, ...: no stream that ever ends
        raise InvalidArgument("fd: is not a file, a pipe, a socket or a device; pass one of those")
    mode = flags & os.O_ACCMODE
    if writing and mode == os.O_RDONLY:
        raise InvalidArgument("fd: open for reading only; ExportDiff writes the layer to it")
    if not writing and mode == os.O_WRONLY:
        raise InvalidArgument("fd: open for writing only; ImportLayer reads the layer from it")


PIPE_SIZE = 1 << 20  # what any user may make a pipe hold (fs.pipe-max-size's default)


def widen_pipe(fd: int) -> None:
    """A pipe holds 64 KiB unless told otherwise: a layer of small files fills that every
    64 files, and the writer then sleeps until the reader wakes and drains it. At 1 MiB
    both run along (ExportDiff of 100,000 files of 1 KiB into a pipe to cat: 1.06 s ->
    0.88 s). The reader loses nothing by it, its pipe only holds more; a pipe already
    larger is left so, and a refusal (the kernel's limits) leaves it as it was."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


class Sink:
    """Writes to the caller's fd in large pieces and counts what it wrote."""

    def __init__(self, fd: int, hashing: bool = False) -> None:
        widen_pipe(fd)
        self.fd = fd
        self.written = 0
        self._buf = bytearray()
        self._hasher = hashlib.sha256() if hashing else None

    @property
    def position(self) -> int:
        """Bytes written so far, including those still buffered."""
        return self.written + len(self._buf)

    @property
    def digest(self) -> str:
        """sha256:<hex> of every byte written, when made with ``hashing``."""
        return "sha256:" + self._hasher.hexdigest() if self._hasher is not None else ""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._hasher is not None:
            self._hasher.update(data)
        if not self._buf and len(data) >= CHUNK:
            self._write_all(data)  # already a large piece: no copy into the buffer
        else:
            self._buf += data
            if len(self._buf) >= CHUNK:
                self._drain()
        return len(data)

    def _drain(self) -> None:
        self._write_all(self._buf)
        self._buf.clear()

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    _wait(self.fd, select.POLLOUT)
                    continue
                except OSError as e:
                    raise _stream_error(e, "written") from None
                self.written += n
                view = view[n:]
        finally:
            view.release()

    def flush(self) -> None:
        self._drain()

    def sendfile(self, src: int, count: int) -> int:
        """Copy up to ``count`` bytes of ``src`` straight to the fd; returns how many."""
        self._drain()
        done = 0
        while done < count:
            try:
                n = os.sendfile(self.fd, src, None, count - done)
            except BlockingIOError:
                _wait(self.fd, select.POLLOUT)
                continue
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS) and not done:
                    return 0  # an fd sendfile cannot write to: the caller copies instead
                raise _stream_error(e, "written") from None
            if n == 0:
                break
            done += n
            self.written += n
        return done


class Source:
    """Reads the caller's fd for tarfile, waiting on a non-blocking one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                _wait(self.fd, select.POLLIN)
            except OSError as e:
                raise _stream_error(e, "read") from None
