"""pipeline.api: in-process fit and score (no Ray) against the Ray jobs' own outputs, artifacts both ways,
and the Ray jobs called with keyword options.

The equality tests run the real jobs (`vaepipe train` builds the session's adult model, `vaepipe score`
writes real partitions) and compare record by record.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA, dataset_spec

from jobs import score as score_job
from pipeline import api
from pipeline.core.artifact import load_model
from pipeline.core.reference import baseline_summary, reference_scores
from pipeline.score.reader import read_scores
from pipeline.train.data import is_validation
from schemas.output_table import scores_schema

ADULT = DATA / "adult" / "adult.parquet"
DATE = "2026-01-15"
SMALL = {"epochs": 2, "kl_warmup_epochs": 1, "latent_dim": 4, "hidden": [32, 32], "batch_size": 256, "lr": 5e-3}
SMALL |= {"mc_samples": 4, "iw_samples": 16, "reference_rows": 2000, "baseline_rows": 2000}


@pytest.fixture(scope="module")
def api_model(tmp_path_factory):
    """A model fitted in process on the adult data, saved; -> (Model, model_dir)."""
    model = api.fit(str(ADULT), dataset_spec("adult").to_dict(), **SMALL)
    model_dir = tmp_path_factory.mktemp("api_model") / "model"
    assert model.save(model_dir) == model.model_id
    return model, str(model_dir)


def poison_table() -> pa.Table:
    """Adult rows with values that cannot be scored (and a null id) among scorable ones."""
    t = pq.read_table(ADULT).slice(0, 600)
    d = t.to_pydict()
    d["fnlwgt"][3] = float("inf")
    d["capital_gain"][10] = -5.0
    d["education"][20] = 99
    d["record_id"][30] = None
    d["age"][40] = None  # missing: scored
    return pa.table(d, schema=t.schema)


def by_id(t: pa.Table) -> pa.Table:
    return t.sort_by("record_id")


def assert_same_scores(a: pa.Table, b: pa.Table) -> None:
    """The same records with the same numbers (float rounding aside: batches differ in size)."""
    a, b = by_id(a), by_id(b)
    assert a.column("record_id").to_pylist() == b.column("record_id").to_pylist()
    assert a.column("model_id").to_pylist() == b.column("model_id").to_pylist()
    assert a.column("n_observed").to_pylist() == b.column("n_observed").to_pylist()
    for name in ("recon_log_density", "kl", "elbo", "log_marginal"):
        np.testing.assert_allclose(a.column(name).to_numpy(), b.column(name).to_numpy(), rtol=1e-6, atol=1e-7)
    for name in ("latent_mean", "latent_var"):
        np.testing.assert_allclose(
            np.stack(a.column(name).to_numpy(zero_copy_only=False)),
            np.stack(b.column(name).to_numpy(zero_copy_only=False)),
            rtol=1e-5,
            atol=1e-6,
        )
    ca, cb = a.column("column_log_density").combine_chunks(), b.column("column_log_density").combine_chunks()
    for i in range(ca.type.num_fields):
        x, y = ca.field(i), cb.field(i)
        assert x.is_null().to_pylist() == y.is_null().to_pylist()
        np.testing.assert_allclose(x.fill_null(0).to_numpy(), y.fill_null(0).to_numpy(), rtol=1e-6, atol=1e-7)


def run_cli_score(data, model_dir, output, mc=8, iw=16) -> tuple[pa.Table, pa.Table]:
    args = ["--data", str(data), "--model-dir", str(model_dir), "--output", str(output), "--run-date", DATE]
    assert score_job.main([*args, "--mc-samples", str(mc), "--iw-samples", str(iw), "--workers", "2",
                           "--batch-size", "300"]) == 0  # fmt: skip
    qdir = os.path.join(output, "_quarantine", f"dt={DATE}")
    q = pa.concat_tables(
        pq.read_table(os.path.join(qdir, f)) for f in sorted(os.listdir(qdir)) if f.endswith(".parquet")
    )
    return read_scores(str(output), [DATE]).drop_columns(["dt"]), q


# ---- the scores of a CLI model: API against the score job ------------------------------------------------
def test_cli_model_scored_in_process_matches_the_score_job(adult_model, tmp_path):
    data = tmp_path / "in.parquet"
    pq.write_table(poison_table(), data)
    job_scored, job_quarantined = run_cli_score(data, adult_model, tmp_path / "out")

    model = api.load(adult_model)
    scored, quarantined = model.score(str(data), mc_samples=8, iw_samples=16, seed=0)
    # exactly the scores table's columns and types, as the job wrote them
    assert scored.schema.names == job_scored.schema.names
    assert [f.type for f in scored.schema] == [f.type for f in job_scored.schema]
    assert scored.num_rows == job_scored.num_rows == 596 and quarantined.num_rows == 4
    assert_same_scores(scored, job_scored)
    key = ["record_id", "column", "reason"]
    assert by_id(quarantined.select(key)).to_pylist() == by_id(job_quarantined.select(key)).to_pylist()
    assert quarantined.schema.names == job_quarantined.schema.names

    # any form of the same data, in any batch size, gives the same rows
    import pandas as pd
    import polars as pl

    table = pq.read_table(data)
    # (pandas: with Arrow dtypes; numpy dtypes turn an integer id column holding a null into float64,
    # which are other ids with other noise)
    for form in (table, table.to_pandas(types_mapper=pd.ArrowDtype), pl.from_arrow(table)):
        s, q = model.score(form, mc_samples=8, iw_samples=16, seed=0, batch_size=97)
        assert_same_scores(s, scored)
        assert sorted(q.column("record_id").drop_null().to_pylist()) == [3, 10, 20]
    clean = table.filter(pa.compute.is_valid(table.column("record_id")))  # plain numpy dtypes
    s, _ = model.score(clean.to_pandas(), mc_samples=8, iw_samples=16, seed=0)
    assert_same_scores(s, scored.filter(pa.compute.is_in(scored.column("record_id"), clean.column("record_id"))))
    # another seed: other noise, other estimates
    other, _ = model.score(table, mc_samples=8, iw_samples=16, seed=1)
    assert not np.allclose(
        by_id(other).column("recon_log_density").to_numpy(), by_id(scored).column("recon_log_density").to_numpy()
    )


def test_reference_and_baseline_computed_as_the_train_job_does(adult_model):
    """pipeline.core.reference (what fit() writes) gives the train job's stored reference and baseline."""
    art = load_model(adult_model)
    meta, spec = art.meta, art.spec
    table = pq.read_table(ADULT, columns=spec.columns)
    mask = is_validation(table, spec.id_columns, meta["train_config"]["val_fraction"])
    valid = art.codec.encode(table.filter(pa.array(mask)).slice(0, 2000))
    train = art.codec.encode(table.filter(pa.array(~mask)).slice(0, 2000))
    ref = reference_scores(art.model, valid, 4, 16, seed=meta["train_config"]["seed"])
    assert json.loads(json.dumps(ref)) == meta["reference"]
    base = baseline_summary(art.model, train, valid, ref)
    assert base == pytest.approx(meta["baseline"], rel=1e-9)


