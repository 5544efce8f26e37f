"""Training data with Ray Data: the deterministic train/validation split and the statistics pass.

* :func:`is_validation` -- a record is in the validation set when a hash of its id columns falls
  below ``val_fraction``: the same record is always on the same side, whatever the file layout,
  batch size, worker count or seed;
* :func:`split_datasets` -- the train and validation Ray Datasets (lazy, streaming);
* :func:`statistics_pass` -- the preprocessing statistics over every input row, one mergeable
  partial per block computed by Ray Data tasks, merged on the driver as they stream in: the driver
  holds one running total, so memory does not grow with the row count.

The statistics cover train and validation rows alike: they are preprocessing (vocabularies,
locations, scales), not learned parameters, and a label seen only in validation rows must still be
known when those records are scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.codec import merge_stats, partial_stats, record_keys, splitmix64
from pipeline.errors import InputDataError, root_message, vaepipe_error_in
from pipeline.io.inputs import InputData, read_dataset
from schemas.feature_spec import FeatureSpec

# Salt of the split hash: decorrelates the split from anything else derived from record keys.
SPLIT_SALT = np.uint64(0x5EED5B117C0FFEE5)
STATS_BATCH_ROWS = 65_536  # rows per statistics partial (a block may be cut into several)


def is_validation(table: pa.Table, id_columns: tuple[str, ...] | list[str], val_fraction: float) -> np.ndarray:
    """[N] bool: True for the records of the validation set."""
    if val_fraction <= 0:
        return np.zeros(table.num_rows, dtype=bool)
    h = splitmix64(record_keys(table, id_columns) ^ SPLIT_SALT)
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    return u < val_fraction


class _SplitFilter:
    """Ray Data batch function keeping one side of the split (a plain, picklable callable)."""

    def __init__(self, id_columns: list[str], val_fraction: float, validation: bool):
        self.id_columns, self.val_fraction, self.validation = list(id_columns), val_fraction, validation

    def __call__(self, table: pa.Table) -> pa.Table:
        mask = is_validation(table, self.id_columns, self.val_fraction)
        return table.filter(pa.array(mask if self.validation else ~mask))


def split_datasets(data: InputData, spec: FeatureSpec, val_fraction: float):
    """(train, validation) Ray Datasets over the spec's columns."""
    ds = read_dataset(data, spec)
    ids = list(spec.id_columns)
    train = ds.map_batches(_SplitFilter(ids, val_fraction, False), batch_format="pyarrow", zero_copy_batch=True)
    valid = ds.map_batches(_SplitFilter(ids, val_fraction, True), batch_format="pyarrow", zero_copy_batch=True)
    return train, valid


def read_split_rows(data: InputData, spec: FeatureSpec, val_fraction: float, validation: bool, limit: int):
    """The first `limit` rows of one side of the split, read on the driver (no Ray): a bounded sample
    for the reference scores and the baseline. None when that side is empty."""
    import pyarrow.parquet as pq

    fs, tables, n = data.filesystem(), [], 0
    for f in data.files:
        with fs.open_input_file(f.path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=65_536, columns=spec.columns):
                table = _SplitFilter(list(spec.id_columns), val_fraction, validation)(pa.Table.from_batches([batch]))
                tables.append(table)
                n += table.num_rows
                if n >= limit:
                    return pa.concat_tables(tables).slice(0, limit)
    return pa.concat_tables(tables) if n else None


# ---- statistics pass ------------------------------------------------------------------------------
@dataclass
class DataStats:
    stats: dict[str, Any]  # merged per-feature statistics, as codec.merge_stats builds them
    rows: int
    val_rows: int

    @property
    def train_rows(self) -> int:
        return self.rows - self.val_rows


class _PartialStats:
    """Ray Data batch function: one JSON-encoded partial per batch, plus its validation-row count."""

    def __init__(self, spec_dict: dict, val_fraction: float):
        self.spec = FeatureSpec.from_dict(spec_dict)
        self.val_fraction = val_fraction

    def __call__(self, table: pa.Table) -> pa.Table:
        part = partial_stats(self.spec, table)
        n_val = int(is_validation(table, self.spec.id_columns, self.val_fraction).sum())
        return pa.table({"partial": [json.dumps(part)], "val_rows": [n_val]})


def statistics_pass(data: InputData, spec: FeatureSpec, val_fraction: float) -> DataStats:
    """Merged statistics over every input row; Ray Data computes the partials, streaming."""
    ds = read_dataset(data, spec).map_batches(
        _PartialStats(spec.to_dict(), val_fraction), batch_format="pyarrow", batch_size=STATS_BATCH_ROWS
    )
    total: dict[str, Any] | None = None
    val_rows = 0
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for part, n_val in zip(
                batch.column("partial").to_pylist(), batch.column("val_rows").to_pylist(), strict=True
            ):
                total = merge_stats(spec, total, json.loads(part))
                val_rows += n_val
    except InputDataError:
        raise
    except Exception as e:  # a page that the footer check could not see: name the input
        cause = vaepipe_error_in(e)
        if isinstance(cause, InputDataError):
            raise cause from e
        raise InputDataError(f"cannot read the input data ({root_message(e)})", file=data.uri) from e
    if total is None or total["_rows"] == 0:
        raise InputDataError("the input has no rows", file=data.uri)
    return DataStats(total, int(total["_rows"]), val_rows)

