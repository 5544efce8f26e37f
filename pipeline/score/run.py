"""The scoring run: what ``vaepipe score`` does beyond its flags.

Phases: **setup** (refuse overlapping paths and an --output that is not a vaepipe table; resolve the
model once and read its description, checked against its weights: the driver never imports torch;
pre-flight every input file; read the input ids), **lease** (one run per partition:
:func:`~pipeline.score.publish.partition_lease`; then complete or clean up what killed runs of the
date left, :func:`~pipeline.score.publish.recover`), **score** (the input's blocks, read on the driver
up to ``DRIVER_READ_BYTES`` of Parquet, else by read_parquet ->
map_batches(:func:`~pipeline.score.settings.score_block`: Ray tasks, ``--workers`` at a time; on GPUs an
actor pool of :class:`~pipeline.score.scorer.BatchScorer`) -> write_parquet into
``OUTPUT/_staging/<run_id>/``; skipped for an input with no rows), **check** (reconcile the staged
rows and ids against the input), **publish** (replace ``OUTPUT/dt=RUN_DATE`` and its quarantine
partition; the guarantee is in :mod:`pipeline.score.publish`), **cleanup** (delete the staging
directory, unless it holds an unfinished publish's journal).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa

from pipeline.core.artifact import read_model, resolve_model
from pipeline.core.defaults import DEFAULT_CONDITIONAL_SAMPLES, DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES
from pipeline.errors import FailureHook, UsageError, VaepipeError, root_message, vaepipe_error_in
from pipeline.io import storage
from pipeline.io.inputs import find_unreadable, preflight, read_dataset, read_files
from pipeline.runtime import init_ray
from pipeline.score import iceberg, publish
from pipeline.score.progress import ProgressReporter, RowCounter
from pipeline.score.publish import Published, Reconciliation
from pipeline.score.settings import (
    DEFAULT_MIN_OBSERVED,
    ScoreSettings,
    output_schemas,
    score_block,
    serialize_schema,
    warm_scorer,
)
from schemas.output_table import PARQUET_COMPRESSION, ROW_GROUP_ROWS, SCHEMA_VERSION, partition_uri

log = logging.getLogger("vaepipe.score")

DEFAULT_ROWS_PER_FILE = 500_000  # the writer gathers at least this many rows per file where it can
BLOCKS_PER_WORKER = 4  # the input is cut into at least this many blocks per scoring worker ...
MAX_BATCHES_PER_BLOCK = 16  # ... of at most this many batches
MIN_BATCH_ROWS = 256  # a small input's batches are cut down to no fewer rows than this (or --batch-size)
# Up to this much Parquet on storage the driver reads the input itself (the spec's columns, each file once)
# and hands Ray Data its blocks: no listing task, footer-reading actors, read tasks or repartition, about 2 s
# of a job's start on 2 cores (1M rows of adult are about 17 MiB). Larger inputs stream through read_parquet.
DRIVER_READ_BYTES = 32 << 20
WARM_UP_WAIT_S = 60.0  # the scoring tasks wait at most this long for the warm-ups (a busy cluster: no longer)


class ScoringFailed(VaepipeError):
    """Scoring or writing failed: nothing was published (exit code 1)."""


@dataclass
class ScoreOptions:
    """One scoring run's configuration (the ``vaepipe score`` flags)."""

    data: str
    model_dir: str
    output: str
    run_date: str | None = None  # YYYY-MM-DD; None: today (UTC)
    mc_samples: int = DEFAULT_MC_SAMPLES
    iw_samples: int = DEFAULT_IW_SAMPLES
    workers: int = 1
    gpus_per_worker: float = 0.0
    batch_size: int = 4096
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    seed: int = 0
    min_observed: int = DEFAULT_MIN_OBSERVED
    conditional_samples: int = DEFAULT_CONDITIONAL_SAMPLES  # per-column conditional scores (0: null)
    table_format: str = "parquet"  # parquet | iceberg
    catalog: str | None = None  # Iceberg catalog URI or configured name (None: OUTPUT/_catalog.db)
    table: str = iceberg.DEFAULT_TABLE  # Iceberg NAMESPACE.NAME
    ray_address: str | None = None

    def validate(self) -> str:
        """Check the options; returns the run date."""
        lows = {"mc_samples": 1, "iw_samples": 0, "workers": 1, "batch_size": 1, "rows_per_file": 1, "min_observed": 0,
                "conditional_samples": 0}
        for name, low in lows.items():
            if getattr(self, name) < low:
                raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            raise UsageError("--gpus-per-worker must be >= 0")
        # the run replaces what it writes under --output: it must hold neither the input nor the model
        storage.ensure_disjoint(("--output", self.output), ("--data", self.data))
        storage.ensure_disjoint(("--output", self.output), ("--model-dir", self.model_dir))
        run_date = self.run_date or dt.datetime.now(dt.UTC).date().isoformat()
        try:
            if dt.date.fromisoformat(str(run_date)).isoformat() != str(run_date):
                raise ValueError
        except ValueError as e:
            raise UsageError(f"--run-date must be YYYY-MM-DD, got {run_date!r}") from e
        return str(run_date)


