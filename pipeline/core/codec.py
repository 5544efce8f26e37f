"""From Arrow tables to what the model sees, with statistics fitted once on training data.

* :func:`partial_stats` / :func:`merge_stats` / :func:`fit_families` -- a mergeable statistics pass
  (one partial per batch, merged in any order), so a distributed streaming job can fit it;
* :class:`TableCodec` -- encodes a table with fitted families into an :class:`EncodedBatch`:
  float64 values, an observed mask, record keys, and the rows that cannot be scored (with reasons);
* :func:`record_keys` -- a stable 64-bit key per record from its id columns, the seed of its noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.core.likelihoods import FAMILIES, Family, family_from_state
from pipeline.errors import InputDataError
from pipeline.io.columns import as_array
from schemas.feature_spec import FeatureSpec

# ---- statistics ----------------------------------------------------------------------------------


def partial_stats(spec: FeatureSpec, table: pa.Table) -> dict[str, Any]:
    """Summaries of one batch, one per feature, JSON-serialisable and mergeable."""
    return {
        f.name: FAMILIES[f.type].partial_stats(table.column(f.name)) for f in spec.features
    } | {"_rows": table.num_rows}


def merge_stats(spec: FeatureSpec, a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    if a is None:
        return b
    out = {f.name: FAMILIES[f.type].merge_stats(a[f.name], b[f.name]) for f in spec.features}
    out["_rows"] = a["_rows"] + b["_rows"]
    return out


def fit_families(spec: FeatureSpec, stats: dict[str, Any]) -> list[Family]:
    families = []
    for f in spec.features:
        options = {"levels": list(f.levels)} if f.type == "ordinal" and f.levels is not None else {}
        families.append(FAMILIES[f.type].from_stats(f.name, stats[f.name], **options))
    return families


def families_to_json(families: list[Family]) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": f.kind, "state": f.state()} for f in families]


def families_from_json(items: list[dict[str, Any]]) -> list[Family]:
    return [family_from_state(it["type"], it["name"], it["state"]) for it in items]


# ---- record keys ---------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def signed64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits (torch's >> on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64_bits(z: torch.Tensor) -> torch.Tensor:
    """:func:`splitmix64` on an int64 tensor holding uint64 bits, on any device: two's-complement adds and
    multiplies wrap to the same bits as unsigned ones."""
    z = z + signed64(int(_GOLDEN))
    z = (z ^ shift_right(z, 30)) * signed64(0xBF58476D1CE4E5B9)
    z = (z ^ shift_right(z, 27)) * signed64(0x94D049BB133111EB)
    return z ^ shift_right(z, 31)


def _column_hash(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    col = as_array(col)
    if pa.types.is_integer(col.type):
        vals = pc.cast(col, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).view(np.uint64)
        return splitmix64(vals)
    texts = col.cast(pa.string()).to_pylist() if not pa.types.is_string(col.type) else col.to_pylist()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(t).encode(), digest_size=8).digest(), "little") for t in texts),
        dtype=np.uint64,
        count=len(texts),
    )


def record_keys(table: pa.Table, id_columns: tuple[str, ...] | list[str]) -> np.ndarray:
    """A 64-bit key per record that depends only on its id values (not on batch or position)."""
    h = np.zeros(table.num_rows, dtype=np.uint64)
    for col in id_columns:
        with np.errstate(over="ignore"):
            h = splitmix64(h * np.uint64(31) ^ _column_hash(table.column(col)))
    return h


# ---- encoding ------------------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    values: torch.Tensor  # [N, F] float64, valid fillers where not observed
    observed: torch.Tensor  # [N, F] bool
    keys: np.ndarray  # [N] uint64
    invalid: list[tuple[int, str, str]] = field(default_factory=list)  # (row, column, reason)

    def __len__(self) -> int:
        return self.values.shape[0]

    def select(self, rows: np.ndarray) -> EncodedBatch:
        r = torch.as_tensor(rows)
        return EncodedBatch(self.values[r], self.observed[r], self.keys[rows], [])

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(self.values.to(device), self.observed.to(device), self.keys, self.invalid)


class TableCodec:
    """Encodes Arrow tables with fitted families."""

    def __init__(self, spec: FeatureSpec, families: list[Family]):
        self.spec = spec
        self.families = families

    def encode(self, table: pa.Table) -> EncodedBatch:
        n = table.num_rows
        values = np.empty((n, len(self.families)), dtype=np.float64)
        observed = np.empty((n, len(self.families)), dtype=bool)
        invalid: list[tuple[int, str, str]] = []
        for j, fam in enumerate(self.families):
            try:
                enc = fam.encode(table.column(fam.name))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise InputDataError(f"cannot read values: {e}", column=fam.name) from e
            values[:, j] = enc.value
            observed[:, j] = enc.observed
            if enc.invalid is not None:
                rows = np.flatnonzero(enc.invalid != None)  # noqa: E711 -- elementwise
                invalid.extend((int(r), fam.name, str(enc.invalid[r])) for r in rows)
        keys = record_keys(table, self.spec.id_columns)
        return EncodedBatch(torch.from_numpy(values), torch.from_numpy(observed), keys, invalid)
