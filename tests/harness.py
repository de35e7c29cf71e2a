"""Real parts for the tests: a dbus-daemon configured as a system bus with the shipped
policy, uniond started as its own process the way systemd starts it (with a real
NOTIFY_SOCKET), and a small synchronous D-Bus client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError

from uniond import constants
from uniond.service import privatebus

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "dbus" / privatebus.POLICY_NAME
POLKIT_MOCK_POLICY = ROOT / "tests" / "polkit-mock.conf"
LOGIND_MOCK_POLICY = ROOT / "tests" / "logind-mock.conf"


class Bus:
    """A private dbus-daemon with the system bus policy and uniond's policy file, plus
    a rule that lets the polkit mock (run as root) own polkit's name."""

    def __init__(self, directory: Path) -> None:
        self.process, self.address = privatebus.start(str(directory), POLICY, [POLKIT_MOCK_POLICY, LOGIND_MOCK_POLICY])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class PipeReader(threading.Thread):
    """Reads a pipe's read end in a thread until its end (every write end closed), as a
    caller of ExportDiff or DiffInto does; ``received`` holds what came."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.received = bytearray()
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.fd, 1 << 16):
            self.received.extend(chunk)


class NotifySocket:
    """What systemd listens on: a datagram socket receiving sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_for(self, needle: str, timeout: float = 15, since: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.drain()[since:]:
                if needle in message.split("\n"):
                    return message
            time.sleep(0.01)
        raise AssertionError(f"no {needle!r} on NOTIFY_SOCKET within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Daemon:
    """uniond as its own process, with the environment systemd would give it."""

    bus: Bus
    state_dir: Path
    runtime_dir: Path
    notify: NotifySocket
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.state_dir.parent / "uniond.conf"

    @property
    def mounts_dir(self) -> Path:
        """The test's /etc/uniond/mounts.d."""
        return self.state_dir.parent / "mounts.d"

    def start(self, wait_ready: bool = True) -> None:
        if not self.config_path.exists():
            self.config_path.write_text('log_level = "debug"\n')
        env = {
            **os.environ,
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus.address,
            "STATE_DIRECTORY": str(self.state_dir),
            "RUNTIME_DIRECTORY": str(self.runtime_dir),
            "NOTIFY_SOCKET": self.notify.path,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        self._ready_index = len(self.notify.drain())
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uniond", "--bus", "system", "--config", str(self.config_path),
             "--mounts-dir", str(self.mounts_dir), *self.extra_args],
            env=env,
            stderr=log,
            stdout=log,
        )
        log.close()
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> str:
        return self.notify.wait_for("READY=1", since=self._ready_index)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return self.process.wait(timeout=15)

    def kill(self) -> None:
        assert self.process is not None
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=15)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text()


class CallError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


class Client:
    """A synchronous D-Bus client on its own event loop, as a test reads best."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus = self.loop.run_until_complete(self._connect(address))
        self.signals: list[Message] = []
        self.bus.add_message_handler(self._on_message)
        self.call_raw(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
            [f"type='signal',sender='{constants.BUS_NAME}'"],
        )

    @staticmethod
    async def _connect(address: str) -> MessageBus:
        return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()

    def _on_message(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL:
            self.signals.append(msg)

    def call_raw(self, destination, path, interface, member, signature="", body=None, unix_fds=None):
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body or [], unix_fds=unix_fds or [])
        reply = self.loop.run_until_complete(asyncio.wait_for(self.bus.call(msg), 60))
        if reply.message_type == MessageType.ERROR:
            raise CallError(reply.error_name, reply.body[0] if reply.body else "")
        return reply.body

    def call(self, member: str, signature: str = "", *body):
        return self.call_raw(constants.BUS_NAME, constants.MANAGER_PATH, constants.MANAGER_INTERFACE,
                             member, signature, list(body))

    def mount(self, lowers, upper="", mountpoint="", **options) -> str:
        opts = {k: Variant("b" if isinstance(v, bool) else "s", v) for k, v in options.items()}
        return self.call("Mount", "asssa{sv}", [str(p) for p in lowers], str(upper), str(mountpoint), opts)[0]

    def unmount(self, path: str, **options) -> None:
        self.call("Unmount", "oa{sv}", path, {k: Variant("b", v) for k, v in options.items()})

    def diff(self, path: str) -> list[tuple[str, str]]:
        return [tuple(c) for c in self.call("Diff", "oa{sv}", path, {})[0]]

    def list(self) -> list[str]:
        return self.call("ListMounts")[0]

    def props(self, path: str, interface: str = constants.MOUNT_INTERFACE) -> dict:
        body = self.call_raw(constants.BUS_NAME, path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface])
        return {k: v.value for k, v in body[0].items()}

    def managed_objects(self) -> dict:
        return self.call_raw(constants.BUS_NAME, constants.MANAGER_PATH,
                             "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")[0]

    def introspect(self, path: str) -> str:
        return self.call_raw(constants.BUS_NAME, path, "org.freedesktop.DBus.Introspectable", "Introspect")[0]

    def pump(self, seconds: float = 0.1) -> None:
        """Let queued signals arrive."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


