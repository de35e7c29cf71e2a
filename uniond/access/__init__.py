"""The access room: who calls, where they may point the daemon, and what they may do.

It owns the Caller value, caller paths (checked for form, opened once without
symlinks, placed below an allowed root: ``paths.Places`` is the one way in), what a
caller could reach by itself (``reach``), and polkit's rules (``polkit``; the D-Bus call
itself is handed in by the service room). It may import ``uniond.kernel`` and the
top-level ``errors``/``constants``.
"""
