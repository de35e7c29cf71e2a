"""Stops, lost buses and hostile messages: every call gets an answer (while there is a
bus to answer on), and the log never gets a traceback."""

from __future__ import annotations

import asyncio
import os

import pytest
from dbus_next import Message, MessageType, Variant
from harness import CallError

from uniond import constants

E = constants.ERROR_PREFIX
NOT_IN_LOG = ("Traceback", "Future exception was never retrieved", "Exception in callback", "CancelledError")


def _stuck_export(client, layers):
    """An ExportDiff that cannot finish: nobody reads its pipe, which is full."""
    t = layers
    path = client.mount([t / "image1"], t / "upper", t / "merge")
    (t / "merge/big").write_bytes(os.urandom(4 << 20))
    read_end, write_end = os.pipe()
    msg = Message(destination=constants.BUS_NAME, path=constants.MANAGER_PATH, interface=constants.MANAGER_INTERFACE,
                  member="ExportDiff", signature="oha{sv}", body=[path, 0, {}], unix_fds=[write_end])
    pending = asyncio.ensure_future(client.bus.call(msg), loop=client.loop)
    client.pump(0.3)
    os.close(write_end)
    assert not pending.done()
    return pending, read_end


def test_a_stop_answers_the_calls_in_flight(daemon, client, layers):
    pending, read_end = _stuck_export(client, layers)
    try:
        assert daemon.stop() == 0
        reply = client.loop.run_until_complete(asyncio.wait_for(pending, 10))
        assert reply.message_type == MessageType.ERROR
        assert reply.error_name == f"{E}.Failed" and "stopping" in reply.body[0]
    finally:
        os.close(read_end)
    log = daemon.log()
    assert not [word for word in NOT_IN_LOG if word in log], log[-3000:]


def test_a_lost_bus_with_calls_in_flight_exits_without_traceback(daemon, client, layers, bus):
    pending, read_end = _stuck_export(client, layers)
    try:
        bus.process.kill()
        assert daemon.process.wait(timeout=15) == 1
    finally:
        os.close(read_end)
        bus.process.wait()
    log = daemon.log()
    assert "lost the bus connection" in log
    assert not [word for word in NOT_IN_LOG if word in log], log[-3000:]


PROPERTIES = "org.freedesktop.DBus.Properties"


def _fuzz_calls(mount: str):
    """What dfuzzer sends: properties of interfaces that do not exist, on every object."""
    for path in (constants.MANAGER_PATH, mount, "/org/uniond1/nothing"):
        for interface in ("org.example.Nothing", "", constants.MOUNT_INTERFACE, constants.MANAGER_INTERFACE,
                          "org.freedesktop.DBus.Peer"):
            yield path, PROPERTIES, "Get", "ss", [interface, "Version"]
            yield path, PROPERTIES, "GetAll", "s", [interface]
            yield path, PROPERTIES, "Set", "ssv", [interface, "Id", Variant("s", "x")]
            yield path, PROPERTIES, "Set", "ssv", [interface, "Version", Variant("as", ["a"])]
        yield path, PROPERTIES, "Get", "s", ["only one"]
        yield path, PROPERTIES, "Nothing", "", []
        yield path, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "as", [["x"]]
        yield path, "org.freedesktop.DBus.Peer", "Ping", "s", ["x"]
        yield path, "org.freedesktop.DBus.Introspectable", "Introspect", "i", [1]
        yield path, constants.MANAGER_INTERFACE, "Mount", "as", [["x"]]


def test_hostile_messages_get_an_error_answer_and_no_traceback(daemon, client, layers):
    t = layers
    mount = client.mount([t / "image1"], t / "upper", t / "merge")
    before = daemon.log()
    calls = list(_fuzz_calls(mount))
    answered = 0
    for path, interface, member, signature, body in calls:
        try:
            client.call_raw(constants.BUS_NAME, path, interface, member, signature, body)
        except CallError as e:
            assert e.name.startswith(("org.freedesktop.DBus.Error.", E)), e
            assert "Traceback" not in e.text and "\n" not in e.text
        answered += 1
    assert answered == len(calls)
    assert daemon.alive() and client.list() == [mount]
    new = daemon.log()[len(before):]
    assert not [word for word in NOT_IN_LOG if word in new], new[-3000:]
    assert len(new.splitlines()) <= len(calls), "at most one line per bad message"


def test_answers_to_unknown_properties_are_errors(client, layers):
    t = layers
    mount = client.mount([t / "image1"], t / "upper", t / "merge")
    with pytest.raises(CallError) as e:
        client.call_raw(constants.BUS_NAME, mount, PROPERTIES, "GetAll", "s", ["org.example.Nothing"])
    assert e.value.name == "org.freedesktop.DBus.Error.UnknownInterface"
    with pytest.raises(CallError) as e:
        client.call_raw(constants.BUS_NAME, mount, PROPERTIES, "Set", "ssv",
                        [constants.MOUNT_INTERFACE, "Id", Variant("s", "x")])
    assert e.value.name == "org.freedesktop.DBus.Error.PropertyReadOnly"
