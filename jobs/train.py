"""vaepipe train: Ray Train over the Parquet shards; writes the model artifact.

Phases: **setup** (spec, pre-flight of every shard's footer: a bad file ends the job with exit 3
before anything is written), **statistics** (a streaming Ray Data pass over every row; skipped on
``--resume``, which reuses the recorded ones), **train** (TorchTrainer, ``--workers`` data-parallel
workers, a checkpoint every epoch), **save** (the best epoch's weights, the reference distribution
of validation elbo and log_marginal, the independent-columns baseline, then model.json last).

Checkpoints live in ``--checkpoint-dir`` (default ``MODEL_DIR/_checkpoints``; a leading underscore
marks it as not part of the artifact) together with ``run.json``, the run's recorded configuration
and statistics. A successful run removes them (``--keep-checkpoints`` keeps them); a failed run
leaves them, and the same command with ``--resume`` continues from the last completed epoch. Within
one run, Ray Train restarts failed workers from the last checkpoint up to ``--max-failures`` times.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from pipeline.core.artifact import save_model
from pipeline.core.baseline import IndependentBaseline
from pipeline.core.codec import TableCodec, families_from_json, families_to_json, fit_families
from pipeline.core.model import VAE, VAEConfig
from pipeline.core.scoring import DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES, reference_values, score_batch
from pipeline.core.training import TrainConfig, passes_per_epoch
from pipeline.errors import InputDataError, UsageError, VaepipeError, first_line
from pipeline.io import storage
from pipeline.io.inputs import InputData, preflight
from pipeline.runtime import add_ray_options, init_ray, job_main, make_parser
from pipeline.train.data import input_error_in, read_split_rows, split_datasets, statistics_pass
from pipeline.train.loop import (
    LoopConfig,
    exact_split_config,
    final_weights,
    load_state,
    progress_line,
    train_loop_per_worker,
)
from schemas.feature_spec import FeatureSpec, load_spec

log = logging.getLogger("vaepipe.train")

RUN_META = "run.json"
RUN_NAME = "train"  # the Ray Train run inside --checkpoint-dir
REFERENCE_QUANTILES = np.linspace(0.0, 1.0, 1001)  # 0.1% steps
BASELINE_STEPS = 300  # Adam steps of the independent-columns baseline (free constants: converges fast)


class TrainingFailed(VaepipeError):
    exit_code = 1


def build_parser():
    d, m = TrainConfig(), VAEConfig()
    p = make_parser("vaepipe train", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--data", required=True, help="Parquet file, directory of shards, or glob (local or s3://)")
    p.add_argument("--spec", required=True, help="feature spec YAML (local or s3://)")
    p.add_argument("--model-dir", required=True, help="where the model artifact is written (local or s3://)")
    g = p.add_argument_group("workers")
    g.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    g.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per worker")
    g.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs per worker (0: CPU training with gloo)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast on GPU workers")
    g.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (-1: no limit)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--latent-dim", type=int, default=m.latent_dim, help="dimension of z")
    g.add_argument("--hidden", type=int, nargs="+", default=list(m.hidden), help="MLP widths")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="records per step per worker")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--kl-warmup-epochs", type=int, default=d.kl_warmup_epochs)
    g.add_argument("--min-epoch-steps", type=int, default=d.min_epoch_steps,
                   help="a small table's epoch makes several passes, until this many steps per worker")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--patience", type=int, default=d.patience, help="early stopping on validation elbo (0: off)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of records (by id hash) held out")
    g.add_argument("--shuffle-buffer", type=int, default=10_000, help="rows in each worker's local shuffle buffer")
    g = p.add_argument_group("checkpoints and artifact")
    g.add_argument("--checkpoint-dir", default=None, help="Ray Train storage (default: MODEL_DIR/_checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --checkpoint-dir")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after success")
    g.add_argument("--reference-rows", type=int, default=10_000, help="validation rows for the reference scores")
    g.add_argument("--mc-samples", type=int, default=DEFAULT_MC_SAMPLES, help="samples for the reference elbo")
    g.add_argument("--iw-samples", type=int, default=DEFAULT_IW_SAMPLES, help="samples for the reference log_marginal")
    g.add_argument("--baseline-rows", type=int, default=5_000, help="training rows to fit the baseline on")
    # test hook: the last worker raises at the start of each of these epochs, once per checkpoint dir
    p.add_argument("--inject-failure-at-epoch", type=int, nargs="+", default=[], help=argparse.SUPPRESS)
    add_ray_options(p)
    return p


def check_args(args) -> None:
    positive = ["workers", "cpus_per_worker", "latent_dim", "epochs", "batch_size", "reference_rows", "mc_samples"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ["gpus_per_worker", "kl_warmup_epochs", "patience", "iw_samples", "baseline_rows", "shuffle_buffer",
                 "min_epoch_steps"]:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError("--val-fraction must be between 0 and 1 (exclusive)")
    if any(h < 1 for h in args.hidden):
        raise UsageError("--hidden widths must be at least 1")
    if args.bf16 and args.gpus_per_worker == 0:
        raise UsageError("--bf16 needs GPU workers (--gpus-per-worker > 0)")


# ---- phases --------------------------------------------------------------------------------------
def setup(args) -> tuple[FeatureSpec, InputData, str]:
    check_args(args)
    spec = load_spec(args.spec)
    data = preflight(args.data, spec)
    if not storage.is_s3(args.model_dir):  # Ray Train's storage wants absolute local paths
        args.model_dir = os.path.abspath(args.model_dir)
    ckpt_dir = args.checkpoint_dir or storage.join(args.model_dir, "_checkpoints")
    if not storage.is_s3(ckpt_dir):
        ckpt_dir = os.path.abspath(ckpt_dir)
    log.info("input: %d file(s), %d rows", len(data.files), data.rows)
    return spec, data, ckpt_dir


def new_run(args, spec: FeatureSpec, data: InputData) -> dict[str, Any]:
    """Statistics pass and fitted families: the run's recorded configuration (run.json)."""
    t0 = time.perf_counter()
    ds = statistics_pass(data, spec, args.val_fraction)
    families = fit_families(spec, ds.stats)
    log.info("statistics pass: %d rows (%d validation) in %.1fs", ds.rows, ds.val_rows, time.perf_counter() - t0)
    if ds.train_rows == 0 or ds.val_rows == 0:
        raise InputDataError(
            f"the split leaves {ds.train_rows} training and {ds.val_rows} validation rows; "
            "use more data or another --val-fraction",
            file=data.uri,
        )
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        kl_warmup_epochs=args.kl_warmup_epochs,
        grad_clip=args.grad_clip,
        patience=args.patience,
        seed=args.seed,
        min_epoch_steps=args.min_epoch_steps,
    )
    train.passes_per_epoch = passes_per_epoch(train, ds.train_rows, args.workers)
    return {
        "spec": spec.to_dict(),
        "statistics": ds.stats,
        "families": families_to_json(families),
        "model_config": VAEConfig(latent_dim=args.latent_dim, hidden=tuple(args.hidden)).to_dict(),
        "train_config": asdict(train),
        "val_fraction": args.val_fraction,
        "shuffle_buffer": args.shuffle_buffer,
        "data": {"uri": data.uri, "files": data.fingerprint(), "rows": ds.rows, "val_rows": ds.val_rows},
    }


