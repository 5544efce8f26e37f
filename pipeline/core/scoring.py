"""Per-record scores, pure torch (no Ray): what the batch scoring job calls on every batch.

For each record, with q(z|x) = N(mu, diag(sigma^2)) and samples z_s = mu + sigma * eps_s:

* ``recon_log_density`` = (1/S) sum_{s<S} log p(x | z_s): a Monte Carlo estimate of
  E_q[log p(x|z)], over observed features, in the data's own units;
* ``column_log_density``: the same average for each feature (NaN where the value is missing);
* ``kl`` = KL(q(z|x) || p(z)), closed form (for a mixture prior the KL of the joint latent (component, z),
  an upper bound: pipeline/core/model.py); ``elbo`` = recon_log_density - kl;
* ``log_marginal`` = log (1/K) sum_{s<K} p(x|z_s) p(z_s) / q(z_s|x): the importance-weighted bound,
  computed with a running logsumexp over chunks of samples so memory stays bounded for large K.

One set of max(S, K) samples serves both estimates: sample s feeds the Monte Carlo average when
s < S and the importance-weighted sum when s < K, through a single decoder pass.

* ``column_conditional_log_density`` (optional, ``conditional_samples`` = C > 0): for each observed
  feature j, an estimate of log p(x_j | x_-j), the feature given all the others. The record is encoded
  with j hidden, giving q_j(z) = q(z | x_-j) (training's masked pass teaches the encoder records with
  features hidden, so q_j is a trained posterior); with C samples z_c from q_j and weights
  w_c = p(x_-j | z_c) p(z_c) / q_j(z_c),

      log p(x_j | x_-j) ~= log sum_c w_c p(x_j | z_c) - log sum_c w_c,

  the ratio of the importance-weighted estimates of p(x) and p(x_-j) on shared samples: consistent as
  C grows (biased for finite C, like every ratio estimator). A wrong value in column j gets a very low
  conditional score in j, whatever the record's other columns say: it names the broken column. Cost:
  one encoder pass and C decoder samples per observed feature.

The noise eps for sample s of a record is a counter-based hash of (record key, seed, s, latent dim),
so a record's scores do not depend on which batch, position or worker it is scored in. The conditional
score of feature j draws from its own stream (seed shifted by j + 1 times a large odd constant).

``tail_probability`` compares a record's log_marginal with the model's stored validation values
(:func:`tail_probability`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.codec import EncodedBatch, shift_right, signed64, splitmix64, splitmix64_bits
from pipeline.core.defaults import DEFAULT_CONDITIONAL_SAMPLES, DEFAULT_IW_SAMPLES, DEFAULT_MC_SAMPLES
from pipeline.core.likelihoods.base import LOG_2PI
from pipeline.core.model import VAE

_COLUMN_STREAM = 0x9E3779B1  # seed offset per feature for the conditional scores' noise
# records x samples per decoder pass: bounds scoring memory whatever S, K and the batch size. On a CPU a pass's
# activations (8,192 x 128 float32: 4 MiB) stay in cache: adult's batches of 4,096 records scored 1.5x faster
# than with 65,536 rows a pass (S and K; 1.25x with the conditional scores). A GPU wants large passes.
SAMPLE_ROWS_PER_PASS = 1 << 13
SAMPLE_ROWS_PER_PASS_GPU = 1 << 16


def samples_per_pass(records: int, device: torch.device) -> int:
    """Latent samples per decoder pass for a batch of ``records``: at least one."""
    rows = SAMPLE_ROWS_PER_PASS if device.type == "cpu" else SAMPLE_ROWS_PER_PASS_GPU
    return max(1, rows // max(records, 1))


@dataclass
class Scores:
    latent_mean: np.ndarray  # [N, D] float32
    latent_var: np.ndarray  # [N, D] float32
    recon_log_density: np.ndarray  # [N] float64
    column_log_density: np.ndarray  # [N, F] float64, NaN where missing
    kl: np.ndarray  # [N] float64
    elbo: np.ndarray  # [N] float64
    log_marginal: np.ndarray | None  # [N] float64, None when K = 0
    n_observed: np.ndarray  # [N] int32
    column_conditional_log_density: np.ndarray | None = None  # [N, F] float64, NaN where missing; None when off


def device_keys(keys: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch's uint64 record keys as int64 bits on ``device``, for :func:`record_noise`."""
    return torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64)).to(device)


