"""The layers room: what a mount changed and how layers travel.

It owns reading a Diff from an upper (D1-D6), walking an upper, building a layer
directory safely (the Builder), the caller's file descriptor (checks, streaming), layer
tars in both directions (compressed, with their digests), whole image archives and the
layer store they unpack into, and Commit's copy. It works on directories and descriptors it
is handed, never on mounts or callers, and may import ``uniond.kernel`` and the
top-level ``errors``/``constants``.
"""
