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
from pipeline.core.model import Layout


class IndependentBaseline(nn.Module):
    def __init__(self, families: list[Family]):
        super().__init__()
        self.families = families
        # every feature's raw parameters, feature after feature, evaluated grouped like the model's heads
        self.params = nn.Parameter(torch.zeros(sum(f.n_params for f in families)))
        self._layout = Layout.build(families, torch.device("cpu"))

    def column_log_prob(self, batch: EncodedBatch) -> torch.Tensor:
        # one row of parameters for every record: each distribution is computed once, then broadcast
        raw = self.params[self._layout.head_rows].unsqueeze(0)
        return self._layout.column_log_prob(raw, batch.values, batch.observed)

    def log_likelihood(self, batch: EncodedBatch) -> torch.Tensor:
        """[N] sum over observed features of log p(x_j)."""
        return self.column_log_prob(batch).sum(-1)

    def fit(self, batch: EncodedBatch, steps: int = 100) -> IndependentBaseline:
        """Maximum likelihood by L-BFGS (full batch, strong Wolfe line search), at most ``steps`` iterations:
        a smooth problem of a few hundred constants, which it solves to the optimum in tens of iterations
        (adult: closer after 50 than Adam after 1,000 steps, in a twentieth of the time)."""
        opt = torch.optim.LBFGS(
            self.parameters(),
            max_iter=steps,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = -self.log_likelihood(batch).mean()
            loss.backward()
            return loss

        opt.step(closure)
        return self
