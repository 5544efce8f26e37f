"""vaepipe demo: the whole job on embedded defaults: makes data, trains, scores, shows the result.

Phases: **generate** (a mixed-type customer table as Parquet shards: a history to train on and an
incoming batch with planted anomalies, their labels kept apart; pipeline/synthetic.py), **train**
(``vaepipe train``, 2 Ray Train workers on a local Ray instance), **score** (``vaepipe score``),
**evaluate** (how the planted anomalies ranked), **report** (``vaepipe report``), then it prints what a
newcomer needs: rows, time, the top anomalies and why, and the lines to query the output.

Everything goes under --workdir; a second run replaces the demo's own outputs there and nothing else.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import synthetic
from pipeline.core import artifact
from pipeline.errors import UsageError, VaepipeError
from pipeline.runtime import job_main, make_parser
from pipeline.score import reader
from schemas.output_table import partition_name, partition_uri, quarantine_partition_uri

log = logging.getLogger("vaepipe.demo")

MARKER = ".vaepipe-demo"  # marks a directory as the demo's own, so a re-run may replace its contents
OUTPUTS = ("history", "incoming", "labels", "model", "scores", "spec.yaml", "report.html")


class DemoFailed(VaepipeError):
    """A phase of the demo failed (its own message was printed); exit with that phase's code."""

    def __init__(self, phase: str, code: int):
        super().__init__(f"the {phase} phase failed (exit code {code})")
        self.exit_code = code


