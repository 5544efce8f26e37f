"""What a trained model carries beside its weights to judge later runs: the reference distribution of
validation scores, and the independent-columns baseline it must beat.

* :func:`reference_scores` -- elbo and log_marginal of validation records (the scoring estimators,
  the training seed), summarised as mean, std and the quantiles at 0.1% steps (``model.json``'s
  ``reference``: what ``vaepipe check`` and ``tail_probability`` compare a run with);
* :func:`baseline_summary` -- the independent-columns baseline fitted on training records and its
  held-out log-likelihood beside the model's (``model.json``'s ``baseline``).

The train job and the in-process API (``pipeline.api.fit``) both write these, so the two artifacts
hold the same keys and the same numbers for the same model and rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.core.baseline import IndependentBaseline
from pipeline.core.codec import EncodedBatch
from pipeline.core.defaults import REFERENCE_QUANTILES
from pipeline.core.model import VAE
from pipeline.core.scoring import reference_values, score_batch

BASELINE_STEPS = 60  # L-BFGS iterations of the independent-columns baseline (free constants: converges fast)


def reference_scores(model: VAE, valid: EncodedBatch, mc_samples: int, iw_samples: int, seed: int) -> dict[str, Any]:
    scores = score_batch(model, valid, mc_samples, iw_samples, seed=seed)
    ref: dict[str, Any] = {
        "rows": len(valid),
        "mc_samples": mc_samples,
        "iw_samples": iw_samples,
        "quantile_probs": REFERENCE_QUANTILES.round(4).tolist(),
    }
    for name, values in (("elbo", scores.elbo), ("log_marginal", scores.log_marginal)):
        if values is None:
            continue
        ref[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "quantiles": np.quantile(values, REFERENCE_QUANTILES).tolist(),
        }
    if scores.log_marginal is not None:  # what tail_probability compares with (pipeline/core/scoring.py)
        ref["log_marginal"]["sorted"] = reference_values(scores.log_marginal)
    return ref


def fit_baseline(families: list, train: EncodedBatch, valid: EncodedBatch) -> dict[str, Any]:
    """The independent-columns baseline fitted on ``train``, and its mean log-likelihood on ``valid``. It needs
    the fitted families only (not the model), so the train job fits it while the workers train."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred steps on tiny tensors: threads only add synchronisation
    try:
        base = IndependentBaseline(families).fit(train, steps=BASELINE_STEPS)
        with torch.no_grad():
            base_ll = base.log_likelihood(valid)
    finally:
        torch.set_num_threads(threads)
    return {"train_rows": len(train), "val_rows": len(valid), "val_log_likelihood": float(base_ll.mean())}


def baseline_summary(model: VAE, train: EncodedBatch, valid: EncodedBatch, ref: dict[str, Any],
                     fitted: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """``fit_baseline`` (or its result, ``fitted``) beside the model's validation numbers."""
    return (fitted or fit_baseline(model.families, train, valid)) | {
        "model_val_elbo": ref["elbo"]["mean"],
        "model_val_log_marginal": ref.get("log_marginal", {}).get("mean"),
    }
