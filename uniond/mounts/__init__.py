"""The mounts room: the mounts the daemon owns, their record and their life cycle.

It owns the manager (Mount, Unmount, start-up), the plan that turns a request into
checked open directories, the journal and its records, option dictionaries,
reconciliation with the kernel, and the layer operations on mounts (``layerops``:
Diff, ExportDiff, ImportLayer, Commit, ExportLayer, ApplyLayer, with destdir claims
and freezing; ``imageops``: ImportImage, ExportImage). It knows
nothing of D-Bus; it may import ``access``, ``layers``, ``kernel`` and the top-level
``errors``/``constants``/``config``.
"""
