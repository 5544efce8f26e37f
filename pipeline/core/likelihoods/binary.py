"""binary: a Bernoulli on a logit from the decoder. The two labels are fitted from training data;
the lower (by sort order of their text) is 0."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.likelihoods.base import LOGIT_BOUND, EncodedColumn, LabelFamily, index_labels, to_labels
from pipeline.errors import InputDataError


class Binary(LabelFamily):
    kind = "binary"

    def __init__(self, name: str, labels: list[str]):
        super().__init__(name)
        self.labels = [str(v) for v in labels]

    n_params = 1

    @classmethod
    def from_stats(cls, name, stats, **options):
        labels = sorted(stats["counts"])
        if len(labels) > 2:
            raise InputDataError(
                f"a binary feature has {len(labels)} distinct values ({', '.join(labels[:5])}...)", column=name
            )
        if len(labels) == 0:
            raise InputDataError("no observed values to fit", column=name)
        return cls(name, labels)

    def state(self):
        return {"labels": self.labels}

    def encode(self, column) -> EncodedColumn:
        idx = index_labels(to_labels(column), self.labels)
        observed = idx != -2
        bad = idx == -1
        invalid = np.where(bad, "unknown label for a binary column", None) if bad.any() else None
        ok = observed & ~bad
        return EncodedColumn(np.where(ok, idx, 0).astype(np.float64), ok, invalid)

    def encoder_input(self, value):
        return (2.0 * value - 1.0).unsqueeze(-1).float()

    def params(self, raw: torch.Tensor) -> torch.Tensor:
        """Logit of P(value = labels[1])."""
        return raw.double()[..., 0].clamp(-LOGIT_BOUND, LOGIT_BOUND)

    def log_prob(self, raw, value):
        logit = self.params(raw)
        return -F.softplus(torch.where(value > 0.5, -logit, logit))
