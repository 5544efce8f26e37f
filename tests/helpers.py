"""Test helpers shared by the tests and the benchmarks (no fixtures: those are in conftest.py).

* ``DATA``: the test datasets (tests/data/<name>/, each with its authors' types.csv);
* :func:`dataset_spec`: a dataset's feature spec from that types.csv;
* :func:`reference_prior`: a model's prior p(z) as torch.distributions builds it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from schemas.feature_spec import FeatureSpec

DATA = Path(__file__).parent / "data"
HIVAE_TYPES = {"pos": "positive", "count": "count", "cat": "categorical", "real": "real", "ordinal": "ordinal"}


def dataset_spec(name: str) -> FeatureSpec:
    """The spec of a test dataset from its authors' types.csv (2-class 'cat' columns are binary)."""
    features = {}
    with open(DATA / name / "types.csv") as f:
        for row in csv.DictReader(f):
            kind = HIVAE_TYPES[row["hivae_type"]]
            if kind == "categorical" and row["nclass"] == "2":
                kind = "binary"
            features[row["column"]] = kind
    return FeatureSpec.from_dict({"id_columns": ["record_id"], "features": features})


def reference_prior(model) -> torch.distributions.Distribution:
    """p(z) of a VAE as torch.distributions builds it: N(0, I), or its learned mixture of diagonal Gaussians."""
    if model.config.prior_components == 1:
        return Independent(Normal(torch.zeros(model.latent_dim, dtype=torch.float64), 1.0), 1)
    scale = torch.exp(0.5 * model.prior_log_var.detach().double())
    return MixtureSameFamily(
        Categorical(logits=model.prior_logits.detach().double()),
        Independent(Normal(model.prior_mean.detach().double(), scale), 1),
    )
