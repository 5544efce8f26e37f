"""vaepipe report: one self-contained HTML page on a model and a scoring run (plots embedded as PNG).

Training curves, the run's elbo / log_marginal against the validation reference stored with the model,
the top anomalies with the features that made each unlikely, the latent space coloured by elbo, and
the per-column average log-density. Open the file in any browser; it loads nothing from elsewhere.
"""

from __future__ import annotations

import json
import sys

from pipeline.core.artifact import META, meta_path
from pipeline.errors import UsageError
from pipeline.io import storage
from pipeline.runtime import job_main, make_parser
from pipeline.score import iceberg, reader


def build_parser():
    p = make_parser("vaepipe report", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--model-dir", required=True, help="the model artifact (local or s3://)")
    p.add_argument("--scores", required=True, help="the scores table: the --output of vaepipe score")
    p.add_argument("--out", default="report.html", help="the HTML file to write (local or s3://)")
    p.add_argument(
        "--run-date", default=None, help="the partition to report on (YYYY-MM-DD, or 'all'; default: the latest)"
    )
    p.add_argument("--top", type=int, default=20, help="how many anomalies to list")
    p.add_argument("--data", default=None, help="the scored input data: show the values behind the top anomalies")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    iceberg.add_options(p)  # --table-format parquet|iceberg, --catalog, --table
    return p


def load_meta(model_dir: str) -> dict:
    try:
        return json.loads(storage.read_text(meta_path(model_dir)))  # the version LATEST names, or a plain artifact
    except FileNotFoundError as e:
        raise UsageError(f"no model at {model_dir} ({META} not found)") from e


def run(args) -> int:
    from pipeline import report

    if args.top < 1:
        raise UsageError("--top must be at least 1")
    meta = load_meta(args.model_dir)
    ice = args.table_format == "iceberg"
    published = (iceberg.partitions(args.scores, args.catalog, args.table) if ice
                 else reader.partitions(args.scores))  # fmt: skip
    if args.run_date == "all":
        dates = published
    elif args.run_date:
        dates = [args.run_date]
    else:
        dates = published[-1:]
    if ice:
        table = iceberg.read_table(args.scores, args.catalog, args.table, dates or None)
    else:
        table = reader.read_scores(args.scores, dates or None)
    model_ids = set(table.column("model_id").unique().to_pylist())
    if meta.get("model_id") not in model_ids:
        print(
            f"warning: the scores were made by model(s) {sorted(model_ids)}, not {meta.get('model_id')}",
            file=sys.stderr,
        )
    ids = list(meta["spec"]["id_columns"])
    scores = report.run_scores(table, ids)
    values = None
    if args.data:
        top = report.top_anomalies(scores, args.top)
        values = report.input_rows(args.data, ids, [a.ids for a in top])
    page = report.render(
        meta,
        scores,
        scores_uri=args.scores,
        model_dir=args.model_dir,
        run_dates=dates,
        top=args.top,
        input_values=values,
    )
    storage.write_text(args.out, page)
    print(f"report on {len(scores.elbo):,} rows ({', '.join(dates)}) written to {args.out}")
    return 0


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