@dataclass(frozen=True)
class ScoreResult:
    run_id: str
    model_id: str
    input_rows: int
    seconds: float
    reconciliation: Reconciliation
    published: Published


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def run_scoring(opts: ScoreOptions) -> ScoreResult:
    """The whole scoring run (see the module docstring); nothing is published unless every row is
    accounted for, and the run deletes or replaces only what it made."""
    # ---- setup: everything that can refuse the job before any work starts -----------------------------
    run_date = opts.validate()
    if opts.table_format == "iceberg":
        iceberg.check_options(opts.output, opts.catalog, opts.table)
    publish.check_table(opts.output)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    resolved = resolve_model(opts.model_dir)  # once: every worker loads this version and checks its id
    artifact = read_model(resolved.location)  # its description, checked against its weights: no torch here
    spec = artifact.spec
    data = preflight(opts.data, spec, allow_empty_files=True)
    ids_in = publish.input_ids(data, spec.id_columns)
    run_id = new_run_id()
    hook = FailureHook.from_env()
    settings = ScoreSettings(
        model_dir=resolved.location,
        expected_model_id=artifact.model_id,
        run_id=run_id,
        input_schema=serialize_schema(data.schema),
        mc_samples=opts.mc_samples,
        conditional_samples=opts.conditional_samples,
        iw_samples=opts.iw_samples,
        seed=opts.seed,
        min_observed=opts.min_observed,
        device="cuda" if opts.gpus_per_worker > 0 else "cpu",
        s3_endpoint=storage.s3_endpoint(),
        failure_hook=hook.to_dict(),
        extra_metadata={"run_date": run_date},
    )
    staging = publish.Staging(opts.output, run_id)
    settings.quarantine_dir = staging.quarantine
    scores_schema, quarantine_schema = output_schemas(artifact, settings)
    publish.check_partition_ours(partition_uri(opts.output, run_date))
    log.info(
        "run %s: scoring %d rows in %d files with model %s into %s",
        run_id, data.rows, len(data.files), artifact.model_id, partition_uri(opts.output, run_date),
    )  # fmt: skip

    with publish.partition_lease(opts.output, run_date, run_id) as lease:
        publish.recover(opts.output, run_date)  # what killed runs of this date left
        publish.claim_table(opts.output, run_id)
        staging.begin(run_date)
        try:
            if data.rows:
                _score_into_staging(opts, data, spec, settings, staging, scores_schema)
            hook.kill_point("scored")
            # ---- check, then publish ----------------------------------------------------------------
            rec = publish.reconcile(staging, ids_in, spec.id_columns)
            finished = dt.datetime.now(dt.UTC)
            manifest = {
                "run_id": run_id,
                "run_date": run_date,
                "model_id": artifact.model_id,
                "model_dir": opts.model_dir,
                "model_version": resolved.location,
                "schema_version": SCHEMA_VERSION,
                "mc_samples": opts.mc_samples,
                "iw_samples": opts.iw_samples,
                "conditional_samples": opts.conditional_samples,
                "min_observed": opts.min_observed,
                "seed": opts.seed,
                "input": data.uri,
                "input_files": [{"file": f.uri, "rows": f.rows} for f in data.files],
                "input_rows": data.rows,
                "scored_rows": rec.scored_rows,
                "quarantined_rows": rec.quarantined_rows,
                "started_at": started.isoformat(),
                "finished_at": finished.isoformat(),
            }
            lease.check()
            if opts.table_format == "iceberg":  # one snapshot replacing the run date's partition
                published = iceberg.publish(
                    staging, run_date, rec, manifest, scores_schema, quarantine_schema, opts.catalog, opts.table
                )
            else:
                published = publish.publish(staging, run_date, rec, manifest, scores_schema, quarantine_schema, hook)
        except VaepipeError:
            raise
        except Exception as e:
            cause = vaepipe_error_in(e)
            if cause is not None:
                raise cause from e
            bad_input = find_unreadable(data, spec)  # a corrupt page behind a valid footer: exit 3
            if bad_input is not None:
                raise bad_input from e
            log.debug("scoring failed", exc_info=True)
            raise ScoringFailed(f"scoring failed, nothing published: {root_message(e)}") from e
        finally:
            staging.discard()
    return ScoreResult(run_id, artifact.model_id, data.rows, time.perf_counter() - t0, rec, published)


