"""Scoring benchmarks: the job with 1 and 2 workers against the plain loop and a decoder-only floor;
10k rows end to end with Ray's start; peak memory at 1x and 10x rows. Arms side by side in one run.

    python benchmarks/score_throughput.py [--rows 50000] [--repeats 3] [--mc-samples 16] [--iw-samples 64]
                                          [--model-dir DIR]

Data: adult rows resampled (with replacement) to --rows records with fresh ids, 20% of cells nulled, in
--shards Parquet files. Model: --model-dir, or one trained here in-process on adult with the job's
default widths (latent 8, hidden 128-128), 1 epoch: its quality does not matter for throughput.
S and K default to the job's defaults (16 and 64).

Arms, each on the same files:
* ``job, N worker(s)``: ``vaepipe score --workers N`` end to end (pre-flight, id read, Ray Data read ->
  scoring tasks -> write, reconciliation, publish), wall clock, in-process on one local Ray instance started
  beforehand (its start-up is not counted), after one job with the most workers on the same files, listed
  apart (``first job after Ray's start``): the first job in a fresh instance took 4-6 s longer on 20,000
  rows on 2 cores (Ray's first worker processes import torch, the first Ray Data plan), whichever arm it
  was, and so biased the ratio of whichever arm ran first;
* ``plain loop``: one process, ``pyarrow.parquet`` read, batches of --batch-size across the files as the
  job cuts them -> the same ``split_and_score`` (which calls
  ``core.scoring.score_batch``) -> ``ParquetWriter``, torch with one thread (like one worker), with the
  Ray instance idle beside it; and the same without the per-column conditional scores
  (``--conditional-samples 0``: S and K samples only), after Ray's shutdown;
* the job arms and the plain loop run in --repeats interleaved rounds (1 worker, 2 workers, plain; again):
  a shared machine's speed drifts within minutes by more than the arms differ, so each arm's median is
  what the ratios compare (every run is printed beside it);
* ``decoder floor``: the decoder network alone (``model.generative``) on max(S, K) latent samples per
  record, one thread, batches of --batch-size: what no scorer can beat on this model;
* ``e2e 10k`` / ``e2e 10x``: ``vaepipe score`` as a user runs it (a fresh process starting its own local
  Ray) on 10,000 rows and on 100,000 rows; wall clock and the CPU time of each of its processes (the job's
  own, Ray's workers by task or actor, Ray's daemons), then each again for its peak memory (PSS of the
  job's process tree), sampled in a run of its own because reading PSS takes the kernel about half a core.

The machine may be shared: ratios of arms measured in the same run mean more than absolute figures, and
the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import DATA, dataset_spec  # noqa: E402
from procmem import cpu_line, load_line, run_child  # noqa: E402

from jobs import score  # noqa: E402
from pipeline.core import artifact  # noqa: E402
from pipeline.core.artifact import load_model, save_model  # noqa: E402
from pipeline.score.scorer import split_and_score  # noqa: E402
from pipeline.score.settings import ScoreSettings, output_schemas, serialize_schema  # noqa: E402
from schemas.output_table import PARQUET_COMPRESSION, ROW_GROUP_ROWS  # noqa: E402


def make_data(directory: Path, rows: int, shards: int, seed: int = 0) -> None:
    src = pq.read_table(DATA / "adult" / "adult.parquet")
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    per = -(-rows // shards)
    for s in range(shards):
        n = min(per, rows - s * per)
        t = src.take(rng.integers(0, src.num_rows, n))
        cols = {"record_id": pa.array(np.arange(s * per, s * per + n, dtype=np.int64))}
        for name in t.column_names[1:]:
            col = t.column(name).combine_chunks()
            mask = pa.array(rng.random(n) < 0.2)
            cols[name] = pa.compute.if_else(mask, pa.scalar(None, col.type), col)
        pq.write_table(pa.table(cols), directory / f"part-{s:03d}.parquet", row_group_size=ROW_GROUP_ROWS)


def train_model(model_dir: Path, epochs: int, latent_dim: int, hidden: list[int]) -> None:
    from pipeline.core.codec import TableCodec, fit_families, partial_stats
    from pipeline.core.model import VAE, VAEConfig
    from pipeline.core.training import TrainConfig, fit

    spec = dataset_spec("adult")
    table = pq.read_table(DATA / "adult" / "adult.parquet")
    families = fit_families(spec, partial_stats(spec, table))
    model = VAE(families, VAEConfig(latent_dim=latent_dim, hidden=tuple(hidden)))
    fit(model, TableCodec(spec, families).encode(table), TrainConfig(epochs=epochs, patience=0, kl_warmup_epochs=1))
    save_model(str(model_dir), model, spec)


def plain_loop(data: Path, model_dir: str, out: Path, args, conditional: bool = True) -> int:
    """The job's scoring in one process; ``conditional=False``: without the per-column conditional scores
    (``--conditional-samples 0``), the S and K samples alone, as the decoder floor counts them."""
    from pipeline.core.defaults import DEFAULT_CONDITIONAL_SAMPLES

    torch.set_num_threads(1)
    art = load_model(model_dir)
    files = sorted(data.glob("*.parquet"))
    in_schema = pq.read_schema(files[0])
    settings = ScoreSettings(
        model_dir=model_dir, run_id="plain", input_schema=serialize_schema(in_schema.remove_metadata()),
        mc_samples=args.mc_samples, iw_samples=args.iw_samples,
        conditional_samples=DEFAULT_CONDITIONAL_SAMPLES if conditional else 0,
    )  # fmt: skip
    sschema, qschema = output_schemas(art, settings)
    out.mkdir(parents=True)
    rows = 0
    # batches of --batch-size across the files, as the job cuts them (its driver reads a small input whole)
    table = pa.concat_tables([pq.read_table(f, columns=art.spec.columns) for f in files]).combine_chunks()
    with pq.ParquetWriter(out / "scores.parquet", sschema, compression=PARQUET_COMPRESSION) as writer:
        for start in range(0, table.num_rows, args.batch_size):
            scored, quarantined = split_and_score(
                art, table.slice(start, args.batch_size), sschema, qschema, args.mc_samples, args.iw_samples,
                conditional_samples=settings.conditional_samples,
            )  # fmt: skip
            writer.write_table(scored, row_group_size=ROW_GROUP_ROWS)
            rows += scored.num_rows + quarantined.num_rows
    return rows


def decoder_floor(model_dir: str, rows: int, samples: int, batch_size: int) -> float:
    """Seconds for the decoder network alone on `samples` latent draws for each of `rows` records."""
    from pipeline.core.scoring import samples_per_pass

    torch.set_num_threads(1)
    model = load_model(model_dir).model.eval()
    n = min(rows, batch_size)
    chunk = samples_per_pass(n, torch.device("cpu"))  # the same samples per pass as score_batch
    z = torch.randn(min(chunk, samples), n, model.latent_dim)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(0, rows, n):
            for first in range(0, samples, chunk):
                model.generative(z[: min(samples, first + chunk) - first])
    return time.perf_counter() - t0


def e2e(data: Path, model_dir: str, out: Path, args, memory: bool) -> tuple[float, float | None]:
    """vaepipe score in a fresh process (its own Ray start): (seconds, peak MiB). ``memory``: its peak PSS
    sampled, in a run whose time does not count (the sampling takes about half a core: benchmarks/procmem.py)."""
    shutil.rmtree(out, ignore_errors=True)
    # the console script's entry (pipeline.cli), as `vaepipe score` runs
    cmd = [sys.executable, "-m", "pipeline.cli", "score", "--data", str(data), "--model-dir", model_dir]
    cmd += ["--output", str(out)]
    cmd += ["--run-date", "2026-01-01", "--mc-samples", str(args.mc_samples), "--iw-samples", str(args.iw_samples)]
    cmd += ["--workers", str(max(args.workers))]
    run = run_child(cmd, cwd=str(ROOT), memory=memory)
    print(f"  {cpu_line(run)}", flush=True)
    return run.seconds, run.peak_mib


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--iw-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096, help="the job's default")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--epochs", type=int, default=1, help="epochs when training the benchmark model here")
    p.add_argument("--latent-dim", type=int, default=8, help="of the model trained here")
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="of the model trained here")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-e2e", action="store_true", help="skip the fresh-process 10k / 100k runs")
    p.add_argument("--e2e-rows", type=int, nargs=2, default=[10_000, 100_000], help="rows of the two fresh runs")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the job arms and the plain loop, interleaved; the table shows each arm's median")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    from pipeline.runtime import retain_freed_memory

    retain_freed_memory()  # the plain loop and the floor run here: the allocator as in the job's processes
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vaepipe-bench-"))
    data = work / f"data-{args.rows}"
    if not data.exists():
        t0 = time.perf_counter()
        make_data(data, args.rows, args.shards)
        print(f"generated {args.rows:,} rows in {args.shards} shards ({time.perf_counter() - t0:.0f} s)")
    model_dir = args.model_dir or str(work / "model")
    if not Path(model_dir, artifact.META).exists():
        train_model(Path(model_dir), args.epochs, args.latent_dim, args.hidden)
    art = load_model(model_dir)
    print(f"model {art.model_id}: latent_dim {art.model.latent_dim}, hidden {art.model.config.hidden}; "
          f"S={args.mc_samples} K={args.iw_samples}, batch {args.batch_size}")  # fmt: skip
    print(f"start: {load_line()}", flush=True)

    import ray

    from pipeline.runtime import init_ray

    init_ray(None, num_cpus=max(os.cpu_count() or 1, max(args.workers)))  # as the job starts one
    common = ["--data", str(data), "--model-dir", model_dir, "--run-date", "2026-01-01"]
    common += ["--batch-size", str(args.batch_size), "--mc-samples", str(args.mc_samples)]
    common += ["--iw-samples", str(args.iw_samples)]
    # the first job of the instance, listed apart, then the measured arms
    def job_arm(workers: int) -> str:
        return f"job, {workers} worker{'s' if workers > 1 else ''}"

    most = max(args.workers)  # every worker process the arms use has run a job before them
    runs: dict[str, list[float]] = {}  # arm -> seconds of each run
    plain_cpu: list[float] = []  # CPU seconds of each plain-loop run

    def run_job(name: str, w: int, i: int) -> bool:
        out = work / f"out-{i}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rc = score.main([*common, "--output", str(out), "--workers", str(w)])
        seconds = time.perf_counter() - t0
        if rc != 0:
            print(f"{name} failed (exit {rc})")
            return False
        runs.setdefault(name, []).append(seconds)
        print(f"{name}: {seconds:.1f} s; {load_line()}", flush=True)
        return True

    if not run_job(f"{job_arm(most)}, first job after Ray's start", most, 0):
        return 1
    plain_name = "plain loop (1 process)"
    # the arms interleaved, round after round: a shared machine's speed drifts by more than the arms differ
    for r in range(args.repeats):
        for w in args.workers:
            if not run_job(job_arm(w), w, w):
                return 1
        out = work / "out-plain"
        shutil.rmtree(out, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        assert plain_loop(data, model_dir, out, args) == args.rows
        runs.setdefault(plain_name, []).append(time.perf_counter() - t0)
        plain_cpu.append(time.process_time() - c0)
        print(f"{plain_name}: {runs[plain_name][-1]:.1f} s (round {r + 1}); {load_line()}", flush=True)
    ray.shutdown()
    cpu = {plain_name: float(np.median(plain_cpu))}
    bare = "plain loop, no conditional scores"
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    assert plain_loop(data, model_dir, out, args, conditional=False) == args.rows
    runs[bare] = [time.perf_counter() - t0]
    cpu[bare] = time.process_time() - c0
    samples = max(args.mc_samples, args.iw_samples)
    floor_name = f"decoder floor ({samples} samples)"
    c0 = time.process_time()
    runs[floor_name] = [decoder_floor(model_dir, args.rows, samples, args.batch_size)]
    cpu[floor_name] = time.process_time() - c0

    small = {}
    if not args.skip_e2e:
        for rows in args.e2e_rows:
            d = work / f"data-{rows}"
            if not d.exists():
                make_data(d, rows, args.shards)
            seconds, _ = e2e(d, model_dir, work / f"out-e2e-{rows}", args, memory=False)
            print(f"e2e {rows:,} rows: {seconds:.1f} s; {load_line()}", flush=True)
            _, peak = e2e(d, model_dir, work / f"out-e2e-{rows}", args, memory=True)
            print(f"e2e {rows:,} rows, memory sampled: peak {peak:,.0f} MiB; {load_line()}", flush=True)
            small[rows] = seconds, peak
    print(f"end: {load_line()}")

    order = [n for n in runs if n.startswith("job")] + [plain_name, bare, floor_name]
    median = {name: float(np.median(runs[name])) for name in order}
    rate = {name: args.rows / seconds for name, seconds in median.items()}
    plain = rate[plain_name]
    print(f"\n{'arm':<44}{'seconds':>9}{'rows/s':>10}{'vs plain':>9}   runs (s, in order; seconds: their median)")
    for name in order:
        each = " ".join(f"{x:.1f}" for x in runs[name])
        print(f"{name:<44}{median[name]:>9.1f}{rate[name]:>10,.0f}{rate[name] / plain:>8.2f}x   {each}")
    print(f"\ntargets (ratios of the medians above; {args.repeats} interleaved rounds of the jobs and the plain loop):")
    if "job, 1 worker" in rate and "job, 2 workers" in rate:
        print(f"  2 workers / 1 worker = {rate['job, 2 workers'] / rate['job, 1 worker']:.2f} (target >= 1.7)")
    if "job, 1 worker" in rate:
        print(f"  job with 1 worker / plain loop = {rate['job, 1 worker'] / plain:.2f} (target >= 0.9)")
    floor = rate[floor_name]
    by_cpu = cpu["plain loop (1 process)"] / cpu[floor_name]
    print(
        f"  plain loop / decoder floor, time per row = {floor / plain:.2f} by wall clock, {by_cpu:.2f} by CPU time "
        "(target <= 1.5)"
    )
    print(
        f"  plain loop without the conditional scores / decoder floor = {floor / rate[bare]:.2f} by wall clock, "
        f"{cpu[bare] / cpu[floor_name]:.2f} by CPU time (the samples the floor counts: S and K only)"
    )
    if small:
        (r1, (s10, m10)), (r2, (s100, m100)) = small.items()
        w = max(args.workers)
        print(f"  {r1:,} rows end to end, Ray start included ({w} workers): {s10:.1f} s (target for 10k: <= 8 s)")
        print(f"  {r2:,} rows end to end: {s100:.1f} s; peak memory {r2:,} / {r1:,} rows = {m100:,.0f} / {m10:,.0f} "
              f"MiB = {m100 / m10:.2f} (target at 10x rows: <= 1.2)")  # fmt: skip
    print(f"workdir {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
