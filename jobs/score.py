"""vaepipe score: Ray Data batch scoring of Parquet records into the scores table partition for a run date.

Phases: setup (load the model, pre-flight every input file, read the input ids), score (read_parquet ->
map_batches(BatchScorer) -> write_parquet into OUTPUT/_staging/<run_id>/), check (reconcile the staged
rows and ids against the input), publish (replace OUTPUT/dt=RUN_DATE and its quarantine partition;
see pipeline/publish.py for the guarantee), cleanup (delete the staging directory).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
import time
import uuid

from pipeline.core.artifact import load_model
from pipeline.core.scoring import DEFAULT_CONDITIONAL_SAMPLES, DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES
from pipeline.errors import UsageError, VaepipeError, causes
from pipeline.io import storage
from pipeline.io.inputs import preflight, read_dataset
from pipeline.runtime import add_ray_options, init_ray, job_main, make_parser
from pipeline.score import publish
from pipeline.score.scorer import (
    FAIL_AFTER_ENV,
    BatchScorer,
    ScoreSettings,
    output_schemas,
    serialize_schema,
)
from schemas.output_table import SCHEMA_VERSION

log = logging.getLogger("vaepipe.score")

ROW_GROUP_ROWS = 65_536  # rows per Parquet row group
DEFAULT_ROWS_PER_FILE = 500_000  # the writer gathers at least this many rows per file where it can


class ScoringFailed(VaepipeError):
    """Scoring or writing failed: nothing was published (exit code 1)."""


def build_parser():
    p = make_parser("vaepipe score", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--data", required=True, help="Parquet file, directory of shards, or glob (local or s3://)")
    p.add_argument("--model-dir", required=True, help="model artifact written by vaepipe train")
    p.add_argument("--output", required=True, help="scores table root; the run writes OUTPUT/dt=RUN_DATE")
    p.add_argument("--run-date", default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--mc-samples", type=int, default=DEFAULT_MC_SAMPLES, help="Monte Carlo samples S per record")
    p.add_argument(
        "--iw-samples", type=int, default=DEFAULT_IW_SAMPLES, help="importance samples K (0: log_marginal is null)"
    )
    p.add_argument(
        "--conditional-samples", type=int, default=DEFAULT_CONDITIONAL_SAMPLES,
        help="samples per feature for column_conditional_log_density (0: that column is null, scoring is faster)",
    )
    p.add_argument("--workers", type=int, default=1, help="scoring actors (each loads the model once)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per scoring actor (0: CPU)")
    p.add_argument("--batch-size", type=int, default=4096, help="records per scoring batch")
    p.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE, help="target rows per output file")
    p.add_argument("--seed", type=int, default=0, help="noise seed (outputs do not depend on batching)")
    add_ray_options(p)
    return p


def check_args(args) -> str:
    """Validate options; returns the run date."""
    lows = (("mc_samples", 1), ("iw_samples", 0), ("conditional_samples", 0), ("workers", 1), ("batch_size", 1),
            ("rows_per_file", 1))
    for name, low in lows:
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.gpus_per_worker < 0:
        raise UsageError("--gpus-per-worker must be >= 0")
    run_date = args.run_date or dt.datetime.now(dt.UTC).date().isoformat()
    try:
        if dt.date.fromisoformat(str(run_date)).isoformat() != str(run_date):
            raise ValueError
    except ValueError as e:
        raise UsageError(f"--run-date must be YYYY-MM-DD, got {run_date!r}") from e
    return str(run_date)


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _vaepipe_cause(e: BaseException) -> VaepipeError | None:
    """The VaepipeError raised inside a Ray task, if that is what failed."""
    return next((c for c in causes(e) if isinstance(c, VaepipeError)), None)


_ERROR_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Failure)): (.+)$")


def _root_message(e: BaseException) -> str:
    """``Type: message`` of the error that started it: Ray keeps a task's own exception only in the
    traceback text of its wrapper, so that text is searched for its last ``Type: message`` line."""
    for c in causes(e):
        for line in reversed(str(c).splitlines()):
            m = _ERROR_LINE.match(line)
            if m and not m.group(1).startswith("ray.") and "RayTaskError" not in m.group(1):
                return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
    root = list(causes(e))[-1]
    lines = [ln for ln in str(root).strip().splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0] if lines else ''}"


def run(args) -> int:
    # ---- setup: everything that can refuse the job before any work starts -----------------------------
    run_date = check_args(args)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    artifact = load_model(args.model_dir)
    spec = artifact.spec
    data = preflight(args.data, spec)
    ids_in = publish.input_ids(data, spec.id_columns)
    run_id = new_run_id()
    fail_after = os.environ.get(FAIL_AFTER_ENV)
    settings = ScoreSettings(
        model_dir=args.model_dir,
        run_id=run_id,
        input_schema=serialize_schema(data.schema),
        mc_samples=args.mc_samples,
        iw_samples=args.iw_samples,
        conditional_samples=args.conditional_samples,
        seed=args.seed,
        device="cuda" if args.gpus_per_worker > 0 else "cpu",
        s3_endpoint=storage.s3_endpoint(),
        fail_after_batches=int(fail_after) if fail_after else None,
        extra_metadata={"run_date": run_date},
    )
    staging = publish.Staging(args.output, run_id)
    settings.quarantine_dir = staging.quarantine
    scores_schema, quarantine_schema = output_schemas(artifact, settings)
    log.info(
        "run %s: scoring %d rows in %d files with model %s into %s",
        run_id, data.rows, len(data.files), artifact.model_id, publish.partition_uri(args.output, run_date),
    )  # fmt: skip

    from ray.data import ActorPoolStrategy

    # a local instance gets a logical CPU beyond the actors, for the read and write tasks
    init_ray(args.ray_address, num_cpus=max(os.cpu_count() or 1, args.workers + 1))
    _check_capacity(args)
    try:
        # ---- score: Ray Data, Arrow batches end to end, into staging --------------------------------
        ds = read_dataset(data, spec)
        if len(data.files) < 2 * args.workers:
            # few input files (perhaps one row group each): split their blocks (streaming, no
            # shuffle) so that every actor gets work
            per_block = max(args.batch_size, -(-data.rows // (2 * args.workers)))
            ds = ds.repartition(target_num_rows_per_block=per_block)
        resources = {"num_gpus": args.gpus_per_worker} if args.gpus_per_worker > 0 else {"num_cpus": 1}
        ds = ds.map_batches(
            BatchScorer,
            fn_constructor_kwargs={"settings": settings.to_dict()},
            batch_size=args.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=args.workers),
            **resources,
        )
        out = storage.locate(staging.scores)
        ds.write_parquet(
            out.path,
            filesystem=out.fs,
            schema=scores_schema,
            compression="zstd",
            row_group_size=ROW_GROUP_ROWS,
            min_rows_per_file=args.rows_per_file,
        )
        # ---- check, then publish ------------------------------------------------------------------
        rec = publish.reconcile(staging, ids_in, spec.id_columns)
        finished = dt.datetime.now(dt.UTC)
        manifest = {
            "run_id": run_id,
            "run_date": run_date,
            "model_id": artifact.model_id,
            "model_dir": args.model_dir,
            "schema_version": SCHEMA_VERSION,
            "mc_samples": args.mc_samples,
            "iw_samples": args.iw_samples,
            "conditional_samples": args.conditional_samples,
            "seed": args.seed,
            "input": data.uri,
            "input_files": [{"file": f.uri, "rows": f.rows} for f in data.files],
            "input_rows": data.rows,
            "scored_rows": rec.scored_rows,
            "quarantined_rows": rec.quarantined_rows,
            "started_at": started.isoformat(),
            "finished_at": finished.isoformat(),
        }
        published = publish.publish(staging, run_date, rec, manifest, scores_schema, quarantine_schema)
    except VaepipeError:
        raise
    except Exception as e:
        cause = _vaepipe_cause(e)
        if cause is not None:
            raise cause from e
        log.debug("scoring failed", exc_info=True)
        raise ScoringFailed(f"scoring failed, nothing published: {_root_message(e)}") from e
    finally:
        staging.discard()

    # ---- summary --------------------------------------------------------------------------------
    seconds = time.perf_counter() - t0
    print(
        f"scored {rec.scored_rows:,} rows, quarantined {rec.quarantined_rows:,} "
        f"({data.rows:,} input rows, {data.rows / max(seconds, 1e-9):,.0f} rows/s over {seconds:.1f} s)\n"
        f"  scores:     {published.partition} ({len(published.files)} files)\n"
        f"  quarantine: {published.quarantine_partition}\n"
        f"  run {run_id}, model {artifact.model_id}"
    )
    return 0


def _check_capacity(args) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if args.gpus_per_worker == 0 and cpus < args.workers + 1:
        log.warning(
            "the Ray cluster has %s CPUs: %d scoring actors leave none for reading and writing; "
            "the job waits until more join (use fewer --workers)", cpus, args.workers,
        )  # fmt: skip


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
