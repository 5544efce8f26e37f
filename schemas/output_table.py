"""The scores table, in one place: its directory layout and its Arrow schema.

Layout (``OUTPUT`` local or ``s3://``; every name below is defined here and used from here)::

    OUTPUT/dt=YYYY-MM-DD/part-NNNNN-<run_id>.parquet   the scores table (PARTITION_KEY=run date)
    OUTPUT/dt=YYYY-MM-DD/_manifest.json, _SUCCESS      MANIFEST and SUCCESS, written after the data files
    OUTPUT/_quarantine/dt=YYYY-MM-DD/...               QUARANTINE: rows that could not be scored
    OUTPUT/_staging/<run_id>/                          STAGING: a run's work in progress
    OUTPUT/_vaepipe_table.json                         TABLE_MARKER: the table is vaepipe's (first write)
    OUTPUT/_leases/dt=YYYY-MM-DD.{lock,json}           LEASES: one run per partition at a time

Schema: see the README, "The scores table". Every writer hands :func:`scores_schema` to the Parquet
writer so no batch can drift its types; :func:`scores_to_table` builds a batch of rows in exactly
that schema. Files are written with :data:`PARQUET_COMPRESSION` and :data:`ROW_GROUP_ROWS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from schemas.feature_spec import FeatureSpec

SCHEMA_VERSION = "2"  # 2: tail_probability, column_conditional_log_density

# Parquet key-value metadata keys
META_SCHEMA_VERSION = b"vaepipe.schema_version"
META_MODEL_ID = b"vaepipe.model_id"
META_RUN_ID = b"vaepipe.run_id"
META_MC_SAMPLES = b"vaepipe.mc_samples"
META_IW_SAMPLES = b"vaepipe.iw_samples"
META_SEED = b"vaepipe.seed"
META_CONDITIONAL_SAMPLES = b"vaepipe.conditional_samples"

# ---- layout ----------------------------------------------------------------------------------------
PARTITION_KEY = "dt"  # hive partitioning: OUTPUT/dt=YYYY-MM-DD
SUCCESS = "_SUCCESS"  # a partition's commit marker
MANIFEST = "_manifest.json"  # the run's record, listing the partition's data files
QUARANTINE = "_quarantine"  # OUTPUT/_quarantine/dt=YYYY-MM-DD: rows that could not be scored
STAGING = "_staging"  # OUTPUT/_staging/<run_id>: a run's files before publish
STAGING_RUN = "_run.json"  # OUTPUT/_staging/<run_id>/_run.json: the run's date (written first)
PUBLISH_JOURNAL = "_publish.json"  # OUTPUT/_staging/<run_id>/_publish.json: a publish in progress
TABLE_MARKER = "_vaepipe_table.json"  # OUTPUT/_vaepipe_table.json: written by the first run
LEASES = "_leases"  # OUTPUT/_leases/dt=D.lock (local flock) or dt=D.json (S3 lease object)
ROW_GROUP_ROWS = 65_536  # rows per Parquet row group, in every file vaepipe writes
PARQUET_COMPRESSION = "zstd"


def partition_name(run_date: str) -> str:
    """``dt=YYYY-MM-DD``: the directory of one run date's partition."""
    return f"{PARTITION_KEY}={run_date}"


def partition_date(name: str) -> str | None:
    """The run date of a partition directory name, None for any other name."""
    prefix = f"{PARTITION_KEY}="
    return name[len(prefix) :] if name.startswith(prefix) else None


def partition_uri(output: str, run_date: str) -> str:
    from pipeline.io import storage

    return storage.join(output, partition_name(run_date))


def quarantine_partition_uri(output: str, run_date: str) -> str:
    from pipeline.io import storage

    return storage.join(output, QUARANTINE, partition_name(run_date))


def staging_uri(output: str, run_id: str) -> str:
    from pipeline.io import storage

    return storage.join(output, STAGING, run_id)