# ---- an API model ---------------------------------------------------------------------------------------
def test_fit_writes_a_complete_artifact_with_the_job_options(api_model, adult_model):
    model, model_dir = api_model
    cli = load_model(adult_model).meta
    meta = model.meta
    assert set(cli) <= set(meta)  # every key the train job writes
    assert meta["train_config"] == cli["train_config"]  # same options, same defaults
    assert meta["model_config"] == cli["model_config"]
    assert meta["data"]["rows"] == cli["data"]["rows"] and meta["data"]["val_rows"] == cli["data"]["val_rows"]
    assert meta["data"]["files"] == cli["data"]["files"]
    assert set(meta["metrics"][0]) == set(cli["metrics"][0])
    assert len(meta["metrics"]) == 2 and meta["best_epoch"] == 1
    # the statistics are the job's (the same pass over the same rows, in batches)
    assert json.dumps(meta["statistics"], sort_keys=True) == json.dumps(cli["statistics"], sort_keys=True)
    assert meta["reference"]["rows"] == 2000 and len(meta["reference"]["log_marginal"]["quantiles"]) == 1001
    # learned something: better than the independent columns on held-out rows
    assert meta["baseline"]["model_val_log_marginal"] > meta["baseline"]["val_log_likelihood"]
    # load(): the same artifact, checked against its model_id
    again = api.load(model_dir)
    assert again.model_id == model.model_id and again.meta == meta