def recorded_run(ckpt_dir: str, data: InputData) -> dict[str, Any]:
    try:
        run = json.loads(storage.read_text(storage.join(ckpt_dir, RUN_META)))
    except FileNotFoundError as e:
        raise UsageError(f"--resume: no interrupted run in {ckpt_dir} ({RUN_META} not found)") from e
    if run["data"]["files"] != data.fingerprint():
        raise UsageError(f"--resume: the input files differ from those of the run in {ckpt_dir}")
    return run


def train(args, run: dict[str, Any], data: InputData, spec: FeatureSpec, ckpt_dir: str) -> dict:
    """TorchTrainer over the train/valid split; returns the last checkpoint's (tensors, meta)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    train_ds, valid_ds = split_datasets(data, spec, run["val_fraction"])
    loop = LoopConfig(
        spec=run["spec"],
        families=run["families"],
        model=run["model_config"],
        train=run["train_config"],
        shuffle_buffer=run["shuffle_buffer"],
        use_gpu=args.gpus_per_worker > 0,
        bf16=args.bf16,
        threads=args.cpus_per_worker,
        fail_at_epochs=list(args.inject_failure_at_epoch),
        fail_marker=storage.join(ckpt_dir, "injected_failure"),
    )
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {})
    kwargs: dict[str, Any] = {"storage_path": ckpt_dir}
    if storage.is_s3(ckpt_dir):
        kwargs = {"storage_path": storage.fs_path(ckpt_dir), "storage_filesystem": storage.filesystem(ckpt_dir)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers, use_gpu=args.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            **kwargs,
        ),
        datasets={"train": train_ds, "valid": valid_ds},
        dataset_config=exact_split_config(),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train's TrainingFailedError and friends
        for failure in [e, *getattr(e, "worker_failures", {}).values()]:
            cause = input_error_in(failure)
            if cause is not None:  # a value no footer check could see: still bad input, exit 3
                raise InputDataError(f"{cause} (checkpoints kept in {ckpt_dir})") from e
        raise TrainingFailed(
            f"training failed ({type(e).__name__}: {first_line(e)}); the checkpoints are kept in {ckpt_dir}: "
            "run the same command with --resume to continue"
        ) from e
    if result.checkpoint is None:
        raise TrainingFailed("training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        tensors, meta = load_state(d)
    return {"tensors": tensors, "meta": meta}


def reference(args, run: dict, data: InputData, spec: FeatureSpec, model: VAE) -> tuple[dict, dict]:
    """Reference distribution of validation elbo / log_marginal, and the independent baseline."""
    codec = TableCodec(spec, model.families)
    valid = codec.encode(read_split_rows(data, spec, run["val_fraction"], True, args.reference_rows))
    scores = score_batch(model, valid, args.mc_samples, args.iw_samples, seed=run["train_config"]["seed"])
    ref: dict[str, Any] = {
        "rows": len(valid),
        "mc_samples": args.mc_samples,
        "iw_samples": args.iw_samples,
        "quantile_probs": REFERENCE_QUANTILES.round(4).tolist(),
    }
    for name, values in (("elbo", scores.elbo), ("log_marginal", scores.log_marginal)):
        if values is None:
            continue
        ref[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "quantiles": np.quantile(values, REFERENCE_QUANTILES).tolist(),
        }
    if scores.log_marginal is not None:  # what tail_probability compares with (pipeline/core/scoring.py)
        ref["log_marginal"]["sorted"] = reference_values(scores.log_marginal)
    baseline_train = codec.encode(read_split_rows(data, spec, run["val_fraction"], False, args.baseline_rows))
    base = IndependentBaseline(model.families).fit(baseline_train, steps=BASELINE_STEPS)
    with torch.no_grad():
        base_ll = base.log_likelihood(valid)
    baseline = {
        "train_rows": len(baseline_train),
        "val_rows": len(valid),
        "val_log_likelihood": float(base_ll.mean()),
        "model_val_elbo": ref["elbo"]["mean"],
        "model_val_log_marginal": ref.get("log_marginal", {}).get("mean"),
    }
    return ref, baseline


def save(args, run: dict, data: InputData, spec: FeatureSpec, out: dict) -> str:
    tensors, meta = out["tensors"], out["meta"]
    model = VAE(families_from_json(run["families"]), VAEConfig.from_dict(run["model_config"]))
    model.load_state_dict(final_weights(tensors))
    model.eval()
    ref, baseline = reference(args, run, data, spec, model)
    history = meta["history"]
    if history[-1]["invalid_cells"]:
        log.warning(
            "%d training cells per epoch could not be used (negative, infinite or non-integer values where the "
            "spec forbids them) and were treated as missing",
            history[-1]["invalid_cells"],
        )
    best = [h for h in history if h.get("best")]
    model_id = save_model(
        args.model_dir,
        model,
        spec,
        statistics=run["statistics"],
        train_config=run["train_config"]
        | {"val_fraction": run["val_fraction"], "shuffle_buffer": run["shuffle_buffer"]},
        workers={
            "workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker,
            "gpus_per_worker": args.gpus_per_worker,
            "bf16": args.bf16,
        },
        metrics=history,
        best_epoch=best[-1]["epoch"] if best else history[-1]["epoch"],
        resumed_at_epochs=meta.get("resumed_at_epochs", []),
        data=run["data"],
        reference=ref,
        baseline=baseline,
    )
    return model_id


def run(args) -> int:
    spec, data, ckpt_dir = setup(args)
    run_meta = recorded_run(ckpt_dir, data) if args.resume else None
    # a local instance gets logical CPUs for the workers plus Ray Data's read tasks beside them
    init_ray(args.ray_address, num_cpus=max(os.cpu_count() or 1, args.workers * args.cpus_per_worker + 2))
    if run_meta is not None:
        log.info("resuming the run recorded in %s", ckpt_dir)
    else:
        run_meta = new_run(args, spec, data)
        # from here on the job writes: a fresh run starts from empty checkpoints
        storage.delete_dir(ckpt_dir)
        storage.write_text(storage.join(ckpt_dir, RUN_META), json.dumps(run_meta, indent=1))
    out = train(args, run_meta, data, spec, ckpt_dir)
    for row in out["meta"]["history"]:
        log.info(progress_line(row, run_meta["train_config"]["epochs"]))
    model_id = save(args, run_meta, data, spec, out)
    if not args.keep_checkpoints:
        storage.delete_dir(ckpt_dir)
    print(f"model {model_id} written to {args.model_dir}")
    return 0


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