def record_noise(keys: torch.Tensor, seed: int, first: int, last: int, dim: int) -> torch.Tensor:
    """Standard normal noise [last - first, N, dim] (float32) on ``keys``' device, a pure function of
    (key, seed, s, d); ``keys`` from :func:`device_keys`.

    Counter-based: two SplitMix64 hashes per draw give two uniforms (53 bits each), Box-Muller in float64
    gives a normal. Made where the model scores: a GPU gets no host round trip per decoder pass. The
    hashes are the same bits on every device; the draws too, but where a device's log or cos rounds a
    float64 differently in its last bit and the cast to float32 shows it (on a CPU, bit for bit the numpy
    reference of tests/helpers.py: tests/test_vae.py).
    """
    seed_hash = int(splitmix64(np.array([seed], dtype=np.uint64))[0])
    base = splitmix64_bits(keys ^ signed64(seed_hash))  # [N]
    s = torch.arange(first, last, dtype=torch.int64, device=keys.device)[:, None, None]
    d = torch.arange(dim, dtype=torch.int64, device=keys.device)[None, None, :]
    counter = base[None, :, None] + (s * dim + d) * 2
    h1 = splitmix64_bits(counter)
    h2 = splitmix64_bits(counter + 1)
    scale = 2.0**-53
    u1 = (shift_right(h1, 11).double() + 0.5) * scale  # (0, 1)
    u2 = shift_right(h2, 11).double() * scale  # [0, 1)
    eps = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return eps.float()


@torch.inference_mode()
def score_batch(
    model: VAE,
    batch: EncodedBatch,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    iw_samples: int = DEFAULT_IW_SAMPLES,
    seed: int = 0,
    conditional_samples: int = 0,
) -> Scores:
    if mc_samples < 1:
        raise ValueError("mc_samples must be at least 1")
    if iw_samples < 0:
        raise ValueError("iw_samples must be >= 0")
    model.eval()
    device = next(model.parameters()).device
    values, observed = batch.values.to(device), batch.observed.to(device)
    keys = device_keys(batch.keys, device)
    n, n_feat = observed.shape
    mean, log_var = model.inference(values, observed)
    std = torch.exp(0.5 * log_var)
    kl = model.kl(mean, log_var)

    total = max(mc_samples, iw_samples)
    chunk = samples_per_pass(n, device)
    col_sum = torch.zeros(n, n_feat, dtype=torch.float64, device=device)
    lse = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
    log_det = 0.5 * log_var.double().sum(-1)  # sum log sigma
    for first in range(0, total, chunk):
        last = min(total, first + chunk)
        eps = record_noise(keys, seed, first, last, model.latent_dim)
        z = mean + std * eps  # [C, N, D]
        col = model.column_log_prob(model.generative(z), values, observed)  # [C, N, F] float64
        if first < mc_samples:
            col_sum += col[: mc_samples - first].sum(0)
        if first < iw_samples:
            k = min(last, iw_samples) - first
            log_q = -0.5 * (eps[:k].double().pow(2) + LOG_2PI).sum(-1) - log_det
            log_w = col[:k].sum(-1) + model.log_prior(z[:k]) - log_q
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))

    column = col_sum / mc_samples
    recon = column.sum(-1)
    column = torch.where(observed, column, torch.full_like(column, math.nan))
    log_marginal = (lse - math.log(iw_samples)).cpu().numpy() if iw_samples > 0 else None
    conditional = (
        conditional_log_density(model, batch, conditional_samples, seed) if conditional_samples > 0 else None
    )
    return Scores(
        latent_mean=mean.float().cpu().numpy(),
        latent_var=torch.exp(log_var).float().cpu().numpy(),
        recon_log_density=recon.cpu().numpy(),
        column_log_density=column.cpu().numpy(),
        kl=kl.cpu().numpy(),
        elbo=(recon - kl).cpu().numpy(),
        log_marginal=log_marginal,
        n_observed=observed.sum(-1).to(torch.int32).cpu().numpy(),
        column_conditional_log_density=conditional,
    )


