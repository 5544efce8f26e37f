"""What every likelihood family provides, and the small numeric helpers they share.

A family is one feature's whole story, fitted once on training data and stored with the model:

* **statistics** -- ``partial_stats(column)`` summarises one batch, ``merge_stats`` combines two
  summaries (so a distributed, streaming pass can fit them), ``from_stats`` turns the total into a
  fitted family;
* **codec** -- ``encode(column)`` turns an Arrow column into a float64 value per row, whether the
  value is observed, and why a row cannot be scored (or None);
* **encoder view** -- ``encoder_input(value)``: what the encoder network sees (standardised, bounded);
* **likelihood** -- ``log_prob(raw, value)``: the exact log-density (or log-mass) of the value under
  the distribution whose parameters the decoder head emitted as ``raw``, in the column's own units;
* **stacking** -- families with the same ``group_key`` are evaluated together: ``stack(families)`` is
  one family of their class whose per-column numbers (``column_attrs``: location, scale, ...) are
  tensors [G], so one call of ``encoder_input`` or ``log_prob`` on values [N, G] and raw parameters
  [..., N, G, n_params] does the work of G calls, each column exactly as its own family would. The model
  evaluates a table's likelihood this way, a few tensor operations per family instead of per column.
  Every family writes its numbers through ``log_of`` and tensor broadcasting, so one implementation
  serves a column and a stack.

``log_prob`` works in float64 and is finite for every value that ``encode`` accepts, however extreme.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.io.columns import as_array

LOG_2PI = math.log(2.0 * math.pi)
# The encoder sees standardised values clipped here: a value 1e6 standard deviations out must not
# overflow the encoder's activations. The likelihood always sees the exact value.
ENCODER_CLIP = 10.0
# Logits from a decoder head are clamped here: no class or outcome gets probability 0 (or 1), so
# every log-probability stays finite; e^-20 is far below anything a fitted model needs.
LOGIT_BOUND = 20.0


@dataclass
class EncodedColumn:
    """One column of a batch, as the model sees it."""

    value: np.ndarray  # float64 [N]; a valid filler where the value is missing or invalid
    observed: np.ndarray  # bool [N]
    invalid: np.ndarray | None = None  # object [N]: reason string where the row cannot be scored


class Family(ABC):
    """A likelihood family bound to one feature and its fitted statistics."""

    kind: ClassVar[str]
    # position of the spread parameter (log-variance, log-dispersion) in the head's raw output, if any:
    # the model bounds how far a record can move it from the column's learned base (pipeline/core/model.py)
    spread_index: ClassVar[int | None] = None

    # the fitted numbers that differ between the columns of one stack (tensors [G] in a stacked family)
    column_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str):
        self.name = name

    # ---- shape ----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def n_params(self) -> int:
        """Width of the decoder head: raw parameters per record."""

    @property
    def enc_width(self) -> int:
        return 1

    # ---- statistics -----------------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def partial_stats(column: pa.ChunkedArray | pa.Array) -> dict[str, Any]: ...

    @staticmethod
    @abstractmethod
    def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]: ...

    @classmethod
    @abstractmethod
    def from_stats(cls, name: str, stats: dict[str, Any], **options: Any) -> Family: ...

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON-serialisable fitted state; ``cls(name, **state)`` rebuilds the family."""

    # ---- codec ----------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, column: pa.ChunkedArray | pa.Array) -> EncodedColumn: ...

    @abstractmethod
    def encoder_input(self, value: torch.Tensor) -> torch.Tensor:
        """[N] float64 -> [N, enc_width] float32, bounded."""

    # ---- likelihood -----------------------------------------------------------------------------
    @abstractmethod
    def log_prob(self, raw: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """raw [..., N, n_params] (any float), value [N] float64 -> log p [..., N] float64."""

    # ---- stacking -------------------------------------------------------------------------------
    def group_key(self) -> tuple:
        """Families with equal keys are stacked: they have the same shapes and the same distribution."""
        return (type(self), self.n_params, self.enc_width)

    @classmethod
    def stack(cls, families: list[Family], device: torch.device | str | None = None) -> Family:
        """One family for the columns of ``families`` (all of this class, with one ``group_key``): its
        ``column_attrs`` become float64 tensors [G] on ``device``; everything else is the first's."""
        out = copy.copy(families[0])
        out.name = ",".join(f.name for f in families)
        for a in cls.column_attrs:
            if getattr(out, a) is None:  # an option none of them has (their group_key says so)
                continue
            setattr(out, a, torch.tensor([getattr(f, a) for f in families], dtype=torch.float64, device=device))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.state()})"


