"""Fork a manager from a lean process, as a daemon embeds one, and keep it until stdin closes.

    python bench/launch_manager.py SOCKET_PATH

Prints the manager's pid. Its memory is what tests/test_memory.py and bench/bench.py
measure: the forked child owns only what it writes.
"""

import sys

import shmstore

server = shmstore.start_server(sys.argv[1])
print(server.pid, flush=True)
sys.stdin.read()
server.stop()
