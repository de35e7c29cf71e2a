"""The two interfaces uniond exports, as dbus-next service classes, and the rules of
translation: options in, values and errors out.

Each method asks who calls, hands plain values to the manager (or the layer
operations) and turns the answer into the contract's types; a UniondError leaves under
its own D-Bus name, anything else as a one-line Failed, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from dbus_next import Message, MessageType, Variant
from dbus_next.constants import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from uniond import constants
from uniond.errors import Failed, InvalidArgument, NotFound, UniondError
from uniond.mounts.manager import MountRequest
from uniond.service.values import unwrap_options, wrap

if TYPE_CHECKING:
    from uniond.service.bus import BusService

log = logging.getLogger("uniond.service.bus")



# Where each method taking a descriptor has it: (member, signature) -> argument position.
_FD_ARGUMENTS = {
    ("ExportDiff", "oha{sv}"): 1, ("ImportLayer", "hsa{sv}"): 0,
    ("ExportLayer", "oha{sv}"): 1, ("ApplyLayer", "hsa{sv}"): 0,
    ("ExportImage", "oha{sv}"): 1, ("ImportImage", "hsa{sv}"): 0,
    ("DiffInto", "oha{sv}"): 1,
}

# The largest message the bus passes on (dbus-daemon's max_message_size, 32 MiB by
# default; a larger one makes it drop the sender), less room for the header.
MAX_REPLY_BODY = 32 * 1024 * 1024 - 64 * 1024


def _diff_size(changes: list[tuple[str, str]]) -> int:
    """Bytes of a(ss) on the wire: each struct 8-aligned, two strings with length and NUL;
    Failed for a name no D-Bus string can carry."""
    size = 8
    for kind, path in changes:
        size += -size % 8
        size += 4 + len(kind.encode()) + 1
        size += -size % 4
        try:
            size += 4 + len(path.encode()) + 1
        except UnicodeEncodeError:
            raise Failed(
                f"the name {path.encode(errors='surrogateescape')!r} is not UTF-8, which a D-Bus string cannot "
                "carry; call DiffInto, which writes names as their bytes"
            ) from None
        if size > MAX_REPLY_BODY:
            return size
    return size


def close_unclaimed_fds(msg: Message) -> None:
    """dbus-next never closes the descriptors that come with a message, and any caller
    may attach some to any call: keep only the one a layer method takes (and closes
    itself), close the others now, so that no caller can exhaust the daemon's fds."""
    if not msg.unix_fds:
        return
    keep = None
    if (
        msg.message_type == MessageType.METHOD_CALL
        and msg.path == constants.MANAGER_PATH
        and msg.interface in (None, constants.MANAGER_INTERFACE)
    ):
        position = _FD_ARGUMENTS.get((msg.member, msg.signature))
        if position is not None and len(msg.body) > position:
            index = msg.body[position]
            if isinstance(index, int) and 0 <= index < len(msg.unix_fds):
                keep = index
    for index, fd in enumerate(msg.unix_fds):
        if index != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def signature_helper(interface: ServiceInterface, path: str) -> Callable[[Message], Message | None]:
    """A message handler that answers a call of a known method with the wrong signature
    by naming the signature that works (dbus-next would only say "no such method")."""
    methods = {m.name: m for m in ServiceInterface._get_methods(interface) if not m.disabled}

    def check(msg: Message) -> Message | None:
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != path
                or msg.interface not in (None, interface.name) or msg.member not in methods):
            return None
        expected = methods[msg.member]
        if msg.signature == expected.in_signature:
            return None
        arguments = ", ".join(f"{a.signature} {a.name}" for a in expected.introspection.in_args)
        return Message.new_error(
            msg, "org.freedesktop.DBus.Error.InvalidArgs",
            f"{interface.name}.{msg.member} takes signature '{expected.in_signature}' ({arguments}), "
            f"not '{msg.signature}'",
        )

    return check


@contextlib.contextmanager
def _owned(fd: int | None) -> Iterator[int]:
    """The received descriptor, closed on every path; an index without one is refused."""
    try:
        if fd is None:
            raise InvalidArgument("fd: the message carries no file descriptor for it")
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _layer_info(count: int, entries: int, result: Any) -> dict[str, Variant]:
    """What a manifest needs of a layer (ExportLayer, ApplyLayer)."""
    return {
        "bytes": Variant("t", count),
        "entries": Variant("t", entries),
        "diff_id": Variant("s", result.diff_id),
        "digest": Variant("s", result.digest),
        "media_type": Variant("s", result.media_type),
    }


def mount_path(mount_id: str) -> str:
    return f"{constants.MOUNT_PATH_PREFIX}/{mount_id}"


def mount_id_of(path: str) -> str:
    prefix = constants.MOUNT_PATH_PREFIX + "/"
    if not path.startswith(prefix) or "/" in path[len(prefix) :]:
        raise NotFound(f"{path!r} is not a uniond mount object; ListMounts gives valid paths")
    return path[len(prefix) :]


def translated(fn):
    """Send UniondErrors under their own names and anything else as one-line Failed.

    dbus-next would otherwise send a Python traceback to the caller.
    """

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except UniondError as e:
            log.info("%s refused: %s", fn.__name__, e)
            raise DBusError(e.dbus_name, str(e)) from None
        except DBusError:
            raise
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DBusError(Failed.dbus_name, f"{fn.__name__} failed: {text}") from None

    return wrapper


