"""count: a negative binomial with mean and dispersion from the decoder.

    p(k) = Gamma(k + r) / (Gamma(r) k!) * (r / (r + mu))^r * (mu / (r + mu))^k,   k = 0, 1, 2, ...

mean mu, variance mu + mu^2 / r: over-dispersed relative to a Poisson, which it approaches as r grows.
A log-mass with respect to counting measure, so no Jacobian: counts have no units to rescale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.core.likelihoods.base import (
    ENCODER_CLIP,
    EncodedColumn,
    Family,
    loc_scale,
    moments_merge,
    moments_partial,
    to_float64,
)

LOG_MEAN_BOUND = (-15.0, 25.0)
LOG_R_BOUND = (-10.0, 12.0)


def negbinom_log_prob(k: torch.Tensor, log_mu: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    r = torch.exp(log_r)
    log_r_mu = torch.logaddexp(log_r, log_mu)
    return (
        torch.lgamma(k + r)
        - torch.lgamma(r)
        - torch.lgamma(k + 1.0)
        + r * (log_r - log_r_mu)
        + k * (log_mu - log_r_mu)
    )


class Count(Family):
    kind = "count"

    def __init__(self, name: str, loc: float, scale: float, log_mean: float):
        super().__init__(name)
        self.loc, self.scale, self.log_mean = float(loc), float(scale), float(log_mean)

    n_params = 2  # log-mean (offset by the column's log mean), log-dispersion
    spread_index = 1

    @staticmethod
    def partial_stats(column) -> dict[str, Any]:
        x = to_float64(column)
        x = x[np.isfinite(x) & (x >= 0)]
        return {"log1p": moments_partial(np.log1p(x)), "sum": float(x.sum())}

    @staticmethod
    def merge_stats(a, b):
        return {"log1p": moments_merge(a["log1p"], b["log1p"]), "sum": a["sum"] + b["sum"]}

    @classmethod
    def from_stats(cls, name, stats, **options):
        loc, scale = loc_scale(stats["log1p"])
        n = stats["log1p"]["n"]
        mean = stats["sum"] / n if n else 1.0
        return cls(name, loc, scale, math.log(max(mean, 1e-3)))

    def state(self):
        return {"loc": self.loc, "scale": self.scale, "log_mean": self.log_mean}

    def encode(self, column) -> EncodedColumn:
        x = to_float64(column)
        observed = ~np.isnan(x)
        invalid = np.full(x.shape, None, dtype=object)
        with np.errstate(invalid="ignore"):
            invalid[observed & (np.floor(x) != x)] = "non-integer value in a count column"
            invalid[np.isinf(x)] = "infinite value"
            invalid[observed & (x < 0)] = "negative value in a count column"
        bad = invalid != None  # noqa: E711 -- elementwise
        ok = observed & ~bad
        return EncodedColumn(np.where(ok, x, 0.0), ok, invalid if bad.any() else None)

    def encoder_input(self, value):
        u = (torch.log1p(value) - self.loc) / self.scale
        return u.clamp(-ENCODER_CLIP, ENCODER_CLIP).unsqueeze(-1).float()

    def params(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log mean and log dispersion r."""
        raw = raw.double()
        return (raw[..., 0] + self.log_mean).clamp(*LOG_MEAN_BOUND), raw[..., 1].clamp(*LOG_R_BOUND)

    def log_prob(self, raw, value):
        log_mu, log_r = self.params(raw)
        return negbinom_log_prob(value, log_mu, log_r)
