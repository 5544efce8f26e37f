"""One training step, shared by the plain loop here and the Ray Train workers.

The objective is the negative ELBO per record, -(log p(x|z) - beta * KL), with one reparameterised
sample per record and beta ramping linearly from 0 to 1 over the warm-up epochs.

An epoch is at least ``min_epoch_steps`` optimizer steps: on a small table it makes several shuffled
passes over the data (:func:`passes_per_epoch`), so that the same defaults (epochs, warm-up, patience)
train a 500-row table as well as a million-row one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline.core.codec import EncodedBatch
from pipeline.core.model import VAE


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training data
    batch_size: int = 512  # records per step (per worker under Ray Train)
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-4
    kl_warmup_epochs: int = 5  # KL weight ramps 0 -> 1 over these epochs
    grad_clip: float = 10.0  # max gradient norm
    patience: int = 5  # early stopping on validation elbo (0 = off)
    seed: int = 0
    min_epoch_steps: int = 50  # an epoch repeats passes over the data until it has made this many steps
    passes_per_epoch: int | None = None  # None: from min_epoch_steps and the number of training rows


def passes_per_epoch(cfg: TrainConfig, train_rows: int, workers: int = 1) -> int:
    """Passes over the training rows per epoch: enough for ``min_epoch_steps`` steps of ``batch_size`` per worker."""
    if cfg.passes_per_epoch:
        return cfg.passes_per_epoch
    steps = max(1, math.ceil(train_rows / (cfg.batch_size * max(workers, 1))))
    return max(1, math.ceil(cfg.min_epoch_steps / steps))


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up: epoch 0 gets 1/(warmup+1), reaching 1 from epoch `warmup_epochs` on."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / (warmup_epochs + 1))


def make_optimizer(model: VAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    # foreach: one kernel per operation over all parameters (CUDA's default; on CPU 5-8% off a small step)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def train_step_sums(
    model: VAE, optimizer: torch.optim.Optimizer, batch: EncodedBatch, beta: float = 1.0, grad_clip: float = 10.0
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One gradient step on the negative ELBO; returns (records, recon sum, kl sum), the sums as detached
    0-d tensors on the model's device (no host round trip: a loop adds them up and reads them once)."""
    model.train()
    out = model.loss(batch, kl_weight=beta)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return len(batch), out.recon.detach().sum(), out.kl.detach().sum()


def train_step(
    model: VAE, optimizer: torch.optim.Optimizer, batch: EncodedBatch, beta: float = 1.0, grad_clip: float = 10.0
) -> dict[str, float]:
    """One gradient step on the negative ELBO; returns sums over the batch for epoch averages."""
    n, recon, kl = train_step_sums(model, optimizer, batch, beta, grad_clip)
    return {"n": n, "recon": float(recon), "kl": float(kl)}


@torch.no_grad()
def evaluate(model: VAE, batches: Iterable[EncodedBatch]) -> dict[str, float]:
    """Single-sample ELBO averages over batches (cheap; scoring gives the precise estimates)."""
    model.eval()
    n = recon = kl = 0.0
    col = None
    for b in batches:
        out = model.loss(b)
        n += len(b)
        recon += float(out.recon.sum())
        kl += float(out.kl.sum())
        s = out.column_log_prob.sum(0)
        col = s if col is None else col + s
    cols = {} if col is None else {f.name: float(v) / n for f, v in zip(model.families, col, strict=True)}
    return {"elbo": (recon - kl) / n, "recon_log_density": recon / n, "kl": kl / n, "columns": cols}


def iterate_minibatches(batch: EncodedBatch, batch_size: int, generator: torch.Generator | None = None):
    """Shuffled minibatches of an in-memory encoded table."""
    perm = torch.randperm(len(batch), generator=generator).numpy()
    for i in range(0, len(batch), batch_size):
        yield batch.select(perm[i : i + batch_size])


def fit(model: VAE, train: EncodedBatch, cfg: TrainConfig, valid: EncodedBatch | None = None) -> list[dict]:
    """A plain single-process loop over an in-memory table, with the same step Ray Train uses."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    history = []
    best, best_state, stale = -float("inf"), None, 0
    passes = passes_per_epoch(cfg, len(train))
    for epoch in range(cfg.epochs):
        beta = kl_weight(epoch, cfg.kl_warmup_epochs)
        tot = {"n": 0, "recon": 0.0, "kl": 0.0}
        for _ in range(passes):
            for mb in iterate_minibatches(train, cfg.batch_size, gen):
                for k, v in train_step(model, opt, mb, beta, cfg.grad_clip).items():
                    tot[k] += v
        row = {"epoch": epoch, "kl_weight": beta, "train_elbo": (tot["recon"] - tot["kl"]) / tot["n"]}
        if valid is not None:
            row["val_elbo"] = evaluate(model, [valid])["elbo"]
            if beta >= 1.0 and cfg.patience:
                if row["val_elbo"] > best:
                    best, stale = row["val_elbo"], 0
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                else:
                    stale += 1
        history.append(row)
        if cfg.patience and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
