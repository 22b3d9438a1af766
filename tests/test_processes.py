"""Worker processes die with their parent: the Linux kernel request and the portable watchdog."""
import os
import subprocess
import sys
import time

import pytest

from minicompact.system.processes import pid_alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORPHAN = """
import os, sys, time
from minicompact.system import processes
if sys.argv[1] == "watchdog-only":
    processes._kill_on_parent_exit = lambda: False
# "prctl": the watchdog's first look comes after the test gives up, so only the kernel can act.
interval = 3600 if sys.argv[1] == "prctl" else 0.05
parent = os.getpid()
child = os.fork()
if child == 0:
    processes.die_with_parent(parent, interval=interval)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(0.3)  # let the child start watching, then die without any cleanup
os._exit(0)
"""


def alive(pid):
    """A running process (a zombie, which an init that does not reap may keep, is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["prctl", "watchdog-only"])
def test_child_exits_when_its_parent_dies_without_cleanup(how):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", ORPHAN, how], capture_output=True, text=True,
                         timeout=30, env=env, check=True)
    child = int(out.stdout.split()[0])
    assert wait_dead([child]) == [], f"child {child} outlived its parent ({how})"


def test_pid_alive():
    assert pid_alive(os.getpid()) and pid_alive(os.getppid())
    assert not pid_alive(2 ** 22 + 1)  # above Linux's largest pid_max
