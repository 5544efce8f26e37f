"""Training data with Ray Data: the deterministic train/validation split and the statistics pass.

* :func:`is_validation` -- a record is in the validation set when a hash of its id columns falls
  below ``val_fraction``: the same record is always on the same side, whatever the file layout,
  batch size, worker count or seed;
* :func:`split_inputs` -- the train and validation sides: for inputs the driver can hold, one Arrow table
  per worker and side in the object store (:class:`WorkerShards`); else lazy, streaming Ray Datasets;
* :func:`statistics_pass` -- the preprocessing statistics over every input row, each file read once
  with the spec's columns only: on the driver for small inputs, else one mergeable partial per file
  (or share of its row groups) from Ray tasks, merged on the driver as they finish: the driver holds
  one running total, so memory does not grow with the row count;
* :func:`read_split_samples` -- bounded samples of both sides for the reference scores and baseline.

The statistics cover train and validation rows alike: they are preprocessing (vocabularies,
locations, scales), not learned parameters, and a label seen only in validation rows must still be
known when those records are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.codec import merge_stats, partial_stats, record_keys, splitmix64
from pipeline.errors import InputDataError, root_message, vaepipe_error_in
from pipeline.io.inputs import InputData, InputFile, read_dataset, read_files
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


@dataclass
class WorkerShards:
    """Each worker's rows of each side, as object-store references to Arrow tables:
    ``refs[side][rank]``. Rows are contiguous slices of the driver's split, in file order."""

    refs: dict[str, list]  # "train" / "valid" -> one ObjectRef of a pa.Table per worker


def split_inputs(data: InputData, spec: FeatureSpec, val_fraction: float, workers: int):
    """The train and validation sides over the spec's columns: :class:`WorkerShards`, or a pair of Ray
    Datasets.

    Up to ``LOCAL_STATS_ROWS`` input rows the driver reads the files once (the spec's columns only),
    splits them, and puts each worker's slice of each side in the object store: a worker takes its
    tables by reference (no copy on its own node), and no epoch starts Ray Data's split coordinators,
    Parquet listing tasks or footer-reading actors (processes that cost a small table's whole training
    many times over). Larger inputs are read lazily by Ray Data, a streaming pass per epoch, split
    across the workers by Ray Train."""
    if data.rows <= LOCAL_STATS_ROWS:
        return _shards_on_the_driver(data, spec, val_fraction, workers)
    ds = read_dataset(data, spec)
    ids = list(spec.id_columns)
    train = ds.map_batches(_SplitFilter(ids, val_fraction, False), batch_format="pyarrow", zero_copy_batch=True)
    valid = ds.map_batches(_SplitFilter(ids, val_fraction, True), batch_format="pyarrow", zero_copy_batch=True)
    return train, valid


def split_tables(data: InputData, spec: FeatureSpec, val_fraction: float) -> tuple[pa.Table, pa.Table]:
    """(train, validation) tables of the spec's columns, read on the driver, each file once."""
    sides = {False: [], True: []}
    for _, table in read_files(data, spec):
        mask = is_validation(table, spec.id_columns, val_fraction)
        sides[True].append(table.filter(pa.array(mask)))
        sides[False].append(table.filter(pa.array(~mask)))

    def whole(parts: list[pa.Table]) -> pa.Table:
        return pa.concat_tables(parts, promote_options="permissive").combine_chunks()

    return whole(sides[False]), whole(sides[True])


