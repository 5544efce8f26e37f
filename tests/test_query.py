"""vaepipe query over a small scores table built with the table's own writer (schemas.output_table)."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import query
from pipeline.core.scoring import Scores
from schemas.feature_spec import FeatureSpec
from schemas.output_table import scores_schema, scores_to_table

SPEC = FeatureSpec.from_dict({"id_columns": ["record_id"], "features": {"income": "positive", "city": "categorical"}})
DIM = 3


def write_partition(root: str, dt: str, ids: np.ndarray, elbo: np.ndarray, success: bool = True, shards: int = 2):
    """One dt= partition in the contract's schema; income's log-density NaN (null) on every 4th row."""
    n = ids.size
    rng = np.random.default_rng(n)
    col = np.stack([elbo * 0.7, elbo * 0.3], 1)
    col[::4, 0] = np.nan
    scores = Scores(
        latent_mean=rng.standard_normal((n, DIM)).astype(np.float32),
        latent_var=np.full((n, DIM), 0.5, np.float32),
        recon_log_density=np.nansum(col, 1),
        column_log_density=col,
        kl=np.full(n, 1.5),
        elbo=elbo,
        log_marginal=elbo + 0.5,
        n_observed=np.where(np.isnan(col[:, 0]), 1, 2).astype(np.int32),
    )
    schema = scores_schema(SPEC, {"record_id": pa.int64()}, DIM)
    table = scores_to_table(pa.table({"record_id": ids}), scores, SPEC, "m-test", schema)
    part = os.path.join(root, f"dt={dt}")
    os.makedirs(part)
    files = []
    for i, piece in enumerate(np.array_split(np.arange(n), shards)):
        path = os.path.join(part, f"part-{i:03d}.parquet")
        pq.write_table(table.take(piece), path)
        files.append({"file": path, "rows": int(piece.size)})
    with open(os.path.join(part, "_manifest.json"), "w") as f:
        json.dump({"rows": n, "output_files": files}, f)
    if success:
        open(os.path.join(part, "_SUCCESS"), "w").close()


@pytest.fixture(scope="module")
def scores_uri(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scores"))
    write_partition(root, "2026-11-22", np.arange(0, 10), -np.arange(10, 20, dtype=float))
    write_partition(root, "2026-11-23", np.arange(10, 30), -np.arange(20, 40, dtype=float))
    # a partition still being written (no _SUCCESS) and a quarantine folder: neither is scores
    write_partition(root, "2026-11-24", np.arange(30, 35), np.full(5, -1.0), success=False)
    os.makedirs(os.path.join(root, "_quarantine", "dt=2026-11-23"))
    pq.write_table(
        pa.table({"record_id": [99], "reason": ["x"]}), os.path.join(root, "_quarantine/dt=2026-11-23/q.parquet")
    )
    return root


TOP3 = "SELECT record_id, dt, elbo, column_log_density.income AS income_ld FROM scores ORDER BY elbo LIMIT 3"


@pytest.mark.parametrize("engine", ["duckdb", "polars"])
def test_sql_sees_every_published_partition_and_nothing_else(scores_uri, engine):
    t = query.run_sql(
        scores_uri, "SELECT dt, count(*) AS n, min(record_id) AS lo FROM scores GROUP BY dt ORDER BY dt", engine
    )
    assert t.to_pylist() == [
        {"dt": "2026-11-22", "n": 10, "lo": 0},
        {"dt": "2026-11-23", "n": 20, "lo": 10},
    ]
    top = query.run_sql(scores_uri, TOP3, engine).to_pylist()
    assert [r["record_id"] for r in top] == [29, 28, 27]
    assert top[0]["income_ld"] == pytest.approx(-39 * 0.7)
    assert top[0]["dt"] == "2026-11-23"


def test_format_table_prints_rows_and_count(scores_uri, capsys):
    assert query.main([scores_uri, TOP3]) == 0
    out = capsys.readouterr().out
    assert "record_id" in out and "income_ld" in out and "(3 rows)" in out
    assert "-39.0" in out and "2026-11-23" in out


def test_format_csv_with_nested_columns_as_json(scores_uri, tmp_path):
    out = tmp_path / "r.csv"
    sql = "SELECT record_id, latent_mean, column_log_density FROM scores WHERE record_id IN (0, 1) ORDER BY record_id"
    assert query.main([scores_uri, sql, "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["record_id"] for r in rows] == ["0", "1"]
    assert len(json.loads(rows[0]["latent_mean"])) == DIM
    assert json.loads(rows[0]["column_log_density"]) == {"income": None, "city": pytest.approx(-10 * 0.3)}
    assert json.loads(rows[1]["column_log_density"])["income"] == pytest.approx(-11 * 0.7)


def test_format_json_is_valid_json_with_nulls(scores_uri, capsys):
    sql = (
        "SELECT record_id, column_log_density.income AS income_ld, log_marginal FROM scores ORDER BY record_id LIMIT 5"
    )
    assert query.main([scores_uri, sql, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["record_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["income_ld"] is None and rows[4]["income_ld"] is None  # missing value -> null
    assert rows[1]["log_marginal"] == pytest.approx(-10.5)


@pytest.mark.parametrize("engine", ["duckdb", "polars"])
def test_format_parquet_round_trips_types(scores_uri, tmp_path, engine):
    out = tmp_path / "r.parquet"
    sql = "SELECT record_id, latent_mean, elbo FROM scores WHERE dt = '2026-11-22'"
    assert query.main([scores_uri, sql, "--format", "parquet", "--out", str(out), "--engine", engine]) == 0
    t = pq.read_table(out)
    assert t.num_rows == 10
    assert t.schema.field("record_id").type == pa.int64()
    assert t.schema.field("elbo").type == pa.float64()
    assert sorted(t.column("record_id").to_pylist()) == list(range(10))


def test_bad_sql_and_usage_exit_2(scores_uri, capsys):
    assert query.main([scores_uri, "SELEC nonsense FROM scores"]) == 2
    assert "SQL error" in capsys.readouterr().err
    assert query.main([scores_uri, "SELECT * FROM scores", "--format", "parquet"]) == 2
    with pytest.raises(SystemExit) as e:
        query.main([scores_uri])
    assert e.value.code == 2


def test_missing_table_exits_3(tmp_path, capsys):
    assert query.main([str(tmp_path / "nothing"), "SELECT 1"]) == 3
    assert "no scores table" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert query.main([str(tmp_path / "empty"), "SELECT 1"]) == 3


def test_query_on_s3(s3, scores_uri):
    """The same table uploaded to an S3-compatible server, read through pyarrow's S3 filesystem."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3, scheme="http", region="us-east-1")
    pafs.copy_files(scores_uri, "vaepipe-test/query/scores", destination_filesystem=fs)
    t = query.run_sql("s3://vaepipe-test/query/scores", "SELECT count(*) AS n, min(elbo) AS lo FROM scores")
    assert t.to_pylist() == [{"n": 30, "lo": -39.0}]


def test_manifest_file_list_wins_over_stray_files(tmp_path):
    """A partition whose _manifest.json lists its output files is read from that list only (a stray
    file from an interrupted S3 re-run is not scores)."""
    root = str(tmp_path)
    write_partition(root, "2026-11-23", np.arange(0, 10), -np.arange(10, 20, dtype=float), shards=2)
    part = os.path.join(root, "dt=2026-11-23")
    with open(os.path.join(part, "_manifest.json"), "w") as f:
        json.dump({"output_files": [{"file": "/elsewhere/dt=2026-11-23/part-000.parquet", "rows": 5}]}, f)
    t = query.run_sql(root, "SELECT count(*) AS n, max(record_id) AS hi FROM scores")
    assert t.to_pylist() == [{"n": 5, "hi": 4}]