def test_api_model_scored_by_the_score_job(api_model, tmp_path):
    model, model_dir = api_model
    data = tmp_path / "in.parquet"
    pq.write_table(poison_table(), data)
    job_scored, job_quarantined = run_cli_score(data, model_dir, tmp_path / "out")
    scored, quarantined = model.score(pq.read_table(data), mc_samples=8, iw_samples=16)
    assert set(job_scored.column("model_id").to_pylist()) == {model.model_id}
    assert_same_scores(scored, job_scored)
    assert quarantined.num_rows == job_quarantined.num_rows == 4


def test_fit_takes_every_form_of_data_and_spec(tmp_path):
    spec = dataset_spec("adult")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(spec.to_yaml())
    table = pq.read_table(ADULT).slice(0, 3000)
    opts = SMALL | {"epochs": 1, "reference_rows": 200, "baseline_rows": 200}
    ref = api.fit(table, spec, **opts)
    import polars as pl

    for data, sp in ((table.to_pandas(), spec.to_dict()), (pl.from_arrow(table), str(spec_path))):
        other = api.fit(data, sp, **opts)
        assert other.metrics[0]["val_elbo"] == pytest.approx(ref.metrics[0]["val_elbo"], rel=1e-12)
        assert other.meta["reference"] == ref.meta["reference"]
    # the split is the job's: validation rows are those whose id hash falls below val_fraction
    n_val = int(is_validation(table, ["record_id"], 0.1).sum())
    assert ref.meta["data"]["val_rows"] == n_val == ref.metrics[0]["val_rows"]


def test_fit_refuses_bad_options_and_data():
    spec = dataset_spec("adult")
    table = pq.read_table(ADULT).slice(0, 500)
    with pytest.raises(api.UsageError, match="workers"):
        api.fit(table, spec, workers=2)
    with pytest.raises(api.UsageError, match="epochs"):
        api.fit(table, spec, epochs=0)
    with pytest.raises(api.UsageError, match="prior-components"):
        api.fit(table, spec, prior_components=0)
    with pytest.raises(api.UsageError, match="linear-patience"):
        api.fit(table, spec, linear_patience=-1)
    with pytest.raises(api.InputDataError, match="fnlwgt"):
        api.fit(table.drop_columns(["fnlwgt"]), spec)
    with pytest.raises(api.UsageError, match="expected a pyarrow Table"):
        api.fit([1, 2, 3], spec)


# ---- the Ray jobs with keyword options --------------------------------------------------------------------
def test_score_job_through_the_api(adult_model, tmp_path):
    data = tmp_path / "in.parquet"
    pq.write_table(poison_table(), data)
    out = tmp_path / "out"
    summary = api.score(data=str(data), model_dir=adult_model, output=str(out), run_date=DATE,
                        mc_samples=4, iw_samples=8, workers=2)  # fmt: skip
    assert summary["exit_code"] == 0 and summary["status"] == "succeeded"
    assert (summary["rows_in"], summary["scored_rows"], summary["quarantined_rows"]) == (600, 596, 4)
    assert summary["model_id"] == load_model(adult_model).model_id and summary["output_uri"] == str(out)

    with pytest.raises(api.JobInputError) as e:  # exit 3: a column the spec needs is absent
        bad = tmp_path / "bad.parquet"
        pq.write_table(poison_table().drop_columns(["age"]), bad)
        api.score(data=str(bad), model_dir=adult_model, output=str(tmp_path / "o2"), run_date=DATE)
    assert e.value.exit_code == 3 and "age" in str(e.value) and e.value.summary["status"] == "failed"
    with pytest.raises(api.JobUsageError):  # exit 2
        api.score(data=str(data), model_dir=adult_model, output=str(out), run_date="15/01/2026")
    with pytest.raises(api.JobUsageError):  # exit 2 from the command-line parser itself
        api.train(data=str(data), model_dir=str(tmp_path / "m"))  # no spec
    assert issubclass(api.DriftDetected, api.JobFailed) and api.DriftDetected.exit_code == 4


def test_scores_schema_is_the_table_schema(api_model):
    model, _ = api_model
    scored, _ = model.score(pq.read_table(ADULT).slice(0, 50))
    expected = scores_schema(model.spec, {"record_id": pa.int64()}, 4)
    assert scored.schema.remove_metadata() == expected


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, as written, in a scratch directory."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "vaepipe-api" / "model" / "model.json").exists()
