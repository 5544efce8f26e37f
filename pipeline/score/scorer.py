"""Scoring Arrow tables in a worker: the callable class Ray Data maps over the input, and the function it
calls (the settings, the output schemas and the task functions the driver hands over are in the torch-free
:mod:`pipeline.score.settings`).

* :func:`split_and_score` -- one Arrow table in, two out: the scored rows in the one fixed schema
  of the scores table, and the rows that cannot be scored in the quarantine schema, with a reason,
  the offending column and every original value. The plain benchmark loop calls it too.
* :class:`BatchScorer` -- loads the model once (``__init__``), then ``__call__(batch)``
  scores a ``pyarrow.Table`` under ``torch.inference_mode`` and returns the scored rows; it writes
  the batch's quarantined rows itself, to the run's staging prefix, under a name that cannot collide
  with any other batch's (the run id and a fresh uuid; never a name derived from the rows' ids,
  which may be null). On GPUs it is the class of Ray Data's actor pool, one actor per GPU.
* :func:`process_scorer` -- what Ray Data's tasks use on CPU workers
  (:func:`~pipeline.score.settings.score_block`): the :class:`BatchScorer` of the run, built once per
  worker process and kept there for the run's later blocks. Ray keeps its worker processes between
  tasks, so a task pool starts no process of its own, and :func:`~pipeline.score.settings.warm_scorer`
  lets a process import torch and load the model while the driver plans the read (an actor pool started
  a fresh process per actor: about 3 s before its first batch on 2 cores).

A row cannot be scored when an id column is null, when the feature codec lists it as invalid
(inf, a negative value in a positive column, a non-integer count, an unknown ordinal or binary
level), or when fewer than ``min_observed`` of its features are present (a record with nothing
observed has no likelihood worth ranking). Other missing feature values are scored (masked);
unseen categorical labels are scored with the out-of-vocabulary class.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.core.artifact import ModelArtifact, load_model
from pipeline.core.defaults import DEFAULT_CONDITIONAL_SAMPLES, DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES
from pipeline.core.scoring import score_batch, tail_probability
from pipeline.errors import FailureHook, VaepipeError
from pipeline.io import storage
from pipeline.io.columns import as_array
from pipeline.runtime import retain_freed_memory
from pipeline.score.publish import write_table
from pipeline.score.settings import DEFAULT_MIN_OBSERVED, ScoreSettings, output_schemas
from schemas.output_table import scores_to_table

NULL_ID_REASON = "null id"


def too_few_observed_reason(n_observed: int, min_observed: int) -> str:
    return f"{n_observed} observed feature(s), fewer than --min-observed {min_observed}"


class ModelChanged(VaepipeError):
    """A scoring worker loaded another model than the one the run resolved (exit code 1)."""


def _conform(table: pa.Table, columns: list[str], schema: pa.Schema) -> list[pa.Array]:
    return [as_array(table.column(c)).cast(schema.field(c).type) for c in columns]


def unscorable_rows(
    table: pa.Table,
    id_columns,
    invalid: list[tuple[int, str, str]],
    n_observed: np.ndarray | None = None,
    min_observed: int = DEFAULT_MIN_OBSERVED,
) -> dict[int, tuple[str | None, str]]:
    """row -> (column, reason) for every row that cannot be scored; a null id comes first, then
    invalid values, then too few observed features (column None: the record as a whole)."""
    bad: dict[int, list[tuple[str | None, str]]] = {}
    for c in id_columns:
        nulls = table.column(c).is_null()
        for r in np.flatnonzero(nulls.to_numpy(zero_copy_only=False)):
            bad.setdefault(int(r), []).append((c, NULL_ID_REASON))
    for r, c, reason in invalid:
        bad.setdefault(int(r), []).append((c, reason))
    if n_observed is not None:
        for r in np.flatnonzero(n_observed < min_observed):
            bad.setdefault(int(r), []).append((None, too_few_observed_reason(int(n_observed[r]), min_observed)))
    out = {}
    for r, problems in bad.items():
        column, reason = problems[0]
        if len(problems) > 1:
            reason += "; also " + "; ".join(f"{c}: {why}" if c else why for c, why in problems[1:])
        out[r] = (column, reason)
    return out


def split_and_score(
    artifact: ModelArtifact,
    table: pa.Table,
    scores_schema_: pa.Schema,
    quarantine_schema_: pa.Schema,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    iw_samples: int = DEFAULT_IW_SAMPLES,
    seed: int = 0,
    min_observed: int = DEFAULT_MIN_OBSERVED,
    conditional_samples: int = DEFAULT_CONDITIONAL_SAMPLES,
) -> tuple[pa.Table, pa.Table]:
    """-> (scored rows in ``scores_schema_``, quarantined rows in ``quarantine_schema_``)."""
    spec = artifact.spec
    encoded = artifact.codec.encode(table)
    n_observed = encoded.observed.sum(dim=1).numpy()
    bad = unscorable_rows(table, spec.id_columns, encoded.invalid, n_observed, min_observed)
    if bad:
        bad_rows = np.array(sorted(bad), dtype=np.int64)
        keep = np.setdiff1d(np.arange(table.num_rows), bad_rows)
        quarantined = _quarantine_table(table.take(bad_rows), [bad[r] for r in bad_rows], spec, quarantine_schema_)
        encoded = encoded.select(keep)
        good = table.take(keep)
    else:
        quarantined = quarantine_schema_.empty_table()
        good = table
    if good.num_rows == 0:
        return scores_schema_.empty_table(), quarantined
    scores = score_batch(artifact.model, encoded, mc_samples=mc_samples, iw_samples=iw_samples, seed=seed,
                         conditional_samples=conditional_samples)
    reference = reference_log_marginal(artifact)
    tail = (
        tail_probability(scores.log_marginal, reference)
        if scores.log_marginal is not None and reference is not None
        else None
    )
    ids = pa.table(_conform(good, list(spec.id_columns), scores_schema_), names=list(spec.id_columns))
    scored = scores_to_table(ids, scores, spec, artifact.model_id, scores_schema_, tail)
    return scored, quarantined


def reference_log_marginal(artifact: ModelArtifact) -> np.ndarray | None:
    """The model's stored validation log_marginal values (sorted) for tail_probability; for a model that stored
    only quantiles, those quantiles (at their evenly spaced probabilities); None when it stored neither."""
    ref = artifact.meta.get("reference", {}).get("log_marginal") or {}
    values = ref.get("sorted") or ref.get("quantiles")
    return np.asarray(values, dtype=np.float64) if values else None


def _quarantine_table(rows: pa.Table, problems: list[tuple[str, str]], spec, schema: pa.Schema) -> pa.Table:
    ids = _conform(rows, list(spec.id_columns), schema)
    values = _conform(rows, spec.feature_names, schema)
    reason = pa.array([p[1] for p in problems], pa.string())
    column = pa.array([p[0] for p in problems], pa.string())
    return pa.Table.from_arrays([*ids, reason, column, *values], schema=schema)


def quarantine_file_name(run_id: str) -> str:
    """A name no other batch's file can have: the run id and a fresh uuid (ids may be null, so no
    name is derived from them)."""
    return f"quarantine-{run_id}-{uuid.uuid4().hex}.parquet"


class BatchScorer:
    """Scores batches with the run's model, loaded once (per actor on GPUs, per worker process on CPUs)."""

    def __init__(self, settings: dict[str, Any], progress=None):
        self.settings = ScoreSettings.from_dict(settings)
        self.progress = progress  # a RowCounter actor handle (pipeline.score.progress), or None
        if self.settings.s3_endpoint:
            storage.configure(self.settings.s3_endpoint)
        torch.set_num_threads(1)  # one scoring worker per CPU; Ray gives each one
        retain_freed_memory()  # a scoring process: its passes reuse the heap instead of faulting pages in
        self.artifact = load_model(self.settings.model_dir, device=self.settings.device)
        expected = self.settings.expected_model_id
        if expected is not None and self.artifact.model_id != expected:
            raise ModelChanged(
                f"the scoring worker loaded model {self.artifact.model_id} from {self.settings.model_dir}, "
                f"not {expected} which the run resolved; nothing published"
            )
        self.scores_schema, self.quarantine_schema = output_schemas(self.artifact, self.settings)
        self.batches = 0
        self.failure_hook = FailureHook.from_dict(self.settings.failure_hook)

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.settings
        self.failure_hook.check(self.batches, "batch")
        with torch.inference_mode():
            scored, quarantined = split_and_score(
                self.artifact,
                batch,
                self.scores_schema,
                self.quarantine_schema,
                s.mc_samples,
                s.iw_samples,
                s.seed,
                s.min_observed,
                s.conditional_samples,
            )
        if quarantined.num_rows:
            if s.quarantine_dir is None:
                raise RuntimeError("rows to quarantine but no quarantine directory was given")
            name = quarantine_file_name(s.run_id)
            write_table(storage.join(s.quarantine_dir, name), quarantined)
        self.batches += 1
        if self.progress is not None:
            self.progress.add.remote(batch.num_rows)  # fire and forget
        return scored


# the run's scorer in this worker process: (its settings, the scorer); one run at a time per process
_PROCESS_SCORER: list[tuple[dict[str, Any], BatchScorer]] = []


def process_scorer(settings: dict[str, Any], progress=None) -> BatchScorer:
    """The :class:`BatchScorer` for ``settings`` in this process: built on first use, then kept (the
    batch count of the failure hook included). A scorer of other settings (an earlier run) is let go."""
    if not _PROCESS_SCORER or _PROCESS_SCORER[0][0] != settings:
        _PROCESS_SCORER.clear()
        _PROCESS_SCORER.append((settings, BatchScorer(settings)))
    scorer = _PROCESS_SCORER[0][1]
    scorer.progress = progress
    return scorer
