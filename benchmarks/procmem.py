"""Benchmark helpers: run a command as a child process and sample the memory and CPU of its whole process tree.

Memory is the peak, sampled every 50 ms, of the summed PSS (proportional set size: shared pages counted
once) of the child and every process it started (Ray's raylet, GCS, workers). CPU is each process's user
plus system time at its last sample, summed by what the process is (:func:`process_name`): where a job's
CPU goes beside its own work. Linux only (reads /proc).

Reading PSS is not free: the kernel walks every page table of the tree for ``smaps_rollup``, about 50 ms of
CPU a round for a Ray Train job of two workers (15 processes), half a core at 50 ms intervals. On a 2-core
machine that took a core's share from the job it measured: a 2-worker training job ran its epochs at
30,000 rows/s while sampled and 46,000 unsampled, the same run. So a timed run samples CPU alone
(``memory=False``: /proc/PID/stat every 0.25 s, about 2 ms a round), and memory is measured in runs of
its own, whose times are not compared.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_and_title(pid: int) -> tuple[float, str] | None:
    """(user + system CPU seconds, command line) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline") as f:
            title = f.read().replace("\0", " ").strip()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, title


def process_name(title: str, root: bool = False) -> str:
    """What a process of a job's tree is: the job itself, a Ray worker by its task or actor (``ray::X``),
    or a Ray daemon by its program."""
    if root:
        return "the job's own process"
    if title.startswith("ray::"):
        name = title[5:].split()[0] if title[5:].split() else "?"
        return "ray worker, idle" if name == "IDLE" else f"ray::{name.split('.')[0]}"
    words = title.split()
    prog = next((w for w in words[1:] if w.endswith(".py")), words[0] if words else "?")
    return os.path.basename(prog)


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
    peak_mib: float | None  # peak summed PSS of the process tree (None: not sampled, ``memory=False``)
    cpu_by_process: dict[str, float]  # CPU seconds of the tree's processes, summed by process_name
    returncode: int
    stdout: str
    stderr: str
    sampler_cpu_s: float = 0.0  # CPU time the sampling itself took (this process's sampler thread)


def run_child(
    argv: list[str], cwd: str, env: dict | None = None, timeout: float | None = None, memory: bool = True
) -> ChildRun:
    """Run argv, sampling the CPU time (and with ``memory``, the PSS) of its process tree; raises when it
    fails. A run whose time is compared passes ``memory=False`` (the module doc says why)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    sampler_cpu = [0.0]
    interval = 0.05 if memory else 0.25
    stop = threading.Event()
    cpu_of: dict[int, float] = {}  # pid -> CPU seconds at its last sample
    titles: dict[int, Counter] = {}  # pid -> how often each title was seen (a Ray worker's is its task's)

    def sample():
        while not stop.is_set():
            pids = _children(proc.pid)
            if memory:
                peak[0] = max(peak[0], sum(_pss_kib(p) for p in pids))
            for p in pids:
                got = _cpu_and_title(p)
                if got is not None:
                    cpu_of[p] = got[0]
                    titles.setdefault(p, Counter())[got[1]] += 1
            sampler_cpu[0] = time.thread_time()
            stop.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        t.join()
    seconds = time.perf_counter() - t0
    cpu: dict[str, float] = {}
    for p, secs in cpu_of.items():
        # a worker is named by the task or actor it ran most often, not by the IDLE it shows between tasks
        busy = [(n, t) for t, n in titles[p].items() if t and not t.startswith("ray::IDLE")]
        idle = "ray::IDLE" if any(t.startswith("ray::IDLE") for t in titles[p]) else "?"
        name = process_name(max(busy)[1] if busy else idle, root=p == proc.pid)
        cpu[name] = cpu.get(name, 0.0) + secs
    by_cpu = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
    peak_mib = peak[0] / 1024 if memory else None
    run = ChildRun(seconds, peak_mib, by_cpu, proc.returncode, out, err, sampler_cpu[0])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{err[-3000:]}")
    return run


def cpu_line(run: ChildRun, top: int = 12) -> str:
    """'CPU s by process: total T; name s, name s, ...' (the largest first)."""
    parts = [f"{name} {secs:.1f}" for name, secs in list(run.cpu_by_process.items())[:top]]
    total = sum(run.cpu_by_process.values())
    head = f"CPU s by process: total {total:.1f} in {run.seconds:.1f} s (sampling it: {run.sampler_cpu_s:.1f})"
    return f"{head}; " + ", ".join(parts)
