"""A private system-like bus for machines that have no system bus (containers, CI).

It runs a real dbus-daemon whose configuration mirrors Debian's system bus and
includes uniond's own shipped policy file, so what works here works on a real system
bus. Tests start their bus with the same configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

POLICY_NAME = "org.uniond1.conf"

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
        Path(__file__).resolve().parents[2] / "dbus" / POLICY_NAME,  # uniond/service/ -> the tree
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{POLICY_NAME} not found in any of: {', '.join(map(str, candidates))}")


def write_config(directory: str, policy: Path | None = None, extra: Sequence[Path] = ()) -> tuple[str, str]:
    """Write the bus configuration; return (config path, bus address).

    ``extra`` policy files are included after uniond's own: the tests use one to let a
    polkit mock own its name, as polkit's own policy file does on a real system.
    """
    os.makedirs(directory, mode=0o755, exist_ok=True)
    socket = os.path.join(directory, "system_bus_socket")
    config = os.path.join(directory, "bus.conf")
    includes = "".join(f"  <include>{path}</include>\n" for path in extra)
    with open(config, "w", encoding="utf-8") as f:
        f.write(_CONFIG.format(socket=socket, policy=policy or find_policy(), extra=includes))
    return config, f"unix:path={socket}"


def start(directory: str, policy: Path | None = None, extra: Sequence[Path] = ()) -> tuple[subprocess.Popen, str]:
    """Start dbus-daemon on a private socket; return the process and its address."""
    config, address = write_config(directory, policy, extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
    process = subprocess.Popen(
        ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}", "--print-address=1"],
        stdout=subprocess.PIPE,
        env=env,
        # Its own session: a Ctrl-C in the terminal reaches uniond alone, which stops
        # cleanly and then ends the bus, instead of both racing.
        start_new_session=True,
    )
    assert process.stdout is not None
    printed = process.stdout.readline().decode().strip()
    if not printed:
        process.wait(timeout=5)
        raise RuntimeError(f"dbus-daemon exited with {process.returncode} before listening")
    return process, address
