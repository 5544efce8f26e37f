"""The feature spec (load, validate, infer) and the output table schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import DATA

from pipeline.errors import InputDataError, UsageError
from schemas.feature_spec import infer_spec, load_spec, parse_spec
from schemas.output_table import scores_schema

CONTRACT_EXAMPLE = """
id_columns: [record_id]
features:
  age: count
  workclass: categorical
  fnlwgt: positive
  hours_per_week: real
  sex: binary
  education: ordinal
  grade: {ordinal: [low, mid, high]}
"""


def test_contract_example_loads():
    spec = parse_spec(CONTRACT_EXAMPLE)
    assert spec.id_columns == ("record_id",)
    assert [(f.name, f.type) for f in spec.features][:3] == [("age", "count"), ("workclass", "categorical"),
                                                            ("fnlwgt", "positive")]
    assert spec["grade"].levels == ("low", "mid", "high") and spec["education"].levels is None
    assert parse_spec(spec.to_yaml()) == spec  # round trip


@pytest.mark.parametrize(
    "text,message",
    [
        ("id_columns: [id]\nfeatures: {a: gaussian}", "unknown type 'gaussian'"),
        ("id_columns: [id]\nfeatures:\n  a: real\n  a: count\n", "duplicate key 'a'"),
        ("id_columns: [id]\nfeatures:\n  - a: real\n  - a: count\n", "duplicate feature column 'a'"),
        ("id_columns: [id]\nfeatures: {id: real, b: count}", "'id' is both an id column and a feature"),
        ("id_columns: [id, id]\nfeatures: {b: count}", "duplicate id column"),
        ("id_columns: []\nfeatures: {b: count}", "at least one column"),
        ("id_columns: [id]\nfeatures: {}", "'features' is empty"),
        ("id_columns: [id]\nfeatures: {g: {ordinal: [a]}}", "at least two levels"),
        ("id_columns: [id]\nfeatures: {g: {ordinal: [a, b, a]}}", "lists a level twice"),
        ("id_columns: [id]\nfeature: {b: count}", "unknown top-level keys"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_invalid_specs_are_clear_usage_errors(text, message):
    with pytest.raises(UsageError, match=message) as e:
        parse_spec(text, source="job.yaml")
    assert e.value.exit_code == 2 and "job.yaml" in str(e.value)


def test_spec_checked_against_data_names_file_and_column():
    spec = parse_spec("id_columns: [record_id]\nfeatures: {age: count, nope: real}")
    schema = pq.read_schema(DATA / "adult" / "adult.parquet")
    with pytest.raises(InputDataError) as e:
        spec.check_schema(schema, "s3://b/adult.parquet")
    assert "'nope'" in str(e.value) and "s3://b/adult.parquet" in str(e.value) and e.value.exit_code == 3
    bad = pa.schema([("record_id", pa.int64()), ("age", pa.string()), ("nope", pa.float64())])
    with pytest.raises(InputDataError, match="'age'"):
        spec.check_schema(bad, "f.parquet")


def test_infer_spec_on_adult():
    table = pq.read_table(DATA / "adult" / "adult.parquet")
    spec = infer_spec(table.slice(0, 5000))
    kinds = {f.name: f.type for f in spec.features}
    assert spec.id_columns == ("record_id",)
    assert kinds["sex"] == "binary" and kinds["workclass"] == "categorical"
    assert kinds["capital_gain"] == "positive" and kinds["fnlwgt"] == "positive"
    assert kinds["age"] == "count" and kinds["hours_per_week"] == "count"
    spec.check_schema(table.schema, "adult.parquet")


def test_infer_spec_cli_output_is_a_valid_spec(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jobs.infer_spec", "--data", str(DATA / "wine"), "--sample-rows", "2000"],
        capture_output=True, text=True, check=True,
    ).stdout
    spec = parse_spec(out)
    assert spec.id_columns == ("record_id",) and len(spec.features) == 13
    (tmp_path / "spec.yaml").write_text(out)
    assert load_spec(str(tmp_path / "spec.yaml")) == spec


def test_cli_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True)

    assert run("infer-spec", "--help").returncode == 0
    assert run("infer-spec").returncode == 2  # --data missing
    assert run("no-such-command").returncode == 2
    missing = run("infer-spec", "--data", str(tmp_path / "absent"))
    assert missing.returncode == 3 and "absent" in missing.stderr
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    broken = run("infer-spec", "--data", str(tmp_path / "broken.parquet"))
    assert broken.returncode == 3 and "broken.parquet" in broken.stderr
    (tmp_path / "job.yaml").write_text(f"data: {DATA / 'wine' / 'wine.parquet'}\nsample_rows: 100\n")
    assert "record_id" in run("infer-spec", "--config", str(tmp_path / "job.yaml")).stdout
    (tmp_path / "bad.yaml").write_text("dataa: x\n")
    bad = run("infer-spec", "--config", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and "unknown option 'dataa'" in bad.stderr


def test_console_script_exits_with_main_code_and_the_heap_frozen():
    """The console script (``pipeline.cli:run``) exits with main's code, every object frozen first: the
    interpreter's last collections skip the job's heap."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vaepipe"] == "pipeline.cli:run"
    probe = ("import atexit, gc, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count())); "
             "sys.argv = ['vaepipe', *sys.argv[1:]]; from pipeline.cli import run; run()")  # fmt: skip
    for args, code in ((["--version"], 0), (["no-such-command"], 2)):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert out.returncode == code, out.stderr
        frozen = int(out.stdout.split("frozen ")[-1])
        assert frozen > 1000  # the interpreter's and vaepipe's objects, not a handful


def test_scores_schema_follows_the_contract():
    spec = parse_spec(CONTRACT_EXAMPLE)
    schema = scores_schema(spec, {"record_id": pa.int64()}, latent_dim=5)
    assert schema.names == ["record_id", "latent_mean", "latent_var", "recon_log_density", "kl", "elbo",
                            "log_marginal", "column_log_density", "n_observed", "model_id", "tail_probability",
                            "column_conditional_log_density"]
    assert schema.field("latent_mean").type == pa.list_(pa.float32(), 5)
    assert schema.field("latent_var").type == pa.list_(pa.float32(), 5)
    for name in ("recon_log_density", "kl", "elbo", "log_marginal"):
        assert schema.field(name).type == pa.float64()
    struct = schema.field("column_log_density").type
    assert [f.name for f in struct] == spec.feature_names and all(f.type == pa.float64() for f in struct)
    assert schema.field("n_observed").type == pa.int32() and schema.field("model_id").type == pa.string()
    assert schema.field("tail_probability").type == pa.float64()
    assert schema.field("column_conditional_log_density").type == struct
