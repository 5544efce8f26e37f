"""The model artifact: everything the scorer needs to rebuild the model, and nothing to unpickle.

One model (an *artifact directory*)::

    model.safetensors  weights (safetensors)
    model.json         spec, fitted statistics, architecture, training config, metrics, data
                       fingerprint, library versions, reference score distribution, and ``model_id``:
                       a content hash of the weights and all of the above.

model.json is written last, so a directory without it holds no model.

A *model directory* as ``vaepipe train`` writes it (:func:`publish_model`) keeps every model it
trained, whole, under its id, and names the latest with a small pointer written last::

    MODEL_DIR/versions/<model_id>/   an artifact directory (built in versions/.staging-*, then renamed;
                                     on S3 model.json, written last, completes it)
    MODEL_DIR/LATEST                 {"model_id": ..., "path": "versions/<model_id>"}: the pointer
    MODEL_DIR/_checkpoints/          training checkpoints (not part of any model)

A retrained model never changes a version another reader has resolved. :func:`resolve_model` turns a
model directory (pointer), or a plain artifact directory, into one artifact directory and its id;
:func:`load_model` reads either. :func:`read_model` reads a model's description and checks it against its
weights without building the model: this module imports torch only where a model is built or written, so
the scoring driver, which needs the spec, the id and the latent width, never imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import UsageError
from pipeline.io import storage
from schemas.feature_spec import FeatureSpec

if TYPE_CHECKING:  # torch is imported where a model is built or written, not by a reader of model.json
    import torch

    from pipeline.core.codec import TableCodec
    from pipeline.core.model import VAE

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
VERSIONS = "versions"  # MODEL_DIR/versions/<model_id>/: one artifact directory per trained model
POINTER = "LATEST"  # MODEL_DIR/LATEST: JSON naming the latest version, written last
_STAGING_PREFIX = ".staging-"  # MODEL_DIR/versions/.staging-<uuid>: a version being written (local)


@dataclass
class ModelArtifact:
    model: VAE
    spec: FeatureSpec
    meta: dict[str, Any]
    location: str = ""  # the artifact directory it was read from (a pointer resolved)

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @property
    def codec(self) -> TableCodec:
        from pipeline.core.codec import TableCodec

        return TableCodec(self.spec, self.model.families)


@dataclass(frozen=True)
class ModelInfo:
    """A model as its model.json describes it, checked against its weights (:func:`read_model`): what the
    scoring driver needs, read without torch."""

    spec: FeatureSpec
    meta: dict[str, Any]
    location: str  # the artifact directory it was read from (a pointer resolved)

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def latent_dim(self) -> int:
        return int(self.meta["model_config"]["latent_dim"])


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import pyarrow
    import torch

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
    from safetensors.torch import save as st_save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"format": "pt"})


def content_hash(weights: bytes, meta: dict[str, Any]) -> str:
    h = hashlib.sha256(weights)
    body = {k: v for k, v in meta.items() if k != "model_id"}
    h.update(json.dumps(body, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build_meta(model: VAE, spec: FeatureSpec, **extra: Any) -> dict[str, Any]:
    """The model.json body, without model_id. ``extra``: train_config, metrics, data, reference..."""
    from pipeline.core.codec import families_to_json

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


def version_dir(model_dir: str, model_id: str) -> str:
    return storage.join(model_dir, VERSIONS, model_id)


@dataclass(frozen=True)
class ResolvedModel:
    location: str  # an artifact directory
    model_id: str | None  # from the pointer; None for a plain artifact directory (read model.json)


def resolve_model(model_dir: str) -> ResolvedModel:
    """The artifact directory a model directory names now: its pointer's version, else itself."""
    try:
        pointer = json.loads(storage.read_text(storage.join(model_dir, POINTER)))
    except FileNotFoundError:
        return ResolvedModel(model_dir, None)
    except ValueError as e:
        raise UsageError(f"{model_dir}: unreadable {POINTER} pointer ({e})") from e
    model_id = pointer.get("model_id") if isinstance(pointer, dict) else None
    if not isinstance(model_id, str) or not model_id or "/" in model_id or model_id.startswith("."):
        raise UsageError(f"{model_dir}: {POINTER} does not name a model version")
    return ResolvedModel(version_dir(model_dir, model_id), model_id)


