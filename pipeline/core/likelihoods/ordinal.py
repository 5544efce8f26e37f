"""ordinal: ordered levels with a cumulative-link (logit) model.

The decoder emits ordered thresholds theta_0 < ... < theta_{L-2} for each record, and

    P(y <= k) = sigmoid(theta_k),   P(y = k) = sigmoid(theta_k) - sigmoid(theta_{k-1})

with theta_{-1} = -inf and theta_{L-1} = +inf. Ordering is built in: theta_k = theta_{k-1} +
softplus(raw_k) + GAP. Log-probabilities are computed without cancellation:
log(sigmoid(b) - sigmoid(a)) = b + log(1 - exp(a - b)) - softplus(a) - softplus(b).

Levels come from the spec ({ordinal: [low, mid, high]}) or, for numeric levels, from the sorted
distinct values of the training column. A value that is not a level cannot be scored.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.likelihoods.base import (
    EncodedColumn,
    LabelFamily,
    broadcast_shape,
    index_labels,
    log1mexp,
    to_labels,
)
from pipeline.errors import InputDataError

THRESHOLD_BOUND = 30.0
GAP = 1e-4


def cumulative_logit_log_prob(thresholds: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """thresholds [..., L-1] increasing, k [...] level index in 0..L-1 -> log P(y = k)."""
    n_levels = thresholds.shape[-1] + 1
    shape = broadcast_shape(thresholds.shape[:-1], k.shape)  # thresholds may be one row for all records
    thresholds = thresholds.expand(*shape, n_levels - 1)
    k = k.long().expand(shape)
    upper = torch.gather(thresholds, -1, k.clamp(max=n_levels - 2).unsqueeze(-1)).squeeze(-1)
    lower = torch.gather(thresholds, -1, (k - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    first, last = k == 0, k == n_levels - 1
    # safe stand-ins keep every branch finite (and its gradient NaN-free) before torch.where picks
    a = torch.where(first, upper - 1.0, lower)
    b = torch.where(last, lower + 1.0, upper)
    middle = b + log1mexp(a - b) - F.softplus(a) - F.softplus(b)
    return torch.where(first, -F.softplus(-upper), torch.where(last, -F.softplus(lower), middle))


class Ordinal(LabelFamily):
    kind = "ordinal"

    def __init__(self, name: str, levels: list[str]):
        super().__init__(name)
        self.levels = [str(v) for v in levels]

    @property
    def n_params(self):
        return len(self.levels) - 1

    @classmethod
    def from_stats(cls, name, stats, levels: list | None = None, **options):
        if levels is not None:
            levels = [str(v) for v in levels]
            unknown = sorted(set(stats["counts"]) - set(levels))
            if unknown:
                raise InputDataError(f"values {unknown[:5]} are not among the ordinal levels", column=name)
        else:
            try:
                levels = sorted(stats["counts"], key=float)
            except ValueError as e:
                raise InputDataError(
                    "ordinal levels are not numbers: give their order as {ordinal: [low, ..., high]}", column=name
                ) from e
        if len(levels) < 2:
            raise InputDataError("an ordinal feature needs at least two levels", column=name)
        return cls(name, levels)

    def state(self):
        return {"levels": self.levels}

    def encode(self, column) -> EncodedColumn:
        labels = to_labels(column)
        idx = index_labels(labels, self.levels)
        if (idx == -1).any():
            # numeric levels may arrive as 3.0 where training saw 3: match on value
            try:
                vals = np.array([float(v) for v in self.levels])
                num = np.array([float(v) if v is not None else np.nan for v in labels.to_pylist()])
                hit = (num[:, None] == vals[None, :]) & (idx == -1)[:, None]
                idx = np.where(hit.any(1), hit.argmax(1), idx)
            except ValueError:
                pass
        observed = idx != -2
        bad = idx == -1
        invalid = np.where(bad, "value is not an ordinal level", None) if bad.any() else None
        ok = observed & ~bad
        return EncodedColumn(np.where(ok, idx, 0).astype(np.float64), ok, invalid)

    def encoder_input(self, value):
        return (2.0 * value / (len(self.levels) - 1) - 1.0).unsqueeze(-1).float()

    def params(self, raw: torch.Tensor) -> torch.Tensor:
        """Increasing thresholds theta_0 < ... < theta_{L-2} on the logit scale."""
        raw = raw.double()
        first = raw[..., :1].clamp(-THRESHOLD_BOUND, THRESHOLD_BOUND)
        gaps = F.softplus(raw[..., 1:]).clamp(max=THRESHOLD_BOUND) + GAP
        return torch.cat([first, first + torch.cumsum(gaps, -1)], -1)

    def log_prob(self, raw, value):
        return cumulative_logit_log_prob(self.params(raw), value)