def scores_schema(
    spec: FeatureSpec,
    id_types: Mapping[str, pa.DataType],
    latent_dim: int,
    metadata: Mapping[bytes, bytes] | None = None,
) -> pa.Schema:
    """id columns (their input types), then the score columns of the contract."""
    vec = pa.list_(pa.float32(), latent_dim)
    fields = [pa.field(c, id_types[c], nullable=False) for c in spec.id_columns]
    fields += [
        pa.field("latent_mean", vec, nullable=False),
        pa.field("latent_var", vec, nullable=False),
        pa.field("recon_log_density", pa.float64(), nullable=False),
        pa.field("kl", pa.float64(), nullable=False),
        pa.field("elbo", pa.float64(), nullable=False),
        pa.field("log_marginal", pa.float64(), nullable=True),
        pa.field(
            "column_log_density",
            pa.struct([pa.field(f, pa.float64(), nullable=True) for f in spec.feature_names]),
            nullable=False,
        ),
        pa.field("n_observed", pa.int32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("tail_probability", pa.float64(), nullable=True),
        pa.field(
            "column_conditional_log_density",
            pa.struct([pa.field(f, pa.float64(), nullable=True) for f in spec.feature_names]),
            nullable=True,
        ),
    ]
    return pa.schema(fields, metadata=dict(metadata) if metadata else None)


def _fixed_list(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def _nullable_float(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float64(), from_pandas=True)  # NaN -> null


def scores_to_table(
    ids: pa.Table,
    scores,
    spec: FeatureSpec,
    model_id: str,
    schema: pa.Schema,
    tail_probability: np.ndarray | None = None,
) -> pa.Table:
    """Assemble one batch of output rows (``scores`` is a :class:`pipeline.core.scoring.Scores`).

    ``tail_probability`` None (no log_marginal, or no stored reference) writes nulls; so does a
    ``scores.column_conditional_log_density`` of None (conditional scores turned off) for that struct."""
    n = ids.num_rows
    dim = scores.latent_mean.shape[1]
    col = scores.column_log_density
    struct = pa.StructArray.from_arrays(
        [_nullable_float(col[:, j]) for j in range(len(spec.feature_names))],
        fields=list(schema.field("column_log_density").type),
    )
    log_marginal = (
        pa.array(scores.log_marginal, pa.float64())
        if scores.log_marginal is not None
        else pa.nulls(n, pa.float64())
    )
    cond = scores.column_conditional_log_density
    cond_type = schema.field("column_conditional_log_density").type
    if cond is None:
        cond_struct = pa.nulls(n, cond_type)
    else:
        cond_struct = pa.StructArray.from_arrays(
            [_nullable_float(cond[:, j]) for j in range(len(spec.feature_names))], fields=list(cond_type)
        )
    tail = pa.array(tail_probability, pa.float64()) if tail_probability is not None else pa.nulls(n, pa.float64())
    arrays = [ids.column(c).combine_chunks().cast(schema.field(c).type) for c in spec.id_columns]
    arrays += [
        _fixed_list(scores.latent_mean, dim),
        _fixed_list(scores.latent_var, dim),
        pa.array(scores.recon_log_density, pa.float64()),
        pa.array(scores.kl, pa.float64()),
        pa.array(scores.elbo, pa.float64()),
        log_marginal,
        struct,
        pa.array(scores.n_observed, pa.int32()),
        pa.array([model_id] * n, pa.string()),
        tail,
        cond_struct,
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def quarantine_schema(spec: FeatureSpec, input_types: Mapping[str, pa.DataType]) -> pa.Schema:
    """Rows that could not be scored: ids, why, which column, and every original value."""
    fields = [pa.field(c, input_types[c]) for c in spec.id_columns]
    fields += [pa.field("reason", pa.string(), nullable=False), pa.field("column", pa.string())]
    fields += [pa.field(f, input_types[f]) for f in spec.feature_names]
    return pa.schema(fields)