def _shards_on_the_driver(data: InputData, spec: FeatureSpec, val_fraction: float, workers: int) -> WorkerShards:
    import ray

    refs = {}
    for name, table in zip(("train", "valid"), split_tables(data, spec, val_fraction), strict=True):
        cuts = [table.num_rows * i // workers for i in range(workers + 1)]
        refs[name] = [ray.put(table.slice(a, b - a)) for a, b in zip(cuts, cuts[1:], strict=False)]
    return WorkerShards(refs)


def read_split_samples(data: InputData, spec: FeatureSpec, val_fraction: float, val_limit: int, train_limit: int):
    """The first ``val_limit`` validation rows and the first ``train_limit`` training rows, read on the
    driver (no Ray) in one pass over the leading files: bounded samples for the reference scores and the
    baseline. Each is None when that side has no rows."""
    import pyarrow.parquet as pq

    ids = list(spec.id_columns)
    fs, sides = data.filesystem(), {True: [], False: []}
    limits, counts = {True: val_limit, False: train_limit}, {True: 0, False: 0}
    for f in data.files:
        with fs.open_input_file(f.path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=65_536, columns=spec.columns):
                table = pa.Table.from_batches([batch])
                mask = is_validation(table, ids, val_fraction)
                for side in (True, False):
                    if counts[side] < limits[side]:
                        part = table.filter(pa.array(mask if side else ~mask))
                        sides[side].append(part)
                        counts[side] += part.num_rows
                if all(counts[s] >= limits[s] for s in (True, False)):
                    break
        if all(counts[s] >= limits[s] for s in (True, False)):
            break
    out = [pa.concat_tables(sides[s]).slice(0, limits[s]) if counts[s] else None for s in (True, False)]
    return out[0], out[1]


# ---- statistics pass ------------------------------------------------------------------------------
@dataclass
class DataStats:
    stats: dict[str, Any]  # merged per-feature statistics, as codec.merge_stats builds them
    rows: int
    val_rows: int

    @property
    def train_rows(self) -> int:
        return self.rows - self.val_rows


LOCAL_STATS_ROWS = 2_000_000  # up to this many input rows, the driver computes the statistics itself


def file_partial(fs, f: InputFile, spec: FeatureSpec, val_fraction: float, piece: int = 0, pieces: int = 1):
    """(partial statistics, validation rows) of one file's row groups ``piece::pieces``, reading only
    the spec's columns, in batches (memory bounded by the batch). Errors name the file."""
    import pyarrow.parquet as pq

    total: dict[str, Any] | None = None
    n_val = 0
    try:
        with fs.open_input_file(f.path) as handle:
            pf = pq.ParquetFile(handle)
            groups = list(range(piece, pf.metadata.num_row_groups, pieces))
            if not groups:
                return None, 0
            for batch in pf.iter_batches(batch_size=STATS_BATCH_ROWS, row_groups=groups, columns=spec.columns):
                table = pa.Table.from_batches([batch])
                total = merge_stats(spec, total, partial_stats(spec, table))
                n_val += int(is_validation(table, spec.id_columns, val_fraction).sum())
    except InputDataError as e:
        if e.file is None:
            raise InputDataError(str(e), file=f.uri) from e
        raise
    except Exception as e:  # a page that the footer check could not see: name the file
        raise InputDataError(f"cannot read the input data ({root_message(e)})", file=f.uri) from e
    return total, n_val


def _file_partial_task(fs, f: InputFile, spec_dict: dict, val_fraction: float, piece: int, pieces: int):
    return file_partial(fs, f, FeatureSpec.from_dict(spec_dict), val_fraction, piece, pieces)


def statistics_pass(
    data: InputData, spec: FeatureSpec, val_fraction: float, local_rows: int = LOCAL_STATS_ROWS
) -> DataStats:
    """Merged statistics over every input row, reading each file once with the spec's columns only.

    Up to ``local_rows`` input rows the driver reads the files itself (no task start-up); beyond, one
    Ray task per file (or per share of a file's row groups when files are fewer than twice the
    cluster's CPUs) computes a partial, and the driver merges them as they finish, with a bounded
    number in flight: it holds one running total, so memory does not grow with the row count."""
    fs = data.filesystem()
    total: dict[str, Any] | None = None
    val_rows = 0
    if data.rows <= local_rows:
        for f in data.files:
            part, n_val = file_partial(fs, f, spec, val_fraction)
            if part is not None:
                total, val_rows = merge_stats(spec, total, part), val_rows + n_val
    else:
        import ray

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        pieces = max(1, -(-2 * cpus // len(data.files)))
        task = ray.remote(num_cpus=1, max_retries=2)(_file_partial_task)
        jobs = [(f, k) for f in data.files for k in range(pieces)]
        spec_ref, pending = ray.put(spec.to_dict()), []
        while jobs or pending:
            while jobs and len(pending) < 2 * cpus:
                f, k = jobs.pop(0)
                pending.append(task.remote(fs, f, spec_ref, val_fraction, k, pieces))
            done, pending = ray.wait(pending, num_returns=1)
            try:
                part, n_val = ray.get(done[0])
            except Exception as e:
                cause = vaepipe_error_in(e)
                if isinstance(cause, InputDataError):
                    raise cause from e
                raise InputDataError(f"cannot read the input data ({root_message(e)})", file=data.uri) from e
            if part is not None:
                total, val_rows = merge_stats(spec, total, part), val_rows + n_val
    if total is None or total["_rows"] == 0:
        raise InputDataError("the input has no rows", file=data.uri)
    return DataStats(total, int(total["_rows"]), val_rows)
