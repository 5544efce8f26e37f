"""real: a Gaussian with a per-record mean and variance (heteroscedastic).

The decoder works on the standardised value u = (x - loc) / scale; the density of x is
N(u; mu, sigma^2) / scale, so log p(x) = log N(u; mu, sigma^2) - log(scale): exact, in x's units.
The variance is floored (``min_var``, standardised units) so repeated values cannot drive the
density to infinity.

The mean is held within the range of the training values widened by one standard deviation of the
column (``mean_low``, ``mean_high``: standardised bounds, :func:`~pipeline.core.likelihoods.base.mean_range`).
A decoder is a smooth function of z fitted where the training records put their posteriors; beyond them it
extrapolates, and a record with a value far outside the column's range (a unit error) can be encoded to a
corner of latent space where the decoder's mean follows the value: the error then costs a few nats of KL
instead of its distance from anything the column ever held. With the bound it is charged to its column.
Artifacts written before the bound keep the unbounded mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.core.likelihoods.base import (
    ENCODER_CLIP,
    EncodedColumn,
    Family,
    bounded_log_var,
    bounded_mean,
    gaussian_log_prob,
    loc_scale,
    log_of,
    mean_bounds,
    mean_range,
    mean_state,
    moments_merge,
    moments_partial,
    to_float64,
)

MIN_VAR = 1e-4  # sigma >= 1% of the column's standard deviation
# |u| is capped at a million standard deviations so that neither u**2 nor the float32 gradients of the
# decoder can overflow: the density is exact for every value within 1e6 column standard deviations of
# the column mean; a value further out scores as if it were 1e6 out, a log-density below -5e11.
U_MAX = 1e6


class Real(Family):
    kind = "real"
    column_attrs = ("loc", "scale", "min_var", "mean_low", "mean_high")

    def __init__(
        self,
        name: str,
        loc: float,
        scale: float,
        min_var: float = MIN_VAR,
        mean_low: float | None = None,
        mean_high: float | None = None,
    ):
        super().__init__(name)
        self.loc, self.scale, self.min_var = float(loc), float(scale), float(min_var)
        self.mean_low, self.mean_high = mean_bounds(mean_low, mean_high)

    n_params = 2  # mean, log-variance of u
    spread_index = 1

    @staticmethod
    def partial_stats(column) -> dict[str, Any]:
        return moments_partial(to_float64(column))

    @staticmethod
    def merge_stats(a, b):
        return moments_merge(a, b)

    @classmethod
    def from_stats(cls, name, stats, **options):
        loc, scale = loc_scale(stats)
        low, high = mean_range(stats, loc, scale)
        return cls(name, loc, scale, mean_low=low, mean_high=high, **options)

    def group_key(self):
        return (*super().group_key(), self.mean_low is None)

    def state(self):
        return {"loc": self.loc, "scale": self.scale, "min_var": self.min_var} | mean_state(self)

    def encode(self, column) -> EncodedColumn:
        x = to_float64(column)
        observed = ~np.isnan(x)
        invalid = np.where(np.isinf(x), "infinite value", None)
        bad = observed & (invalid != None)  # noqa: E711 -- elementwise
        value = np.where(observed & ~bad, x, self.loc)
        return EncodedColumn(value, observed & ~bad, invalid if bad.any() else None)

    def encoder_input(self, value):
        u = (value - self.loc) / self.scale
        return u.clamp(-ENCODER_CLIP, ENCODER_CLIP).unsqueeze(-1).float()

    def params(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of u = (x - loc) / scale."""
        raw = raw.double()
        return bounded_mean(raw[..., 0], self.mean_low, self.mean_high), bounded_log_var(raw[..., 1], self.min_var)

    def log_prob(self, raw, value):
        mean, log_var = self.params(raw)
        u = ((value - self.loc) / self.scale).clamp(-U_MAX, U_MAX)
        return gaussian_log_prob(u, mean, log_var) - log_of(self.scale)