def meta_path(model_dir: str) -> str:
    """model.json of the model a model directory (or an artifact directory) names now."""
    return storage.join(resolve_model(model_dir).location, META)


def publish_model(model_dir: str, model: VAE, spec: FeatureSpec, **extra: Any) -> str:
    """Write a complete new version under MODEL_DIR/versions/<model_id>, then point LATEST at it.

    Nothing already there is changed: a version is written beside the others (staged and renamed
    locally; on S3 its model.json, written last, completes it) and the pointer is replaced last, in
    one rename (local) or one PUT (S3). Returns model_id."""
    weights = _weights_bytes(model)
    meta = build_meta(model, spec, **extra)
    meta["model_id"] = model_id = content_hash(weights, meta)
    target = version_dir(model_dir, model_id)
    meta_text = json.dumps(meta, indent=2, sort_keys=False, default=str)
    if not storage.exists(storage.join(target, META)):  # the same id is the same content: keep it
        if storage.is_s3(model_dir):
            storage.write_bytes(storage.join(target, WEIGHTS), weights)
            storage.write_text(storage.join(target, META), meta_text)
        else:
            stage = storage.join(model_dir, VERSIONS, f"{_STAGING_PREFIX}{uuid.uuid4().hex}")
            storage.write_bytes(storage.join(stage, WEIGHTS), weights)
            storage.write_text(storage.join(stage, META), meta_text)
            if storage.exists(target):  # a version left incomplete (no model.json) by a killed run
                for name in storage.list_dir(target):
                    storage.delete_file(storage.join(target, name))
                storage.remove_empty_dir(target)
            os.rename(storage.fs_path(stage), storage.fs_path(target))
    pointer = json.dumps({"model_id": model_id, "path": f"{VERSIONS}/{model_id}", "updated_at": time.time()})
    if storage.is_s3(model_dir):
        storage.write_text(storage.join(model_dir, POINTER), pointer + "\n")
    else:
        tmp = storage.join(model_dir, f"{_STAGING_PREFIX}{POINTER}-{uuid.uuid4().hex}")
        storage.write_text(tmp, pointer + "\n")
        os.replace(storage.fs_path(tmp), storage.fs_path(storage.join(model_dir, POINTER)))
    return model_id


def _read(model_dir: str) -> tuple[ModelInfo, bytes]:
    resolved = resolve_model(model_dir)
    model_dir = resolved.location
    try:
        meta = json.loads(storage.read_text(storage.join(model_dir, META)))
    except FileNotFoundError as e:
        raise UsageError(f"no model at {model_dir} ({META} not found)") from e
    if resolved.model_id is not None and meta.get("model_id") != resolved.model_id:
        raise UsageError(f"{model_dir}: holds model {meta.get('model_id')}, not {resolved.model_id} as its name says")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{model_dir}: unsupported model format {meta.get('format_version')}")
    spec = FeatureSpec.from_dict(meta["spec"], source=f"{model_dir}/{META}")
    weights = storage.read_bytes(storage.join(model_dir, WEIGHTS))
    if content_hash(weights, meta) != meta["model_id"]:
        raise UsageError(f"{model_dir}: weights or model.json do not match model_id {meta['model_id']}")
    return ModelInfo(spec, meta, model_dir), weights


def read_model(model_dir: str) -> ModelInfo:
    """A model's description (a model directory's pointer resolved, or a plain artifact directory), its
    weights and model.json checked against its id as :func:`load_model` checks them; no model is built."""
    return _read(model_dir)[0]


def load_model(model_dir: str, device: str | torch.device = "cpu") -> ModelArtifact:
    """Read a model: a model directory (its LATEST pointer resolved) or a plain artifact directory."""
    from safetensors.torch import load as st_load

    from pipeline.core.codec import families_from_json
    from pipeline.core.model import VAE, VAEConfig

    info, weights = _read(model_dir)
    model = VAE(families_from_json(info.meta["families"]), VAEConfig.from_dict(info.meta["model_config"]))
    model.load_state_dict(st_load(weights))
    model.to(device).eval()
    return ModelArtifact(model, info.spec, info.meta, info.location)
