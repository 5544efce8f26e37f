"""The scoring job end to end: real local Ray, real Parquet files, moto's S3 server on loopback.

Every job run here goes through ``jobs.score.main`` in-process (sharing the session's Ray instance).
Sample counts are reduced (``--mc-samples 8 --iw-samples 16``) to keep the suite within its time budget;
the estimators themselves are tested in the scoring core's own tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import DATA, without_package

from jobs import score
from pipeline.core.artifact import load_model, resolve_model
from pipeline.errors import FAIL_AT_ENV
from pipeline.score import publish
from schemas.output_table import (
    META_IW_SAMPLES,
    META_MC_SAMPLES,
    META_MODEL_ID,
    META_RUN_ID,
    META_SCHEMA_VERSION,
    TABLE_MARKER,
)

pytestmark = pytest.mark.slow

ADULT = DATA / "adult" / "adult.parquet"
ADULT_MISSING = DATA / "adult" / "adult_missing20.parquet"
SAMPLES = ["--mc-samples", "8", "--iw-samples", "16", "--conditional-samples", "2"]
DATE = "2026-01-15"


@pytest.fixture(scope="module")
def model_dir(adult_model) -> str:
    """The adult model trained by the train job (session fixture in conftest.py)."""
    return str(adult_model)


def run_score(data, model_dir, output, *extra, run_date=DATE) -> int:
    args = ["--data", str(data), "--model-dir", str(model_dir), "--output", str(output), "--run-date", run_date]
    return score.main([*args, *SAMPLES, *extra])


def read_partition(output, run_date=DATE) -> pa.Table:
    part = os.path.join(output, f"dt={run_date}")
    files = sorted(p for p in os.listdir(part) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(os.path.join(part, f)) for f in files]).sort_by("record_id")


def read_quarantine(output, run_date=DATE) -> pa.Table:
    part = os.path.join(output, "_quarantine", f"dt={run_date}")
    files = sorted(p for p in os.listdir(part) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(os.path.join(part, f)) for f in files]).sort_by("record_id")


def snapshot(root) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def assert_invariants(t: pa.Table, features: list[str], latent_dim: int) -> None:
    recon = t.column("recon_log_density").to_numpy()
    kl = t.column("kl").to_numpy()
    elbo = t.column("elbo").to_numpy()
    lm = t.column("log_marginal").to_numpy()
    for name, v in (("recon", recon), ("kl", kl), ("elbo", elbo), ("log_marginal", lm)):
        assert np.isfinite(v).all(), f"non-finite {name}"
    np.testing.assert_allclose(elbo, recon - kl, rtol=1e-12, atol=1e-9)
    assert (kl >= 0).all()
    var = t.column("latent_var").combine_chunks().flatten().to_numpy()
    mean = t.column("latent_mean").combine_chunks().flatten().to_numpy()
    assert var.shape == mean.shape == (t.num_rows * latent_dim,)
    assert (var > 0).all() and np.isfinite(var).all() and np.isfinite(mean).all()
    cols = t.column("column_log_density").combine_chunks()
    stacked = np.stack([cols.field(f).to_numpy(zero_copy_only=False) for f in features], axis=1)
    present = ~np.isnan(stacked)  # null -> NaN
    assert np.isfinite(stacked[present]).all()
    np.testing.assert_array_equal(present.sum(1), t.column("n_observed").to_numpy())
    np.testing.assert_allclose(np.where(present, stacked, 0).sum(1), recon, rtol=1e-9, atol=1e-9)
    assert lm.mean() >= elbo.mean()
    # calibrated against the model's validation records: in [0, 1], and ordered like log_marginal
    tail = t.column("tail_probability").to_numpy(zero_copy_only=False)
    assert ((tail >= 0) & (tail <= 1)).all()
    order = np.argsort(lm)
    assert (np.diff(tail[order]) >= 0).all()
    cond = t.column("column_conditional_log_density").combine_chunks()
    cstacked = np.stack([cond.field(f).to_numpy(zero_copy_only=False) for f in features], axis=1)
    np.testing.assert_array_equal(~np.isnan(cstacked), present)  # null exactly where the value is missing
    assert np.isfinite(cstacked[present]).all()


# ---- end to end on the real data ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def adult_scored(model_dir, tmp_path_factory):
    """Both adult files scored by the job (2 workers): {name: (input path, output dir, stdout)}."""
    runs = {}
    for name, path in (("adult", ADULT), ("adult_missing20", ADULT_MISSING)):
        out = tmp_path_factory.mktemp(name) / "scores"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = run_score(path, model_dir, out, "--workers", "2")
        assert rc == 0
        runs[name] = (path, out, buf.getvalue())
    return runs


@pytest.mark.parametrize("name", ["adult", "adult_missing20"])
def test_end_to_end_adult(name, adult_scored, model_dir):
    path, out, summary = adult_scored[name]
    art = load_model(model_dir)
    n_in = pq.ParquetFile(path).metadata.num_rows
    t = read_partition(out)
    q = read_quarantine(out)
    # reconciliation: every input id exactly once, scored or quarantined (this data has no poison)
    assert t.num_rows + q.num_rows == n_in and q.num_rows == 0
    ids_in = pq.read_table(path, columns=["record_id"]).column("record_id").to_numpy()
    np.testing.assert_array_equal(t.column("record_id").to_numpy(), np.sort(ids_in))
    assert_invariants(t, art.spec.feature_names, art.model.latent_dim)
    if name == "adult_missing20":
        assert t.column("n_observed").to_numpy().min() < len(art.spec.feature_names)
    else:  # the rows look like the model's validation rows: tail probabilities spread around the middle
        tail = t.column("tail_probability").to_numpy()
        assert 0.3 < np.median(tail) < 0.7 and (tail < 0.05).mean() < 0.15
    assert set(pc.unique(t.column("model_id")).to_pylist()) == {art.model_id}
    # the one fixed schema, with its metadata, in every file
    part = out / f"dt={DATE}"
    manifest = json.loads((part / "_manifest.json").read_text())
    for f in manifest["output_files"]:
        pf = pq.ParquetFile(f["file"])
        assert pf.metadata.num_rows == f["rows"]
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        meta = pf.schema_arrow.metadata
        assert meta[META_SCHEMA_VERSION] == b"2" and meta[META_MODEL_ID] == art.model_id.encode()
        assert meta[META_RUN_ID] == manifest["run_id"].encode()
        assert (meta[META_MC_SAMPLES], meta[META_IW_SAMPLES]) == (b"8", b"16")
        assert pf.schema_arrow.field("latent_mean").type == pa.list_(pa.float32(), art.model.latent_dim)
    assert manifest["input_rows"] == manifest["scored_rows"] == n_in and manifest["quarantined_rows"] == 0
    assert manifest["input_files"] == [{"file": str(path), "rows": n_in}]
    assert manifest["model_id"] == art.model_id and manifest["started_at"] <= manifest["finished_at"]
    assert sorted(os.listdir(part)) == sorted(
        ["_SUCCESS", "_manifest.json", *(os.path.basename(f["file"]) for f in manifest["output_files"])]
    )
    assert not (out / "_staging").exists()
    assert f"scored {n_in:,} rows, quarantined 0" in summary and str(part) in summary


# ---- determinism and re-runs ---------------------------------------------------------------------------
def test_rerun_with_other_batching_gives_same_values_and_replaces_partition(
    adult_scored, model_dir, tmp_path, monkeypatch
):
    path, first_out, _ = adult_scored["adult_missing20"]
    # the first run's input was read on the driver (a small input); this one streams through read_parquet
    from pipeline.score import run as score_run

    monkeypatch.setattr(score_run, "DRIVER_READ_BYTES", 0)
    out = tmp_path / "scores"
    shutil.copytree(first_out, out)
    first = read_partition(out)
    first_files = set(os.listdir(out / f"dt={DATE}"))
    # one worker instead of two, batches of 700 instead of 4096, files of 10,000 rows, the input streamed
    assert run_score(path, model_dir, out, "--workers", "1", "--batch-size", "700", "--rows-per-file", "10000") == 0
    second = read_partition(out)
    second_files = set(os.listdir(out / f"dt={DATE}"))
    # the re-run replaced the partition whole: none of the first run's data files remain
    assert not ({f for f in first_files if f.endswith(".parquet")} & second_files)
    assert len([f for f in second_files if f.endswith(".parquet")]) > 1
    assert first.num_rows == second.num_rows == 32561
    assert first.column("record_id").equals(second.column("record_id"))
    for name in ("recon_log_density", "kl", "elbo", "log_marginal", "latent_mean", "latent_var"):
        a = first.column(name).combine_chunks()
        b = second.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(a.type):
            a, b = a.flatten(), b.flatten()
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    ca, cb = (t.column("column_log_density").combine_chunks() for t in (first, second))
    for i in range(ca.type.num_fields):
        x, y = ca.field(i).to_numpy(zero_copy_only=False), cb.field(i).to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ---- readers -------------------------------------------------------------------------------------------
def test_output_read_by_polars_duckdb_pyarrow(adult_scored, model_dir):
    import duckdb
    import polars as pl

    _, out, _ = adult_scored["adult_missing20"]
    n = 32561
    dim = load_model(model_dir).model.latent_dim
    glob = f"{out}/dt=*/*.parquet"
    df = pl.read_parquet(glob)
    assert df.height == n
    assert df.schema["latent_mean"] == pl.Array(pl.Float32, dim)
    assert df.schema["latent_var"] == pl.Array(pl.Float32, dim)
    assert df.schema["column_log_density"].to_schema()["age"] == pl.Float64  # a struct of float64 fields
    assert df.select((pl.col("elbo") - (pl.col("recon_log_density") - pl.col("kl"))).abs().max()).item() < 1e-9
    assert df.get_column("latent_mean").arr.get(0).dtype == pl.Float32

    con = duckdb.connect()
    # Parquet has no fixed-size list: DuckDB sees FLOAT[] (a list) of dim floats in every row, which
    # casts to DuckDB's fixed-size FLOAT[dim]
    types = {r[0]: r[1] for r in con.sql(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall()}
    assert types["latent_mean"] in ("FLOAT[]", f"FLOAT[{dim}]")
    rows, first_dim_mean, worst_elbo_id, lengths, cast_type = con.sql(
        f"""
        SELECT count(*), avg(latent_mean[1]), arg_min(record_id, elbo),
               min(len(latent_var)) * (max(len(latent_mean)) = min(len(latent_mean)))::INT,
               typeof(any_value(latent_mean::FLOAT[{dim}]))
        FROM read_parquet('{glob}', hive_partitioning = true)
        WHERE dt = '{DATE}'
        """
    ).fetchall()[0]
    assert cast_type == f"FLOAT[{dim}]"
    assert rows == n and lengths == dim
    assert first_dim_mean == pytest.approx(df.get_column("latent_mean").arr.get(0).mean(), rel=1e-6)
    assert worst_elbo_id == df.sort("elbo").get_column("record_id")[0]

    # pyarrow's dataset discovery on the table root sees the partition and skips _quarantine, _staging
    t = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert t.num_rows == n and t.schema.field("latent_mean").type == pa.list_(pa.float32(), dim)
    assert set(t.column("dt").to_pylist()) == {DATE}


# ---- rows that cannot be scored -----------------------------------------------------------------------
def poison_input(directory: Path) -> tuple[Path, dict[int, tuple[str, str]], set[int]]:
    """Two shards of adult rows with planted problems; -> (dir, {id: (column, reason)}, scored ids)."""
    t = pq.read_table(ADULT).slice(0, 400)
    d = t.to_pydict()
    d["age"] = [float(v) for v in d["age"]]  # a float count column can hold a non-integer
    quarantined = {
        0: ("fnlwgt", "infinite value"),
        1: ("capital_gain", "negative value in a positive column"),
        5: ("age", "non-integer value in a count column"),
        6: ("education", "value is not an ordinal level"),
        7: ("sex", "unknown label for a binary column"),
        9: ("fnlwgt", "negative value in a positive column"),  # -inf, and a second problem in the row
    }
    d["fnlwgt"][0] = math.inf
    d["capital_gain"][1] = -5.0
    d["workclass"][2] = 99  # unseen category: scored with the out-of-vocabulary class
    d["age"][3] = None  # missing values: scored, masked
    d["occupation"][3] = None
    d["age"][5] = 30.5
    d["education"][6] = 99
    d["sex"][7] = 5
    d["fnlwgt"][8] = None
    d["fnlwgt"][9] = -math.inf
    d["capital_loss"][9] = -1.0
    d["record_id"][4] = None  # a null id cannot be scored
    d["record_id"][210] = None  # one in the second shard too
    schema = t.schema.set(t.schema.get_field_index("age"), pa.field("age", pa.float64()))
    full = pa.table(d, schema=schema)
    directory.mkdir()
    pq.write_table(full.slice(0, 200), directory / "a.parquet")
    pq.write_table(full.slice(200), directory / "b.parquet")
    scored = set(range(400)) - set(quarantined) - {4, 210}
    return directory, quarantined, scored


@pytest.fixture(scope="module")
def poison_scored(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("poison")
    data, expected, scored_ids = poison_input(root / "in")
    out = root / "scores"
    assert run_score(data, model_dir, out, "--workers", "2", "--batch-size", "128") == 0
    return data, out, expected, scored_ids


def test_poison_rows_are_quarantined_and_nothing_is_lost(poison_scored, model_dir):
    _, out, expected, scored_ids = poison_scored
    t = read_partition(out)
    q = read_quarantine(out)
    assert t.num_rows + q.num_rows == 400
    assert set(t.column("record_id").to_pylist()) == scored_ids
    assert t.schema.field("record_id").type == pa.int64()
    art = load_model(model_dir)
    assert_invariants(t, art.spec.feature_names, art.model.latent_dim)
    by_id = {r["record_id"]: r for r in t.to_pylist()}
    assert by_id[2]["column_log_density"]["workclass"] is not None  # out-of-vocabulary class, scored
    assert by_id[3]["n_observed"] == len(art.spec.feature_names) - 2
    assert by_id[3]["column_log_density"]["age"] is None and by_id[8]["column_log_density"]["fnlwgt"] is None

    # quarantine: ids, reason, column and the original values with their input types
    assert q.schema.field("age").type == pa.float64() and q.schema.field("fnlwgt").type == pa.float64()
    assert q.schema.field("workclass").type == pa.int64()
    rows = {r["record_id"]: r for r in q.to_pylist() if r["record_id"] is not None}
    assert {k: (v["column"], v["reason"].split(";")[0]) for k, v in rows.items()} == expected
    assert "capital_loss: negative value in a positive column" in rows[9]["reason"]
    assert rows[0]["fnlwgt"] == math.inf and rows[5]["age"] == 30.5 and rows[6]["education"] == 99
    assert rows[9]["fnlwgt"] == -math.inf and rows[9]["capital_loss"] == -1.0
    null_ids = [r for r in q.to_pylist() if r["record_id"] is None]
    assert [(r["column"], r["reason"]) for r in null_ids] == [("record_id", "null id")] * 2
    src = {r["record_id"]: r for r in pq.read_table(ADULT).slice(0, 400).to_pylist()}
    assert sorted(r["hours_per_week"] for r in null_ids) == sorted(src[i]["hours_per_week"] for i in (4, 210))

    manifest = json.loads((out / f"dt={DATE}" / "_manifest.json").read_text())
    assert (manifest["scored_rows"], manifest["quarantined_rows"]) == (len(scored_ids), 8)
    assert [f["rows"] for f in manifest["input_files"]] == [200, 200]
    assert sum(f["rows"] for f in manifest["quarantine_files"]) == 8


# ---- failures publish nothing ------------------------------------------------------------------------
def test_failure_mid_run_publishes_nothing_and_keeps_previous_partition(
    poison_scored, model_dir, tmp_path, monkeypatch, capsys
):
    data, published, _, _ = poison_scored
    out = tmp_path / "scores"
    shutil.copytree(published, out)
    before = snapshot(out)
    assert sum(p.endswith(("_SUCCESS", "_manifest.json")) for p in before) == 4  # in each of two partitions
    assert sum(p.endswith(".parquet") for p in before) >= 2
    # the re-run dies in the middle: each actor raises when it starts its second batch, after some
    # batches were scored (and quarantined rows staged); 4 batches of 128 rows over 2 actors
    monkeypatch.setenv(FAIL_AT_ENV, "1")
    assert run_score(data, model_dir, out, "--workers", "2", "--batch-size", "128", "--rows-per-file", "128") == 1
    err = capsys.readouterr().err
    assert "scoring failed, nothing published: InjectedFailure" in err
    assert snapshot(out) == before  # byte for byte, and no staging left behind
    manifest = json.loads((out / f"dt={DATE}" / "_manifest.json").read_text())
    assert read_partition(out).num_rows == manifest["scored_rows"]


def test_whole_file_problems_stop_before_anything_is_written(model_dir, tmp_path, capsys):
    good = pq.read_table(ADULT).slice(0, 100)
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(good, data / "a.parquet")
    pq.write_table(good.drop_columns(["fnlwgt"]).slice(0, 10), data / "b.parquet")
    out = tmp_path / "scores"
    assert run_score(data, model_dir, out) == 3
    err = capsys.readouterr().err
    assert "fnlwgt" in err and "b.parquet" in err
    assert not out.exists()
    # ids that do not identify records (the same id in two files)
    (data / "b.parquet").unlink()
    pq.write_table(good.slice(50, 10), data / "b.parquet")
    assert run_score(data, model_dir, out) == 3
    err = capsys.readouterr().err
    assert "more than once" in err and "a.parquet" in err and "b.parquet" in err
    assert not out.exists()
    # bad usage
    assert run_score(data, model_dir, out, run_date="2026-13-01") == 2
    assert run_score(data, model_dir, out, "--iw-samples", "-1") == 2
    assert not out.exists()


def test_the_scoring_driver_never_imports_torch(model_dir, ray_local, tmp_path):
    """The job's driver plans, reconciles and publishes from the model's description: a driver in which
    torch cannot be imported scores a file and publishes (the workers, the session's, load the model), and
    the scores match the ones a driver with torch writes."""
    data = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(ADULT_MISSING).slice(0, 600), data)
    code = without_package("torch") + """
from jobs import score

sys.exit(score.main(sys.argv[1:]))
"""
    out = tmp_path / "scores"
    args = ["--data", str(data), "--model-dir", model_dir, "--output", str(out), "--run-date", DATE, *SAMPLES]
    address = ray_local.get_runtime_context().gcs_address
    r = subprocess.run([sys.executable, "-c", code, *args, "--ray-address", address], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scored 600 rows" in r.stdout
    here = tmp_path / "scores_here"
    assert run_score(data, model_dir, here) == 0
    a, b = read_partition(out), read_partition(here)
    assert a.num_rows == 600 and a.column("model_id").to_pylist() == b.column("model_id").to_pylist()
    for column in ("recon_log_density", "kl", "log_marginal"):
        np.testing.assert_array_equal(a.column(column).to_numpy(), b.column(column).to_numpy())


# ---- S3 ------------------------------------------------------------------------------------------------
def test_input_and_output_on_s3(model_dir, s3, ray_local):
    fs = pafs.S3FileSystem(endpoint_override=s3, scheme="http", region="us-east-1")
    src = pq.read_table(ADULT_MISSING).slice(0, 1500)
    for i in range(2):
        pq.write_table(src.slice(i * 750, 750), f"vaepipe-test/score/in/part-{i}.parquet", filesystem=fs)
    model_s3 = "vaepipe-test/score/model"
    version = resolve_model(model_dir).location  # one version's directory: an artifact directory
    for f in os.listdir(version):
        fs.create_dir(model_s3)
        with fs.open_output_stream(f"{model_s3}/{f}") as o:
            o.write(Path(version, f).read_bytes())
    out = "s3://vaepipe-test/score/out"

    def listing():
        sel = pafs.FileSelector("vaepipe-test/score/out", recursive=True)
        return sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)

    assert run_score("s3://vaepipe-test/score/in/", f"s3://{model_s3}", out, "--workers", "2") == 0
    part = f"vaepipe-test/score/out/dt={DATE}"
    first = listing()
    manifest = publish.read_manifest(f"s3://{part}")
    data_files = [f["file"] for f in manifest["output_files"]]
    assert sorted(first) == sorted(
        [f"{part}/_SUCCESS", f"{part}/_manifest.json", *(f[len("s3://"):] for f in data_files)]
        + [f["file"][len("s3://"):] for f in manifest["quarantine_files"]]
        + [f"vaepipe-test/score/out/_quarantine/dt={DATE}/_SUCCESS",
           f"vaepipe-test/score/out/_quarantine/dt={DATE}/_manifest.json",
           f"vaepipe-test/score/out/{TABLE_MARKER}"]
    )  # fmt: skip  (no staging, no lease left behind)
    t = pads.dataset(f"{part}/", filesystem=fs, format="parquet").to_table().sort_by("record_id")
    assert t.num_rows == 1500 and manifest["scored_rows"] == 1500
    assert t.column("record_id").to_pylist() == src.column("record_id").to_pylist()
    local = load_model(model_dir)
    assert_invariants(t, local.spec.feature_names, local.model.latent_dim)


# ---- progress ------------------------------------------------------------------------------------------
def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal():
    from pipeline.score.progress import ProgressReporter, progress_text

    assert progress_text(250, 1000, 10.0) == "250 / 1,000 rows (25%), 25 rows/s, ETA 0:30"
    assert progress_text(1000, 1000, 10.0).endswith("ETA -")

    log = io.StringIO()  # not a terminal: one line at each tenth reached, nothing in between
    rep = ProgressReporter(lambda: 0, total=1000, stream=log, log_every=3600)
    for done in (0, 50, 99, 100, 150, 420, 1000):
        rep.show(done)
    lines = log.getvalue().splitlines()
    assert [line.split(" / ")[0] for line in lines] == ["scoring: 100", "scoring: 420", "scoring: 1,000"]
    assert "\r" not in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    rep = ProgressReporter(lambda: 0, total=1000, stream=term)
    rep.show(500)
    assert term.getvalue().startswith("\r[" + "#" * 15 + "." * 15 + "] scoring: 500 / 1,000 rows (50%)")


def test_block_plan_cuts_equal_blocks_of_whole_batches_in_rounds_of_the_workers():
    from pipeline.score.run import BLOCKS_PER_WORKER, MAX_BATCHES_PER_BLOCK, MIN_BATCH_ROWS, block_plan

    assert block_plan(80_000, 2, 4096) == (10_002, 3_334, 2)  # 8 blocks, not 6 of 12,288 rows and one of 6,272
    for asked in (4096, 1000):
        for workers in (1, 2, 3, 4):
            for rows in (1, 7, 255, 300, 5_000, 20_000, 80_000, 123_457, 1_000_000, 10_000_001):
                per_block, batch, used = block_plan(rows, workers, asked)
                blocks = -(-rows // per_block)
                sizes = [min(per_block, rows - i * per_block) for i in range(blocks)]
                assert sum(sizes) == rows and min(sizes) > 0
                assert per_block % batch == 0 and batch <= max(asked, MIN_BATCH_ROWS)
                assert per_block // batch <= MAX_BATCHES_PER_BLOCK
                assert 1 <= used == min(workers, blocks)
                if rows >= BLOCKS_PER_WORKER * workers * asked:  # enough rows for whole batches of the size asked
                    assert batch > asked / 2 and blocks >= BLOCKS_PER_WORKER * workers and blocks % workers == 0
                    assert per_block - sizes[-1] < blocks * (per_block // batch)
                elif rows >= MIN_BATCH_ROWS:
                    assert batch >= min(MIN_BATCH_ROWS, asked)


def test_quiet_ray_drops_ray_datas_no_available_cpu_warning_and_keeps_the_others():
    """The scoring job starts its dataset as its warm-ups release their CPUs: Ray Data's "will hang" warning
    is then wrong, and a user can do nothing about it."""
    import logging

    from pipeline.runtime import _NO_CPU_WARNING, quiet_ray

    quiet_ray()
    quiet_ray()  # the jobs call it on every start: one filter, not one per call
    log = logging.getLogger("ray.data.dataset")
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        log.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will "
                    "hang unless more CPUs are freed up.")  # fmt: skip
        log.warning("another warning")
    finally:
        log.removeHandler(handler)
    assert seen == ["another warning"]
    assert log.filters.count(_NO_CPU_WARNING) == 1
