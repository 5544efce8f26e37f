"""Rows/s of the whole scoring job (1 and 2 workers) against a plain single-process loop, same files, same run.

    python benchmarks/score_throughput.py [--rows 1000000] [--mc-samples 4] [--iw-samples 8] [--model-dir DIR]

Data: adult rows resampled (with replacement) to --rows records with fresh ids, 20% of cells nulled, in
--shards Parquet files. Model: --model-dir, or a model trained here in-process on adult (latent 4,
hidden 32-32 as in the tests' fixture by default, 2 epochs; its quality does not matter for throughput).

Measured, each on the same files:
* ``job, N workers``: ``vaepipe score`` end to end (pre-flight, id read, Ray Data read -> scoring actors ->
  write, reconciliation, publish), wall clock, in-process on one local Ray instance started beforehand
  (its start-up is not counted);
* ``plain loop``: one process, ``pyarrow.parquet`` read -> the same ``split_and_score`` -> ``ParquetWriter``,
  with torch using one thread (like one actor).

Sample counts default to S=4, K=8 (the job's defaults are 16 and 64) so 1M rows run in minutes on 2 cores;
cost per row grows with max(S, K).
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

from helpers import DATA, dataset_spec  # noqa: E402

from jobs import score  # noqa: E402
from pipeline.core import artifact  # noqa: E402
from pipeline.core.artifact import load_model, save_model  # noqa: E402
from pipeline.score.scorer import ScoreSettings, output_schemas, serialize_schema, split_and_score  # noqa: E402
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


def plain_loop(data: Path, model_dir: str, out: Path, args) -> int:
    torch.set_num_threads(1)
    art = load_model(model_dir)
    files = sorted(data.glob("*.parquet"))
    in_schema = pq.read_schema(files[0])
    settings = ScoreSettings(
        model_dir=model_dir, run_id="plain", input_schema=serialize_schema(in_schema.remove_metadata()),
        mc_samples=args.mc_samples, iw_samples=args.iw_samples,
    )  # fmt: skip
    sschema, qschema = output_schemas(art, settings)
    out.mkdir(parents=True)
    rows = 0
    with pq.ParquetWriter(out / "scores.parquet", sschema, compression=PARQUET_COMPRESSION) as writer:
        for f in files:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=args.batch_size, columns=art.spec.columns):
                scored, quarantined = split_and_score(
                    art, pa.Table.from_batches([batch]), sschema, qschema, args.mc_samples, args.iw_samples
                )
                writer.write_table(scored, row_group_size=ROW_GROUP_ROWS)
                rows += scored.num_rows + quarantined.num_rows
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--mc-samples", type=int, default=4)
    p.add_argument("--iw-samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--epochs", type=int, default=2, help="epochs when training the benchmark model here")
    p.add_argument("--latent-dim", type=int, default=4, help="of the model trained here")
    p.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="of the model trained here")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vaepipe-bench-"))
    data = work / "data"
    if not data.exists():
        t0 = time.perf_counter()
        make_data(data, args.rows, args.shards)
        print(f"generated {args.rows:,} rows in {args.shards} shards ({time.perf_counter() - t0:.0f} s)")
    model_dir = args.model_dir or str(work / "model")
    if not Path(model_dir, artifact.META).exists():
        train_model(Path(model_dir), args.epochs, args.latent_dim, args.hidden)
    art = load_model(model_dir)
    print(f"model {art.model_id}: latent_dim {art.model.latent_dim}, hidden {art.model.config.hidden}; "
          f"S={args.mc_samples} K={args.iw_samples}, batch {args.batch_size}, {os.cpu_count()} cores")  # fmt: skip

    import ray

    ray.init(num_cpus=max(os.cpu_count() or 1, max(args.workers) + 1), include_dashboard=False, log_to_driver=False)
    results = []
    common = ["--data", str(data), "--model-dir", model_dir, "--run-date", "2026-01-01"]
    common += ["--batch-size", str(args.batch_size), "--mc-samples", str(args.mc_samples)]
    common += ["--iw-samples", str(args.iw_samples)]
    for w in args.workers:
        out = work / f"out-{w}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rc = score.main([*common, "--output", str(out), "--workers", str(w)])
        seconds = time.perf_counter() - t0
        if rc != 0:
            print(f"job with {w} workers failed (exit {rc})")
            return rc
        results.append((f"job, {w} worker{'s' if w > 1 else ''}", seconds))
    ray.shutdown()

    out = work / "out-plain"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    n = plain_loop(data, model_dir, out, args)
    results.append(("plain loop (1 process)", time.perf_counter() - t0))
    assert n == args.rows

    base = args.rows / results[-1][1]
    print(f"\n{'':<26}{'seconds':>10}{'rows/s':>12}{'vs plain':>10}")
    for name, seconds in results:
        rate = args.rows / seconds
        print(f"{name:<26}{seconds:>10.1f}{rate:>12,.0f}{rate / base:>10.2f}x")
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores); workdir {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
