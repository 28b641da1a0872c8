"""The background builder's first process (`background.py` starts it): standard library only, so that it
runs within milliseconds of starting, before the build has taken any CPU.

    python -I build_supervisor.py SPEC LOCK FAILED      # -I: nothing but the standard library on sys.path

It takes LOCK (or leaves, when another builder has it), runs the build in a child process (its own process
group: the C++ compiler's processes too), and stops that child (SIGSTOP) whenever some process on the machine
is generating (it holds the shared lock `generating.lock` beside LOCK), continuing it (SIGCONT) after: on a
2-core machine any work on the other core slows a decode by about a third, whatever its priority
(benchmarks/README.md, "The first run on a machine"). A failed build leaves a note in FAILED.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BUILD = ("import json, sys; from mixtral_edu.inference.background import build; "
         "build(json.loads(open(sys.argv[1]).read()))")


def held(lock: Path) -> bool:
    """Whether some process holds `lock` now (a builder its own lock, a generation the shared one)."""
    import fcntl      # POSIX only: here, not at the top, so that importing this module works everywhere

    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def supervise(spec: Path, lock: Path, failed: Path) -> None:
    import fcntl

    busy = lock.parent / "generating.lock"
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")      # no worker pool: one process group
        worker = subprocess.Popen([sys.executable, "-c", BUILD, str(spec)], env=env, process_group=0)
        paused = False
        try:
            while worker.poll() is None:
                if held(busy) != paused:
                    paused = not paused
                    os.killpg(worker.pid, signal.SIGSTOP if paused else signal.SIGCONT)
                time.sleep(0.05)
        except ProcessLookupError:          # it ended between the poll and the signal
            worker.wait()
        finally:
            if worker.poll() is None:         # the supervisor is leaving early: no stopped worker left behind
                os.killpg(worker.pid, signal.SIGKILL)
        if worker.returncode != 0:
            failed.write_text(f"the build exited with {worker.returncode}; its output is in the .log beside this\n")


if __name__ == "__main__":
    os.nice(19)
    if hasattr(os, "SCHED_IDLE"):    # a CPU running only such tasks counts as idle: the learner's threads take it
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    supervise(*(Path(a) for a in sys.argv[1:4]))
