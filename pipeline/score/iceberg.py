"""The scores table as an Iceberg table (``vaepipe score --table-format iceberg``), through pyiceberg.

Catalog: ``--catalog URI`` names any catalog pyiceberg loads by URI (``http(s)://`` REST, ``sqlite:///``
or ``postgresql://`` SQL, ...) or by name from its configuration (``.pyiceberg.yaml``, e.g. Glue);
without it, local output gets the embedded default: an SQL catalog in ``OUTPUT/_catalog.db`` (SQLite)
with its warehouse under OUTPUT. S3 output needs ``--catalog`` (a SQLite file cannot live on S3); the
table's files then go under the S3 OUTPUT (the catalog's warehouse).

Tables: ``--table NAMESPACE.NAME`` (default ``vaepipe.scores``) and ``NAMESPACE.NAME_quarantine`` beside
it, with the columns and types of the Parquet table plus ``dt`` (date, the run date), partitioned by
``dt`` (identity). Iceberg has no fixed-size list: ``latent_mean`` / ``latent_var`` are stored as
``list<float>``; :func:`read_table` gives them back as ``fixed_size_list<float32>[latent_dim]``, so
``vaepipe query`` and ``vaepipe report`` see the same types from either format.

Publishing (:func:`publish`, called by the score job instead of the Parquet publish step, after
reconciliation passed): the staged, reconciled Parquet files are rewritten as the table's data files,
then one commit replaces the run date's partition with them in **one OVERWRITE snapshot** (the
partition's old data files removed, the new ones added), whose summary carries the run id, model id,
run date and row counts (``vaepipe.*`` properties). Readers see the old partition or the new one,
never a mix; the previous snapshot stays readable (time travel) until expired. A run that fails before
the commit commits nothing (data files it already wrote are unreferenced, invisible to readers; Iceberg's
orphan-file cleanup removes them). The quarantine table is committed first, then the scores table.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputDataError, UsageError
from pipeline.io import storage

log = logging.getLogger("vaepipe.iceberg")

DEFAULT_TABLE = "vaepipe.scores"
CATALOG_FILE = "_catalog.db"
PARTITION = "dt"
QUARANTINE_SUFFIX = "_quarantine"
VECTOR_COLUMNS = ("latent_mean", "latent_var")


def add_options(p) -> None:
    g = p.add_argument_group("table format")
    g.add_argument("--table-format", choices=("parquet", "iceberg"), default="parquet", help="how the table is stored")
    g.add_argument(
        "--catalog", default=None, help="Iceberg catalog URI or configured name (default: OUTPUT/_catalog.db)"
    )
    g.add_argument("--table", default=DEFAULT_TABLE, help="Iceberg table NAMESPACE.NAME (quarantine: NAME_quarantine)")


def check_options(output: str, catalog_uri: str | None, table: str) -> None:
    """Refuse before any work: a bad table name, S3 output without a catalog, pyiceberg missing."""
    parts = table.split(".")
    if len(parts) < 2 or not all(parts):
        raise UsageError(f"--table must be NAMESPACE.NAME, got {table!r}")
    if catalog_uri is None and storage.is_s3(output):
        raise UsageError("--table-format iceberg with S3 output needs --catalog (a REST, Glue or SQL catalog)")
    try:
        import pyiceberg  # noqa: F401
    except ImportError as e:
        raise UsageError("--table-format iceberg needs pyiceberg: pip install 'vaepipe[iceberg]'") from e


def _warehouse(output: str) -> str:
    return output if storage.is_s3(output) else "file://" + os.path.abspath(output)


def load_catalog(output: str, catalog_uri: str | None = None):
    """The catalog for a table root: --catalog, else the embedded SQLite one in OUTPUT/_catalog.db."""
    from pyiceberg.catalog import load_catalog as _load

    props: dict[str, Any] = {"warehouse": _warehouse(output)}
    endpoint = storage.s3_endpoint()
    if endpoint:
        props["s3.endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        props["s3.region"] = region
    if catalog_uri is None:
        if storage.is_s3(output):
            raise UsageError("an Iceberg table on S3 needs --catalog")
        os.makedirs(output, exist_ok=True)
        return _load("vaepipe", uri="sqlite:///" + os.path.join(os.path.abspath(output), CATALOG_FILE), **props)
    if "://" in catalog_uri:
        return _load("vaepipe", uri=catalog_uri, **props)
    return _load(catalog_uri, **props)  # a catalog configured by name (.pyiceberg.yaml, PYICEBERG_CATALOG__*)


def quarantine_name(table: str) -> str:
    return table + QUARANTINE_SUFFIX


def _iceberg_schema(schema: pa.Schema) -> pa.Schema:
    """The Parquet table's Arrow schema as Iceberg stores it: fixed-size lists as lists, plus dt."""
    fields = []
    for f in schema.remove_metadata():
        t = f.type
        if pa.types.is_fixed_size_list(t):
            t = pa.list_(t.value_field)
        fields.append(f.with_type(t))
    return pa.schema([*fields, pa.field(PARTITION, pa.date32(), nullable=False)])


