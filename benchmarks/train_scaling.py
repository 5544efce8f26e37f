"""Training benchmarks, printed side by side.

1. rows/s per epoch of ``vaepipe train`` on tests/data/adult with 1 and 2 Ray Train workers
   (the job's own per-epoch figure: training rows over the epoch's wall time, data loading included);
2. peak memory of the statistics pass (pipeline.train.data.statistics_pass) on adult (1x) and on 10x
   its rows (generated: 10 shards, record ids offset so every record is distinct). Each pass runs in
   a fresh process with its own local Ray; memory is the peak, sampled every 50 ms, of the summed PSS
   (proportional set size: shared pages counted once) of the driver and every Ray process it started.

    python benchmarks/train_scaling.py [--epochs 4] [--skip-throughput] [--skip-memory]

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADULT = ROOT / "tests" / "data" / "adult" / "adult.parquet"


def adult_spec_yaml(path: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import dataset_spec

    path.write_text(dataset_spec("adult").to_yaml())
    return str(path)


# ---- 1. rows/s, 1 vs 2 workers -------------------------------------------------------------------
def throughput(workdir: Path, epochs: int) -> dict[int, list[float]]:
    """Both runs in this process, on one local Ray instance (as a cluster would run them)."""
    import ray

    sys.path.insert(0, str(ROOT))
    from jobs import train
    from pipeline.core import artifact

    spec = adult_spec_yaml(workdir / "adult.yaml")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        for workers in (1, 2):
            model_dir = workdir / f"model-{workers}"
            args = ["--data", str(ADULT), "--spec", spec, "--model-dir", str(model_dir), "--workers", str(workers)]
            args += ["--epochs", str(epochs), "--patience", "0", "--kl-warmup-epochs", "1", "--batch-size", "256"]
            args += ["--reference-rows", "1000", "--baseline-rows", "1000", "--iw-samples", "4", "--mc-samples", "2"]
            t0 = time.perf_counter()
            if train.main(args) != 0:
                raise RuntimeError(f"training with {workers} worker(s) failed")
            meta = json.loads(Path(artifact.meta_path(str(model_dir))).read_text())
            out[workers] = [h["rows_per_s"] for h in meta["metrics"]]
            print(f"  {workers} worker(s): job wall time {time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        ray.shutdown()
    return out


# ---- 2. statistics pass memory ------------------------------------------------------------------
def make_data(workdir: Path, copies: int) -> Path:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(ADULT)
    d = workdir / f"adult-x{copies}"
    d.mkdir()
    for k in range(copies):
        ids = pc.add(
            table.column("record_id"), pa.scalar(k * 10 * table.num_rows, table.schema.field("record_id").type)
        )
        pq.write_table(
            table.set_column(table.schema.get_field_index("record_id"), "record_id", ids), d / f"{k:03d}.parquet"
        )
    return d


STATS_CHILD = """
import sys, json, time, ray
sys.path.insert(0, sys.argv[3])
from helpers import dataset_spec
from pipeline.io.inputs import preflight
from pipeline.train.data import statistics_pass
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
spec = dataset_spec("adult")
data = preflight(sys.argv[1], spec)
open(sys.argv[2], "w").write("ready")
time.sleep(2.0)
t0 = time.perf_counter()
stats = statistics_pass(data, spec, 0.1)
dt = time.perf_counter() - t0
open(sys.argv[2], "w").write(json.dumps({"rows": stats.rows, "seconds": dt}))
time.sleep(1.0)
ray.shutdown()
"""


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


def stats_memory(data_dir: Path, workdir: Path) -> dict:
    signal = workdir / f"signal-{data_dir.name}"
    errors = open(workdir / f"stderr-{data_dir.name}", "w+")  # noqa: SIM115 -- read back on failure
    proc = subprocess.Popen(
        [sys.executable, "-c", STATS_CHILD, str(data_dir), str(signal), str(ROOT / "tests")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=errors,
    )
    samples: list[tuple[str, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            phase = signal.read_text() if signal.exists() else ""
            total = sum(_pss_kib(p) for p in _children(proc.pid))
            samples.append((phase, total))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    proc.wait()
    stop.set()
    t.join()
    if proc.returncode != 0 or not signal.exists():
        errors.seek(0)
        raise RuntimeError(f"statistics pass on {data_dir.name} failed:\n{errors.read()[-3000:]}")
    result = json.loads(signal.read_text())
    idle = [m for ph, m in samples if ph == "ready"]
    during = [m for ph, m in samples if ph in ("ready", "")] + [m for ph, m in samples if ph.startswith("{")]
    result["idle_mib"] = (min(idle) if idle else 0) / 1024
    result["peak_mib"] = max(during) / 1024
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vaepipe-bench-") as tmp:
        workdir = Path(tmp)
        if not args.skip_throughput:
            print("rows/s per epoch on adult (32,561 rows; 90% train), 1 vs 2 workers:", flush=True)
            r = throughput(workdir, args.epochs)
            print(f"  {'epoch':>5} {'1 worker':>10} {'2 workers':>10} {'ratio':>6}")
            for e, (a, b) in enumerate(zip(r[1], r[2], strict=True)):
                print(f"  {e + 1:>5} {a:>10.0f} {b:>10.0f} {b / a:>6.2f}")
            med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            a, b = med(r[1][1:] or r[1]), med(r[2][1:] or r[2])
            print(f"  {'median':>5} {a:>10.0f} {b:>10.0f} {b / a:>6.2f}   (epochs 2.., the first includes start-up)")
        if not args.skip_memory:
            print("statistics pass, peak memory (PSS of driver + Ray processes):", flush=True)
            res = {}
            for copies in (1, 10):
                res[copies] = stats_memory(make_data(workdir, copies), workdir)
            print(f"  {'':>14} {'1x':>10} {'10x':>10} {'ratio':>6}")
            print(f"  {'rows':>14} {res[1]['rows']:>10} {res[10]['rows']:>10} {res[10]['rows'] / res[1]['rows']:>6.1f}")
            for key, label in (("idle_mib", "idle Ray MiB"), ("peak_mib", "peak MiB"), ("seconds", "seconds")):
                a, b = res[1][key], res[10][key]
                print(f"  {label:>14} {a:>10.1f} {b:>10.1f} {b / a:>6.2f}")
            grow = (res[10]["peak_mib"] - res[10]["idle_mib"]) / max(res[1]["peak_mib"] - res[1]["idle_mib"], 1e-9)
            print(
                f"  {'peak - idle':>14} {res[1]['peak_mib'] - res[1]['idle_mib']:>10.1f} "
                f"{res[10]['peak_mib'] - res[10]['idle_mib']:>10.1f} {grow:>6.2f}"
            )


if __name__ == "__main__":
    main()
