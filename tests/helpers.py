"""Test helpers shared by the tests and the benchmarks (no fixtures: those are in conftest.py).

* ``DATA``: the test datasets (tests/data/<name>/, each with its authors' types.csv);
* :func:`dataset_spec`: a dataset's feature spec from that types.csv;
* :func:`reference_prior`: a model's prior p(z) as torch.distributions builds it;
* :func:`reference_noise`: the scorer's noise, written with numpy's unsigned arithmetic.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from pipeline.core.codec import splitmix64
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


def reference_noise(keys: np.ndarray, seed: int, first: int, last: int, dim: int) -> np.ndarray:
    """pipeline.core.scoring.record_noise written with numpy's uint64 arithmetic: [last - first, N, dim] float32,
    the reference the scorer's torch implementation (int64 bits, logical shifts by mask) must equal."""
    n = keys.shape[0]
    base = splitmix64(keys ^ splitmix64(np.array([seed], dtype=np.uint64)))  # [N]
    s = np.arange(first, last, dtype=np.uint64)[:, None, None]
    d = np.arange(dim, dtype=np.uint64)[None, None, :]
    with np.errstate(over="ignore"):
        counter = base[None, :, None] + (s * np.uint64(dim) + d) * np.uint64(2)
        h1 = splitmix64(counter)
        h2 = splitmix64(counter + np.uint64(1))
    scale = 2.0**-53
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * scale  # (0, 1)
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * scale  # [0, 1)
    eps = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return eps.astype(np.float32).reshape(last - first, n, dim)


def without_package(package: str) -> str:
    """Python source that makes ``package`` and its submodules unimportable in the interpreter that runs it
    (an import raises ImportError), and stops that interpreter if the block does not hold: the head of a
    subprocess that proves some code never imports the package."""
    return f"""
import sys

class _Without:
    def find_spec(self, name, path=None, target=None):
        if name == {package!r} or name.startswith({package + "."!r}):
            raise ImportError({package + " is not importable here"!r})
        return None

sys.meta_path.insert(0, _Without())
try:
    import {package}  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the import block does not work")
"""
