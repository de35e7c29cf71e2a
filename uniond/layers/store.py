"""A content-addressed store of layer directories, keyed by diff_id (ImportImage).

``<store>/layers`` is made by the daemon, 0755 and its own, and refused otherwise.
``<store>/layers/<hex>`` is the layer whose uncompressed tar has sha256 ``<hex>``, in
overlay's native form, ready to be a lowerdir. A layer is unpacked into
``layers/.partial-<pid>-<random>`` and renamed to its name only once complete and
checked, so a half-imported layer never looks complete, a layer shared by two images
is stored once, and a layer already there (perhaps mounted right now) is never
written to. Partials left by an earlier daemon (a crash) are removed on the next
import; those of this daemon belong to imports still running.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat

from uniond.errors import InvalidArgument

log = logging.getLogger(__name__)

LAYERS = "layers"
PARTIAL_PREFIX = ".partial-"
DIGESTS = ".digests"  # layers/.digests/<blob hex>: the diff_id of a stored layer's blob
_DIFF_ID = re.compile(rb"sha256:[0-9a-f]{64}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def hex_of(digest: str) -> str:
    return digest.partition(":")[2]


class Store:
    """``root`` is the store directory, as a path the daemon opened without symlinks."""

    def __init__(self, root: str) -> None:
        root_fd = os.open(root, _DIR_FLAGS)
        try:
            try:
                os.mkdir(LAYERS, 0o755, dir_fd=root_fd)
            except FileExistsError:
                pass
            try:
                self.fd = os.open(LAYERS, _DIR_FLAGS, dir_fd=root_fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise InvalidArgument(f"store: {LAYERS!r} in it is not a directory; move it away") from None
                raise
        finally:
            os.close(root_fd)
        st = os.fstat(self.fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            # Only the daemon writes there: nobody can swap a partial for something
            # else between its unpacking and its renaming.
            os.close(self.fd)
            raise InvalidArgument(f"store: {LAYERS!r} in it is not the daemon's own (owner {st.st_uid}, "
                                  f"mode {stat.S_IMODE(st.st_mode):o}); remove it and let ImportImage make it")
        self.partials: list[str] = []
        self._remove_stale()

    def close(self) -> None:
        for name in list(self.partials):
            self.discard(name)
        os.close(self.fd)

    def path(self, name: str) -> str:
        return f"/proc/self/fd/{self.fd}/{name}"

    def _remove_stale(self) -> None:
        mine = f"{PARTIAL_PREFIX}{os.getpid()}-"
        for name in os.listdir(self.fd):
            if name.startswith(PARTIAL_PREFIX) and not name.startswith(mine):
                log.info("store: removing %s, left by an import that did not finish", name)
                self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=self.fd)  # through directory fds, never following a symlink
        else:
            os.unlink(name, dir_fd=self.fd)

    def has(self, diff_id: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(hex_of(diff_id), dir_fd=self.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def partial(self) -> tuple[str, int]:
        """A new empty partial directory: (its name, an fd on it the caller closes)."""
        name = f"{PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        os.mkdir(name, 0o755, dir_fd=self.fd)
        self.partials.append(name)
        return name, os.open(name, _DIR_FLAGS, dir_fd=self.fd)

    def complete(self, name: str, diff_id: str) -> None:
        """Give the partial ``name`` its final name, unless another import got there first."""
        try:
            os.rename(name, hex_of(diff_id), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise InvalidArgument(f"store: {LAYERS}/{hex_of(diff_id)} is not a directory; move it away") from None
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            self.discard(name)  # the same layer, stored once: this copy goes
            return
        self.partials.remove(name)

    def known(self, digest: str) -> str | None:
        """The diff_id of the stored layer a blob of ``digest`` unpacked to, if any: such a
        blob need only be hashed, not unpacked again."""
        try:
            fd = os.open(f"{DIGESTS}/{hex_of(digest)}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None
        try:
            text = os.read(fd, 100).strip()
        finally:
            os.close(fd)
        diff_id = text.decode() if _DIFF_ID.fullmatch(text) else None
        return diff_id if diff_id and self.has(diff_id) else None

    def remember(self, digest: str, diff_id: str) -> None:
        """Note that a blob of ``digest`` is the layer ``diff_id`` (written whole or not at all)."""
        if not digest or self.known(digest) == diff_id:
            return
        try:
            os.mkdir(DIGESTS, 0o755, dir_fd=self.fd)
        except FileExistsError:
            pass
        temporary = f"{DIGESTS}/.{secrets.token_hex(6)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self.fd)
        try:
            os.write(fd, diff_id.encode() + b"\n")
        finally:
            os.close(fd)
        os.rename(temporary, f"{DIGESTS}/{hex_of(digest)}", src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def discard(self, name: str) -> None:
        if name in self.partials:
            self.partials.remove(name)
        self._remove(name)
