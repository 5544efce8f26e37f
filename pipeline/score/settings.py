"""What the scoring driver hands its workers, without torch: the run's settings, the output schemas they
fix, and the task functions Ray Data calls on CPU workers.

The driver of ``vaepipe score`` reads the model's description (:func:`pipeline.core.artifact.read_model`),
plans the run and publishes it; only the workers build the model. Ray pickles :func:`score_block` and
:func:`warm_scorer` by reference to this module, and each imports :mod:`pipeline.score.scorer` (torch, the
model) in the worker process on its first call: the driver never imports torch (about 2 s of CPU before
Ray's start on 2 cores, and its memory).

The settings cross to the Ray workers as a plain dict (:meth:`ScoreSettings.to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.core.defaults import DEFAULT_CONDITIONAL_SAMPLES, DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES
from pipeline.io.columns import plain_type
from schemas.output_table import (
    META_CONDITIONAL_SAMPLES,
    META_IW_SAMPLES,
    META_MC_SAMPLES,
    META_MODEL_ID,
    META_RUN_ID,
    META_SCHEMA_VERSION,
    META_SEED,
    SCHEMA_VERSION,
    quarantine_schema,
    scores_schema,
)

if TYPE_CHECKING:
    from pipeline.core.artifact import ModelArtifact, ModelInfo

DEFAULT_MIN_OBSERVED = 1


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


def output_schemas(model: ModelInfo | ModelArtifact, settings: ScoreSettings) -> tuple[pa.Schema, pa.Schema]:
    """(scores schema with key-value metadata, quarantine schema) for this model (its description or the
    loaded model: the spec, the id and the latent width) and input."""
    input_schema = settings.arrow_input_schema()
    types = {name: plain_type(input_schema.field(name).type) for name in model.spec.columns}  # decoded
    meta = output_metadata(settings, model.model_id)
    scores = scores_schema(model.spec, types, model.latent_dim, meta)
    quarantine = quarantine_schema(model.spec, types).with_metadata(meta)
    return scores, quarantine


def score_block(batch: pa.Table, settings: dict[str, Any], progress=None) -> pa.Table:
    """Ray Data's task function on CPU workers: :meth:`~pipeline.score.scorer.BatchScorer.__call__` with
    this process's scorer (:func:`~pipeline.score.scorer.process_scorer`)."""
    from pipeline.score.scorer import process_scorer

    return process_scorer(settings, progress)(batch)


def warm_scorer(settings: dict[str, Any]) -> bool:
    """Build the run's scorer in this worker process ahead of its first block. False where building
    fails: the block's own task then raises the error (a warm-up has no one to report it to)."""
    from pipeline.score.scorer import process_scorer

    try:
        process_scorer(settings)
    except Exception:  # noqa: BLE001 -- reported by the block that comes next
        return False
    return True
