"""Runs a command until it prints a line matching a pattern (HelloBench's
"ready"), then stops it. Prints the seconds from start to that line and the
bytes a network interface received meanwhile.

Usage: ready.py PATTERN RX_COUNTER_FILE TIMEOUT_SECS -- COMMAND [ARGS...]
"""
import os
import re
import select
import signal
import subprocess
import sys
import time

pattern, counter, timeout = re.compile(sys.argv[1]), sys.argv[2], float(sys.argv[3])
command = sys.argv[sys.argv.index("--") + 1:]


def rx():
    with open(counter) as f:
        return int(f.read())


before, start = rx(), time.monotonic()
child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, start_new_session=True)
ready = None
buffer = b""
while ready is None and time.monotonic() - start < timeout:
    readable, _, _ = select.select([child.stdout], [], [], 0.05)
    if not readable:
        if child.poll() is not None:
            break
        continue
    data = os.read(child.stdout.fileno(), 65536)
    if not data:
        break
    buffer += data
    for line in buffer.split(b"\n")[:-1]:
        if pattern.search(line.decode(errors="replace")):
            ready = (time.monotonic() - start, rx() - before)
            break
    buffer = buffer.rsplit(b"\n", 1)[-1]
if child.poll() is None:
    # SIGTERM to `skiff run` (or the shell of the baseline), which passes it on.
    os.killpg(child.pid, signal.SIGTERM)
try:
    child.wait(timeout=20)
except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
if ready is None:
    sys.exit(f"ready.py: no line matched {sys.argv[1]!r} within {timeout} s: {command}")
print(f"{ready[0]:.4f} {ready[1]}")
