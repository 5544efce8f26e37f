"""Comparing a scoring run's log_marginal with the model's validation reference (``vaepipe check``).

``model.json`` stores, under ``reference``, the validation records' ``log_marginal`` as its quantiles at
0.1% steps (``quantile_probs`` 0, 0.001, ..., 1 and ``log_marginal.quantiles``), from ``rows`` records.
A run of records like the validation ones has about 0.1% of its rows below the reference's 0.1%
quantile and about 1% below its 1% quantile; both shares, and the Kolmogorov-Smirnov distance between
the run's values and the reference distribution, grow when the data drift away from what the model
was trained on.

* :func:`share_below` -- the share of run values strictly below a reference quantile;
* :func:`ks_statistic` -- sup_x |F_run(x) - F_ref(x)|, where F_run is the run's empirical CDF and
  F_ref the reference CDF rebuilt from the stored quantiles (linear between them, which is how
  ``numpy.quantile`` interpolates them from the sample). The supremum is exact for that F_ref: the
  difference is monotone between consecutive jump points and knots, so it is evaluated at all of
  them, on both sides of each jump. With 1001 quantiles it differs from the two-sample statistic on
  the reference sample itself by at most about 0.001 plus the sample's own step (1 / rows);
* :func:`ks_pvalue` -- the asymptotic two-sample p-value, Kolmogorov's distribution at
  sqrt(n m / (n + m)) D, for the log only: large runs make tiny shifts "significant", so the gate is
  on the statistic itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.core.defaults import REFERENCE_QUANTILES

REFERENCE_PROBS = REFERENCE_QUANTILES.round(4)  # as model.json stores them
DEFAULT_MAX_BELOW_01 = 0.005  # 5x the 0.1% a run like the validation data has
DEFAULT_MAX_BELOW_1 = 0.03  # 3x the 1%
DEFAULT_MAX_KS = 0.1


def reference_cdf(x: np.ndarray, quantiles, probs) -> tuple[np.ndarray, np.ndarray]:
    """(F_ref(x), F_ref(x-)) for the distribution whose quantile function is linear between the stored
    (prob, quantile) points. Equal quantiles (ties in the sample) are an atom: the CDF jumps there from
    the lowest to the highest probability of the tie; between distinct quantiles it is linear."""
    q = np.asarray(quantiles, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    u, first = np.unique(q, return_index=True)
    last = len(q) - 1 - np.unique(q[::-1], return_index=True)[1]
    p_low, p_high = p[first], p[last]
    i = np.searchsorted(u, x, side="right") - 1  # the last knot at or below x (-1: below all)
    ic = np.clip(i, 0, len(u) - 1)
    nxt = np.clip(i + 1, 0, len(u) - 1)
    at_knot = (i >= 0) & (u[ic] == x)
    span = np.where(nxt > ic, u[nxt] - u[ic], 1.0)
    between = p_high[ic] + (x - u[ic]) / span * (p_low[nxt] - p_high[ic])
    f = np.where(i < 0, 0.0, np.where(at_knot | (i >= len(u) - 1), p_high[ic], between))
    f_left = np.where(at_knot, p_low[ic], f)
    return f, f_left


def ks_statistic(values: np.ndarray, quantiles, probs) -> float:
    """sup_x |F_run(x) - F_ref(x)| over the run's values (NaN and null excluded by the caller)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n == 0:
        raise ValueError("no values to compare")
    q = np.asarray(quantiles, dtype=np.float64)
    points = np.unique(np.concatenate([v, q]))
    f_run = np.searchsorted(v, points, side="right") / n  # F_run(x)
    f_run_left = np.searchsorted(v, points, side="left") / n  # F_run(x-)
    f_ref, f_ref_left = reference_cdf(points, q, probs)
    return float(max(np.abs(f_run - f_ref).max(), np.abs(f_run_left - f_ref_left).max()))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for Kolmogorov's limiting distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)."""
    if x <= 0:
        return 1.0
    if x < 0.2:  # the series converges slowly here and the value is 1 to double precision
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-17:
            break
    return min(1.0, max(0.0, 2.0 * total))


def ks_pvalue(d: float, n: int, m: int) -> float:
    return kolmogorov_sf(math.sqrt(n * m / (n + m)) * d)


def share_below(values: np.ndarray, threshold: float) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float((v < threshold).mean()) if len(v) else float("nan")


@dataclass
class CheckResult:
    rows: int
    reference_rows: int
    q001: float  # the reference's 0.1% quantile of log_marginal
    q01: float  # its 1% quantile
    below_01: float  # share of the run's rows below q001
    below_1: float  # share below q01
    ks: float
    ks_pvalue: float
    failures: list[str]

    @property
    def drift(self) -> bool:
        return bool(self.failures)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "reference_rows": self.reference_rows,
            "reference_q0.1%": self.q001,
            "reference_q1%": self.q01,
            "share_below_q0.1%": self.below_01,
            "share_below_q1%": self.below_1,
            "ks": self.ks,
            "ks_pvalue": self.ks_pvalue,
            "drift": self.drift,
            "failures": self.failures,
        }


def compare(values: np.ndarray, reference: dict, max_below_01: float, max_below_1: float, max_ks: float) -> CheckResult:
    """The run's log_marginal values against ``model.json``'s ``reference``; failures name each threshold passed."""
    probs = np.asarray(reference["quantile_probs"], dtype=np.float64)
    quantiles = np.asarray(reference["log_marginal"]["quantiles"], dtype=np.float64)
    q001 = float(np.interp(0.001, probs, quantiles))
    q01 = float(np.interp(0.01, probs, quantiles))
    v = np.asarray(values, dtype=np.float64)
    below_01, below_1 = share_below(v, q001), share_below(v, q01)
    ks = ks_statistic(v, quantiles, probs)
    m = int(reference.get("rows") or len(quantiles))
    p = ks_pvalue(ks, len(v), m)
    failures = []
    if below_01 > max_below_01:
        failures.append(
            f"{below_01:.4%} of rows have log_marginal below the reference's 0.1% quantile ({q001:.4g}); "
            f"the threshold is {max_below_01:.4%}"
        )
    if below_1 > max_below_1:
        failures.append(
            f"{below_1:.4%} of rows have log_marginal below the reference's 1% quantile ({q01:.4g}); "
            f"the threshold is {max_below_1:.4%}"
        )
    if ks > max_ks:
        failures.append(
            f"KS distance to the reference log_marginal is {ks:.4f} (p = {p:.3g}); the threshold is {max_ks}"
        )
    return CheckResult(len(v), m, q001, q01, below_01, below_1, ks, p, failures)