class PolkitMock:
    """python-dbusmock's polkitd template, on our bus (not dbusmock's own, which lets
    everyone own every name and so could not test uniond's bus policy).

    CheckAuthorization is replaced by an equivalent added method so that dbusmock logs
    each call (subject, action, details, flags) for the tests to read.
    """

    MOCK_INTERFACE = "org.freedesktop.DBus.Mock"

    def __init__(self, address: str) -> None:
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.client = Client(address)
        deadline = time.monotonic() + 15
        while not self.client.call_raw("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                       "NameHasOwner", "s", [constants.POLKIT_BUS_NAME])[0]:
            assert self.process.poll() is None, "the polkitd mock exited"
            assert time.monotonic() < deadline, "the polkitd mock did not appear on the bus"
            time.sleep(0.05)
        self.answer_code("ret = (args[1] in self.allowed or self.allow_unknown, False, {})")

    def _mock(self, member: str, signature: str = "", *body):
        return self.client.call_raw(constants.POLKIT_BUS_NAME, constants.POLKIT_PATH, self.MOCK_INTERFACE,
                                    member, signature, list(body))

    def answer_code(self, code: str) -> None:
        self._mock("AddMethod", "sssss", constants.POLKIT_INTERFACE, "CheckAuthorization",
                   "(sa{sv})sa{ss}us", "(bba{ss})", code)

    def set_allowed(self, actions: list[str]) -> None:
        self._mock("SetAllowed", "as", actions)

    def answer(self, authorized: bool, challenge: bool, details: dict[str, str] | None = None) -> None:
        """Answer every check the same way (e.g. a challenge, or a dismissed dialog)."""
        self.answer_code(f"ret = ({authorized!r}, {challenge!r}, {details or {}!r})")

    def calls(self) -> list[dict]:
        """Each CheckAuthorization so far: subject, action, details, flags."""
        out = []
        for _, args in self._mock("GetMethodCalls", "s", "CheckAuthorization")[0]:
            subject, action, details, flags, _cancel = [a.value for a in args]
            kind, subject_details = subject
            out.append({"subject": (kind, {k: v.value for k, v in subject_details.items()}),
                        "action": action, "details": details, "flags": flags})
        return out

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=10)


class LogindMock:
    """python-dbusmock's logind template on our bus, run by Debian's python3 (the
    template needs PyGObject, which the venv does not build). Its sessions are real
    objects on the bus; a test ends one the way logind does: State "closing" (a
    PropertiesChanged signal) or SessionRemoved with the object gone."""

    BUS_NAME = "org.freedesktop.login1"
    PATH = "/org/freedesktop/login1"
    MANAGER = "org.freedesktop.login1.Manager"
    MOCK_INTERFACE = "org.freedesktop.DBus.Mock"

    def __init__(self, address: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["DBUS_SYSTEM_BUS_ADDRESS"] = address
        self.process = subprocess.Popen(
            ["/usr/bin/python3", "-m", "dbusmock", "--system", "--template", "logind"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.client = Client(address)
        deadline = time.monotonic() + 15
        while not self.client.call_raw("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                       "NameHasOwner", "s", [self.BUS_NAME])[0]:
            assert self.process.poll() is None, "the logind mock exited"
            assert time.monotonic() < deadline, "the logind mock did not appear on the bus"
            time.sleep(0.05)

    def _mock(self, member: str, signature: str = "", *body, path: str | None = None):
        return self.client.call_raw(self.BUS_NAME, path or self.PATH, self.MOCK_INTERFACE, member, signature,
                                    list(body))

    def add_session(self, session: str, uid: int = 0) -> str:
        return self._mock("AddSession", "ssusb", session, "seat0", uid, f"user{uid}", True)[0]

    def every_pid_in(self, session: str | None) -> None:
        """GetSessionByPID (not in the template): every caller is in ``session``, or in none."""
        code = (f"ret = dbus.ObjectPath('{self.PATH}/session/{session}')" if session else
                "raise dbus.exceptions.DBusException('no session', name='org.freedesktop.login1.NoSessionForPID')")
        self._mock("AddMethod", "sssss", self.MANAGER, "GetSessionByPID", "u", "o", code)

    def close_session(self, session: str) -> None:
        """Logout with processes left behind: the session lingers in State "closing"."""
        self._mock("UpdateProperties", "sa{sv}", "org.freedesktop.login1.Session",
                   {"State": Variant("s", "closing")}, path=f"{self.PATH}/session/{session}")

    def remove_session(self, session: str) -> None:
        path = f"{self.PATH}/session/{session}"
        self._mock("RemoveObject", "s", path)
        self._mock("EmitSignal", "sssav", self.MANAGER, "SessionRemoved", "so",
                   [Variant("s", session), Variant("o", path)])

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=10)


def run_as(uid: int, address: str, calls: list[list], gid: int | None = None) -> list[list]:
    """Make Client calls from a process running as ``uid``: a real unprivileged caller.

    Each call is [method, *args, options]; each result ["ok", value] or ["error", name, text].
    """
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    gid = uid if gid is None else gid
    out = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable,
         str(ROOT / "tests" / "as_user.py"), address],
        input=json.dumps(calls), capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def is_mounted(path: Path | str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


__all__ = ["Bus", "CallError", "Client", "Daemon", "DBusError", "NotifySocket", "PolkitMock", "is_mounted", "run_as"]