class LabelFamily(Family):
    """A family over labels (binary, categorical, ordinal): its statistics are the label counts."""

    @staticmethod
    def partial_stats(column: pa.ChunkedArray | pa.Array) -> dict[str, Any]:
        return {"counts": label_counts(to_labels(column))}

    @staticmethod
    def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"counts": counts_merge(a["counts"], b["counts"])}


# ---- shared helpers -------------------------------------------------------------------------------
def to_float64(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Numeric Arrow column -> float64 numpy, nulls as NaN."""
    arr = as_array(column)
    if not pa.types.is_float64(arr.type):
        arr = pc.cast(arr, pa.float64())
    return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def to_labels(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any label column (ints, strings, bools, floats) -> string labels, nulls kept."""
    arr = as_array(column)
    if pa.types.is_floating(arr.type):
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    return arr


def moments_partial(x: np.ndarray) -> dict[str, float]:
    """(n, mean, M2, min, max) of the finite values of x, for Chan's parallel merge."""
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": 0.0, "m2": 0.0, "min": math.inf, "max": -math.inf}
    mean = float(x.mean())
    return {"n": n, "mean": mean, "m2": float(((x - mean) ** 2).sum()), "min": float(x.min()), "max": float(x.max())}


def moments_merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    n = a["n"] + b["n"]
    low = min(a.get("min", math.inf), b.get("min", math.inf))
    high = max(a.get("max", -math.inf), b.get("max", -math.inf))
    if n == 0:
        return {"n": 0, "mean": 0.0, "m2": 0.0, "min": low, "max": high}
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * b["n"] / n
    m2 = a["m2"] + b["m2"] + delta * delta * a["n"] * b["n"] / n
    return {"n": n, "mean": mean, "m2": m2, "min": low, "max": high}


# The decoder's mean of a continuous column (on its standardised modelling scale) is held within the range the
# training values spanned, widened by this many of the column's standard deviations (:func:`mean_range`).
MEAN_MARGIN = 1.0


def mean_range(m: dict[str, float], loc: float, scale: float) -> tuple[float | None, float | None]:
    """The standardised bounds of the decoder's mean from merged moments: [(min - loc) / scale - MEAN_MARGIN,
    (max - loc) / scale + MEAN_MARGIN]; (None, None) where the moments have no range (no values, or
    statistics from before the range was kept)."""
    low, high = m.get("min", math.inf), m.get("max", -math.inf)
    if not (math.isfinite(low) and math.isfinite(high)) or m["n"] == 0:
        return None, None
    return (low - loc) / scale - MEAN_MARGIN, (high - loc) / scale + MEAN_MARGIN


def mean_bounds(low: float | None, high: float | None) -> tuple[float | None, float | None]:
    """Both bounds or neither, as floats."""
    if (low is None) != (high is None):
        raise ValueError("mean_low and mean_high go together")
    return (None, None) if low is None else (float(low), float(high))


def mean_state(family: Family) -> dict[str, float]:
    """The bounds for a family's ``state()``, where it has them."""
    return {} if family.mean_low is None else {"mean_low": family.mean_low, "mean_high": family.mean_high}


def bounded_mean(
    raw: torch.Tensor, low: float | torch.Tensor | None, high: float | torch.Tensor | None
) -> torch.Tensor:
    """The decoder's raw mean held within [low, high] (floats, or tensors [G] for a stack); without bounds
    (a model from before them) within +-1e4, as before."""
    return raw.clamp(-1e4, 1e4) if low is None else raw.clamp(low, high)


def loc_scale(m: dict[str, float]) -> tuple[float, float]:
    """Location and scale from merged moments; a constant column gets scale 1."""
    if m["n"] == 0:
        return 0.0, 1.0
    var = m["m2"] / max(m["n"] - 1, 1)
    scale = math.sqrt(var) if var > 0 else 1.0
    return float(m["mean"]), float(scale)


def counts_merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def label_counts(labels: pa.Array) -> dict[str, int]:
    vc = pc.value_counts(pc.drop_null(labels))
    return {str(v): int(c) for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)}


