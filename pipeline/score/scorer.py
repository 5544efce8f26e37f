"""Scoring Arrow tables: the callable class Ray Data maps over the input, and the function it calls.

* :func:`split_and_score` -- one Arrow table in, two out: the scored rows in the one fixed schema
  of the scores table, and the rows that cannot be scored in the quarantine schema, with a reason,
  the offending column and every original value. The plain benchmark loop calls it too.
* :class:`BatchScorer` -- loads the model once (``__init__``), then ``__call__(batch)``
  scores a ``pyarrow.Table`` under ``torch.inference_mode`` and returns the scored rows; it writes
  the batch's quarantined rows itself, to the run's staging prefix, under a name that cannot collide
  with any other batch's (the run id and a fresh uuid; never a name derived from the rows' ids,
  which may be null). On GPUs it is the class of Ray Data's actor pool, one actor per GPU.
* :func:`score_block` -- what Ray Data's tasks call on CPU workers: the :class:`BatchScorer` of the
  run, built once per worker process (:func:`process_scorer`) and kept there for the run's later
  blocks. Ray keeps its worker processes between tasks, so a task pool starts no process of its own,
  and :func:`warm_scorer` lets a process import torch and load the model while the driver plans the
  read (an actor pool started a fresh process per actor: about 3 s before its first batch on 2 cores).

A row cannot be scored when an id column is null, when the feature codec lists it as invalid
(inf, a negative value in a positive column, a non-integer count, an unknown ordinal or binary
level), or when fewer than ``min_observed`` of its features are present (a record with nothing
observed has no likelihood worth ranking). Other missing feature values are scored (masked);
unseen categorical labels are scored with the out-of-vocabulary class.

The settings cross to the Ray workers as a plain dict (:meth:`ScoreSettings.to_dict`).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.core.artifact import ModelArtifact, load_model
from pipeline.core.likelihoods.base import as_array, plain_type
from pipeline.core.scoring import (
    DEFAULT_CONDITIONAL_SAMPLES,
    DEFAULT_IW_SAMPLES,
    DEFAULT_MC_SAMPLES,
    score_batch,
    tail_probability,
)
from pipeline.errors import FailureHook, VaepipeError
from pipeline.io import storage
from schemas.output_table import (
    META_CONDITIONAL_SAMPLES,
    META_IW_SAMPLES,
    META_MC_SAMPLES,
    META_MODEL_ID,
    META_RUN_ID,
    META_SCHEMA_VERSION,
    META_SEED,
    PARQUET_COMPRESSION,
    ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    quarantine_schema,
    scores_schema,
    scores_to_table,
)

NULL_ID_REASON = "null id"
DEFAULT_MIN_OBSERVED = 1


def too_few_observed_reason(n_observed: int, min_observed: int) -> str:
    return f"{n_observed} observed feature(s), fewer than --min-observed {min_observed}"


class ModelChanged(VaepipeError):
    """A scoring worker loaded another model than the one the run resolved (exit code 1)."""


@dataclass
class ScoreSettings:
    model_dir: str
    run_id: str
    input_schema: bytes  # serialized Arrow schema of the spec's columns (ids and features)
    quarantine_dir: str | None = None  # staging URI the workers write quarantined rows to
    mc_samples: int = DEFAULT_MC_SAMPLES  # Monte Carlo samples for recon_log_density
    iw_samples: int = DEFAULT_IW_SAMPLES  # importance samples for log_marginal (0: null)
    conditional_samples: int = DEFAULT_CONDITIONAL_SAMPLES  # per-column conditional scores (0: null)
    seed: int = 0  # noise seed (with each record's key)
    min_observed: int = DEFAULT_MIN_OBSERVED  # fewer observed features: quarantined
    expected_model_id: str | None = None  # the model the driver resolved; every worker checks it
    device: str = "cpu"
    s3_endpoint: str | None = None
    failure_hook: dict = field(default_factory=dict)  # FailureHook.to_dict(): the test-only failure hook
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreSettings:
        return cls(**d)

    def arrow_input_schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(self.input_schema))


def serialize_schema(schema: pa.Schema) -> bytes:
    return schema.serialize().to_pybytes()


def output_metadata(settings: ScoreSettings, model_id: str) -> dict[bytes, bytes]:
    meta = {
        META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
        META_MODEL_ID: model_id.encode(),
        META_RUN_ID: settings.run_id.encode(),
        META_MC_SAMPLES: str(settings.mc_samples).encode(),
        META_IW_SAMPLES: str(settings.iw_samples).encode(),
        META_SEED: str(settings.seed).encode(),
        META_CONDITIONAL_SAMPLES: str(settings.conditional_samples).encode(),
    }
    meta.update({f"vaepipe.{k}".encode(): str(v).encode() for k, v in settings.extra_metadata.items()})
    return meta


def output_schemas(artifact: ModelArtifact, settings: ScoreSettings) -> tuple[pa.Schema, pa.Schema]:
    """(scores schema with key-value metadata, quarantine schema) for this model and input."""
    input_schema = settings.arrow_input_schema()
    types = {name: plain_type(input_schema.field(name).type) for name in artifact.spec.columns}  # decoded
    meta = output_metadata(settings, artifact.model_id)
    scores = scores_schema(artifact.spec, types, artifact.model.latent_dim, meta)
    quarantine = quarantine_schema(artifact.spec, types).with_metadata(meta)
    return scores, quarantine


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


def write_table(uri: str, table: pa.Table, row_group_size: int = ROW_GROUP_ROWS) -> None:
    """One Parquet file in the table's own schema (metadata included), zstd."""
    loc = storage.locate(uri)
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as out:
        pq.write_table(table, out, compression=PARQUET_COMPRESSION, row_group_size=row_group_size)


class BatchScorer:
    """Scores batches with the run's model, loaded once (per actor on GPUs, per worker process on CPUs)."""

    def __init__(self, settings: dict[str, Any], progress=None):
        self.settings = ScoreSettings.from_dict(settings)
        self.progress = progress  # a RowCounter actor handle (pipeline.score.progress), or None
        if self.settings.s3_endpoint:
            storage.configure(self.settings.s3_endpoint)
        torch.set_num_threads(1)  # one scoring worker per CPU; Ray gives each one
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


def score_block(batch: pa.Table, settings: dict[str, Any], progress=None) -> pa.Table:
    """Ray Data's task function on CPU workers: :meth:`BatchScorer.__call__` with this process's scorer."""
    return process_scorer(settings, progress)(batch)


def warm_scorer(settings: dict[str, Any]) -> bool:
    """Build the run's scorer in this worker process ahead of its first block. False where building
    fails: the block's own task then raises the error (a warm-up has no one to report it to)."""
    try:
        process_scorer(settings)
    except Exception:  # noqa: BLE001 -- reported by the block that comes next
        return False
    return True
