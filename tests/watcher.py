"""Lists a directory as fast as it can, from a process of its own, until a file appears.

Usage: watcher.py DIRECTORY STOPFILE. Prints one JSON line when stopped: how many
listings were taken and each distinct listing seen (sorted names), with its count.
Used to prove that a mountpoint never shows an empty directory while its stack changes.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter


def main() -> None:
    directory, stop = sys.argv[1], sys.argv[2]
    seen: Counter[tuple[str, ...]] = Counter()
    errors: Counter[str] = Counter()
    print("started", flush=True)
    while not os.path.exists(stop):
        for _ in range(200):
            try:
                seen[tuple(sorted(os.listdir(directory)))] += 1
            except OSError as e:
                errors[e.strerror or str(e)] += 1
    print(json.dumps({"listings": sum(seen.values()), "seen": [[list(k), v] for k, v in seen.items()],
                      "errors": dict(errors)}), flush=True)


if __name__ == "__main__":
    main()
