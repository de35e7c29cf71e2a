"""The kernel room: system calls, the mount table, who holds a mount, and making and
removing overlay mounts.

It owns every conversation with the kernel about mounts (the new mount API through
ctypes, /proc/self/mountinfo, /proc/PID links) and the MountSpec that describes one
mount. It imports nothing of uniond but ``uniond.errors`` and ``uniond.constants``:
whatever decides *whether* to mount lives above it.
"""
