"""Per-record scores, pure torch (no Ray): what the batch scoring job calls on every batch.

For each record, with q(z|x) = N(mu, diag(sigma^2)) and samples z_s = mu + sigma * eps_s:

* ``recon_log_density`` = (1/S) sum_{s<S} log p(x | z_s): a Monte Carlo estimate of
  E_q[log p(x|z)], over observed features, in the data's own units;
* ``column_log_density``: the same average for each feature (NaN where the value is missing);
* ``kl`` = KL(q(z|x) || N(0, I)), closed form; ``elbo`` = recon_log_density - kl;
* ``log_marginal`` = log (1/K) sum_{s<K} p(x|z_s) p(z_s) / q(z_s|x): the importance-weighted bound,
  computed with a running logsumexp over chunks of samples so memory stays bounded for large K.

One set of max(S, K) samples serves both estimates: sample s feeds the Monte Carlo average when
s < S and the importance-weighted sum when s < K, through a single decoder pass.

The noise eps for sample s of a record is a counter-based hash of (record key, seed, s, latent dim),
so a record's scores do not depend on which batch, position or worker it is scored in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.codec import EncodedBatch, splitmix64
from pipeline.core.likelihoods.base import LOG_2PI
from pipeline.core.model import VAE, kl_standard_normal, log_standard_normal

DEFAULT_MC_SAMPLES = 16
DEFAULT_IW_SAMPLES = 64
# records x samples per decoder pass: bounds scoring memory whatever S, K and the batch size
SAMPLE_ROWS_PER_PASS = 1 << 16


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


def record_noise(keys: np.ndarray, seed: int, first: int, last: int, dim: int) -> np.ndarray:
    """Standard normal noise [last - first, N, dim] (float32), a pure function of (key, seed, s, d).

    Counter-based: two SplitMix64 hashes per draw give two uniforms, Box-Muller gives a normal.
    """
    n = keys.shape[0]
    base = splitmix64(keys ^ splitmix64(np.array([seed], dtype=np.uint64)))  # [N]
    s = np.arange(first, last, dtype=np.uint64)[:, None, None]
    d = np.arange(dim, dtype=np.uint64)[None, None, :]
    with np.errstate(over="ignore"):
        counter = base[None, :, None] + (s * np.uint64(dim) + d) * np.uint64(2)
        h1 = splitmix64(counter)
        h2 = splitmix64(counter + np.uint64(1))
    scale = 2.0**-53
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * scale  # (0, 1)
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * scale  # [0, 1)
    eps = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return eps.astype(np.float32).reshape(last - first, n, dim)


@torch.inference_mode()
def score_batch(
    model: VAE,
    batch: EncodedBatch,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    iw_samples: int = DEFAULT_IW_SAMPLES,
    seed: int = 0,
) -> Scores:
    if mc_samples < 1:
        raise ValueError("mc_samples must be at least 1")
    if iw_samples < 0:
        raise ValueError("iw_samples must be >= 0")
    model.eval()
    device = next(model.parameters()).device
    values, observed = batch.values.to(device), batch.observed.to(device)
    n, n_feat = observed.shape
    mean, log_var = model.inference(values, observed)
    std = torch.exp(0.5 * log_var)
    kl = kl_standard_normal(mean, log_var)

    total = max(mc_samples, iw_samples)
    chunk = max(1, SAMPLE_ROWS_PER_PASS // max(n, 1))
    col_sum = torch.zeros(n, n_feat, dtype=torch.float64, device=device)
    lse = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
    log_det = 0.5 * log_var.double().sum(-1)  # sum log sigma
    for first in range(0, total, chunk):
        last = min(total, first + chunk)
        eps = torch.from_numpy(record_noise(batch.keys, seed, first, last, model.latent_dim)).to(device)
        z = mean + std * eps  # [C, N, D]
        col = model.column_log_prob(model.generative(z), values, observed)  # [C, N, F] float64
        if first < mc_samples:
            col_sum += col[: mc_samples - first].sum(0)
        if first < iw_samples:
            k = min(last, iw_samples) - first
            log_q = -0.5 * (eps[:k].double().pow(2) + LOG_2PI).sum(-1) - log_det
            log_w = col[:k].sum(-1) + log_standard_normal(z[:k]) - log_q
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))

    column = col_sum / mc_samples
    recon = column.sum(-1)
    column = torch.where(observed, column, torch.full_like(column, math.nan))
    log_marginal = (lse - math.log(iw_samples)).cpu().numpy() if iw_samples > 0 else None
    return Scores(
        latent_mean=mean.float().cpu().numpy(),
        latent_var=torch.exp(log_var).float().cpu().numpy(),
        recon_log_density=recon.cpu().numpy(),
        column_log_density=column.cpu().numpy(),
        kl=kl.cpu().numpy(),
        elbo=(recon - kl).cpu().numpy(),
        log_marginal=log_marginal,
        n_observed=observed.sum(-1).to(torch.int32).cpu().numpy(),
    )