@torch.inference_mode()
def conditional_log_density(model: VAE, batch: EncodedBatch, samples: int = DEFAULT_CONDITIONAL_SAMPLES,
                            seed: int = 0) -> np.ndarray:
    """[N, F] estimates of log p(x_j | x_-j) (see the module docstring), NaN where x_j is missing."""
    model.eval()
    device = next(model.parameters()).device
    values, observed = batch.values.to(device), batch.observed.to(device)
    keys = device_keys(batch.keys, device)
    n, n_feat = observed.shape
    out = torch.full((n, n_feat), math.nan, dtype=torch.float64, device=device)
    chunk = samples_per_pass(n, device)
    present = batch.observed.any(0).tolist()  # on the host: no device round trip per feature
    views = model.encoder_views(values)  # the same for every feature's mask
    for j in range(n_feat):
        if not present[j]:
            continue
        rows = observed[:, j]
        hidden = observed.clone()
        hidden[:, j] = False
        mean, log_var = model.inference(values, hidden, masked=True, views=views)
        std = torch.exp(0.5 * log_var)
        log_det = 0.5 * log_var.double().sum(-1)
        lse_all = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        lse_rest = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        stream = (seed + (j + 1) * _COLUMN_STREAM) % (1 << 63)
        for first in range(0, samples, chunk):
            last = min(samples, first + chunk)
            eps = record_noise(keys, stream, first, last, model.latent_dim)
            z = mean + std * eps
            col = model.column_log_prob(model.generative(z), values, observed)  # [C, N, F]
            log_q = -0.5 * (eps.double().pow(2) + LOG_2PI).sum(-1) - log_det
            log_w_rest = col.sum(-1) - col[..., j] + model.log_prior(z) - log_q
            lse_rest = torch.logaddexp(lse_rest, torch.logsumexp(log_w_rest, 0))
            lse_all = torch.logaddexp(lse_all, torch.logsumexp(log_w_rest + col[..., j], 0))
        out[:, j] = torch.where(rows, lse_all - lse_rest, out[:, j])
    return out.cpu().numpy()


def reference_values(log_marginal: np.ndarray, keep: int = 10_000) -> list[float]:
    """The validation log_marginal values to store with the model for :func:`tail_probability`: all of them,
    sorted, or ``keep`` evenly spaced order statistics when there are more."""
    v = np.sort(np.asarray(log_marginal, dtype=np.float64))
    if v.size > keep:
        v = v[np.round(np.linspace(0, v.size - 1, keep)).astype(np.int64)]
    return v.tolist()


def tail_probability(log_marginal: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Share of the stored validation records with a lower log_marginal.

    ``reference`` holds n sorted values v_0 <= ... <= v_{n-1}. The empirical distribution function is
    interpolated linearly between the mid-rank points (v_i, (i + 1/2) / n); it is 0 below v_0 and 1 above
    v_{n-1} (tied values share their mean mid-rank). So a record below every stored one gets 0, a record
    at the median of the validation records about 0.5.
    """
    ref = np.asarray(reference, dtype=np.float64)
    x = np.asarray(log_marginal, dtype=np.float64)
    n = ref.size
    uniq, first = np.unique(ref, return_index=True)
    counts = np.diff(np.r_[first, n])
    mid = (first + 0.5 * counts) / n
    out = np.interp(x, uniq, mid)
    out = np.where(x < uniq[0], 0.0, np.where(x > uniq[-1], 1.0, out))
    return out