def _score_into_staging(opts, data, spec, settings, staging, scores_schema) -> None:
    """read -> map_batches(score_block, or BatchScorer actors on GPUs) -> write_parquet into the run's
    staging (Ray Data)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    # a local instance gets a logical CPU per scoring worker (the machine's, where it has more): the read and
    # write tasks take turns with the scoring tasks in the same processes. A CPU kept beyond the workers
    # (before) let Ray keep a third worker process, which the next scoring task sometimes took cold (torch
    # imported and the model loaded again: one block 3.1 s instead of 1.1 s); 2 workers on 2 cores, 20,000
    # rows, jobs after the first in one instance: 5.5 / 5.6 / 5.5 s against 6.6 / 5.5 / 6.0 s; 10,000 rows
    # end to end, alternating: 12.2 / 11.7 / 11.9 / 11.1 s against 13.2 / 13.4 / 12.5 / 12.4 s
    init_ray(opts.ray_address, num_cpus=max(os.cpu_count() or 1, opts.workers))
    _check_capacity(opts)
    counter = ray.remote(num_cpus=0)(RowCounter).remote()
    try:
        per_block, batch_size, workers = block_plan(data.rows, opts.workers, opts.batch_size)
        scorer_args = {"settings": settings.to_dict(), "progress": counter}
        warming = []
        if opts.gpus_per_worker == 0:
            # tasks on the worker processes Ray keeps (an actor pool starts a process per actor), the model
            # loaded once per process: warm-up tasks load it while Ray Data plans and starts the read. They go
            # first, into the processes Ray started beside the driver, ahead of the small tasks of the read
            # (from_arrow's block metadata), which imported Ray Data into them and held them 1.3 s
            warm = ray.remote(num_cpus=1, max_retries=0)(warm_scorer)
            warming = [warm.remote(scorer_args["settings"]) for _ in range(workers)]
        ds = _input_blocks(data, spec, per_block)
        batches = {"batch_size": batch_size, "batch_format": "pyarrow"}
        if opts.gpus_per_worker > 0:
            from pipeline.score.scorer import BatchScorer

            # an actor per GPU: Ray ends a GPU task's worker process after the task, so a task pool would
            # load the model onto the device for every block
            ds = ds.map_batches(
                BatchScorer,
                fn_constructor_kwargs=scorer_args,
                # a short queue per actor: the last blocks go to whichever actor is free
                compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
                num_gpus=opts.gpus_per_worker,
                **batches,
            )
        else:
            # Ray Data's per-operator reservation splits the CPUs among the read, cut, map and write
            # operators, which let a task pool run one scoring task at a time on 3 CPUs (2 workers): the
            # pool's size alone bounds the scoring tasks (this dataset's own context)
            ds.context.op_resource_reservation_enabled = False
            ds = ds.map_batches(
                score_block, fn_kwargs=scorer_args, compute=TaskPoolStrategy(size=workers), num_cpus=1, **batches
            )
        if warming:
            # the scoring tasks start once the warm-ups are done, so that they find those processes idle: where
            # the instance has CPUs beyond the workers, the first scoring task otherwise started in a process
            # of its own while the warm-ups still ran, and imported torch and loaded the model again on the
            # job's critical start
            ray.wait(warming, num_returns=len(warming), timeout=WARM_UP_WAIT_S)
        out = storage.locate(staging.scores)
        with ProgressReporter(lambda: ray.get(counter.get.remote(), timeout=10), data.rows):
            ds.write_parquet(
                out.path,
                filesystem=out.fs,
                schema=scores_schema,
                compression=PARQUET_COMPRESSION,
                row_group_size=ROW_GROUP_ROWS,
                min_rows_per_file=opts.rows_per_file,
            )
    finally:
        ray.kill(counter)


def block_plan(rows: int, workers: int, batch_size: int) -> tuple[int, int, int]:
    """How the input is cut: (rows per block, rows per batch, scoring workers) for ``rows`` records.

    Blocks of whole batches, whatever the files (Ray Data reads many small files in one task, one block, and
    fewer blocks than workers leave workers idle): at least BLOCKS_PER_WORKER per worker, at most
    MAX_BATCHES_PER_BLOCK batches each, as many blocks as whole rounds of the workers take, all of one size
    (the last one shorter, by fewer rows than the blocks' count times a block's batches). The batch is at
    most ``batch_size``, shrunk so that equal batches fill a block: blocks cut at whole ``batch_size``
    batches left a last block of another size, which one worker scored while the other waited (80,000
    rows, 2 workers: 7 blocks, 6 of 12,288 rows and one of 6,272; now 8 of 10,002 rows in batches of
    3,334). A small input gets smaller batches, no fewer than MIN_BATCH_ROWS rows (or ``batch_size``). The
    scores do not depend on batching. Never more workers than blocks."""
    blocks = BLOCKS_PER_WORKER * workers
    most = MAX_BATCHES_PER_BLOCK * batch_size
    if rows > blocks * most:  # more blocks than the minimum: in whole rounds of the workers
        blocks = -(-rows // (most * workers)) * workers
    per_block = -(-rows // blocks)
    if per_block >= batch_size:
        batches = -(-per_block // batch_size)
        batch_size = -(-per_block // batches)
        per_block = batches * batch_size
    else:  # never above the batch size asked for
        batch_size = per_block = max(per_block, min(MIN_BATCH_ROWS, batch_size))
    return per_block, batch_size, max(1, min(workers, -(-rows // per_block)))


def _input_blocks(data, spec, per_block: int):
    """The input as a Ray Dataset of blocks of ``per_block`` rows (the last one shorter), the spec's columns
    only: read on the driver up to DRIVER_READ_BYTES of Parquet, else streamed by read_parquet and cut."""
    import ray.data

    if sum(f.size for f in data.files) > DRIVER_READ_BYTES:
        return read_dataset(data, spec).repartition(target_num_rows_per_block=per_block)
    tables = [t for _, t in read_files(data, spec) if t.num_rows]
    table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    return ray.data.from_arrow([table.slice(i, per_block) for i in range(0, table.num_rows, per_block)])


def _check_capacity(opts: ScoreOptions) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if opts.gpus_per_worker == 0 and cpus < opts.workers:
        log.warning(
            "the Ray cluster has %s CPUs: at most that many of the %d scoring workers run at a time "
            "(use fewer --workers)", cpus, opts.workers,
        )  # fmt: skip
