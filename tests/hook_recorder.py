"""A second hook beside shmstore's, for tests that drive the real Claude Code: it appends
each payload, with the environment variables Claude gives its hooks, to the JSON-lines
file its argument names, so that a test can check what shmstore made of every event."""

import json
import os
import sys

ENV = ("CLAUDE_JOB_DIR", "CLAUDE_CODE_AGENT", "CLAUDE_CODE_SESSION_ATTENDED", "CLAUDE_PID", "CLAUDE_PROJECT_DIR")

if __name__ == "__main__":
    payload = json.loads(sys.stdin.buffer.read() or b"null")
    line = json.dumps({"payload": payload, "env": {name: os.environ.get(name) for name in ENV}})
    with open(sys.argv[1], "a", encoding="utf-8") as out:
        out.write(line + "\n")  # one write of a line under PIPE_BUF-free append: whole lines
