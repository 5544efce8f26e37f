"""vaepipe score --table-format iceberg: read back with pyiceberg, polars and Ray Data, locally (the embedded
SQLite catalog) and on the loopback S3 server (a SQL catalog file beside it); a re-run replaces the date in
one new snapshot, the previous snapshot still reads; a failed run commits nothing; query and report read it."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from jobs import query, report
from jobs import score as score_job
from pipeline.errors import FAIL_AT_ENV
from pipeline.score import iceberg
from pipeline.score.reader import read_scores

pytest.importorskip("pyiceberg")

ADULT = DATA / "adult" / "adult.parquet"
DATE, DATE2 = "2026-02-01", "2026-02-02"
SAMPLES = ["--mc-samples", "4", "--iw-samples", "8"]


def poison(n=800) -> pa.Table:
    t = pq.read_table(ADULT).slice(0, n)
    d = t.to_pydict()
    d["capital_gain"][5] = -1.0
    d["record_id"][7] = None
    return pa.table(d, schema=t.schema)


def run(data, model_dir, output, date, *extra) -> int:
    args = ["--data", str(data), "--model-dir", model_dir, "--output", str(output), "--run-date", date]
    return score_job.main([*args, *SAMPLES, "--table-format", "iceberg", *extra])


@pytest.fixture(scope="module")
def local(adult_model, tmp_path_factory):
    """Two dates into an Iceberg table under OUTPUT, and the same first date as Parquet to compare with."""
    root = tmp_path_factory.mktemp("ice")
    pq.write_table(poison(), root / "in.parquet")
    out = root / "ice"
    assert run(root / "in.parquet", adult_model, out, DATE) == 0
    assert run(root / "in.parquet", adult_model, out, DATE2) == 0
    pq_out = root / "pq"
    args = ["--data", str(root / "in.parquet"), "--model-dir", adult_model, "--output", str(pq_out)]
    assert score_job.main([*args, "--run-date", DATE, *SAMPLES]) == 0
    return root, out, pq_out


def test_same_rows_columns_and_types_as_parquet(local):
    _, out, pq_out = local
    assert (out / "_catalog.db").exists()
    ice = iceberg.read_table(str(out), None, "vaepipe.scores", [DATE]).sort_by("record_id")
    par = read_scores(str(pq_out), [DATE]).sort_by("record_id")
    assert ice.schema.names == par.schema.names
    assert [f.type for f in ice.schema] == [f.type for f in par.schema]
    assert ice.num_rows == par.num_rows == 798
    for c in ("record_id", "elbo", "log_marginal", "latent_mean", "column_log_density", "model_id", "dt"):
        assert ice.column(c).to_pylist() == par.column(c).to_pylist(), c
    q = iceberg.read_table(str(out), None, "vaepipe.scores_quarantine", [DATE])
    assert q.num_rows == 2 and set(q.column("reason").to_pylist()) >= {"null id"}


def test_pyiceberg_polars_and_ray_read_it(local, ray_local):
    import polars as pl
    import ray.data

    _, out, _ = local
    table = iceberg.load_table(str(out), None, "vaepipe.scores")
    assert [f.name for f in table.spec().fields] == ["dt"]
    snap = table.current_snapshot()
    assert snap.summary["vaepipe.run_date"] == DATE2 and snap.summary["vaepipe.scored_rows"] == "798"
    assert snap.summary["vaepipe.quarantined_rows"] == "2" and snap.summary["vaepipe.model_id"]
    n = table.scan().to_arrow().num_rows
    assert n == 2 * 798
    lf = pl.scan_iceberg(table)
    by_day = lf.group_by("dt").agg(pl.len()).sort("dt").collect()
    assert by_day.get_column("len").to_list() == [798, 798]
    ds = ray.data.read_iceberg(
        table_identifier="vaepipe.scores",
        catalog_kwargs={"name": "vaepipe", "type": "sql", "uri": f"sqlite:///{out}/_catalog.db",
                        "warehouse": f"file://{out}"},
    )  # fmt: skip
    assert ds.count() == n
    assert abs(ds.sum("elbo") - table.scan().to_arrow().column("elbo").to_numpy().sum()) < 1e-6 * n


def test_rerun_replaces_the_date_in_one_snapshot_and_time_travel(local, adult_model):
    root, out, _ = local
    table = iceberg.load_table(str(out), None, "vaepipe.scores")
    before = table.current_snapshot().snapshot_id
    n_snapshots = len(table.snapshots())
    small = poison(300)
    pq.write_table(small, root / "small.parquet")
    assert run(root / "small.parquet", adult_model, out, DATE) == 0
    table = iceberg.load_table(str(out), None, "vaepipe.scores")
    assert len(table.snapshots()) == n_snapshots + 1  # one new snapshot
    snap = table.current_snapshot()
    assert snap.parent_snapshot_id == before and snap.summary.operation.value == "overwrite"
    assert iceberg.read_table(str(out), None, "vaepipe.scores", [DATE]).num_rows == 298
    assert iceberg.read_table(str(out), None, "vaepipe.scores", [DATE2]).num_rows == 798  # untouched
    # time travel: the snapshot before the re-run still has the first run's rows
    old = iceberg.read_table(str(out), None, "vaepipe.scores", [DATE], snapshot_id=before)
    assert old.num_rows == 798


def test_a_failed_run_commits_nothing(local, adult_model, monkeypatch):
    root, out, _ = local
    table = iceberg.load_table(str(out), None, "vaepipe.scores")
    before = [s.snapshot_id for s in table.snapshots()]
    monkeypatch.setenv(FAIL_AT_ENV, "0")
    assert run(root / "in.parquet", adult_model, out, DATE) == 1
    table = iceberg.load_table(str(out), None, "vaepipe.scores")
    assert [s.snapshot_id for s in table.snapshots()] == before


def test_query_and_report_read_it(local, adult_model, tmp_path, capsys):
    _, out, _ = local
    opts = ["--table-format", "iceberg"]
    assert query.main([str(out), "SELECT dt, count(*) AS n FROM scores GROUP BY dt ORDER BY dt", "--format", "csv",
                       *opts]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f'"{DATE2}",798' in printed
    page = tmp_path / "r.html"
    assert report.main(["--model-dir", adult_model, "--scores", str(out), "--run-date", DATE2, "--out", str(page),
                        *opts]) == 0  # fmt: skip
    assert "798" in page.read_text()


def test_s3_with_a_sql_catalog(adult_model, s3, ray_local, tmp_path):
    pq.write_table(poison(400), tmp_path / "in.parquet")
    out = "s3://vaepipe-test/iceberg/out"
    assert run(tmp_path / "in.parquet", adult_model, out, DATE) == 2  # S3 needs --catalog
    catalog = f"sqlite:///{tmp_path}/catalog.db"
    assert run(tmp_path / "in.parquet", adult_model, out, DATE, "--catalog", catalog, "--table", "ns.s") == 0
    t = iceberg.read_table(out, catalog, "ns.s", [DATE])
    assert t.num_rows == 398
    table = iceberg.load_table(out, catalog, "ns.s")
    assert table.metadata.location.startswith("s3://vaepipe-test/iceberg/out")
    import polars as pl

    assert pl.scan_iceberg(table).select(pl.len()).collect().item() == 398
    files = [task.file.file_path for task in table.scan().plan_files()]
    assert files and all(f.startswith("s3://vaepipe-test/iceberg/out/") for f in files)
    assert not os.path.exists(tmp_path / "_catalog.db")
    assert np.isfinite(t.column("elbo").to_numpy()).all()
