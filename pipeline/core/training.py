"""One training step, shared by the plain loop here and the Ray Train workers.

The objective is the negative ELBO per record, -(log p(x|z) - beta * KL), with one reparameterised
sample per record and beta ramping linearly from 0 to 1 over the warm-up epochs.

Training starts linear (:class:`Phases`): the MLPs' outputs gated off, the model is its linear paths
alone -- factor analysis with the columns' own likelihoods -- from ``linear_lr``, the rate cut on each
plateau, until the validation elbo stalls at the lowest rate (or half the epochs are spent); then its best
weights are restored, the MLPs join and training goes on at ``lr`` with early stopping. The MLPs overfit
a small table long before the linear structure is learnt (breast cancer, 409 rows: 38.6 nats per
held-out record trained whole from the start, 43.8 started linear; factor analysis 42.3); on larger
tables the start costs epochs, not quality.

An epoch is at least ``min_epoch_steps`` optimizer steps: on a small table it makes several shuffled
passes over the data (:func:`passes_per_epoch`), so that the same defaults (epochs, warm-up, patience)
train a 500-row table as well as a million-row one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core.codec import EncodedBatch
from pipeline.core.model import VAE


@dataclass
class TrainConfig:
    epochs: int = 100  # epochs at most, both phases (early stopping usually ends each sooner)
    batch_size: int = 512  # records per step (per worker under Ray Train)
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-4
    kl_warmup_epochs: int = 5  # KL weight ramps 0 -> 1 over these epochs
    grad_clip: float = 10.0  # max gradient norm
    patience: int = 5  # early stopping on validation elbo (0 = off)
    seed: int = 0
    min_epoch_steps: int = 50  # an epoch repeats passes over the data until it has made this many steps
    passes_per_epoch: int | None = None  # None: from min_epoch_steps and the number of training rows
    linear_start: bool = True  # train the linear paths alone first (Phases); needs VAEConfig.linear_skip
    linear_lr: float = 3e-2  # the learning rate the linear phase starts at
    linear_patience: int = 10  # epochs without improvement that end the linear phase (0: ``patience``)
    linear_lr_drops: int = 3  # times the linear phase's rate is cut (LINEAR_DROP_FACTOR) on a plateau before it ends
    val_samples: int | None = None  # samples of z per validation record; None: from the validation rows


def passes_per_epoch(cfg: TrainConfig, train_rows: int, workers: int = 1) -> int:
    """Passes over the training rows per epoch: enough for ``min_epoch_steps`` steps of ``batch_size`` per worker."""
    if cfg.passes_per_epoch:
        return cfg.passes_per_epoch
    steps = max(1, math.ceil(train_rows / (cfg.batch_size * max(workers, 1))))
    return max(1, math.ceil(cfg.min_epoch_steps / steps))


VAL_SAMPLE_ROWS = 2048  # validation records x samples of z per epoch, at least (up to MAX_VAL_SAMPLES samples)
MAX_VAL_SAMPLES = 32


def val_samples(cfg: TrainConfig, val_rows: int) -> int:
    """Samples of z per validation record: a small validation set is averaged over several, so that early
    stopping follows the model rather than the noise of one draw (57 validation records, one sample: the
    elbo moves by 1-2 nats from epoch to epoch at a standstill and the linear phase stops at a lucky draw)."""
    if cfg.val_samples:
        return cfg.val_samples
    return int(min(MAX_VAL_SAMPLES, max(1, math.ceil(VAL_SAMPLE_ROWS / max(val_rows, 1)))))


LINEAR_DROP_FACTOR = 0.3  # the linear phase's learning rate is multiplied by this on a plateau


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up: epoch 0 gets 1/(warmup+1), reaching 1 from epoch `warmup_epochs` on."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / (warmup_epochs + 1))


class Phases:
    """Early stopping on validation elbo, and the linear start: the same decisions in the plain loop, the
    API's loop and on every Ray Train worker (each sees the same all-reduced validation elbo).

    ``update`` once per epoch counts an epoch without improvement only once the KL weight is 1. The linear
    phase ends after ``linear_patience`` such epochs or after ``linear_epochs`` (half the epochs); the full
    phase stops after ``patience``. The linear phase is given longer: it climbs slowly and steadily (it
    cannot overfit much), while the whole model's climb is quick and its overfitting quicker.
    With ``patience`` 0 (no early stopping) there is no linear phase.

    The linear phase is a reduce-on-plateau schedule: it starts at ``linear_lr`` and, after half of
    ``linear_patience`` epochs without improvement, multiplies the rate by LINEAR_DROP_FACTOR, up to
    ``linear_lr_drops`` times; only then does ``linear_patience`` end it. A constant rate left it short of
    its optimum: on the smallest table of the quality benchmark (breast cancer, 409 training rows) the
    phase was still climbing when half the epochs were spent at 1e-2 (its validation elbo 39.1-41.4 over
    four seeds), and stopped on a plateau at 3e-2 (38.9-40.0); 3e-2 with three cuts reaches 41.5-42.5 in the
    same 50 epochs, and the held-out log-likelihood of the whole model rose from 43.9-45.2 to 45.3-46.9 nats.
    ``start`` hands it the optimizer whose rate it cuts; ``drops`` is the cuts made so far (a resumed run's)."""

    def __init__(self, cfg: TrainConfig, model: VAE, best_val: float = -math.inf, stale: int = 0,
                 linear: bool | None = None, drops: int = 0):  # fmt: skip
        self.cfg = cfg
        # the phases are chosen between on validation: without early stopping the model trains whole from
        # the start (the full phase, unwatched, overfits a small table from the linear optimum within epochs)
        on = cfg.linear_start and model.config.linear_skip and cfg.patience > 0
        self.linear_epochs = cfg.epochs // 2 if on else 0
        self.linear = self.linear_epochs > 0 if linear is None else linear
        self.best_val, self.stale, self.drops = best_val, stale, drops
        self.optimizer: torch.optim.Optimizer | None = None

    def start(self, model: VAE, optimizer: torch.optim.Optimizer, fresh: bool) -> None:
        """Before the first epoch (of a run, or resumed): the gate as the phase says; a fresh run starting
        linear zeroes the weights that carry the MLPs' outputs, so that they join smoothly later."""
        model.nonlinear = not self.linear
        self.optimizer = optimizer
        if self.linear and fresh:
            with torch.no_grad():
                for layer in model.nonlinear_heads():
                    layer.weight.zero_()
            _set_lr(optimizer, self.cfg.linear_lr)

    def update(self, epoch: int, score: float, beta: float) -> tuple[bool, bool, bool]:
        """-> (improved: keep these weights as the best, switch: the linear phase ends now, stop)."""
        improved = False
        if beta >= 1.0:
            if score > self.best_val:
                self.best_val, self.stale, improved = score, 0, True
            else:
                self.stale += 1
        patience = self.cfg.patience
        linear_patience = self.cfg.linear_patience or patience
        if self.linear and self.drops < self.cfg.linear_lr_drops and self.stale >= max(1, linear_patience // 2):
            self.drops, self.stale = self.drops + 1, 0  # a plateau: on at a lower rate
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] *= LINEAR_DROP_FACTOR
        switch = self.linear and (self.stale >= linear_patience or epoch + 1 >= self.linear_epochs)
        if switch:
            self.linear, self.stale = False, 0
        stop = not self.linear and not switch and bool(patience and self.stale >= patience)
        return improved, switch, stop

    def open(self, model: VAE, optimizer: torch.optim.Optimizer, best: dict[str, Any] | None) -> None:
        """The linear phase has ended: its best weights back, the MLPs in, the optimizer afresh at ``lr``."""
        if best is not None:
            model.load_state_dict(best)
        model.nonlinear = True
        optimizer.state.clear()
        _set_lr(optimizer, self.cfg.lr)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(model: VAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused: the whole update in one kernel over all parameters, on the CPU as on CUDA. foreach on the CPU is
    # a loop of per-tensor ops (adult: 37 tensors, ~550 ops and 74 host syncs a step): 0.8 -> 0.2 ms a step
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


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
def evaluate(model: VAE, batches: Iterable[EncodedBatch], samples: int = 1) -> dict[str, float]:
    """ELBO averages over batches, each record's averaged over ``samples`` draws of z (cheap; scoring gives
    the precise estimates)."""
    model.eval()
    n = recon = kl = 0.0
    col = None
    for b in batches:
        for _ in range(samples):
            out = model.loss(b)
            recon += float(out.recon.sum()) / samples
            kl += float(out.kl.sum()) / samples
            s = out.column_log_prob.sum(0) / samples
            col = s if col is None else col + s
        n += len(b)
    cols = {} if col is None else {f.name: float(v) / n for f, v in zip(model.families, col, strict=True)}
    return {"elbo": (recon - kl) / n, "recon_log_density": recon / n, "kl": kl / n, "columns": cols}


def iterate_minibatches(batch: EncodedBatch, batch_size: int, generator: torch.Generator | None = None):
    """Shuffled minibatches of an in-memory encoded table."""
    perm = torch.randperm(len(batch), generator=generator).numpy()
    for i in range(0, len(batch), batch_size):
        yield batch.select(perm[i : i + batch_size])


def fit(model: VAE, train: EncodedBatch, cfg: TrainConfig, valid: EncodedBatch | None = None) -> list[dict]:
    """A plain single-process loop over an in-memory table, with the same step and phases as Ray Train's."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    phases = Phases(cfg, model, linear=False if valid is None else None)
    phases.start(model, opt, fresh=True)
    history = []
    best_state = None
    passes = passes_per_epoch(cfg, len(train))
    samples = val_samples(cfg, 0 if valid is None else len(valid))
    for epoch in range(cfg.epochs):
        beta = kl_weight(epoch, cfg.kl_warmup_epochs)
        tot = {"n": 0, "recon": 0.0, "kl": 0.0}
        for _ in range(passes):
            for mb in iterate_minibatches(train, cfg.batch_size, gen):
                for k, v in train_step(model, opt, mb, beta, cfg.grad_clip).items():
                    tot[k] += v
        row = {"epoch": epoch, "kl_weight": beta, "linear": phases.linear,
               "train_elbo": (tot["recon"] - tot["kl"]) / tot["n"]}  # fmt: skip
        stop = False
        if valid is not None:
            row["val_elbo"] = evaluate(model, [valid], samples)["elbo"]
            improved, switch, stop = phases.update(epoch, row["val_elbo"], beta)
            if improved and cfg.patience:  # patience 0: the last weights are kept
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            if switch:
                phases.open(model, opt, best_state)
        history.append(row)
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.nonlinear = True
    return history
