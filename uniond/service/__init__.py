"""The service room: the process and its D-Bus face.

It owns the bus connection and the exported interfaces (the only code that imports
dbus-next, which only translates to and from the mounts room), the private bus of
``./dev run``, sd_notify, logging, signals and start-up order. It may import every
other room; nothing imports it.
"""