def build_parser():
    p = make_parser("vaepipe demo", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--workdir", default="vaepipe-demo", help="where the demo writes everything")
    p.add_argument("--history-rows", type=int, default=8_000, help="rows to train on")
    p.add_argument("--incoming-rows", type=int, default=4_000, help="rows to score")
    p.add_argument("--anomaly-fraction", type=float, default=0.02, help="share of incoming rows made anomalous")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (and scoring workers)")
    p.add_argument("--latent-dim", type=int, default=4, help="dimension of z")
    p.add_argument("--seed", type=int, default=7, help="seed of the data and of training")
    p.add_argument("--top", type=int, default=10, help="anomalies to list")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs too")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    return p


# ---- workdir ---------------------------------------------------------------------------------------
def prepare_workdir(path: str) -> str:
    """Make (or reclaim) the demo's directory; refuse one that holds anything else."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--workdir {path} is a file")
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, MARKER)):
        raise UsageError(f"--workdir {path} is not empty and was not made by vaepipe demo; choose another")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write("made by vaepipe demo; a re-run replaces its outputs here\n")
    for name in OUTPUTS:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    return path


# ---- evaluation -------------------------------------------------------------------------------------
def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    """AP of ranking by `score` ascending (least likely first): mean precision at each positive's rank."""
    order = np.argsort(score, kind="stable")
    hits = positive[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float((precision * hits).sum() / hits.sum())


@dataclass
class Evaluation:
    rows: int
    anomalies: int  # planted, scorable, present in the scores
    ap: dict[str, float]  # ranking score name -> average precision
    ranks: dict[str, np.ndarray]  # kind -> 1-based ranks by the primary score
    primary: str  # the score the ranks use

    @property
    def fraction(self) -> float:
        return self.anomalies / max(self.rows, 1)


def evaluate(scores: pa.Table, labels: pa.Table) -> Evaluation:
    ids = scores.column("record_id").to_numpy()
    kind_of = dict(zip(labels.column("record_id").to_pylist(), labels.column("kind").to_pylist(), strict=True))
    kinds = np.array([kind_of.get(int(i), "") for i in ids], dtype=object)
    positive = (kinds != "") & (kinds != synthetic.INVALID_KIND)
    lm = scores.column("log_marginal")
    candidates = {"elbo": scores.column("elbo").to_numpy()}
    if lm.null_count < len(lm):
        candidates["log_marginal"] = lm.to_numpy(zero_copy_only=False)
    ap = {name: average_precision(v, positive) for name, v in candidates.items()}
    primary = "log_marginal" if "log_marginal" in candidates else "elbo"
    rank = np.empty(ids.size, dtype=np.int64)
    rank[np.argsort(candidates[primary], kind="stable")] = np.arange(1, ids.size + 1)
    ranks = {k: np.sort(rank[kinds == k]) for k in synthetic.ANOMALY_KINDS}
    return Evaluation(int(ids.size), int(positive.sum()), ap, ranks, primary)


# ---- printing -------------------------------------------------------------------------------------
def _fmt_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1e15 else f"{v:.3g}"
    return str(v)


def top_lines(scores: pa.Table, meta: dict, incoming_dir: str, labels: pa.Table, top: int) -> list[str]:
    from pipeline import report

    run = report.run_scores(scores, ["record_id"])
    anomalies = report.top_anomalies(run, top)
    wanted = [a.ids["record_id"] for a in anomalies]
    data = ds.dataset(incoming_dir, format="parquet").to_table(filter=ds.field("record_id").isin(wanted))
    values = {r["record_id"]: r for r in data.to_pylist()}
    kind_of = dict(zip(labels.column("record_id").to_pylist(), labels.column("kind").to_pylist(), strict=True))
    lines = [f"{'rank':>4}  {'record_id':>9}  {run.score_name:>12}  {'planted as':<18}  features that made it unlikely"]
    for a in anomalies:
        rid = a.ids["record_id"]
        why = (
            ", ".join(f"{n}={_fmt_value(values.get(rid, {}).get(n))} ({d:+.1f})" for n, d in a.culprits())
            or "(no single feature stands out)"
        )
        score = a.log_marginal if a.log_marginal is not None else a.elbo
        lines.append(f"{a.rank:>4}  {rid:>9}  {score:>12.2f}  {kind_of.get(rid, '-'):<18}  {why}")
    lines.append("  (in brackets: the feature's log-density minus its median over the run, in nats)")
    return lines


def query_lines(scores_dir: str, run_date: str) -> list[str]:
    glob = os.path.join(scores_dir, partition_name("*"), "*.parquet")
    sql = "SELECT record_id, elbo, log_marginal FROM scores ORDER BY log_marginal LIMIT 5"
    return [
        "polars:",
        f"  python -c \"import polars as pl; print(pl.scan_parquet('{glob}', hive_partitioning=True)"
        f".sort('log_marginal').select('record_id', 'dt', 'elbo', 'log_marginal').head(5).collect())\"",
        "DuckDB:",
        f'  python -c "import duckdb; duckdb.sql(\\"SELECT record_id, dt, elbo, log_marginal FROM '
        f"read_parquet('{glob}', hive_partitioning=true) ORDER BY log_marginal LIMIT 5\\\").show()\"",
        "vaepipe query:",
        f'  vaepipe query {scores_dir} "{sql}"',
        f'  vaepipe query {scores_dir} "SELECT dt, count(*) AS n, avg(elbo) AS mean_elbo FROM scores '
        f'GROUP BY dt" --format csv',
    ]


# ---- the job --------------------------------------------------------------------------------------
def _say(text: str) -> None:
    print(text, flush=True)


def _phase(name: str, fn, *argv: str) -> None:
    code = fn(list(argv))
    if code != 0:
        raise DemoFailed(name, code)


def _quiet_ray(args) -> None:
    """Start the local Ray instance the jobs will share, without the workers' logs unless --verbose."""
    from pipeline.runtime import init_ray

    if args.ray_address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster: the jobs join it themselves
    logging.getLogger("ray").setLevel(logging.INFO if args.verbose else logging.WARNING)
    init_ray(None, num_cpus=max(os.cpu_count() or 1, args.workers + 2), log_to_driver=args.verbose)
    if not args.verbose:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def run(args) -> int:
    if args.history_rows < 1000 or args.incoming_rows < 500:
        raise UsageError("the demo needs at least 1000 history rows and 500 incoming rows")
    if not 0 < args.anomaly_fraction < 0.5:
        raise UsageError("--anomaly-fraction must be between 0 and 0.5")
    from jobs import report as report_job
    from jobs import score as score_job
    from jobs import train as train_job

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    work = prepare_workdir(args.workdir)
    _say(
        f"[1/5] generate: {args.history_rows:,} history rows to train on, {args.incoming_rows:,} incoming rows "
        f"with planted anomalies -> {work}"
    )
    data = synthetic.generate(
        work,
        args.history_rows,
        args.incoming_rows,
        args.anomaly_fraction,
        seed=args.seed,
        shards=4,
    )
    times["generate"] = time.perf_counter() - t0
    model_dir, scores_dir = os.path.join(work, "model"), os.path.join(work, "scores")
    run_date = dt.datetime.now(dt.UTC).date().isoformat()
    ray_opts = ["--ray-address", args.ray_address] if args.ray_address else []

    import ray

    owns_ray = not ray.is_initialized()
    if owns_ray:
        _quiet_ray(args)
    try:
        t = time.perf_counter()
        _say(f"[2/5] train: vaepipe train, {args.workers} Ray Train workers, {args.epochs} epochs")
        _phase(
            "train", train_job.main,
            "--data", data.history_dir, "--spec", data.spec_path, "--model-dir", model_dir,
            "--workers", str(args.workers), "--epochs", str(args.epochs), "--latent-dim", str(args.latent_dim),
            "--seed", str(args.seed), "--batch-size", "256", "--kl-warmup-epochs", str(max(1, args.epochs // 3)),
            *ray_opts,
        )  # fmt: skip
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()
        _say(f"[3/5] score: vaepipe score, run date {run_date}")
        _phase(
            "score", score_job.main,
            "--data", data.incoming_dir, "--model-dir", model_dir, "--output", scores_dir,
            "--run-date", run_date, "--workers", str(args.workers), *ray_opts,
        )  # fmt: skip
        times["score"] = time.perf_counter() - t
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()

    with open(artifact.meta_path(model_dir)) as f:
        meta = json.load(f)
    scores = reader.read_scores(scores_dir, [run_date])
    labels = ds.dataset(data.labels_path, format="parquet").to_table()
    quarantine_dir = quarantine_partition_uri(scores_dir, run_date)
    quarantined = ds.dataset(quarantine_dir, format="parquet").to_table(columns=["record_id", "reason", "column"])
    ev = evaluate(scores, labels)
    report_path = os.path.join(work, "report.html")
    _say("[4/5] evaluate: rank the scored rows, look up the planted anomalies")
    if not args.no_report:
        t = time.perf_counter()
        _say("[5/5] report: vaepipe report")
        _phase(
            "report", report_job.main,
            "--model-dir", model_dir, "--scores", scores_dir, "--run-date", run_date,
            "--out", report_path, "--data", data.incoming_dir,
        )  # fmt: skip
        times["report"] = time.perf_counter() - t
    total = time.perf_counter() - t0

    out = print_summary(args, data, meta, scores, labels, quarantined, ev, times, total, scores_dir, run_date)
    if not args.no_report:
        out.append(f"\nReport: {report_path}  (open it in a browser)")
    print("\n".join(out))
    return 0


def print_summary(args, data, meta, scores, labels, quarantined, ev, times, total, scores_dir, run_date) -> list[str]:
    invalid_ids = set(
        labels.filter(pc.equal(labels.column("kind"), synthetic.INVALID_KIND)).column("record_id").to_pylist()
    )
    q_ids = set(quarantined.column("record_id").to_pylist())
    reasons = sorted({f"{r['column']}: {r['reason']}" for r in quarantined.to_pylist()})
    bar = "=" * 100
    out = [
        "",
        bar,
        f"vaepipe demo: {data.history_rows:,} history rows (training), {data.incoming_rows:,} incoming rows "
        f"(scored), {len(meta['spec']['features'])} features",
        bar,
        f"model {meta['model_id']}: {len(meta.get('metrics') or [])} epochs on {args.workers} Ray Train workers, "
        f"latent dimension {args.latent_dim}",
        f"rows scored: {scores.num_rows:,}   quarantined: {quarantined.num_rows:,}"
        + (f" ({'; '.join(reasons)})" if reasons else ""),
        f"  planted invalid rows found in quarantine: {len(invalid_ids & q_ids)} of {len(invalid_ids)}",
        "time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total:.0f}s",
        "",
        f"How the {ev.anomalies} planted anomalies ranked among {ev.rows:,} scored rows "
        f"({ev.fraction:.1%} of them; a random ranking has average precision ~{ev.fraction:.3f}):",
        "  average precision: " + ", ".join(f"by {k} {v:.3f}" for k, v in ev.ap.items()),
    ]
    k = ev.anomalies
    out.append(f"  {'kind':<20} {'n':>4} {'in top ' + str(k):>10} {'median rank':>12}   best ranks (by {ev.primary})")
    for kind, r in ev.ranks.items():
        if r.size == 0:
            continue
        out.append(
            f"  {kind:<20} {r.size:>4} {int((r <= k).sum()):>10} {int(np.median(r)):>12}   "
            + ", ".join(str(x) for x in r[:8])
            + (" ..." if r.size > 8 else "")
        )
    out += ["", f"Top {args.top} anomalies (least likely first):"]
    out += ["  " + line for line in top_lines(scores, meta, data.incoming_dir, labels, args.top)]
    part = partition_uri(scores_dir, run_date)
    out += ["", f"The scores table: {part}/ (labels of the planted anomalies: {data.labels_path})"]
    out += ["Query it with:"] + ["  " + line for line in query_lines(scores_dir, run_date)]
    return out


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
