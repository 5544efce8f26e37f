"""positive: log-normal for x > 0, with a point mass at 0 learned from z where zeros occur.

The density is with respect to counting measure at 0 plus Lebesgue measure on (0, inf):

    p(0)   = pi
    p(x)   = (1 - pi) * LogNormal(x),   x > 0

With v = (log x - loc) / scale the decoder emits N(v; mu, sigma^2) and a zero logit; the change of
variables x -> log x -> v gives log p(x) = log(1 - pi) + log N(v; mu, sigma^2) - log(scale) - log(x).
Where the training column had no zeros, pi is fixed at ``ZERO_FLOOR``: a zero at scoring time gets a
very low, finite log-mass instead of -inf, and the density above 0 is scaled by (1 - ZERO_FLOOR) so
the whole still integrates to 1.

The same holds where zeros are rarer than ``MIN_ZERO_FRACTION`` (1 in 1,000) of the training values:
in a column the spec declares positive, a zero that rare is a recording error (a measurement of 0 for
something that cannot be 0), not a state of the data, and a point mass learned from a handful of them
would let every such error, in training and after, pass for an ordinary record costing a few nats.
They score at the floor instead, charged to their column; a column whose zeros are a real part of it
(money amounts that are mostly 0, concentrations below detection) keeps its point mass.

Without a point mass, the floor is only where the model finds a small value possible. A zero stands
for a value below anything the column held in training (``zero_bound``, its smallest positive value),
so its mass is at most what the log-normal gives such values:

    p(0 | z) = min(ZERO_FLOOR, P(X <= zero_bound | z)),   p(x | z) = (1 - p(0 | z)) * LogNormal(x),

exactly normalised, and without units (a rescaled column rescales its bound). A diamond's width of 0
where the other measurements say 5.7 mm with a spread of 1% gets the log-normal's tail below the
smallest width ever measured, thousands of nats down, instead of the floor's 27.6; a zero where the
record's other features make small values plausible still costs at least the floor. Artifacts written
before ``zero_bound`` existed keep the floor alone.

The mean of v is held within the range of the training values' log (the positive ones) widened by one
standard deviation (``mean_low``, ``mean_high``), as in the real family and for the same reason: a value
ten times too large cannot pull the decoder's mean beyond anything the column held.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.likelihoods.base import (
    ENCODER_CLIP,
    LOGIT_BOUND,
    EncodedColumn,
    Family,
    bounded_log_var,
    bounded_mean,
    gaussian_log_prob,
    loc_scale,
    log1mexp,
    log_ndtr,
    log_of,
    mean_bounds,
    mean_range,
    mean_state,
    moments_merge,
    moments_partial,
    to_float64,
)
from pipeline.core.likelihoods.real import MIN_VAR

ZERO_FLOOR = 1e-12
MIN_ZERO_FRACTION = 1e-3  # zeros rarer than this are errors: no point mass (see the module doc)


class Positive(Family):
    kind = "positive"
    # a stack's columns all have a point mass at 0 or none has, and all have a zero bound or none has
    column_attrs = ("loc", "scale", "min_var", "zero_bound", "mean_low", "mean_high")
    spread_index = 1

    def __init__(
        self,
        name: str,
        loc: float,
        scale: float,
        zero_fraction: float,
        min_var: float = MIN_VAR,
        zero_bound: float | None = None,
        mean_low: float | None = None,
        mean_high: float | None = None,
    ):
        super().__init__(name)
        self.loc, self.scale = float(loc), float(scale)
        self.zero_fraction, self.min_var = float(zero_fraction), float(min_var)
        self.zero_bound = None if zero_bound is None else float(zero_bound)
        self.mean_low, self.mean_high = mean_bounds(mean_low, mean_high)

    def group_key(self):
        return (*super().group_key(), self.zero_bound is None, self.mean_low is None)

    @property
    def has_zeros(self) -> bool:
        return self.zero_fraction > 0

    @property
    def n_params(self):
        return 3 if self.has_zeros else 2  # mean, log-variance of v; zero logit

    @property
    def enc_width(self):
        return 2 if self.has_zeros else 1

    @staticmethod
    def partial_stats(column) -> dict[str, Any]:
        x = to_float64(column)
        x = x[np.isfinite(x)]
        pos = x[x > 0]
        return {
            "log": moments_partial(np.log(pos)),
            "zeros": int((x == 0).sum()),
            "negative": int((x < 0).sum()),
            "min": float(pos.min()) if pos.size else math.inf,
        }

    @staticmethod
    def merge_stats(a, b):
        return {
            "log": moments_merge(a["log"], b["log"]),
            "zeros": a["zeros"] + b["zeros"],
            "negative": a["negative"] + b["negative"],
            "min": min(a.get("min", math.inf), b.get("min", math.inf)),
        }

    @classmethod
    def from_stats(cls, name, stats, **options):
        loc, scale = loc_scale(stats["log"])
        n = stats["log"]["n"] + stats["zeros"]
        fraction = stats["zeros"] / n if n else 0.0
        fraction = fraction if fraction >= MIN_ZERO_FRACTION else 0.0
        low = stats.get("min", math.inf)
        bound = None if fraction > 0 or not math.isfinite(low) else low
        mean_low, mean_high = mean_range(stats["log"], loc, scale)
        return cls(name, loc, scale, fraction, zero_bound=bound, mean_low=mean_low, mean_high=mean_high, **options)

    def state(self):
        out = {"loc": self.loc, "scale": self.scale, "zero_fraction": self.zero_fraction, "min_var": self.min_var}
        return out | ({"zero_bound": self.zero_bound} if self.zero_bound is not None else {}) | mean_state(self)

    def encode(self, column) -> EncodedColumn:
        x = to_float64(column)
        observed = ~np.isnan(x)
        invalid = np.full(x.shape, None, dtype=object)
        invalid[np.isinf(x)] = "infinite value"
        invalid[observed & (x < 0)] = "negative value in a positive column"
        bad = invalid != None  # noqa: E711 -- elementwise
        ok = observed & ~bad
        value = np.where(ok, x, math.exp(self.loc))
        return EncodedColumn(value, ok, invalid if bad.any() else None)

    def encoder_input(self, value):
        is_zero = value == 0
        v = (torch.log(torch.where(is_zero, torch.ones_like(value), value)) - self.loc) / self.scale
        v = torch.where(is_zero, torch.zeros_like(v), v).clamp(-ENCODER_CLIP, ENCODER_CLIP)
        cols = [v, is_zero.double()] if self.has_zeros else [v]
        return torch.stack(cols, -1).float()

    def params(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean and log-variance of v = (log x - loc) / scale, and the logit of P(x = 0)."""
        raw = raw.double()
        mean = bounded_mean(raw[..., 0], self.mean_low, self.mean_high)
        log_var = bounded_log_var(raw[..., 1], self.min_var)
        if self.has_zeros:
            logit = raw[..., 2].clamp(-LOGIT_BOUND, LOGIT_BOUND)
        else:
            logit = torch.full_like(mean, math.log(ZERO_FLOOR) - math.log1p(-ZERO_FLOOR))
        return mean, log_var, logit

    def log_prob(self, raw, value):
        mean, log_var, logit = self.params(raw)
        is_zero = value == 0
        safe = torch.where(is_zero, torch.ones_like(value), value)
        log_x = torch.log(safe)
        v = (log_x - self.loc) / self.scale
        log_density = gaussian_log_prob(v, mean, log_var) - log_of(self.scale) - log_x
        if self.has_zeros or self.zero_bound is None:
            return torch.where(is_zero, -F.softplus(-logit), -F.softplus(logit) + log_density)
        # no point mass: a zero has the log-normal's mass below the bound, at most the floor
        b = ((log_of(self.zero_bound) - self.loc) / self.scale - mean) * torch.exp(-0.5 * log_var)
        log_zero = log_ndtr(b).clamp(max=math.log(ZERO_FLOOR))
        return torch.where(is_zero, log_zero, log1mexp(log_zero) + log_density)
