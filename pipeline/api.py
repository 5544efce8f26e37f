"""The Python API: train and score in process on data that fits in memory, or run the Ray jobs.

In process, no Ray (a notebook, a test, an Airflow or Dagster task on one machine)::

    from pipeline import api

    model = api.fit("data/train.parquet", "spec.yaml", epochs=10, latent_dim=4)
    scored, quarantined = model.score(table)          # pyarrow Tables
    model.save("models/m1")                           # the artifact `vaepipe score` reads
    model = api.load("models/m1")                     # ... and one `vaepipe train` wrote

* :func:`fit` takes a pyarrow Table, a pandas or polars DataFrame, or a Parquet path (file, directory
  or glob, local or ``s3://``); the spec as a :class:`~schemas.feature_spec.FeatureSpec`, a dict or a
  YAML path; and the options of ``vaepipe train`` as keyword arguments, with the same defaults
  (``epochs=...``, ``latent_dim=...``, ``hidden=[...]``, ``val_fraction=...``, ...). It makes the same
  id-hash validation split, the same statistics, the same per-epoch metrics and early stopping, and
  writes the same reference scores and baseline, so its artifact is complete.
* :meth:`Model.score` returns ``(scored, quarantined)``: the scored rows with exactly the scores
  table's columns (built by the same function the Ray scorer calls on every batch), and the rows that
  cannot be scored with their reason. Each record's numbers are those the score job writes for it.

The Ray jobs, in process (a local Ray instance unless ``RAY_ADDRESS`` / ``ray_address=`` names one)::

    summary = api.train(data="s3://b/in/", spec="spec.yaml", model_dir="s3://b/model", workers=4)
    summary = api.score(data="s3://b/in/", model_dir="s3://b/model", output="s3://b/scores")

Keyword arguments are the command's long options (``model_dir=`` for ``--model-dir``; ``True`` for a
flag, a list for a multi-value option). They return the run's summary (the ``--summary-json`` dict);
a failed run raises the exception of its exit code: :class:`JobUsageError` (2),
:class:`JobInputError` (3), :class:`DriftDetected` (4), :class:`JobFailed` (1, the base of all four).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.core.artifact import ModelArtifact, load_model, new_artifact, write_artifact
from pipeline.core.codec import EncodedBatch, TableCodec, fit_families, merge_stats, partial_stats
from pipeline.core.defaults import DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES
from pipeline.core.model import VAE, sized_config
from pipeline.core.reference import baseline_summary, reference_scores
from pipeline.core.training import Phases, evaluate, kl_weight, make_optimizer, train_step
from pipeline.errors import InputDataError, UsageError, VaepipeError
from pipeline.io.inputs import preflight
from schemas.feature_spec import FeatureSpec, load_spec

__all__ = [
    "DriftDetected",
    "JobFailed",
    "JobInputError",
    "JobUsageError",
    "Model",
    "check",
    "fit",
    "load",
    "score",
    "train",
]

# rows per statistics partial, as the train job's statistics pass cuts its blocks
STATS_BATCH_ROWS = 65_536
SCORE_BATCH_ROWS = 4096  # the score job's default --batch-size

# options of `vaepipe train` that concern Ray, its workers, checkpoints or locations: fit() has none of them
_RAY_ONLY = {
    "data", "spec", "model_dir", "config", "workers", "cpus_per_worker", "gpus_per_worker", "bf16",
    "max_failures", "checkpoint_dir", "resume", "keep_checkpoints", "ray_address", "s3_endpoint", "cache_mb",
    "inject_failure_at_epoch", "summary_json", "log_format", "help",
}  # fmt: skip


# ---- data and spec ---------------------------------------------------------------------------------
def _as_spec(spec: FeatureSpec | dict | str | os.PathLike) -> FeatureSpec:
    if isinstance(spec, FeatureSpec):
        return spec
    if isinstance(spec, dict):
        return FeatureSpec.from_dict(spec)
    if isinstance(spec, str | os.PathLike):
        return load_spec(str(spec))
    raise UsageError(f"spec: expected a FeatureSpec, a dict or a YAML path, got {type(spec).__name__}")


def _plain_types(table: pa.Table) -> pa.Table:
    """View string types (what polars hands out) as the plain ones Parquet readers give."""
    views = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}
    if not any(f.type in views for f in table.schema):
        return table
    return table.cast(pa.schema([f.with_type(views.get(f.type, f.type)) for f in table.schema]))


def as_table(data: Any, spec: FeatureSpec) -> pa.Table:
    """The spec's columns (ids first) of a pyarrow Table, a pandas or polars DataFrame, or Parquet data
    (a file, a directory of shards or a glob, local or s3://, checked as the jobs check their input)."""
    if isinstance(data, str | os.PathLike):
        uri = str(data)
        files = preflight(uri, spec)
        fs = files.filesystem()
        tables = []
        for f in files.files:
            with fs.open_input_file(f.path) as handle:
                tables.append(pq.read_table(handle, columns=spec.columns))
        return _plain_types(pa.concat_tables(tables, promote_options="permissive"))
    source = "data"
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    elif not isinstance(data, pa.Table):
        module = type(data).__module__.split(".", 1)[0]
        if module == "polars":
            if hasattr(data, "collect") and not hasattr(data, "to_arrow"):  # a LazyFrame
                data = data.collect()
            data = data.to_arrow()
        elif module == "pandas":
            data = pa.Table.from_pandas(data, preserve_index=False)
        else:
            raise UsageError(
                f"data: expected a pyarrow Table, a pandas or polars DataFrame or a Parquet path, "
                f"got {type(data).__name__}"
            )
        source = f"{module} DataFrame"
    spec.check_schema(data.schema, source)
    return _plain_types(data.select(spec.columns))


# ---- the model ---------------------------------------------------------------------------------------
class Model:
    """A trained model: its network, spec and ``model.json`` body (an artifact in memory)."""

    def __init__(self, artifact: ModelArtifact):
        self.artifact = artifact

    @property
    def model_id(self) -> str:
        return self.artifact.model_id

    @property
    def spec(self) -> FeatureSpec:
        return self.artifact.spec

    @property
    def meta(self) -> dict[str, Any]:
        """The ``model.json`` body: statistics, configs, per-epoch metrics, reference, baseline."""
        return self.artifact.meta

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.meta.get("metrics", [])

    def __repr__(self) -> str:
        return (
            f"Model({self.model_id}, {len(self.spec.features)} features, latent_dim {self.artifact.model.latent_dim})"
        )

    def save(self, model_dir: str | os.PathLike) -> str:
        """Write the artifact (model.safetensors, then model.json) to a local path or s3://; returns model_id."""
        return write_artifact(str(model_dir), self.artifact)

    def score(
        self,
        data: Any,
        mc_samples: int = DEFAULT_MC_SAMPLES,
        iw_samples: int = DEFAULT_IW_SAMPLES,
        seed: int = 0,
        batch_size: int = SCORE_BATCH_ROWS,
    ) -> tuple[pa.Table, pa.Table]:
        """-> (scored rows with exactly the scores table's columns, quarantined rows), in input order.

        The same estimators, noise and table building as ``vaepipe score`` with the same samples and
        seed: a record's numbers do not depend on the batch it is scored in (beyond float rounding)."""
        from pipeline.score.scorer import split_and_score
        from pipeline.score.settings import ScoreSettings, output_schemas, serialize_schema

        if mc_samples < 1 or iw_samples < 0 or batch_size < 1:
            raise UsageError("mc_samples and batch_size must be at least 1, iw_samples at least 0")
        table = as_table(data, self.spec)
        settings = ScoreSettings(
            model_dir="",
            run_id=f"api-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
            input_schema=serialize_schema(table.schema),
            mc_samples=mc_samples,
            iw_samples=iw_samples,
            seed=seed,
        )
        scores_schema, quarantine_schema = output_schemas(self.artifact, settings)
        scored, quarantined = [], []
        with torch.inference_mode():
            for start in range(0, max(table.num_rows, 1), batch_size):
                s, q = split_and_score(
                    self.artifact,
                    table.slice(start, batch_size),
                    scores_schema,
                    quarantine_schema,
                    mc_samples,
                    iw_samples,
                    seed,
                )
                scored.append(s)
                quarantined.append(q)
        return (
            pa.concat_tables(scored).combine_chunks(),
            pa.concat_tables(quarantined).combine_chunks(),
        )


def load(model_dir: str | os.PathLike, device: str = "cpu") -> Model:
    """The artifact in model_dir (written by `vaepipe train` or :meth:`Model.save`), checked against its model_id."""
    return Model(load_model(str(model_dir), device=device))


# ---- fit ---------------------------------------------------------------------------------------------
def train_defaults() -> dict[str, Any]:
    """The options of ``vaepipe train`` that :func:`fit` takes, with their defaults (its TrainOptions)."""
    from dataclasses import MISSING, fields

    from pipeline.train.run import TrainOptions

    out = {}
    for f in fields(TrainOptions):
        if f.name in _RAY_ONLY:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is not MISSING:  # None: chosen from the data (latent_dim, hidden)
            out[f.name] = list(default) if isinstance(default, list | tuple) else default
    return out


def _options(options: dict[str, Any]) -> Any:
    from argparse import Namespace

    from pipeline.train.run import TrainOptions

    defaults = train_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        ray_only = [k for k in unknown if k in _RAY_ONLY]
        hint = f" ({', '.join(ray_only)}: Ray options; use api.train for the Ray job)" if ray_only else ""
        raise UsageError(f"fit: unknown option(s) {', '.join(unknown)}{hint}")
    opts = Namespace(**(defaults | options))
    # the checks of `vaepipe train` on the options fit takes (its Ray options at their in-process defaults)
    TrainOptions.check_values(TrainOptions(data="", spec="", model_dir="", **vars(opts)))
    return opts


def _statistics(spec: FeatureSpec, table: pa.Table) -> dict[str, Any]:
    total = None
    for start in range(0, table.num_rows, STATS_BATCH_ROWS):
        total = merge_stats(spec, total, partial_stats(spec, table.slice(start, STATS_BATCH_ROWS)))
    return json.loads(json.dumps(total))  # as the job records it (run.json)


def _batches(batch: EncodedBatch, size: int):
    for start in range(0, len(batch), size):
        yield batch.select(np.arange(start, min(start + size, len(batch))))


def _history_row(epoch, beta, train_sums, val, n_val, seconds, cpu_seconds, epoch_seconds, names) -> dict[str, Any]:
    n, recon, kl, invalid = train_sums
    return {
        "epoch": epoch,
        "kl_weight": beta,
        "train_rows": int(n),
        "train_elbo": (recon - kl) / max(n, 1),
        "train_recon_log_density": recon / max(n, 1),
        "train_kl": kl / max(n, 1),
        "val_rows": n_val,
        "val_elbo": val["elbo"],
        "val_recon_log_density": val["recon_log_density"],
        "val_kl": val["kl"],
        "val_columns": {c: val["columns"][c] for c in names},
        "invalid_cells": int(invalid),
        "seconds": seconds,
        "rows_per_s": n / max(seconds, 1e-9),
        "cpu_seconds": cpu_seconds,
        "rows_per_cpu_s": n / max(cpu_seconds, 1e-9),
        "epoch_seconds": epoch_seconds,
    }


def fit(data: Any, spec: FeatureSpec | dict | str | os.PathLike, *, verbose: bool = False, **options: Any) -> Model:
    """Train in this process (no Ray) on data that fits in memory; the options and defaults of
    ``vaepipe train`` (``epochs``, ``batch_size``, ``lr``, ``latent_dim``, ``hidden``, ``seed``,
    ``val_fraction``, ``reference_rows``, ``mc_samples``, ``iw_samples``, ``baseline_rows``, ...)."""
    from pipeline.train.data import is_validation  # the job's split: Ray is imported only inside its readers
    from pipeline.train.loop import progress_line

    spec = _as_spec(spec)
    opts = _options(options)
    table = as_table(data, spec)
    uri = str(data) if isinstance(data, str | os.PathLike) else f"<in-memory {type(data).__name__}>"
    if table.num_rows == 0:
        raise InputDataError("the input has no rows", file=uri)

    # ---- statistics and split, as the job's statistics pass ----
    is_val = is_validation(table, spec.id_columns, opts.val_fraction)
    train_table, valid_table = table.filter(pa.array(~is_val)), table.filter(pa.array(is_val))
    if train_table.num_rows == 0 or valid_table.num_rows == 0:
        raise InputDataError(
            f"the split leaves {train_table.num_rows} training and {valid_table.num_rows} validation rows; "
            "use more data or another val_fraction",
            file=uri,
        )
    stats = _statistics(spec, table)
    families = fit_families(spec, stats)
    from pipeline.train.run import train_config

    tcfg = train_config(opts, train_table.num_rows, valid_table.num_rows)
    mcfg = sized_config(
        len(spec.features), train_table.num_rows, opts.latent_dim, opts.hidden, opts.prior_components
    )

    # ---- train: the job's worker loop with one worker, the whole table shuffled each epoch ----
    torch.manual_seed(tcfg.seed)
    codec = TableCodec(spec, families)
    vae = VAE(families, mcfg)
    optimizer = make_optimizer(vae, tcfg)
    phases = Phases(tcfg, vae)
    phases.start(vae, optimizer, fresh=True)
    train_enc, valid_enc = codec.encode(train_table), codec.encode(valid_table)
    torch.manual_seed(tcfg.seed * 1_000_003)
    gen = torch.Generator().manual_seed(tcfg.seed)
    names = [f.name for f in families]
    history: list[dict[str, Any]] = []
    best = None
    for epoch in range(tcfg.epochs):
        beta = kl_weight(epoch, tcfg.kl_warmup_epochs)
        t0, c0 = time.perf_counter(), time.process_time()
        n = recon = kl = 0.0
        for _ in range(tcfg.passes_per_epoch):
            perm = torch.randperm(len(train_enc), generator=gen).numpy()
            for start in range(0, len(perm), tcfg.batch_size):
                s = train_step(
                    vae, optimizer, train_enc.select(perm[start : start + tcfg.batch_size]), beta, tcfg.grad_clip
                )
                n, recon, kl = n + s["n"], recon + s["recon"], kl + s["kl"]
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        val = evaluate(vae, _batches(valid_enc, max(tcfg.batch_size, 4096)), tcfg.val_samples)
        row = _history_row(
            epoch, beta, (n, recon, kl, len(train_enc.invalid)), val, len(valid_enc), seconds, cpu_seconds,
            time.perf_counter() - t0, names,
        )  # fmt: skip
        # early stopping on validation elbo once the KL weight is 1, and the linear start, as the job's loop
        row["linear"] = phases.linear
        improved, switch, row["stop"] = phases.update(epoch, row["val_elbo"], beta)
        if improved:
            best = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        if switch:
            phases.open(vae, optimizer, best)
        row["best"] = improved
        history.append(row)
        if verbose:
            print(progress_line(row, tcfg.epochs), flush=True)
        if row["stop"]:
            break
    if best is not None:
        vae.load_state_dict(best)
    vae.nonlinear = True
    vae.eval()

    # ---- reference scores and baseline, on the job's rows: the first of each side in input order ----
    ref_enc = codec.encode(valid_table.slice(0, opts.reference_rows))
    ref = reference_scores(vae, ref_enc, opts.mc_samples, opts.iw_samples, seed=tcfg.seed)
    base_enc = codec.encode(train_table.slice(0, opts.baseline_rows))
    baseline = baseline_summary(vae, base_enc, ref_enc, ref)

    best_rows = [h for h in history if h.get("best")]
    files = []
    if isinstance(data, str | os.PathLike):
        files = preflight(str(data), spec).fingerprint()
    artifact = new_artifact(
        vae,
        spec,
        statistics=stats,
        train_config=asdict(tcfg) | {"val_fraction": opts.val_fraction, "shuffle_buffer": opts.shuffle_buffer},
        workers={"workers": 1, "cpus_per_worker": torch.get_num_threads(), "gpus_per_worker": 0, "bf16": False,
                 "in_process": True},
        metrics=history,
        best_epoch=best_rows[-1]["epoch"] if best_rows else history[-1]["epoch"],
        resumed_at_epochs=[],
        data={"uri": uri, "files": files, "rows": table.num_rows, "val_rows": valid_table.num_rows},
        reference=ref,
        baseline=baseline,
    )  # fmt: skip
    return Model(artifact)


# ---- the Ray jobs ------------------------------------------------------------------------------------
class JobFailed(VaepipeError):
    """A job run by :func:`train`, :func:`score` or :func:`check` failed (exit code 1). ``.summary``
    holds its run summary, ``.exit_code`` its exit code."""

    exit_code = 1

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}


