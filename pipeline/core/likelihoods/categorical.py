"""categorical: a softmax over the training vocabulary plus one out-of-vocabulary class.

A label never seen in training (or beyond ``max_categories`` most frequent) is scored as the
out-of-vocabulary class: a low, finite log-probability, never a crash and never silence. Logits are
bounded so no class, the unseen one included, has probability 0.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.likelihoods.base import LOGIT_BOUND, EncodedColumn, LabelFamily, index_labels, to_labels
from pipeline.errors import InputDataError

MAX_CATEGORIES = 1000


class Categorical(LabelFamily):
    kind = "categorical"

    def __init__(self, name: str, vocab: list[str]):
        super().__init__(name)
        self.vocab = [str(v) for v in vocab]

    @property
    def n_classes(self) -> int:
        return len(self.vocab) + 1  # the last class is out-of-vocabulary

    @property
    def n_params(self):
        return self.n_classes

    @property
    def enc_width(self):
        return self.n_classes

    @classmethod
    def from_stats(cls, name, stats, max_categories: int = MAX_CATEGORIES, **options):
        if not stats["counts"]:
            raise InputDataError("no observed values to fit", column=name)
        ranked = sorted(stats["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
        return cls(name, [k for k, _ in ranked[:max_categories]])

    def state(self):
        return {"vocab": self.vocab}

    def encode(self, column) -> EncodedColumn:
        idx = index_labels(to_labels(column), self.vocab)
        observed = idx != -2
        value = np.where(idx == -1, len(self.vocab), np.maximum(idx, 0)).astype(np.float64)
        return EncodedColumn(value, observed, None)

    def encoder_input(self, value):
        return torch.nn.functional.one_hot(value.long(), self.n_classes).float()

    def params(self, raw: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the classes, vocabulary order, out-of-vocabulary last."""
        return torch.log_softmax(raw.double().clamp(-LOGIT_BOUND, LOGIT_BOUND), dim=-1)

    def log_prob(self, raw, value):
        logp = self.params(raw)
        idx = value.long().expand(logp.shape[:-1])
        return torch.gather(logp, -1, idx.unsqueeze(-1)).squeeze(-1)
