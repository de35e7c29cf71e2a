"""A client that asks for a mount bound to something, then stays until it is killed.

argv: the bus address, the bind word, the mountpoint, the lowers. Prints the mount's
object path (or the error) and waits; tests kill it to end its bus connection.
"""

import json
import sys
import time

from harness import CallError, Client

address, bind, mountpoint, *lowers = sys.argv[1:]
client = Client(address)
try:
    print(json.dumps(["ok", client.mount(lowers, "", mountpoint, bind=bind)]), flush=True)
except CallError as e:
    print(json.dumps(["error", e.name, e.text]), flush=True)
while True:
    time.sleep(60)