class JobUsageError(JobFailed, UsageError):
    """Bad options or config (exit code 2)."""

    exit_code = 2


class JobInputError(JobFailed):
    """Invalid input data (exit code 3); nothing was published."""

    exit_code = 3


class DriftDetected(JobFailed):
    """``check`` found the run past a threshold (exit code 4)."""

    exit_code = 4


_BY_EXIT_CODE = {2: JobUsageError, 3: JobInputError, 4: DriftDetected}


def _argv(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def run_job(module: str, **options: Any) -> dict[str, Any]:
    """Run ``jobs.<module>`` in this process with keyword options; its summary, or the exception of its exit code."""
    import importlib

    job = importlib.import_module(f"jobs.{module}")
    with tempfile.TemporaryDirectory(prefix="vaepipe-summary-") as d:
        path = options.pop("summary_json", None) or str(Path(d) / "summary.json")
        try:
            code = job.main([*_argv(options), "--summary-json", path])
        except SystemExit as e:  # the command-line parser refused the options (or --help)
            code = e.code if isinstance(e.code, int) else 2
        try:
            summary = json.loads(Path(path).read_text())
        except FileNotFoundError:
            summary = {"exit_code": code, "error": None}
    if code == 0:
        return summary
    cls = _BY_EXIT_CODE.get(code, JobFailed)
    raise cls(summary.get("error") or f"vaepipe {module} exited with code {code}", summary)


def train(**options: Any) -> dict[str, Any]:
    """``vaepipe train`` with its options as keyword arguments (``data=``, ``spec=``, ``model_dir=``, ...)."""
    return run_job("train", **options)


def score(**options: Any) -> dict[str, Any]:
    """``vaepipe score`` with its options as keyword arguments (``data=``, ``model_dir=``, ``output=``, ...)."""
    return run_job("score", **options)


def check(**options: Any) -> dict[str, Any]:
    """``vaepipe check`` (``scores=``, ``model_dir=``, ``run_date=``, thresholds); raises DriftDetected on drift."""
    return run_job("check", **options)
