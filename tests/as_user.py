"""Run Client calls as whoever started this script (tests start it under setpriv).

argv: the bus address; stdin: a JSON list of [method, *args, options]. Prints a JSON list
with, per call, ["ok", result] or ["error", name, text].
"""

import json
import sys

from harness import CallError, Client

client = Client(sys.argv[1])
results = []
for method, *args in json.load(sys.stdin):
    *positional, options = args
    try:
        results.append(["ok", getattr(client, method)(*positional, **options)])
    except CallError as e:
        results.append(["error", e.name, e.text])
client.close()
print(json.dumps(results))
