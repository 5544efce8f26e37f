"""vaepipe check: compare a scoring run's log_marginal with the model's validation reference; exit 4 on drift.

Reads the run date's partition of the scores table (Parquet or Iceberg) and the reference stored in
the model's model.json. Three measures, each with its threshold (see pipeline/check.py): the share of
rows below the reference's 0.1% quantile, the share below its 1% quantile, and the Kolmogorov-Smirnov
distance between the run's log_marginal and the reference distribution. Any one past its threshold
exits 4 and prints why; a scheduler gates the steps downstream of the scoring run on it.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pyarrow.compute as pc

from pipeline import summary
from pipeline.check import DEFAULT_MAX_BELOW_01, DEFAULT_MAX_BELOW_1, DEFAULT_MAX_KS, compare
from pipeline.errors import UsageError, VaepipeError
from pipeline.runtime import job_main, make_parser

log = logging.getLogger("vaepipe.check")


class DriftError(VaepipeError):
    """The run is past a threshold (exit code 4)."""

    exit_code = 4


def build_parser():
    p = make_parser("vaepipe check", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--scores", required=True, help="scores table root (the --output of vaepipe score)")
    p.add_argument("--model-dir", required=True, help="the model artifact whose reference the run is compared with")
    p.add_argument("--run-date", required=True, help="the partition YYYY-MM-DD to check")
    p.add_argument(
        "--max-below-01", type=float, default=DEFAULT_MAX_BELOW_01,
        help="largest share of rows below the reference's 0.1%% quantile of log_marginal",
    )  # fmt: skip
    p.add_argument(
        "--max-below-1", type=float, default=DEFAULT_MAX_BELOW_1,
        help="largest share of rows below the reference's 1%% quantile of log_marginal",
    )  # fmt: skip
    p.add_argument("--max-ks", type=float, default=DEFAULT_MAX_KS, help="largest KS distance to the reference")
    p.add_argument("--table-format", choices=("parquet", "iceberg"), default="parquet", help="how the table is stored")
    p.add_argument("--catalog", default=None, help="Iceberg catalog URI (default: SCORES/_catalog.db)")
    p.add_argument("--table", default="vaepipe.scores", help="Iceberg table NAMESPACE.NAME")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    return p


def read_run(args):
    """The run's (log_marginal, model_id) columns."""
    columns = ["log_marginal", "model_id"]
    if args.table_format == "iceberg":
        from pipeline.score import iceberg

        return iceberg.read_table(args.scores, args.catalog, args.table, [args.run_date], columns)
    from pipeline.score.reader import read_scores

    return read_scores(args.scores, [args.run_date], columns=columns)


def run(args) -> int:
    from pipeline.core.artifact import read_model

    for name in ("max_below_01", "max_below_1", "max_ks"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1")
    log.info("checking the run of %s in %s against the reference of %s", args.run_date, args.scores, args.model_dir)
    meta = read_model(args.model_dir).meta
    reference = meta.get("reference") or {}
    if "log_marginal" not in reference:
        raise UsageError(f"{args.model_dir}: the model stores no log_marginal reference (trained with --iw-samples 0)")
    table = read_run(args)
    ids = set(pc.unique(table.column("model_id")).to_pylist())
    if ids - {meta["model_id"]}:
        raise UsageError(
            f"the run of {args.run_date} was scored by model(s) {', '.join(sorted(ids))}, "
            f"not by {meta['model_id']} in {args.model_dir}"
        )
    lm = table.column("log_marginal")
    if lm.null_count == len(lm):
        raise UsageError(f"the run of {args.run_date} has no log_marginal (scored with --iw-samples 0)")
    values = lm.drop_null().to_numpy()
    values = values[np.isfinite(values)]
    result = compare(values, reference, args.max_below_01, args.max_below_1, args.max_ks)
    summary.record(rows_in=result.rows, model_id=meta["model_id"], check=result.to_dict())
    print(
        f"run {args.run_date}: {result.rows:,} rows; the reference: {result.reference_rows:,} validation rows\n"
        f"  below the 0.1% quantile ({result.q001:.4g}): {result.below_01:.4%}  (max {args.max_below_01:.4%})\n"
        f"  below the 1% quantile ({result.q01:.4g}):   {result.below_1:.4%}  (max {args.max_below_1:.4%})\n"
        f"  KS distance: {result.ks:.4f}  (max {args.max_ks}; p = {result.ks_pvalue:.3g})"
    )
    if result.drift:
        raise DriftError("drift: " + "; ".join(result.failures))
    print("no drift")
    return 0


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
