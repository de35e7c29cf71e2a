"""Writing layer tars: a mount's upper as an OCI / Docker image layer (ExportDiff).

The upper becomes a PAX tar with AUFS-style whiteouts (E1, E2), streamed straight to
the caller's file descriptor; file data moves in bounded chunks (sendfile for big
files). The layer holds every entry of the upper, including copies-up that Diff does
not report (D5): a copied-up file no longer shares the lower's inode, so leaving it
out would make a stacked layer show hard links the mount did not show.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import operator
import os
import stat
import tarfile
from dataclasses import dataclass

from uniond.errors import InvalidArgument
from uniond.layers import tree
from uniond.layers.compress import MEDIA_TYPES, Compressing, check_compression, sha256_digest
from uniond.layers.stream import CHUNK, Sink, check_fd
from uniond.layers.tar_header import BLOCK, RECORD, entry_header, file_entry

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."  # AUFS bookkeeping (.wh..wh.plnk, ...): not content


@dataclass(frozen=True)
class ExportResult:
    bytes: int  # written to the fd, after compression
    entries: int  # tar members, whiteouts and opaque markers included
    diff_id: str = ""  # sha256:<hex> of the uncompressed tar, when asked for
    digest: str = ""  # sha256:<hex> of the bytes written, when asked for
    media_type: str = ""


class _Counted:
    """The uncompressed tar stream, gathered into pieces of about CHUNK bytes before it
    goes on (one join and one write per piece rather than per entry); its length, for
    padding its end to a whole record; its sha256 when a diff_id is wanted."""

    def __init__(self, out: Sink | Compressing, sink: Sink | None, hashing: bool) -> None:
        self.out = out
        self.sink = sink  # the fd itself when nothing compresses and nothing hashes: sendfile
        self.length = 0  # including what is still gathered
        self.hasher = hashlib.sha256() if hashing else None
        self._pieces: list[bytes] = []
        self._gathered = 0

    def write(self, data: bytes) -> None:
        self.length += len(data)
        self._pieces.append(data)
        self._gathered += len(data)
        if self._gathered >= CHUNK:
            self.flush()

    def write_pieces(self, pieces: tuple[bytes, ...], length: int) -> None:
        """``pieces`` in order, ``length`` bytes in all: no copy until the flush."""
        self.length += length
        self._pieces += pieces
        self._gathered += length
        if self._gathered >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._pieces:
            return
        data = b"".join(self._pieces)
        self._pieces.clear()
        self._gathered = 0
        if self.hasher is not None:
            self.hasher.update(data)
        self.out.write(data)

    def sendfile(self, fd: int, size: int) -> int:
        """Copy up to ``size`` bytes of ``fd`` straight to the caller's fd (see ``sink``)."""
        assert self.sink is not None
        self.flush()
        done = self.sink.sendfile(fd, size)
        self.length += done
        return done


_SENDFILE_MIN = 1 << 16
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A regular file as the listing saw it; should it have become a FIFO or a device since,
# opening it must neither wait for a writer nor make it a controlling terminal.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")  # D3
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")  # D2
_NAME = operator.attrgetter("name")
_RAW_WHITEOUT = WHITEOUT_PREFIX.encode()
_RAW_OPAQUE = OPAQUE_MARKER.encode()
_ZEROS = bytes(BLOCK)


def _listing(dir_fd: int) -> list[os.DirEntry[str]]:
    """Siblings sorted by name (D1, E2): the same upper always gives the same bytes."""
    try:
        with os.scandir(dir_fd) as it:
            return sorted(it, key=_NAME)
    except FileNotFoundError:
        return []  # removed since its parent was listed: a live mount's upper


