"""The scores table: its Arrow schema as a function of the spec and latent dimension, in one place.

See CONTRACT.md, "The scores table". Every writer hands :func:`scores_schema` to the Parquet writer
so no batch can drift its types; :func:`scores_to_table` builds a batch of rows in exactly that schema.
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

SCORE_COLUMNS = (
    "latent_mean",
    "latent_var",
    "recon_log_density",
    "kl",
    "elbo",
    "log_marginal",
    "column_log_density",
    "n_observed",
    "model_id",
    "tail_probability",
    "column_conditional_log_density",
)


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
