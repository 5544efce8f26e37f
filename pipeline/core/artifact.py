"""The model artifact: everything the scorer needs to rebuild the model, and nothing to unpickle.

``MODEL_DIR/model.safetensors``  weights (safetensors)
``MODEL_DIR/model.json``         spec, fitted statistics, architecture, training config, metrics,
                                 data fingerprint, library versions, reference score distribution,
                                 and ``model_id``: a content hash of the weights and all of the above.

model.json is written last, so a directory without it holds no model.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.core.codec import TableCodec, families_from_json, families_to_json
from pipeline.core.model import VAE, VAEConfig
from pipeline.errors import UsageError
from pipeline.io import storage
from schemas.feature_spec import FeatureSpec

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"


@dataclass
class ModelArtifact:
    model: VAE
    spec: FeatureSpec
    meta: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def codec(self) -> TableCodec:
        return TableCodec(self.spec, self.model.families)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import pyarrow

    import pipeline

    try:  # read from the installed metadata: the core never imports Ray
        ray_version = version("ray")
    except PackageNotFoundError:
        ray_version = "not installed"
    return {
        "vaepipe": pipeline.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray_version,
        "pyarrow": pyarrow.__version__,
    }


def _weights_bytes(model: VAE) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"format": "pt"})


def content_hash(weights: bytes, meta: dict[str, Any]) -> str:
    h = hashlib.sha256(weights)
    body = {k: v for k, v in meta.items() if k != "model_id"}
    h.update(json.dumps(body, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build_meta(model: VAE, spec: FeatureSpec, **extra: Any) -> dict[str, Any]:
    """The model.json body, without model_id. ``extra``: train_config, metrics, data, reference..."""
    return {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "families": families_to_json(model.families),
        "model_config": model.config.to_dict(),
        "versions": library_versions(),
        **extra,
    }


def new_artifact(model: VAE, spec: FeatureSpec, **extra: Any) -> ModelArtifact:
    """An artifact in memory, its model_id computed as save_model computes it (nothing written)."""
    # as JSON will read it back, so the in-memory body and the loaded one hash alike
    meta = json.loads(json.dumps(build_meta(model, spec, **extra), default=str))
    meta["model_id"] = content_hash(_weights_bytes(model), meta)
    return ModelArtifact(model, spec, meta)


def write_artifact(model_dir: str, artifact: ModelArtifact) -> str:
    """Write an artifact (its model.json body as it is) to model_dir, model.json last; returns model_id."""
    weights = _weights_bytes(artifact.model)
    meta = artifact.meta
    if content_hash(weights, meta) != meta["model_id"]:
        raise UsageError(f"the model's weights or metadata changed since model_id {meta['model_id']} was computed")
    storage.write_bytes(storage.join(model_dir, WEIGHTS), weights)
    storage.write_text(storage.join(model_dir, META), json.dumps(meta, indent=2, sort_keys=False, default=str))
    return meta["model_id"]


def save_model(model_dir: str, model: VAE, spec: FeatureSpec, **extra: Any) -> str:
    """Write the artifact to model_dir (local or s3://); returns model_id."""
    return write_artifact(model_dir, new_artifact(model, spec, **extra))


def load_model(model_dir: str, device: str | torch.device = "cpu") -> ModelArtifact:
    try:
        meta = json.loads(storage.read_text(storage.join(model_dir, META)))
    except FileNotFoundError as e:
        raise UsageError(f"no model at {model_dir} ({META} not found)") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{model_dir}: unsupported model format {meta.get('format_version')}")
    spec = FeatureSpec.from_dict(meta["spec"], source=f"{model_dir}/{META}")
    families = families_from_json(meta["families"])
    model = VAE(families, VAEConfig.from_dict(meta["model_config"]))
    weights = storage.read_bytes(storage.join(model_dir, WEIGHTS))
    if content_hash(weights, meta) != meta["model_id"]:
        raise UsageError(f"{model_dir}: weights or model.json do not match model_id {meta['model_id']}")
    model.load_state_dict(st_load(weights))
    model.to(device).eval()
    return ModelArtifact(model, spec, meta)
