"""count: a discretised log-normal (the default), or a negative binomial (models trained before it).

**Discretised log-normal** (``dist="lognormal"``). On the column's log1p scale, standardised,
v = (log(1 + k) - loc) / scale, the decoder emits a Gaussian N(mu, sigma^2); the count k gets the
Gaussian's mass over the bin of v that holds log(1 + k):

    p(0) = Phi(b_0),   p(k) = Phi(b_k) - Phi(b_k - w_k)   (k >= 1),
    b_k = ((log(1 + k + 1/2) - loc) / scale - mu) / sigma,
    w_k = log1p(1 / (k + 1/2)) / (scale * sigma)   (the bin's width, exact for any k).

The bins tile the real line, so the masses sum to 1 over k = 0, 1, 2, ...: a probability mass with
respect to counting measure (no Jacobian: counts have no units to rescale). Unlike the negative
binomial (whose variance is at least its mean) it can be as tight as the data: a count that is
always 5 or 6, or a count whose zero is many standard deviations below its typical value (an age of
0), gets the small mass it deserves.

**Zeros that training never had.** Where zeros are rarer than ``MIN_ZERO_FRACTION`` (1 in 1,000) of the
training counts (``zero_floor``), a zero is a recording error (an age of 0, a working week of 0 hours),
as in the positive family: its mass is at most the floor,

    p(0 | z) = min(ZERO_FLOOR, Phi(b_0)),   p(k | z) = bin_k * (1 - p(0 | z)) / (1 - Phi(b_0))   (k >= 1),

still exactly normalised. Without it a decoder can reach, somewhere in latent space the training data never
visited, a narrow Gaussian below the smallest count it saw, and a zero there passes for an ordinary value
costing nothing in its column. Artifacts written before it keep the plain bins.

The log-normal's mean is held within the range of the training counts' log(1 + k) widened by one
standard deviation (``mean_low``, ``mean_high``), as in the real family: a count ten times too large (a
working week of 400 hours) cannot pull the decoder's mean beyond anything the column held.

``log(Phi(b) - Phi(a))`` is computed as
``log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b)))`` on the side of the bin nearer the Gaussian's
lower tail (the upper tail is reflected), so neither tail cancels; a bin narrower than 1e-7 sigma
gets the density at its midpoint times its width (relative error below 1e-14).

**Negative binomial** (``dist="negbinom"``): mean mu and dispersion r from the decoder,

    p(k) = Gamma(k + r) / (Gamma(r) k!) * (r / (r + mu))^r * (mu / (r + mu))^k,   k = 0, 1, 2, ...

variance mu + mu^2 / r. A fitted state without ``dist`` is a negative binomial (the artifacts written
before the discretised log-normal existed score as they did).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.core.likelihoods.base import (
    ENCODER_CLIP,
    LOG_2PI,
    EncodedColumn,
    Family,
    bounded_log_var,
    bounded_mean,
    loc_scale,
    log1mexp,
    log_ndtr,
    mean_bounds,
    mean_range,
    mean_state,
    moments_merge,
    moments_partial,
    to_float64,
)
from pipeline.core.likelihoods.positive import MIN_ZERO_FRACTION, ZERO_FLOOR
from pipeline.core.likelihoods.real import MIN_VAR

LOG_MEAN_BOUND = (-15.0, 25.0)
LOG_R_BOUND = (-10.0, 12.0)
DISTS = ("lognormal", "negbinom")
NARROW_BIN = 1e-7  # bins narrower than this (in sigmas) get density x width
V_MAX = 1e6  # |standardised bin edge| cap, as real's U_MAX


def log_normal_interval(a: torch.Tensor, b: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """log(Phi(b) - Phi(a)) for a < b, both finite, float64, accurate in both tails; then log Phi of each
    of ``more`` (tensors of a's shape), all from one evaluation of log Phi on the stacked points: a count
    needs four, and each evaluation is some thirty tensor operations forward and backward, whatever the
    size of a training step's tensors."""
    upper = a > 0  # reflect the upper tail onto the lower one: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo, hi = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_lo, log_hi, *log_more = log_ndtr(torch.stack(torch.broadcast_tensors(lo, hi, *more))).unbind(0)
    return log_hi + log1mexp((log_lo - log_hi).clamp(max=-1e-300)), *log_more


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
    column_attrs = ("loc", "scale", "log_mean", "min_var", "mean_low", "mean_high")

    def __init__(
        self,
        name: str,
        loc: float,
        scale: float,
        log_mean: float,
        dist: str = "negbinom",
        min_var: float = MIN_VAR,
        zero_floor: bool = False,
        mean_low: float | None = None,
        mean_high: float | None = None,
    ):
        super().__init__(name)
        if dist not in DISTS:
            raise ValueError(f"count distribution {dist!r} is not one of {DISTS}")
        if zero_floor and dist != "lognormal":
            raise ValueError("zero_floor needs the discretised log-normal")
        self.loc, self.scale, self.log_mean = float(loc), float(scale), float(log_mean)
        self.dist, self.min_var, self.zero_floor = dist, float(min_var), bool(zero_floor)
        self.mean_low, self.mean_high = mean_bounds(mean_low, mean_high)
        if self.mean_low is not None and dist != "lognormal":
            raise ValueError("mean bounds need the discretised log-normal")

    # lognormal: mean and log-variance of v; negbinom: log-mean (offset by the column's), log-dispersion
    n_params = 2
    spread_index = 1

    @staticmethod
    def partial_stats(column) -> dict[str, Any]:
        x = to_float64(column)
        x = x[np.isfinite(x) & (x >= 0)]
        return {"log1p": moments_partial(np.log1p(x)), "sum": float(x.sum()), "zeros": int((x == 0).sum())}

    @staticmethod
    def merge_stats(a, b):
        return {
            "log1p": moments_merge(a["log1p"], b["log1p"]),
            "sum": a["sum"] + b["sum"],
            "zeros": a.get("zeros", 0) + b.get("zeros", 0),
        }

    @classmethod
    def from_stats(cls, name, stats, **options):
        loc, scale = loc_scale(stats["log1p"])
        n = stats["log1p"]["n"]
        mean = stats["sum"] / n if n else 1.0
        options = {"dist": "lognormal"} | options
        if options["dist"] == "lognormal" and n:
            options.setdefault("zero_floor", stats.get("zeros", 0) < MIN_ZERO_FRACTION * n)
            low, high = mean_range(stats["log1p"], loc, scale)
            options.setdefault("mean_low", low)
            options.setdefault("mean_high", high)
        return cls(name, loc, scale, math.log(max(mean, 1e-3)), **options)

    def group_key(self):
        return (*super().group_key(), self.dist, self.zero_floor, self.mean_low is None)

    def state(self):
        out = {"loc": self.loc, "scale": self.scale, "log_mean": self.log_mean, "dist": self.dist}
        if self.dist != "lognormal":
            return out
        floor = {"zero_floor": True} if self.zero_floor else {}
        return out | {"min_var": self.min_var} | floor | mean_state(self)

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
        """lognormal: mean and log-variance of v; negbinom: log mean and log dispersion r."""
        raw = raw.double()
        if self.dist == "lognormal":
            return bounded_mean(raw[..., 0], self.mean_low, self.mean_high), bounded_log_var(raw[..., 1], self.min_var)
        return (raw[..., 0] + self.log_mean).clamp(*LOG_MEAN_BOUND), raw[..., 1].clamp(*LOG_R_BOUND)

    def log_prob(self, raw, value):
        if self.dist == "negbinom":
            log_mu, log_r = self.params(raw)
            return negbinom_log_prob(value, log_mu, log_r)
        mean, log_var = self.params(raw)
        inv_sd = torch.exp(-0.5 * log_var)
        top = (torch.log1p(value + 0.5) - self.loc) / self.scale
        b = ((top - mean) * inv_sd).clamp(-V_MAX, V_MAX)
        w = torch.log1p(1.0 / (value + 0.5)) / self.scale * inv_sd  # the bin's width in sigmas
        zero = value == 0
        narrow = w < NARROW_BIN
        a = torch.where(zero | narrow, b - 1.0, b - w)  # any finite edge below b where unused
        mid = b - 0.5 * w
        approx = -0.5 * (LOG_2PI + mid * mid) + torch.log(w.clamp_min(1e-300))
        if not self.zero_floor:
            exact, log_b = log_normal_interval(a, b, b)
            return torch.where(zero, log_b, torch.where(narrow, approx, exact))
        # the zero's mass capped at the floor; the bins above it share the rest (see the module doc)
        b0 = (((math.log1p(0.5) - self.loc) / self.scale - mean) * inv_sd).clamp(-V_MAX, V_MAX)
        exact, log_zero, log_above = log_normal_interval(a, b, b0, -b0)
        log_bins = torch.where(narrow, approx, exact)
        capped = log_zero.clamp(max=math.log(ZERO_FLOOR))
        rest = log1mexp(capped) - log_above
        return torch.where(zero, capped, log_bins + rest)
