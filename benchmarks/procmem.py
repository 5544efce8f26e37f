"""Benchmark helpers: run a command as a child process and sample the memory of its whole process tree.

Memory is the peak, sampled every 50 ms, of the summed PSS (proportional set size: shared pages counted
once) of the child and every process it started (Ray's raylet, GCS, workers). Linux only (reads /proc).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} cores"


def _children(pid: int) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(parents.get(p, []))
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class ChildRun:
    seconds: float  # wall clock, spawn to exit
    peak_mib: float  # peak summed PSS of the process tree
    returncode: int
    stdout: str
    stderr: str


def run_child(argv: list[str], cwd: str, env: dict | None = None, timeout: float | None = None) -> ChildRun:
    """Run argv, sampling the PSS of its process tree; raises when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(_pss_kib(p) for p in _children(proc.pid)))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        t.join()
    seconds = time.perf_counter() - t0
    run = ChildRun(seconds, peak[0] / 1024, proc.returncode, out, err)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{err[-3000:]}")
    return run