def ensure_table(catalog, name: str, schema: pa.Schema):
    """Load the table, or create it partitioned by dt; its columns must be this run's."""
    from pyiceberg.exceptions import NoSuchTableError

    namespace = name.rsplit(".", 1)[0]
    catalog.create_namespace_if_not_exists(namespace)
    wanted = _iceberg_schema(schema)
    try:
        table = catalog.load_table(name)
    except NoSuchTableError:
        with catalog.create_table_transaction(name, schema=wanted) as tx, tx.update_spec() as spec:
            spec.add_identity(PARTITION)
        log.info("created Iceberg table %s partitioned by %s", name, PARTITION)
        return catalog.load_table(name)
    have = [f.name for f in table.schema().fields]
    if have != wanted.names:
        raise UsageError(f"Iceberg table {name} has columns {have}; this run writes {wanted.names}")
    return table


def _as_rows(table: pa.Table, target: pa.Schema, run_date: dt.date) -> pa.Table:
    table = table.replace_schema_metadata(None)
    arrays = [table.column(f.name).cast(f.type) for f in target if f.name != PARTITION]
    arrays.append(pa.array([run_date] * table.num_rows, pa.date32()))
    return pa.Table.from_arrays(arrays, schema=target)


def replace_partition(table, files: list[str], filesystem, run_date: str, properties: dict[str, str]) -> int | None:
    """One OVERWRITE snapshot: the run date's old data files out, these staged files' rows in.
    -> the new snapshot id (None when there was nothing to replace and nothing to add)."""
    from pyiceberg.expressions import EqualTo
    from pyiceberg.io.pyarrow import _dataframe_to_data_files

    day = dt.date.fromisoformat(run_date)
    target = table.schema().as_arrow()
    commit_uuid = uuid.uuid4()
    with table.transaction() as tx:
        new = []
        for path in files:
            with filesystem.open_input_file(path) as f:
                rows = _as_rows(pq.read_table(f), target, day)
            if rows.num_rows:
                new += _dataframe_to_data_files(
                    table_metadata=tx.table_metadata, write_uuid=commit_uuid, df=rows, io=table.io
                )
        old = [task.file for task in table.scan(row_filter=EqualTo(PARTITION, run_date)).plan_files()]
        if not old and not new:
            return None
        with tx.update_snapshot(snapshot_properties=properties).overwrite(commit_uuid=commit_uuid) as ow:
            for f in old:
                ow.delete_data_file(f)
            for f in new:
                ow.append_data_file(f)
    table.refresh()
    return table.current_snapshot().snapshot_id