def _name_arguments(interface: ServiceInterface, names: dict[str, list[str]]) -> None:
    """dbus-next leaves results and signal arguments unnamed; the contract names them."""
    members = [*ServiceInterface._get_methods(interface), *ServiceInterface._get_signals(interface)]
    for member in members:
        intro = member.introspection
        args = intro.out_args if hasattr(intro, "out_args") else intro.args
        for arg, name in zip(args, names.get(member.name, []), strict=False):
            arg.name = name


class ManagerInterface(ServiceInterface):
    """org.uniond1.Manager: the methods callers use."""

    def __init__(self, service: BusService) -> None:
        super().__init__(constants.MANAGER_INTERFACE)
        self.service = service
        self.manager = service.manager
        self.layers = service.layers
        self.images = service.images
        _name_arguments(
            self,
            {
                "Mount": ["mount"],
                "Diff": ["changes"],
                "DiffInto": ["count"],
                "ExportDiff": ["bytes"],
                "ImportLayer": ["entries"],
                "ExportLayer": ["info"],
                "ApplyLayer": ["info"],
                "ImportImage": ["lowerdirs", "info"],
                "ExportImage": ["info"],
                "Commit": ["entries"],
                "ListMounts": ["mounts"],
                "MountAdded": ["mount", "mountpoint"],
                "MountRemoved": ["mount", "mountpoint"],
            },
        )

    @method()
    @translated
    async def Mount(self, lowerdirs: "as", upperdir: "s", mountpoint: "s", options: "a{sv}") -> "o":
        try:
            caller = await self.service.caller()
            request = MountRequest(tuple(lowerdirs), upperdir, mountpoint, unwrap_options(options))
            record = await self.manager.mount(request, caller)
            return mount_path(record.id)
        finally:
            self.service.kernel_calls -= 1

    @method()
    @translated
    async def Unmount(self, mount: "o", options: "a{sv}"):
        try:
            caller = await self.service.caller()
            await self.manager.unmount(mount_id_of(mount), caller, unwrap_options(options))
        finally:
            self.service.kernel_calls -= 1

    @method()
    @translated
    async def Update(self, mount: "o", lowerdirs: "as", options: "a{sv}"):
        caller = await self.service.caller()
        await self.manager.update(mount_id_of(mount), tuple(lowerdirs), caller, unwrap_options(options))

    @method()
    @translated
    async def Diff(self, mount: "o", options: "a{sv}") -> "a(ss)":
        caller = await self.service.caller()
        changes = await self.layers.diff(mount_id_of(mount), caller, unwrap_options(options))
        if _diff_size(changes) > MAX_REPLY_BODY:
            raise Failed(
                f"the {len(changes)} changes do not fit in one D-Bus message (at most "
                f"{MAX_REPLY_BODY >> 20} MiB); call DiffInto, which writes them to a file descriptor"
            )
        return [list(c) for c in changes]  # dbus-next wants a struct as a list

    @method()
    @translated
    async def DiffInto(self, mount: "o", fd: "h", options: "a{sv}") -> "t":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            return await self.layers.diff_into(mount_id_of(mount), owned, caller, unwrap_options(options))

    # dbus-next hands an "h" argument over as the received descriptor itself and never
    # closes it: the method owns it and closes it on every path. An index with no
    # descriptor attached arrives as None.

    @method()
    @translated
    async def ExportDiff(self, mount: "o", fd: "h", options: "a{sv}") -> "t":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.layers.export_diff(mount_id_of(mount), owned, caller, unwrap_options(options))
        return result.bytes

    @method()
    @translated
    async def ImportLayer(self, fd: "h", destdir: "s", options: "a{sv}") -> "t":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.layers.import_layer(owned, destdir, caller, unwrap_options(options))
        return result.entries

    @method()
    @translated
    async def ExportLayer(self, mount: "o", fd: "h", options: "a{sv}") -> "a{sv}":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.layers.export_diff(
                mount_id_of(mount), owned, caller, unwrap_options(options), method="ExportLayer"
            )
        return _layer_info(result.bytes, result.entries, result)

    @method()
    @translated
    async def ApplyLayer(self, fd: "h", destdir: "s", options: "a{sv}") -> "a{sv}":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.layers.import_layer(
                owned, destdir, caller, unwrap_options(options), method="ApplyLayer"
            )
        return _layer_info(result.bytes, result.members, result)

    @method()
    @translated
    async def ImportImage(self, fd: "h", store: "s", options: "a{sv}") -> "asa{sv}":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.images.import_image(owned, store, caller, unwrap_options(options))
        return [list(result.lowerdirs), {key: wrap(value) for key, value in result.info().items()}]

    @method()
    @translated
    async def ExportImage(self, mount: "o", fd: "h", options: "a{sv}") -> "a{sv}":
        with _owned(fd) as owned:
            caller = await self.service.caller()
            result = await self.images.export_image(mount_id_of(mount), owned, caller, unwrap_options(options))
        return {key: wrap(value) for key, value in result.info().items()}

    @method()
    @translated
    async def Commit(self, mount: "o", destdir: "s", options: "a{sv}") -> "t":
        caller = await self.service.caller()
        result = await self.layers.commit(mount_id_of(mount), destdir, caller, unwrap_options(options))
        return result.entries

    @method()
    @translated
    async def Reload(self):
        caller = await self.service.caller()
        await self.manager.authorize(caller, constants.ACTION_RELOAD, {})
        self.service.on_reload()

    @method()
    @translated
    async def ListMounts(self) -> "ao":
        return [mount_path(r.id) for r in self.manager.list()]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return constants.VERSION

    @signal()
    def MountAdded(self, mount: str, mountpoint: str) -> "os":
        return [mount, mountpoint]

    @signal()
    def MountRemoved(self, mount: str, mountpoint: str) -> "os":
        return [mount, mountpoint]
