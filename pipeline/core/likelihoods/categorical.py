"""categorical: a softmax over the training vocabulary, and a fixed mass for labels never seen.

A label never seen in training (or beyond ``max_categories`` most frequent) is scored as the
out-of-vocabulary class: a low, finite log-probability, never a crash and never silence.

The out-of-vocabulary mass is set from the training counts, not learned (training data never holds an
unseen label, so a learned one only sinks to its bound): the Good-Turing estimate of the mass of unseen
labels, the share of training values whose label occurs exactly once, counting the labels cut off by
``max_categories`` as unseen, and at least 1 / (N + 1):

    p(oov) = max(n_1 + n_cut, 1) / (N + 1),    p(label k | z) = (1 - p(oov)) * softmax(logits(z))_k

Logits are bounded so no class has probability 0. Artifacts written before ``oov_mass`` existed keep
their learned out-of-vocabulary logit (``oov_mass`` None).

Categoricals with vocabularies of similar sizes stack (:meth:`Categorical.stack`): the stack has the
longest vocabulary's width, a shorter column's extra logits are masked to -inf (probability exactly 0,
no gradient), and its out-of-vocabulary class moves to the stack's last position.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from pipeline.core.likelihoods.base import (
    LOGIT_BOUND,
    EncodedColumn,
    LabelFamily,
    broadcast_shape,
    index_labels,
    logsumexp_classes,
    to_labels,
)
from pipeline.errors import InputDataError

MAX_CATEGORIES = 1000


def good_turing_oov_mass(counts: dict[str, int], kept: int) -> float:
    """Mass of unseen labels from training counts: (labels seen once + values cut off) / (N + 1), floor 1/(N+1)."""
    ranked = sorted(counts.values(), reverse=True)
    n = sum(ranked)
    once = sum(1 for c in ranked[:kept] if c == 1)
    cut = sum(ranked[kept:])
    return max(once + cut, 1) / (n + 1)


class Categorical(LabelFamily):
    kind = "categorical"

    def __init__(self, name: str, vocab: list[str], oov_mass: float | None = None):
        super().__init__(name)
        self.vocab = [str(v) for v in vocab]
        self.oov_mass = None if oov_mass is None else float(oov_mass)
        self._pad: torch.Tensor | None = None  # a stack's [G, n_params]: -inf at the logits a column lacks, else 0
        self._n_vocab: torch.Tensor | None = None  # a stack's [G] vocabulary sizes

    def group_key(self):
        # with a fixed out-of-vocabulary mass, vocabularies of similar sizes (the same power of two) stack,
        # padded to the longest: at most twice the work of the column alone, one evaluation for all
        if self.oov_mass is None:  # a learned out-of-vocabulary logit is the last: one size per stack
            return super().group_key()
        return (Categorical, "oov_mass", (len(self.vocab) - 1).bit_length())

    @classmethod
    def stack(cls, families, device=None):
        out = copy.copy(max(families, key=lambda f: len(f.vocab)))
        out.name = ",".join(f.name for f in families)
        if out.oov_mass is None:  # one vocabulary size (group_key): nothing to pad
            return out
        sizes = torch.tensor([len(f.vocab) for f in families], device=device)
        out._n_vocab = sizes
        lacks = torch.arange(len(out.vocab), device=device) >= sizes[:, None]
        out._pad = torch.zeros(lacks.shape, dtype=torch.float64, device=device).masked_fill(lacks, -math.inf)
        out.oov_mass = torch.tensor([f.oov_mass for f in families], dtype=torch.float64, device=device)
        return out

    @property
    def n_classes(self) -> int:
        return len(self.vocab) + 1  # the last class is out-of-vocabulary

    @property
    def n_params(self):
        return len(self.vocab) if self.oov_mass is not None else self.n_classes

    @property
    def enc_width(self):
        return self.n_classes

    @classmethod
    def from_stats(cls, name, stats, max_categories: int = MAX_CATEGORIES, **options):
        if not stats["counts"]:
            raise InputDataError("no observed values to fit", column=name)
        ranked = sorted(stats["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
        vocab = [k for k, _ in ranked[:max_categories]]
        return cls(name, vocab, good_turing_oov_mass(stats["counts"], max_categories))

    def state(self):
        return {"vocab": self.vocab} | ({"oov_mass": self.oov_mass} if self.oov_mass is not None else {})

    def encode(self, column) -> EncodedColumn:
        idx = index_labels(to_labels(column), self.vocab)
        observed = idx != -2
        value = np.where(idx == -1, len(self.vocab), np.maximum(idx, 0)).astype(np.float64)
        return EncodedColumn(value, observed, None)

    def encoder_input(self, value):
        return torch.nn.functional.one_hot(value.long(), self.n_classes).float()

    def _logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The bounded float64 logits; a stack's logits beyond a column's vocabulary -inf."""
        logits = raw.double().clamp(-LOGIT_BOUND, LOGIT_BOUND)
        # added, not masked_fill: a sum keeps the logits' memory layout (generative's, parameter by parameter),
        # masked_fill copies to row-major and the reductions after it walk the memory across
        return logits if self._pad is None else logits + self._pad

    def params(self, raw: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the classes, vocabulary order, out-of-vocabulary last."""
        logits = self._logits(raw)
        if self.oov_mass is None:
            return torch.log_softmax(logits, dim=-1)
        mass = torch.as_tensor(self.oov_mass, dtype=logits.dtype, device=logits.device)
        mass = mass.unsqueeze(-1) if mass.dim() else mass  # a stack's [G] against [..., G, classes]
        known = torch.log_softmax(logits, dim=-1) + torch.log1p(-mass)
        oov = torch.log(mass).expand_as(known[..., :1])
        return torch.cat([known, oov], dim=-1)

    def log_prob(self, raw, value):
        idx = value.long()
        if self.oov_mass is None:
            logp = self.params(raw)
            shape = broadcast_shape(logp.shape[:-1], idx.shape)  # raw may be one row for all records
            return torch.gather(logp.expand(*shape, logp.shape[-1]), -1, idx.expand(shape).unsqueeze(-1)).squeeze(-1)
        # params' log-probabilities at the observed class only: the observed logit less the log-normaliser,
        # without the [..., classes] table of log_softmax (the same float64 numbers, a fraction of the work)
        logits = self._logits(raw)
        # a stack: each column's out-of-vocabulary class is its own vocabulary size
        oov = idx == (self._n_vocab if self._n_vocab is not None else len(self.vocab))
        shape = broadcast_shape(logits.shape[:-1], idx.shape)
        at = torch.where(oov, 0, idx).expand(shape).unsqueeze(-1)  # class 0 stands in for the oov rows (masked below)
        picked = torch.gather(logits.expand(*shape, logits.shape[-1]), -1, at).squeeze(-1)
        mass = torch.as_tensor(self.oov_mass, dtype=logits.dtype, device=logits.device)
        known = picked - logsumexp_classes(logits) + torch.log1p(-mass)
        return torch.where(oov, torch.log(mass), known)
