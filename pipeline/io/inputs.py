"""Input data: pre-flight checks of every shard, then a Ray Dataset over exactly the spec's columns.

Pre-flight reads only Parquet footers: it finds a missing column, an incompatible type, an empty,
unreadable or truncated file before any work starts, and names the file and column
(:class:`~pipeline.errors.InputDataError`, exit code 3).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputDataError, root_message
from pipeline.io import storage
from schemas.feature_spec import FeatureSpec


@dataclass(frozen=True)
class InputFile:
    uri: str  # as the user would write it (s3://bucket/key or a local path)
    path: str  # as the filesystem wants it
    rows: int
    size: int  # bytes


@dataclass(frozen=True)
class InputData:
    uri: str
    files: list[InputFile]
    schema: pa.Schema  # the spec's columns, as in the first file

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def filesystem(self):
        return storage.filesystem(self.uri)

    def fingerprint(self) -> list[dict]:
        return [{"file": f.uri, "rows": f.rows, "bytes": f.size} for f in self.files]


def preflight(uri: str, spec: FeatureSpec, allow_empty_files: bool = False) -> InputData:
    """Check every shard's footer against the spec. Raises InputDataError naming file and column."""
    fs = storage.filesystem(uri)
    files: list[InputFile] = []
    schema = None
    for path in storage.list_parquet(uri):
        file_uri = storage.to_uri(uri, path)
        try:
            info = fs.get_file_info(path)
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                file_schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001 -- whatever the reader says, name the file
            raise InputDataError(f"unreadable Parquet file ({type(e).__name__}: {e})", file=file_uri) from e
        spec.check_schema(file_schema, file_uri)
        if meta.num_rows == 0 and not allow_empty_files:
            raise InputDataError("empty Parquet file (0 rows)", file=file_uri)
        if schema is None:
            schema = pa.schema([file_schema.field(c) for c in spec.columns])
        else:
            for c in spec.id_columns:
                if not _same_kind(file_schema.field(c).type, schema.field(c).type):
                    raise InputDataError(
                        f"id column type {file_schema.field(c).type} differs from {schema.field(c).type} "
                        f"in {files[0].uri}",
                        file=file_uri,
                        column=c,
                    )
        files.append(InputFile(file_uri, path, meta.num_rows, info.size))
    return InputData(uri, files, schema)


def read_files(data: InputData, spec: FeatureSpec):
    """Yield (file, its table of the spec's columns), read on the caller's side, each file once; a file
    that cannot be decoded (a page behind a valid footer) raises InputDataError naming it."""
    fs = data.filesystem()
    for f in data.files:
        try:
            with fs.open_input_file(f.path) as handle:
                table = pq.read_table(handle, columns=list(spec.columns))
        except Exception as e:  # noqa: BLE001 -- whatever the decoder says, name the file
            raise InputDataError(f"cannot read the input data ({root_message(e)})", file=f.uri) from e
        yield f, table


def find_unreadable(data: InputData, spec: FeatureSpec) -> InputDataError | None:
    """Read every page of the spec's columns, file by file: the first file that cannot be decoded
    (a corrupt page behind a valid footer, which no footer check sees), as an InputDataError naming
    it; None if every file reads. Costs a full read: for explaining a failure, not for pre-flight."""
    fs = data.filesystem()
    for f in data.files:
        try:
            with fs.open_input_file(f.path) as fh:
                for _ in pq.ParquetFile(fh).iter_batches(columns=list(spec.columns), batch_size=65_536):
                    pass
        except Exception as e:  # noqa: BLE001 -- whatever the decoder says, name the file
            return InputDataError(f"unreadable Parquet data ({type(e).__name__}: {e})", file=f.uri)
    return None


def _same_kind(a: pa.DataType, b: pa.DataType) -> bool:
    def kind(t):
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_integer(t):
            return "int"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "str"
        return str(t)

    return kind(a) == kind(b)


# Ray Data's Parquet reader lists files through a pool of footer-reading actors, 32 of them whatever the
# input, each a fresh process: on 2 cores, 13 of a 20-second scoring run of one small file. The pool is
# sized from the files instead (Ray reads footers 10 to a call), unless the environment sets it.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTERS_PER_ACTOR = 10
MAX_FOOTER_ACTORS = 32


def footer_actors(files: int) -> int:
    return max(1, min(MAX_FOOTER_ACTORS, math.ceil(files / FOOTERS_PER_ACTOR)))


@contextlib.contextmanager
def _footer_pool(files: int):
    """Ray's footer-reader pool sized from the files while a read is planned (the driver reads the setting
    when ``read_parquet`` builds the read); a value the user set is left alone."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(files))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


def read_dataset(data: InputData, spec: FeatureSpec, **kwargs):
    """A Ray Dataset over the checked files, reading only the spec's columns."""
    import ray.data

    # select_columns is pushed down into the Parquet reads: other columns are never read
    with _footer_pool(len(data.files)):
        ds = ray.data.read_parquet(data.paths, filesystem=data.filesystem(), **kwargs)
    return ds.select_columns(spec.columns)
