"""A private system-like bus for machines that have no system bus (containers, CI).

It runs a real dbus-daemon whose configuration mirrors Debian's system bus and
includes uniond's own shipped policy file, so what works here works on a real system
bus. Tests start their bus with the same configuration.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket as socketlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from uniond.errors import Failed

POLICY_NAME = "org.uniond1.conf"
_PR_SET_PDEATHSIG = 1

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>
{extra}</busconfig>
"""


def find_policy() -> Path:
    """The shipped policy: installed copies first, then the source tree's."""
    candidates = [
        Path(sys.prefix) / "share/dbus-1/system.d" / POLICY_NAME,
        Path("/usr/share/dbus-1/system.d") / POLICY_NAME,
        Path("/etc/dbus-1/system.d") / POLICY_NAME,
        Path(__file__).resolve().parents[2] / "dbus" / POLICY_NAME,  # the source tree
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise Failed(f"{POLICY_NAME} not found in any of: {', '.join(map(str, candidates))}")


def write_config(directory: str, policy: Path | None = None, extra: Sequence[Path] = ()) -> tuple[str, str]:
    """Write the bus configuration; return (config path, bus address).

    ``extra`` policy files are included after uniond's own: the tests use one to let a
    polkit mock own its name, as polkit's own policy file does on a real system.
    """
    os.makedirs(directory, mode=0o755, exist_ok=True)
    socket = os.path.join(directory, "system_bus_socket")
    config = os.path.join(directory, "bus.conf")
    # Copies beside the configuration: the bus user may not be able to read a clone's
    # tree (in a 0700 home directory, say).
    policies = []
    for index, source in enumerate([policy or find_policy(), *extra]):
        copy = os.path.join(directory, f"policy-{index}.conf")
        shutil.copyfile(source, copy)
        os.chmod(copy, 0o644)
        policies.append(copy)
    includes = "".join(f"  <include>{path}</include>\n" for path in policies[1:])
    with open(config, "w", encoding="utf-8") as f:
        f.write(_CONFIG.format(socket=socket, policy=policies[0], extra=includes))
    os.chmod(config, 0o644)
    return config, f"unix:path={socket}"


def _reachable_by_all(directory: str) -> bool:
    path = os.path.abspath(directory)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def _bus_user(directory: str) -> tuple[int, int] | None:
    """Who the private bus runs as: Debian's system bus user, else nobody; root only
    where they could not reach ``directory``.

    Not root, as a system bus never is: dbus-daemon started as root insists on raising
    its fd limit to 65536, which a container's lower hard limit refuses ("Failed to set
    fd limit to 65536" on every start); unprivileged, it keeps the limit it is given.
    """
    if not _reachable_by_all(directory):
        return None
    for name in ("messagebus", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    return 65534, 65534


def _die_with_parent(parent: int) -> Callable[[], None]:
    """The bus ends when the process that started it ends, even by SIGKILL: a bus left
    behind would keep the socket, and a second one started on it would lose it when
    the first exits and unlinks it."""

    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return setup


def _refuse_a_live_socket(socket_path: str) -> None:
    """A bus that still listens there belongs to a uniond that is still running."""
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        probe.connect(socket_path)
    except OSError:
        return  # nothing listens: a socket file left by a bus that died, replaced below
    finally:
        probe.close()
    raise Failed(f"a bus already listens on {socket_path}: is another uniond running with its private bus?")


def start(directory: str, policy: Path | None = None, extra: Sequence[Path] = ()) -> tuple[subprocess.Popen, str]:
    """Start dbus-daemon on a private socket; return the process and its address."""
    config, address = write_config(directory, policy, extra)
    socket_path = address.removeprefix("unix:path=")
    _refuse_a_live_socket(socket_path)
    user = _bus_user(directory)
    if user is not None:
        os.chown(directory, *user)  # the bus makes (and at exit removes) its socket there
    uid, gid = user or (None, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
    process = subprocess.Popen(
        ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}", "--print-address=1"],
        stdout=subprocess.PIPE,
        env=env,
        # Its own session: a Ctrl-C in the terminal reaches uniond alone, which stops
        # cleanly and then ends the bus, instead of both racing.
        start_new_session=True,
        user=uid,
        group=gid,
        extra_groups=None if user is None else [],
        # After the change of user, which would clear it.
        preexec_fn=_die_with_parent(os.getpid()),
    )
    assert process.stdout is not None
    printed = process.stdout.readline().decode().strip()
    if not printed:
        process.wait(timeout=5)
        raise Failed(f"dbus-daemon exited with {process.returncode} before listening")
    return process, address
