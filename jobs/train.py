"""vaepipe train: Ray Train over the Parquet shards; writes the model artifact.

The flags make a :class:`pipeline.train.run.TrainOptions`; :func:`pipeline.train.run.run_training`
does the run (statistics pass, Ray Train with checkpoints and ``--resume``, reference scores, baseline,
the artifact). See the README, "How it fits together".
"""

from __future__ import annotations

import argparse
import sys

from pipeline import summary
from pipeline.runtime import add_ray_options, job_main, make_parser, options_from_args
from pipeline.train.run import TrainOptions, run_training


def build_parser():
    d = TrainOptions(data="", spec="", model_dir="")
    p = make_parser("vaepipe train", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--data", required=True, help="Parquet file, directory of shards, or glob (local or s3://)")
    p.add_argument("--spec", required=True, help="feature spec YAML (local or s3://)")
    p.add_argument("--model-dir", required=True, help="where the model artifact is written (local or s3://)")
    g = p.add_argument_group("workers")
    g.add_argument("--workers", type=int, default=d.workers, help="data-parallel Ray Train workers")
    g.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker, help="CPUs (and torch threads) per worker")
    g.add_argument(
        "--gpus-per-worker", type=int, default=d.gpus_per_worker, help="GPUs per worker (0: CPU training with gloo)"
    )
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast on GPU workers")
    g.add_argument(
        "--max-failures", type=int, default=d.max_failures, help="worker failures to recover from (-1: no limit)"
    )
    g = p.add_argument_group("model and optimisation")
    g.add_argument(
        "--latent-dim", type=int, default=d.latent_dim,
        help="dimension of z (default: two thirds of the number of features, between 8 and 32)",
    )  # fmt: skip
    g.add_argument(
        "--hidden", type=int, nargs="+", default=d.hidden,
        help="MLP widths (default: 128 128, or 64 64 for fewer than 2,000 training rows)",
    )  # fmt: skip
    g.add_argument(
        "--prior-components", type=int, default=d.prior_components,
        help="the prior p(z): a learned mixture of this many Gaussians (1: N(0, I))",
    )  # fmt: skip
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="records per step per worker")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--kl-warmup-epochs", type=int, default=d.kl_warmup_epochs)
    g.add_argument(
        "--min-epoch-steps", type=int, default=d.min_epoch_steps,
        help="a small table's epoch makes several passes, until this many steps per worker",
    )  # fmt: skip
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--patience", type=int, default=d.patience, help="early stopping on validation elbo (0: off)")
    g.add_argument(
        "--linear-start", action=argparse.BooleanOptionalAction, default=d.linear_start,
        help="train the linear paths alone first (factor analysis with the columns' likelihoods) until validation "
        "stalls or half the epochs are spent, then the whole model (needs --patience > 0)",
    )  # fmt: skip
    g.add_argument("--linear-lr", type=float, default=d.linear_lr, help="AdamW rate the linear start begins at")
    g.add_argument(
        "--linear-lr-drops", type=int, default=d.linear_lr_drops,
        help="times the linear start's learning rate is cut (x0.3) after half of --linear-patience epochs without "
        "improvement, before --linear-patience ends it",
    )  # fmt: skip
    g.add_argument(
        "--linear-patience", type=int, default=d.linear_patience,
        help="epochs without improvement that end the linear start (0: --patience)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of records (by id hash) held out")
    g.add_argument(
        "--shuffle-buffer", type=int, default=d.shuffle_buffer, help="rows in each worker's local shuffle buffer"
    )
    g.add_argument(
        "--cache-mb",
        type=int,
        default=d.cache_mb,
        help="each worker keeps its encoded data in memory up to this size after the first epoch (0: read every epoch)",
    )
    g = p.add_argument_group("checkpoints and artifact")
    g.add_argument("--checkpoint-dir", default=None, help="Ray Train storage (default: MODEL_DIR/_checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --checkpoint-dir")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after success")
    g.add_argument(
        "--reference-rows", type=int, default=d.reference_rows, help="validation rows for the reference scores"
    )
    g.add_argument("--mc-samples", type=int, default=d.mc_samples, help="samples for the reference elbo")
    g.add_argument("--iw-samples", type=int, default=d.iw_samples, help="samples for the reference log_marginal")
    g.add_argument("--baseline-rows", type=int, default=d.baseline_rows, help="training rows to fit the baseline on")
    add_ray_options(p)
    return p


def run(args) -> int:
    summary.record(model_uri=args.model_dir)
    result = run_training(options_from_args(TrainOptions, args))
    summary.record(rows_in=result.input_rows, model_id=result.model_id)
    print(f"model {result.model_id} written to {result.model_dir}")
    return 0


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
