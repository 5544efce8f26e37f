"""vaepipe score: Ray Data batch scoring of Parquet records into the scores table partition for a run date.

The flags make a :class:`pipeline.score.run.ScoreOptions`; :func:`pipeline.score.run.run_scoring` does
the run (read -> map_batches -> write into staging, reconcile, publish, cleanup). See the README,
"How it fits together", and :mod:`pipeline.score.publish` for the publish guarantee.
"""

from __future__ import annotations

import sys

from pipeline import summary
from pipeline.runtime import add_ray_options, job_main, make_parser, options_from_args
from pipeline.score import iceberg
from pipeline.score.run import ScoreOptions, run_scoring


def build_parser():
    d = ScoreOptions(data="", model_dir="", output="")
    p = make_parser("vaepipe score", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--data", required=True, help="Parquet file, directory of shards, or glob (local or s3://)")
    p.add_argument("--model-dir", required=True, help="model artifact written by vaepipe train")
    p.add_argument("--output", required=True, help="scores table root; the run writes OUTPUT/dt=RUN_DATE")
    p.add_argument("--run-date", default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--mc-samples", type=int, default=d.mc_samples, help="Monte Carlo samples S per record")
    p.add_argument(
        "--iw-samples", type=int, default=d.iw_samples, help="importance samples K (0: log_marginal is null)"
    )
    p.add_argument(
        "--conditional-samples", type=int, default=d.conditional_samples,
        help="samples per feature for column_conditional_log_density (0: that column is null, scoring is faster)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=d.workers, help="scoring workers (each process loads the model once)")
    p.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker, help="GPUs per scoring worker (0: CPU)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="records per scoring batch")
    p.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="target rows per output file")
    p.add_argument("--seed", type=int, default=d.seed, help="noise seed (outputs do not depend on batching)")
    p.add_argument(
        "--min-observed",
        type=int,
        default=d.min_observed,
        help="a record with fewer observed (non-null) features is quarantined, with the reason",
    )
    iceberg.add_options(p)  # --table-format parquet|iceberg, --catalog, --table
    add_ray_options(p)
    return p


def run(args) -> int:
    r = run_scoring(options_from_args(ScoreOptions, args))
    rec, published, rows = r.reconciliation, r.published, r.input_rows
    summary.record(
        run_id=r.run_id, rows_in=rows, model_id=r.model_id, scored_rows=rec.scored_rows,
        quarantined_rows=rec.quarantined_rows, partition=published.partition,
    )  # fmt: skip
    print(
        f"scored {rec.scored_rows:,} rows, quarantined {rec.quarantined_rows:,} "
        f"({rows:,} input rows, {rows / max(r.seconds, 1e-9):,.0f} rows/s over {r.seconds:.1f} s)\n"
        f"  scores:     {published.partition} ({len(published.files)} files)\n"
        f"  quarantine: {published.quarantine_partition}\n"
        f"  run {r.run_id}, model {r.model_id}"
    )
    return 0


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