def publish(staging, run_date: str, rec, manifest: dict[str, Any], scores_schema, quarantine_schema,
            catalog_uri: str | None, table_name: str):  # fmt: skip
    """Replace the run date's partition of the quarantine table, then of the scores table (see module doc)."""
    from pipeline.score.publish import Published

    catalog = load_catalog(staging.output, catalog_uri)
    properties = {
        f"vaepipe.{k}": str(manifest[k])
        for k in ("run_id", "run_date", "model_id", "input_rows", "scored_rows", "quarantined_rows",
                  "mc_samples", "iw_samples", "seed", "schema_version")
        if k in manifest
    }  # fmt: skip
    fs = storage.filesystem(staging.output)
    snapshots = {}
    for name, files, schema in (
        (quarantine_name(table_name), rec.quarantine_files, quarantine_schema),
        (table_name, rec.scored_files, scores_schema),
    ):
        table = ensure_table(catalog, name, schema)
        snapshots[name] = replace_partition(table, [f.path for f in files], fs, run_date, properties)
        log.info("%s: partition %s=%s replaced in snapshot %s", name, PARTITION, run_date, snapshots[name])
    return Published(
        partition=f"{table_name} ({PARTITION}={run_date}, snapshot {snapshots[table_name]})",
        quarantine_partition=f"{quarantine_name(table_name)} ({PARTITION}={run_date})",
        files=[{"file": f.uri, "rows": f.rows} for f in rec.scored_files],
    )


# ---- reading -------------------------------------------------------------------------------------------
def load_table(output: str, catalog_uri: str | None, table_name: str):
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    if catalog_uri is None and not storage.is_s3(output) and not os.path.exists(os.path.join(output, CATALOG_FILE)):
        raise InputDataError(f"no Iceberg catalog ({CATALOG_FILE}) here", file=output)
    try:
        return load_catalog(output, catalog_uri).load_table(table_name)
    except (NoSuchTableError, NoSuchNamespaceError) as e:
        raise InputDataError(f"no Iceberg table {table_name}", file=output) from e


def read_table(output: str, catalog_uri: str | None, table_name: str, run_dates: list[str] | None = None,
               columns: list[str] | None = None, snapshot_id: int | None = None) -> pa.Table:  # fmt: skip
    """The scores (or quarantine) rows as the Parquet table's reader gives them: ``dt`` a string, the
    latent vectors fixed-size lists. ``snapshot_id`` reads an earlier snapshot (time travel)."""
    from pyiceberg.expressions import AlwaysTrue, In

    table = load_table(output, catalog_uri, table_name)
    row_filter = AlwaysTrue() if run_dates is None else In(PARTITION, [dt.date.fromisoformat(d) for d in run_dates])
    fields = ("*",) if columns is None else tuple(columns)
    data = table.scan(row_filter=row_filter, selected_fields=fields, snapshot_id=snapshot_id).to_arrow()
    if run_dates is not None:
        have = set(pa.compute.unique(data.column(PARTITION)).to_pylist()) if PARTITION in data.column_names else None
        missing = [d for d in run_dates if have is not None and dt.date.fromisoformat(d) not in have]
        if missing or data.num_rows == 0:
            raise InputDataError(
                f"no rows for run date(s) {', '.join(missing or run_dates)} in {table_name}", file=output
            )
    return to_parquet_types(data)


def partitions(output: str, catalog_uri: str | None, table_name: str) -> list[str]:
    """The run dates (YYYY-MM-DD) the table holds, sorted."""
    dates = read_table(output, catalog_uri, table_name, columns=[PARTITION]).column(PARTITION)
    return sorted(pa.compute.unique(dates).to_pylist())


def to_parquet_types(data: pa.Table) -> pa.Table:
    out = []
    for f in data.schema:
        col = data.column(f.name)
        t = f.type
        if f.name in VECTOR_COLUMNS and (pa.types.is_list(t) or pa.types.is_large_list(t)):
            dim = int(pa.compute.max(pa.compute.list_value_length(col)).as_py() or 0)
            t = pa.list_(pa.field("item", pa.float32(), nullable=f.type.value_field.nullable), dim)
        elif (f.name == PARTITION and pa.types.is_date(t)) or pa.types.is_large_string(t):
            t = pa.string()
        out.append((f.with_type(t), col.cast(t)))
    return pa.Table.from_arrays([c for _, c in out], schema=pa.schema([f for f, _ in out]))