class _Export:
    """One export: the upper walked through directory descriptors, parents before
    children, each entry written as it is met.

    Every system call names an entry relative to its open directory (and a regular
    file's metadata and xattrs are read from its own descriptor), so the kernel never
    resolves a whole path again, let alone the /proc/self/fd/N path the upper is
    handed over as: that resolution was about half of an export of small files. The
    walk keeps one descriptor per level (the daemon's soft descriptor limit is raised
    to the hard one at start) and no recursion, so depth costs no stack.
    """

    def __init__(self, out: _Counted, what: str) -> None:
        self.out = out
        self.write = out.write
        self.what = what
        self.first_names: dict[tuple[int, int], bytes] = {}  # D7: (dev, ino) -> first name in the layer
        self.entries = 0

    def run(self, upperdir: str) -> None:
        root = os.open(upperdir, _DIR_FLAGS)
        stack = [(root, b"", "", iter(_listing(root)))]
        try:
            while stack:
                dir_fd, raw_prefix, prefix, pending = stack[-1]
                for entry in pending:
                    name = entry.name
                    if name.startswith(WHITEOUT_PREFIX):
                        raise InvalidArgument(
                            f"the mount holds {'/' + prefix + name!r}: a layer cannot carry a name starting with "
                            f"{WHITEOUT_PREFIX!r}, every reader would take it for a whiteout (E3); rename it"
                        )
                    raw = raw_prefix + name.encode("utf-8", "surrogateescape")
                    try:
                        if entry.is_file(follow_symlinks=False):
                            if self._regular(dir_fd, name, raw, prefix):
                                continue
                        elif entry.is_dir(follow_symlinks=False):
                            child = self._directory(dir_fd, name, raw, prefix)
                            if child is not None:
                                stack.append((child, raw + b"/", prefix + name + "/", iter(_listing(child))))
                                break
                            continue
                        # Neither a directory nor a regular file, or no longer what the listing said.
                        self._other(dir_fd, name, raw, prefix + name)
                    except FileNotFoundError:
                        continue  # gone since the listing: a live mount's upper
                else:
                    stack.pop()
                    os.close(dir_fd)
        finally:
            for dir_fd, *_ in stack:
                os.close(dir_fd)

    def _directory(self, dir_fd: int, name: str, raw: bytes, prefix: str) -> int | None:
        """Writes a directory; returns its open descriptor to descend into, or None if
        it is no longer a directory."""
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            self._other(dir_fd, name, raw, prefix + name)
            return None
        try:
            st = os.fstat(fd)
            names = tree.list_xattrs(fd)
            opaque = any(name in names and _getxattr(fd, name) == b"y" for name in _OPAQUE_XATTRS)
            self.write(entry_header(raw + b"/", tarfile.DIRTYPE, st, tree.read_xattrs(fd, names)))
            self.entries += 1
            if opaque:
                # E1: the directory entry, without overlay xattrs, then its marker.
                self.write(entry_header(raw + b"/" + _RAW_OPAQUE, tarfile.REGTYPE, None))
                self.entries += 1
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _regular(self, dir_fd: int, name: str, raw: bytes, prefix: str) -> bool:
        """A regular file, read through its own descriptor; False if it no longer is one.
        The path every file of a layer takes: kept to as few calls as it can be."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return False  # a symlink now
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            size = st.st_size
            try:
                names = os.listxattr(fd)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                names = None
            if names:
                if not size and any(name in names for name in _WHITEOUT_XATTRS):
                    self._whiteout(raw)  # D2, the xattr form
                    return True
                xattrs = tree.read_xattrs(fd, names)
            else:
                xattrs = ()
            if st.st_nlink > 1 and self._linked(st, raw, xattrs):
                return True
            self.entries += 1
            if size < _SENDFILE_MIN:
                data = os.read(fd, size) if size else b""
                if len(data) == size:  # the usual case: headers, data, padding, not copied once more
                    if xattrs:
                        header = entry_header(raw, tarfile.REGTYPE, st, xattrs, size)
                        pad = -size % BLOCK
                        self.out.write_pieces((header, data, _ZEROS[:pad]), len(header) + size + pad)
                    else:
                        self.out.write_pieces(*file_entry(raw, st, data))
                    return True
                self.write(entry_header(raw, tarfile.REGTYPE, st, xattrs, size) + data)
                _copy_rest(self.out, fd, size, size - len(data), self.what, prefix + name)
            else:
                self.write(entry_header(raw, tarfile.REGTYPE, st, xattrs, size))
                _copy_rest(self.out, fd, size, size, self.what, prefix + name)
            return True
        finally:
            os.close(fd)

    def _linked(self, st: os.stat_result, raw: bytes, xattrs: tuple[tuple[str, bytes], ...]) -> bool:
        """D7: a second name of an inode already in the layer becomes a hard link to the first."""
        key = (st.st_dev, st.st_ino)
        first = self.first_names.get(key)
        if first is None:
            self.first_names[key] = raw
            return False
        self.write(entry_header(raw, tarfile.LNKTYPE, st, xattrs, raw_link=first))
        self.entries += 1
        return True

    def _whiteout(self, raw: bytes) -> None:
        """E1: a deletion is an empty regular file named .wh.<name>."""
        head, _, base = raw.rpartition(b"/")
        self.write(entry_header(head + b"/" + _RAW_WHITEOUT + base if head else _RAW_WHITEOUT + base,
                                tarfile.REGTYPE, None))
        self.entries += 1

    def _other(self, dir_fd: int, name: str, raw: bytes, rel: str) -> None:
        """Symlinks, FIFOs, devices, whiteout devices (D2, D8): few, so read by name."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            self._whiteout(raw)
            return
        if stat.S_ISSOCK(mode):
            return  # D8: a socket is no content
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            log.warning("%s: /%s changed type while the layer was written; left out", self.what, rel)
            return
        path = f"/proc/self/fd/{dir_fd}/{name}"  # the last component is never followed
        xattrs = tree.read_xattrs(path)
        if st.st_nlink > 1 and self._linked(st, raw, xattrs):
            return
        if stat.S_ISLNK(mode):
            target = os.fsencode(os.readlink(name, dir_fd=dir_fd))
            self.write(entry_header(raw, tarfile.SYMTYPE, st, xattrs, raw_link=target))
        elif stat.S_ISFIFO(mode):
            self.write(entry_header(raw, tarfile.FIFOTYPE, st, xattrs))
        elif stat.S_ISCHR(mode):
            self.write(entry_header(raw, tarfile.CHRTYPE, st, xattrs))
        elif stat.S_ISBLK(mode):
            self.write(entry_header(raw, tarfile.BLKTYPE, st, xattrs))
        else:
            return
        self.entries += 1