def log_of(v: float | torch.Tensor) -> float | torch.Tensor:
    """log of a fitted number: a float (one column) or a tensor of one per column (a stack)."""
    return torch.log(v) if isinstance(v, torch.Tensor) else math.log(v)


def bounded_log_var(raw: torch.Tensor, min_var: float | torch.Tensor, max_log_var: float = 10.0) -> torch.Tensor:
    """log(min_var + exp(raw)) with raw clamped: a smooth floor on the variance, finite above."""
    floor = torch.as_tensor(log_of(min_var), dtype=raw.dtype, device=raw.device)
    return torch.logaddexp(raw.clamp(-30.0, max_log_var), floor.expand_as(raw))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var)) = -1/2 [log(2 pi sigma^2) + (x - mean)^2 / sigma^2]."""
    return -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


# log_ndtr below this takes torch's own (its erfcx branch): erfc(-x / sqrt 2) underflows near x = -38
LOG_NDTR_ERFC_MIN = -30.0


def log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """log Phi(x), as ``torch.special.log_ndtr`` at a fraction of its cost on the CPU: log(erfc(-x / sqrt 2) / 2)
    for x < 0 and log1p(-erfc(x / sqrt 2) / 2) for x >= 0, which keep erfc's relative accuracy (a few ulp)
    in both tails; torch's own, whose erfcx takes most of its time, only where x < -30. Elsewhere than the
    CPU torch's own throughout (no host round trip to look for such values)."""
    if x.device.type != "cpu":
        return torch.special.log_ndtr(x)
    xs = x.clamp_min(LOG_NDTR_ERFC_MIN)
    neg = xs < 0
    e = torch.special.erfc(torch.where(neg, -xs, xs) * math.sqrt(0.5))  # > 0 where x < 0 (the clamp)
    # each branch finite, its gradient too, where the other is picked (erfc underflows to 0 for large x)
    out = torch.where(neg, torch.log(0.5 * torch.where(neg, e, 1.0)), torch.log1p(-0.5 * torch.where(neg, 0.0, e)))
    far = x < LOG_NDTR_ERFC_MIN
    if bool(far.any()):
        out = out.masked_scatter(far, torch.special.log_ndtr(x[far]))
    return out


def broadcast_shape(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` by numpy's rule: torch's own imports sympy on its first call (about 0.5 s
    of CPU, paid in every new scoring and training process on its first batch)."""
    return torch.Size(np.broadcast_shapes(*shapes))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def index_labels(labels: pa.Array, vocab: list[str]) -> np.ndarray:
    """Position of each label in vocab; -1 where unknown, -2 where null."""
    idx = pc.index_in(labels, value_set=pa.array(vocab, pa.string()))
    out = idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    out[labels.is_null().to_numpy(zero_copy_only=False)] = -2
    return out


def logsumexp_classes(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, -1)`` for a stack's logits [..., G, K], reduced where they lie in memory.

    The decoder emits its parameters parameter by parameter (``VAE.generative``), so the classes of a
    stack are its slowest-varying dimensions: [G, K, ..., N] is the contiguous view. Reduced over K in
    that view, torch's reduction walks the memory in order (the same float64 numbers; on [2, 4,096, 3, 16]
    1.7 against 4.8 ms over the strided last dimension); any other layout gives the same result.
    """
    nd = logits.dim()
    if nd < 3:
        return torch.logsumexp(logits, -1)
    by_class = logits.permute(nd - 2, nd - 1, *range(nd - 2))  # [G, K, ..., N]
    return torch.logsumexp(by_class, 1).permute(*range(1, nd - 1), 0)
