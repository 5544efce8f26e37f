"""The training run: what ``vaepipe train`` does beyond its flags.

Phases: **setup** (spec, pre-flight of every shard's footer: a bad file ends the job with exit 3
before anything is written), **statistics** (a streaming Ray Data pass over every row; skipped on
``resume``, which reuses the recorded ones), **train** (TorchTrainer, ``workers`` data-parallel
workers, a checkpoint every epoch), **save** (the best epoch's weights, the reference distribution
of validation elbo and log_marginal, the independent-columns baseline: a new complete version
``MODEL_DIR/versions/<model_id>/``, then the ``MODEL_DIR/LATEST`` pointer last; see
:mod:`pipeline.core.artifact`).

Checkpoints live in ``checkpoint_dir`` (default ``MODEL_DIR/_checkpoints``; a leading underscore
marks it as not part of the artifact) together with ``run.json``, the run's recorded configuration
and statistics. The run claims the directory with a marker file (``_vaepipe_checkpoints.json``)
and refuses a non-empty directory without it; it deletes only its own entries there (never the
directory's other contents). A successful run removes them (``keep_checkpoints`` keeps them); a failed run
leaves them, and the same command with ``--resume`` continues from the last completed epoch. Within
one run, Ray Train restarts failed workers from the last checkpoint up to ``max_failures`` times.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.core.artifact import publish_model
from pipeline.core.codec import TableCodec, families_from_json, families_to_json, fit_families
from pipeline.core.defaults import DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES
from pipeline.core.model import VAE, VAEConfig, sized_config
from pipeline.core.reference import baseline_summary, fit_baseline, reference_scores
from pipeline.core.training import TrainConfig, passes_per_epoch, val_samples
from pipeline.errors import FailureHook, InputDataError, UsageError, VaepipeError, root_message, vaepipe_error_in
from pipeline.io import storage
from pipeline.io.inputs import InputData, preflight
from pipeline.runtime import init_ray
from pipeline.train.data import WorkerShards, read_split_samples, split_inputs, statistics_pass
from pipeline.train.loop import LoopConfig, exact_split_config, final_weights, load_state, newest_checkpoint
from schemas.feature_spec import FeatureSpec, load_spec

log = logging.getLogger("vaepipe.train")

CHECKPOINTS = "_checkpoints"  # default checkpoint directory inside MODEL_DIR (not part of the artifact)
CHECKPOINTS_MARKER = "_vaepipe_checkpoints.json"  # marks a checkpoint directory as made by vaepipe train
RUN_META = "run.json"
RUN_NAME = "train"  # the Ray Train run inside the checkpoint directory
FAILURE_MARKER = "injected_failure"  # the test-only failure hook's once-per-epoch markers

_T = TrainConfig()


class TrainingFailed(VaepipeError):
    exit_code = 1


@dataclass
class TrainOptions:
    """One training run's configuration (the ``vaepipe train`` flags)."""

    data: str
    spec: str
    model_dir: str
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    bf16: bool = False
    max_failures: int = 2
    latent_dim: int | None = None  # None: auto_latent_dim(number of features)
    hidden: list[int] | None = None  # None: auto_hidden(training rows)
    prior_components: int = VAEConfig.prior_components  # p(z): 1 = N(0, I), more = a learned mixture
    epochs: int = _T.epochs
    batch_size: int = _T.batch_size
    lr: float = _T.lr
    weight_decay: float = _T.weight_decay
    kl_warmup_epochs: int = _T.kl_warmup_epochs
    grad_clip: float = _T.grad_clip
    patience: int = _T.patience
    linear_start: bool = _T.linear_start
    linear_lr: float = _T.linear_lr
    linear_patience: int = _T.linear_patience
    linear_lr_drops: int = _T.linear_lr_drops
    min_epoch_steps: int = _T.min_epoch_steps
    seed: int = _T.seed
    val_fraction: float = 0.1
    shuffle_buffer: int = 10_000
    cache_mb: int = 1024
    checkpoint_dir: str | None = None
    resume: bool = False
    keep_checkpoints: bool = False
    reference_rows: int = 10_000
    mc_samples: int = DEFAULT_MC_SAMPLES
    iw_samples: int = DEFAULT_IW_SAMPLES
    baseline_rows: int = 5_000
    ray_address: str | None = None

    def validate(self) -> None:
        self.check_values()
        # what the run writes (model, checkpoints) must hold neither the input nor each other; the
        # default checkpoint directory is MODEL_DIR/_checkpoints, a reserved name of the model's layout
        storage.ensure_disjoint(("--model-dir", self.model_dir), ("--data", self.data))
        storage.ensure_disjoint(("--checkpoint-dir", self.checkpoint_dir), ("--data", self.data))
        storage.ensure_disjoint(("--checkpoint-dir", self.checkpoint_dir), ("--model-dir", self.model_dir))

    def check_values(self) -> None:
        """The checks on the values alone (no paths): what the in-process API applies too."""
        positive = ("workers", "cpus_per_worker", "latent_dim", "prior_components", "epochs", "batch_size",
                    "reference_rows", "mc_samples")  # fmt: skip
        for name in positive:
            if name == "latent_dim" and self.latent_dim is None:  # chosen from the table
                continue
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        non_negative = ("gpus_per_worker", "kl_warmup_epochs", "patience", "linear_patience", "linear_lr_drops",
                        "iw_samples", "baseline_rows")  # fmt: skip
        for name in (*non_negative, "shuffle_buffer", "cache_mb", "min_epoch_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError("--val-fraction must be between 0 and 1 (exclusive)")
        if self.hidden is not None and (not self.hidden or any(h < 1 for h in self.hidden)):
            raise UsageError("--hidden widths must be at least 1")
        if self.bf16 and self.gpus_per_worker == 0:
            raise UsageError("--bf16 needs GPU workers (--gpus-per-worker > 0)")


@dataclass(frozen=True)
class TrainResult:
    model_id: str
    model_dir: str
    input_rows: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (setup, ray, statistics, ...)


def train_config(opts, train_rows: int, val_rows: int, workers: int = 1) -> TrainConfig:
    """The TrainConfig of a run's options (TrainOptions, or the API's options of the same names), with the
    passes per epoch that min_epoch_steps asks of this many training rows and workers, and the samples per
    validation record that this many validation rows get."""
    tcfg = TrainConfig(
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        lr=opts.lr,
        weight_decay=opts.weight_decay,
        kl_warmup_epochs=opts.kl_warmup_epochs,
        grad_clip=opts.grad_clip,
        patience=opts.patience,
        linear_start=opts.linear_start,
        linear_lr=opts.linear_lr,
        linear_patience=opts.linear_patience,
        linear_lr_drops=opts.linear_lr_drops,
        seed=opts.seed,
        min_epoch_steps=opts.min_epoch_steps,
    )
    tcfg.passes_per_epoch = passes_per_epoch(tcfg, train_rows, workers)
    tcfg.val_samples = val_samples(tcfg, val_rows)
    return tcfg


# ---- phases --------------------------------------------------------------------------------------
def setup(opts: TrainOptions) -> tuple[TrainOptions, FeatureSpec, InputData, str]:
    opts.validate()
    spec = load_spec(opts.spec)
    data = preflight(opts.data, spec)
    if not storage.is_s3(opts.model_dir):  # Ray Train's storage wants absolute local paths
        opts = replace(opts, model_dir=os.path.abspath(opts.model_dir))
    ckpt_dir = opts.checkpoint_dir or storage.join(opts.model_dir, CHECKPOINTS)
    if not storage.is_s3(ckpt_dir):
        ckpt_dir = os.path.abspath(ckpt_dir)
    log.info("input: %d file(s), %d rows", len(data.files), data.rows)
    return opts, spec, data, ckpt_dir


def new_run(opts: TrainOptions, spec: FeatureSpec, data: InputData) -> dict[str, Any]:
    """Statistics pass and fitted families: the run's recorded configuration (run.json)."""
    t0 = time.perf_counter()
    ds = statistics_pass(data, spec, opts.val_fraction)
    families = fit_families(spec, ds.stats)
    log.info("statistics pass: %d rows (%d validation) in %.1fs", ds.rows, ds.val_rows, time.perf_counter() - t0)
    if ds.train_rows == 0 or ds.val_rows == 0:
        raise InputDataError(
            f"the split leaves {ds.train_rows} training and {ds.val_rows} validation rows; "
            "use more data or another --val-fraction",
            file=data.uri,
        )
    train = train_config(opts, ds.train_rows, ds.val_rows, opts.workers)
    return {
        "spec": spec.to_dict(),
        "statistics": ds.stats,
        "families": families_to_json(families),
        "model_config": sized_config(
            len(spec.features), ds.train_rows, opts.latent_dim, opts.hidden, opts.prior_components
        ).to_dict(),
        "train_config": asdict(train),
        "val_fraction": opts.val_fraction,
        "shuffle_buffer": opts.shuffle_buffer,
        "data": {"uri": data.uri, "files": data.fingerprint(), "rows": ds.rows, "val_rows": ds.val_rows},
    }


# ---- the checkpoint directory: claimed with a marker; the job deletes only what it made in it -----
def _own_entries(ckpt_dir: str) -> list[str]:
    """What the run writes in its checkpoint directory (the marker aside)."""
    names = storage.list_dir(ckpt_dir)
    return [n for n in names if n in (RUN_META, RUN_NAME) or n.startswith(FAILURE_MARKER + ".")]


def _delete_own_entries(ckpt_dir: str) -> None:
    for name in _own_entries(ckpt_dir):
        path = storage.join(ckpt_dir, name)
        if name == RUN_NAME:
            storage.delete_dir(path)
        else:
            storage.delete_file(path)


def claim_checkpoint_dir(ckpt_dir: str, resume: bool) -> None:
    """Make sure `ckpt_dir` is ours before anything is written there (UsageError, exit 2, otherwise).

    An absent or empty directory is claimed by writing the marker; a non-empty one must already carry
    it. A fresh (not resumed) run then deletes the previous run's entries, and only those."""
    names = storage.list_dir(ckpt_dir)
    marker = storage.join(ckpt_dir, CHECKPOINTS_MARKER)
    if names and CHECKPOINTS_MARKER not in names:
        raise UsageError(
            f"--checkpoint-dir {ckpt_dir} is not empty and has no {CHECKPOINTS_MARKER}: it was not made by "
            "vaepipe train, which deletes only what it made; give an empty or new directory"
        )
    if not names:
        if resume:
            raise UsageError(f"--resume: no interrupted run in {ckpt_dir} ({RUN_META} not found)")
        body = {"made_by": "vaepipe train", "claim": uuid.uuid4().hex, "created_at": time.time()}
        storage.write_text(marker, json.dumps(body) + "\n")
        return
    if not resume:
        _delete_own_entries(ckpt_dir)


def release_checkpoint_dir(ckpt_dir: str) -> None:
    """Delete the run's checkpoints and the marker; the directory goes only if nothing else is in it."""
    _delete_own_entries(ckpt_dir)
    storage.delete_file(storage.join(ckpt_dir, CHECKPOINTS_MARKER))
    storage.remove_empty_dir(ckpt_dir)


def recorded_run(ckpt_dir: str, data: InputData) -> dict[str, Any]:
    try:
        run = json.loads(storage.read_text(storage.join(ckpt_dir, RUN_META)))
    except FileNotFoundError as e:
        raise UsageError(f"--resume: no interrupted run in {ckpt_dir} ({RUN_META} not found)") from e
    if run["data"]["files"] != data.fingerprint():
        raise UsageError(f"--resume: the input files differ from those of the run in {ckpt_dir}")
    return run


def train(opts: TrainOptions, run: dict[str, Any], data: InputData, spec: FeatureSpec, ckpt_dir: str) -> dict:
    """TorchTrainer over the train/valid split; returns the last checkpoint's (tensors, meta)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    sides = split_inputs(data, spec, run["val_fraction"], opts.workers)
    if isinstance(sides, WorkerShards):  # the driver holds the inputs: each worker takes its tables by reference
        shards, ingest = sides.refs, {}
    else:  # streamed by Ray Data, split across the workers by Ray Train
        shards, ingest = None, {"datasets": dict(zip(("train", "valid"), sides, strict=True)),
                                "dataset_config": exact_split_config()}  # fmt: skip
    loop = LoopConfig(
        spec=run["spec"],
        families=run["families"],
        model=run["model_config"],
        train=run["train_config"],
        shuffle_buffer=run["shuffle_buffer"],
        cache_mb=opts.cache_mb,
        use_gpu=opts.gpus_per_worker > 0,
        bf16=opts.bf16,
        threads=opts.cpus_per_worker,
        failure_hook=FailureHook.from_env(marker=storage.join(ckpt_dir, FAILURE_MARKER)).to_dict(),
        resume_from=newest_checkpoint(storage.join(ckpt_dir, RUN_NAME)) if opts.resume else None,
        shards=shards,
    )
    resources = {"CPU": opts.cpus_per_worker} | ({"GPU": opts.gpus_per_worker} if opts.gpus_per_worker else {})
    kwargs: dict[str, Any] = {"storage_path": ckpt_dir}
    if storage.is_s3(ckpt_dir):
        kwargs = {"storage_path": storage.fs_path(ckpt_dir), "storage_filesystem": storage.filesystem(ckpt_dir)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=opts.workers, use_gpu=opts.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (worker group, checkpoints, every report) stay in its log files
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            **kwargs,
        ),
        **ingest,
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train's TrainingFailedError and friends
        for failure in [e, *getattr(e, "worker_failures", {}).values()]:
            cause = vaepipe_error_in(failure)
            if isinstance(cause, InputDataError):  # a value no footer check could see: still bad input, exit 3
                raise InputDataError(f"{cause} (checkpoints kept in {ckpt_dir})") from e
        raise TrainingFailed(
            f"training failed ({root_message(e)}); the checkpoints are kept in {ckpt_dir}: "
            "run the same command with --resume to continue"
        ) from e
    if result.checkpoint is None:
        raise TrainingFailed("training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        tensors, meta = load_state(d)
    return {"tensors": tensors, "meta": meta}


def samples_and_baseline(opts: TrainOptions, run: dict, data: InputData, spec: FeatureSpec):
    """The encoded validation and training samples (``read_split_samples``) and the independent-columns
    baseline fitted on them: needs the fitted families only, so it runs on the driver while the workers
    train."""
    families = families_from_json(run["families"])
    codec = TableCodec(spec, families)
    valid_rows, train_rows = read_split_samples(
        data, spec, run["val_fraction"], opts.reference_rows, opts.baseline_rows
    )
    valid, train_sample = codec.encode(valid_rows), codec.encode(train_rows)
    return valid, train_sample, fit_baseline(families, train_sample, valid)


def reference(opts: TrainOptions, run: dict, model: VAE, early) -> tuple[dict, dict]:
    """Reference distribution of validation elbo / log_marginal, and the independent baseline beside the
    model's numbers (``early``: what ``samples_and_baseline`` returned)."""
    valid, train_sample, fitted = early
    ref = reference_scores(model, valid, opts.mc_samples, opts.iw_samples, seed=run["train_config"]["seed"])
    return ref, baseline_summary(model, train_sample, valid, ref, fitted=fitted)


def save(opts: TrainOptions, run: dict, spec: FeatureSpec, out: dict, early) -> str:
    tensors, meta = out["tensors"], out["meta"]
    model = VAE(families_from_json(run["families"]), VAEConfig.from_dict(run["model_config"]))
    model.load_state_dict(final_weights(tensors))
    model.eval()
    ref, baseline = reference(opts, run, model, early)
    history = meta["history"]
    if history[-1]["invalid_cells"]:
        log.warning(
            "%d training cells per epoch could not be used (negative, infinite or non-integer values where the "
            "spec forbids them) and were treated as missing",
            history[-1]["invalid_cells"],
        )
    best = [h for h in history if h.get("best")]
    return publish_model(
        opts.model_dir,
        model,
        spec,
        statistics=run["statistics"],
        train_config=run["train_config"]
        | {"val_fraction": run["val_fraction"], "shuffle_buffer": run["shuffle_buffer"]},
        workers={
            "workers": opts.workers,
            "cpus_per_worker": opts.cpus_per_worker,
            "gpus_per_worker": opts.gpus_per_worker,
            "bf16": opts.bf16,
        },
        metrics=history,
        best_epoch=best[-1]["epoch"] if best else history[-1]["epoch"],
        resumed_at_epochs=meta.get("resumed_at_epochs", []),
        data=run["data"],
        reference=ref,
        baseline=baseline,
    )


def run_training(opts: TrainOptions) -> TrainResult:
    """The whole training run: setup, statistics (or the recorded run), Ray Train, the artifact."""
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    opts, spec, data, ckpt_dir = setup(opts)
    claim_checkpoint_dir(ckpt_dir, opts.resume)
    run_meta = recorded_run(ckpt_dir, data) if opts.resume else None
    lap("setup")
    # a local instance gets logical CPUs for the workers plus Ray Data's read tasks beside them
    init_ray(
        opts.ray_address,
        prestart_workers=False,
        num_cpus=max(os.cpu_count() or 1, opts.workers * opts.cpus_per_worker + 2),
    )
    lap("ray_start")
    if run_meta is not None:
        log.info("resuming the run recorded in %s", ckpt_dir)
    else:
        run_meta = new_run(opts, spec, data)
        storage.write_text(storage.join(ckpt_dir, RUN_META), json.dumps(run_meta, indent=1))
    lap("statistics")
    # the samples and the baseline need the statistics only: the driver computes them while the workers train
    with ThreadPoolExecutor(1, thread_name_prefix="vaepipe-baseline") as pool:
        early = pool.submit(samples_and_baseline, opts, run_meta, data, spec)
        out = train(opts, run_meta, data, spec, ckpt_dir)
        lap("train")
        early = early.result()
    history = out["meta"]["history"]
    resumes = out["meta"].get("resumed_at_epochs") or [0]
    first = resumes[-1] if opts.resume else 0  # the epochs this invocation trained
    timings["epochs"] = sum(h.get("epoch_seconds", 0.0) for h in history if h["epoch"] >= first)
    timings["train_start_and_end"] = timings["train"] - timings["epochs"]
    model_id = save(opts, run_meta, spec, out, early)
    lap("reference_baseline_save")
    if not opts.keep_checkpoints:
        release_checkpoint_dir(ckpt_dir)
    lap("cleanup")
    log.info(
        "done in %.1fs: %s", sum(v for k, v in timings.items() if k not in ("epochs", "train_start_and_end")),
        ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
    )  # fmt: skip
    return TrainResult(model_id, opts.model_dir, data.rows, timings)