def _getxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def _copy_rest(out: _Counted, fd: int, size: int, left: int, what: str, rel: str) -> None:
    """The rest of a file's data after its header, so that exactly ``size`` bytes follow:
    a file that shrank meanwhile is padded, one that grew is cut, as the header already
    promised ``size`` (GNU tar does the same).

    Into an uncompressed stream, large files go by sendfile(2): the kernel moves the
    pages, nothing passes through Python.
    """
    if left == size and size >= _SENDFILE_MIN and out.sink is not None:
        left -= out.sendfile(fd, size)
    while left:
        data = os.read(fd, min(left, CHUNK))
        if not data:
            log.warning("%s: /%s shrank while it was read; padded with zeros", what, rel)
            data = bytes(min(left, CHUNK))
        out.write(data)
        left -= len(data)
    if size % BLOCK:
        out.write(bytes(BLOCK - size % BLOCK))


def export_diff(upperdir: str, fd: int, compression: str = "none", what: str = "export",
                digests: bool = False) -> ExportResult:
    """Stream ``upperdir`` to ``fd`` as a layer tar; the caller keeps ``fd`` open.

    ``what`` starts the log lines about files that change meanwhile (e.g. the mount id);
    ``digests`` asks for the diff_id and digest (file data then passes through Python
    instead of sendfile, to be hashed).
    """
    check_compression(compression)
    check_fd(fd, writing=True)
    sink = Sink(fd, hashing=digests)
    zipped = Compressing(sink, compression)
    plain = compression == "none"
    out = _Counted(zipped, sink if plain and not digests else None, digests and not plain)
    export = _Export(out, what)
    if upperdir:
        export.run(upperdir)
    # The end: two zero blocks, padded to a whole record as tar(1) and tarfile write it.
    trailer = 2 * BLOCK
    out.write(bytes(trailer + (-(out.length + trailer)) % RECORD))
    out.flush()
    zipped.close()  # writes the compressor's trailer into the sink
    sink.flush()
    if not digests:
        return ExportResult(sink.written, export.entries)
    digest = sink.digest
    diff_id = digest if out.hasher is None else sha256_digest(out.hasher)
    return ExportResult(sink.written, export.entries, diff_id, digest, MEDIA_TYPES[compression])
