"""The independent-columns baseline: each feature fitted alone, with the same likelihood family.

Every family's parameters are free constants (no z), fitted by maximum likelihood. Its held-out
log-likelihood is what a model of the joint distribution must beat to have learned anything about
how the columns depend on each other.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.codec import EncodedBatch
from pipeline.core.likelihoods import Family


class IndependentBaseline(nn.Module):
    def __init__(self, families: list[Family]):
        super().__init__()
        self.families = families
        self.params = nn.ParameterList([nn.Parameter(torch.zeros(f.n_params)) for f in families])

    def column_log_prob(self, batch: EncodedBatch) -> torch.Tensor:
        n = len(batch)
        cols = [
            fam.log_prob(p.expand(n, -1), batch.values[:, j])
            for j, (fam, p) in enumerate(zip(self.families, self.params, strict=True))
        ]
        logp = torch.stack(cols, -1)
        return torch.where(batch.observed, logp, torch.zeros((), dtype=logp.dtype))

    def log_likelihood(self, batch: EncodedBatch) -> torch.Tensor:
        """[N] sum over observed features of log p(x_j)."""
        return self.column_log_prob(batch).sum(-1)

    def fit(self, batch: EncodedBatch, steps: int = 500, lr: float = 0.05) -> IndependentBaseline:
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = -self.log_likelihood(batch).mean()
            loss.backward()
            opt.step()
        return self
