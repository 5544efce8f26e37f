"""Never destroy or hide data: overlapping paths, ownership markers, quarantine, empty input, corrupt
pages, versioned models, interrupted publishes, S3 leases.

The scoring runs here use a tiny untrained model over a tiny table (what is checked is where rows go
and what is kept, not the scores) and the session's local Ray instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import score, train
from pipeline.core import artifact
from pipeline.core.artifact import load_model, publish_model, resolve_model, save_model
from pipeline.core.codec import fit_families, partial_stats
from pipeline.core.model import VAE, VAEConfig
from pipeline.errors import FAIL_AT_ENV, UsageError
from pipeline.io import storage
from pipeline.score import publish, reader
from pipeline.score.scorer import BatchScorer, ModelChanged, process_scorer
from pipeline.score.settings import ScoreSettings, score_block, serialize_schema, warm_scorer
from pipeline.train import run as train_run
from schemas.feature_spec import FeatureSpec

DATE = "2026-03-01"
SPEC = FeatureSpec.from_dict(
    {"id_columns": ["record_id"], "features": {"x": "real", "c": "categorical", "k": "count"}}
)


def tiny_table(n: int = 400, first_id: int = 0, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "record_id": pa.array(np.arange(first_id, first_id + n), pa.int64()),
            "x": rng.normal(size=n),
            "c": pa.array(rng.choice(["a", "b", "c"], size=n)),
            "k": pa.array(rng.poisson(3, size=n), pa.int64()),
        }
    )


def tiny_model(directory: Path, seed: int = 0, versioned: bool = False) -> str:
    """An untrained VAE for SPEC (plain artifact directory, or a versioned model directory)."""
    table = tiny_table()
    families = fit_families(SPEC, partial_stats(SPEC, table))
    torch.manual_seed(seed)
    model = VAE(families, VAEConfig(latent_dim=2, hidden=(8,)))
    (publish_model if versioned else save_model)(str(directory), model, SPEC)
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model", versioned=True)


def write(table: pa.Table, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return path


def run_score(data, model_dir, output, *extra) -> int:
    args = ["--data", str(data), "--model-dir", str(model_dir), "--output", str(output), "--run-date", DATE]
    return score.main([*args, "--mc-samples", "2", "--iw-samples", "2", "--batch-size", "100", *extra])


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_dir(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(path.glob("*.parquet"))])


# ---- 1. overlapping paths: exit 2 before any work ----------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("/t/lake/in", "/t/lake/in/dt=1", True),
        ("/t/lake/in/dt=1", "/t/lake/in", True),
        ("/t/lake/in", "/t/lake/in/", True),
        ("/t/lake/in", "/t/lake/in2", False),  # a shared string prefix is not containment
        ("/t/lake/a/../in", "/t/lake/in/x", True),
        ("/t/lake/in/*.parquet", "/t/lake/in", True),  # a glob is its directory
        ("s3://b/lake/in", "s3://b/lake/in/dt=1", True),
        ("s3://b/lake/in", "s3://b/lake/in2", False),
        ("s3://b/lake", "s3://c/lake", False),
        ("s3://b/lake", "/b/lake", False),
    ],
)
def test_overlap_is_containment_on_path_components(a, b, overlap):
    if overlap:
        with pytest.raises(UsageError, match="overlap") as e:
            storage.ensure_disjoint(("--output", a), ("--data", b))
        assert a in str(e.value) and b in str(e.value)
    else:
        storage.ensure_disjoint(("--output", a), ("--data", b))


def test_overlap_sees_through_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UsageError):
        storage.ensure_disjoint(("--output", str(tmp_path / "link")), ("--data", str(tmp_path / "real" / "in")))


def test_score_into_its_own_input_exits_2_and_keeps_the_input(model_dir, tmp_path, capsys):
    lake = tmp_path / "lake" / "in"
    write(tiny_table(), lake / f"dt={DATE}" / "part-0.parquet")
    before = files_under(lake)
    rc = run_score(lake / f"dt={DATE}", model_dir, lake)  # the reproduction: output = the input's table
    err = capsys.readouterr().err
    assert rc == 2 and "--output" in err and "--data" in err and str(lake) in err, err
    assert files_under(lake) == before
    rc = run_score(lake, model_dir, Path(model_dir) / "scores")
    assert rc == 2 and "--model-dir" in capsys.readouterr().err


def test_train_paths_must_not_overlap(tmp_path, capsys):
    data = write(tiny_table(), tmp_path / "data" / "p.parquet").parent
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.to_yaml())
    base = ["--data", str(data), "--spec", str(spec)]
    for extra, flags in (
        (["--model-dir", str(data / "model")], ("--model-dir", "--data")),
        (["--model-dir", str(tmp_path / "m"), "--checkpoint-dir", str(data)], ("--checkpoint-dir", "--data")),
        (["--model-dir", str(tmp_path / "m"), "--checkpoint-dir", str(tmp_path)], ("--checkpoint-dir", "--data")),
        (["--model-dir", str(tmp_path / "m"), "--checkpoint-dir", str(tmp_path / "m" / "ck")], ("--checkpoint-dir",)),
    ):
        rc = train.main([*base, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and all(f in err for f in flags), err
    assert not (tmp_path / "m").exists() and sorted(os.listdir(data)) == ["p.parquet"]


# ---- 2. ownership markers ------------------------------------------------------------------------------
def test_train_refuses_a_user_checkpoint_dir(tmp_path, capsys):
    data = write(tiny_table(), tmp_path / "data" / "p.parquet").parent
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.to_yaml())
    user = tmp_path / "notes"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    rc = train.main(["--data", str(data), "--spec", str(spec), "--model-dir", str(tmp_path / "m"),
                     "--checkpoint-dir", str(user)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and train_run.CHECKPOINTS_MARKER in err and str(user) in err, err
    assert sorted(os.listdir(user)) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"


def test_checkpoint_dir_cleanup_deletes_only_what_the_run_made(tmp_path):
    ck = tmp_path / "ck"
    train_run.claim_checkpoint_dir(str(ck), resume=False)
    assert (ck / train_run.CHECKPOINTS_MARKER).exists()
    (ck / train_run.RUN_META).write_text("{}")
    (ck / train_run.RUN_NAME / "checkpoint_000000").mkdir(parents=True)
    (ck / "notes.txt").write_text("added by a person later")
    train_run.claim_checkpoint_dir(str(ck), resume=False)  # a fresh run: the previous run's entries go
    assert sorted(os.listdir(ck)) == [train_run.CHECKPOINTS_MARKER, "notes.txt"]
    (ck / train_run.RUN_META).write_text("{}")
    train_run.release_checkpoint_dir(str(ck))
    assert sorted(os.listdir(ck)) == ["notes.txt"]
    (ck / "notes.txt").unlink()
    train_run.claim_checkpoint_dir(str(ck), resume=False)
    train_run.release_checkpoint_dir(str(ck))
    assert not ck.exists()  # empty and ours: removed


def test_score_refuses_a_foreign_output_and_a_foreign_partition(model_dir, tmp_path, capsys):
    data = write(tiny_table(), tmp_path / "in" / "p.parquet")
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "report.pdf").write_bytes(b"%PDF")
    assert run_score(data, model_dir, foreign) == 2
    assert "_vaepipe_table.json" in capsys.readouterr().err
    assert files_under(foreign) == {"report.pdf": b"%PDF"}

    out = tmp_path / "table"
    assert run_score(data, model_dir, out) == 0
    assert (out / "_vaepipe_table.json").exists()
    capsys.readouterr()
    # a dt= directory someone else put there (no manifest) is not replaced
    other = "2026-03-02"
    (out / f"dt={other}").mkdir()
    (out / f"dt={other}" / "theirs.parquet").write_bytes(b"x")
    args = ["--data", str(data), "--model-dir", model_dir, "--output", str(out), "--run-date", other]
    assert score.main([*args, "--mc-samples", "2", "--iw-samples", "2"]) == 2
    assert "_manifest.json" in capsys.readouterr().err
    assert (out / f"dt={other}" / "theirs.parquet").read_bytes() == b"x"


# ---- 3. quarantine -------------------------------------------------------------------------------------
def test_null_ids_in_two_batches_and_an_all_null_record_are_quarantined(model_dir, tmp_path):
    t = tiny_table(600)
    ids = t.column("record_id").to_pylist()
    ids[10] = ids[450] = None  # two batches of 100 rows (and two files) each hold a null id
    x = t.column("x").to_pylist()
    c = t.column("c").to_pylist()
    k = t.column("k").to_pylist()
    x[20] = c[20] = k[20] = None  # a record with nothing observed
    x[30] = c[30] = None  # one observed feature of three
    t = t.set_column(0, "record_id", pa.array(ids, pa.int64()))
    t = t.set_column(1, "x", pa.array(x, pa.float64()))
    t = t.set_column(2, "c", pa.array(c, pa.string()))
    t = t.set_column(3, "k", pa.array(k, pa.int64()))
    data = tmp_path / "in"
    write(t.slice(0, 300), data / "a.parquet")
    write(t.slice(300), data / "b.parquet")
    out = tmp_path / "out"
    assert run_score(data, model_dir, out) == 0
    q = read_dir(out / "_quarantine" / f"dt={DATE}")
    scored = read_dir(out / f"dt={DATE}")
    assert q.num_rows == 3 and scored.num_rows == 597
    reasons = dict(zip(q.column("x").to_pylist(), q.column("reason").to_pylist(), strict=True))
    assert sorted(r for r in q.column("reason").to_pylist() if r == "null id") == ["null id"] * 2
    all_null = q.filter(pa.compute.equal(q.column("record_id"), 20)).to_pylist()[0]
    assert all_null["reason"].startswith("0 observed feature(s), fewer than --min-observed 1")
    assert all_null["column"] is None and all_null["k"] is None
    assert x[10] in reasons and x[450] in reasons
    assert 30 in scored.column("record_id").to_pylist()  # one observed feature is enough by default
    names = sorted(p.name for p in (out / "_quarantine" / f"dt={DATE}").glob("*.parquet"))
    assert len(names) == len(set(names)) >= 2

    # --min-observed 2: the record with one observed feature is quarantined too, with its reason
    assert run_score(data, model_dir, out, "--min-observed", "2") == 0
    q = read_dir(out / "_quarantine" / f"dt={DATE}")
    row = q.filter(pa.compute.equal(q.column("record_id"), 30)).to_pylist()[0]
    assert row["reason"] == "1 observed feature(s), fewer than --min-observed 2"
    assert read_dir(out / f"dt={DATE}").num_rows == 596


# ---- 4. empty input ------------------------------------------------------------------------------------
def test_empty_input_publishes_an_empty_partition(model_dir, tmp_path):
    data = write(tiny_table().slice(0, 0), tmp_path / "in" / "empty.parquet")
    out = tmp_path / "out"
    assert run_score(data, model_dir, out) == 0
    part = out / f"dt={DATE}"
    manifest = json.loads((part / "_manifest.json").read_text())
    assert (part / "_SUCCESS").exists() and manifest["input_rows"] == manifest["scored_rows"] == 0
    assert read_dir(part).num_rows == 0 and reader.read_scores(str(out)).num_rows == 0


# ---- 5. a corrupt page behind a valid footer -----------------------------------------------------------
def test_corrupt_page_behind_a_valid_footer_exits_3_naming_the_file(model_dir, tmp_path, capsys):
    data = tmp_path / "in"
    write(tiny_table(400), data / "good.parquet")
    bad = write(tiny_table(4000, first_id=1000, seed=1), data / "bad.parquet", compression="gzip", use_dictionary=False)
    meta = pq.ParquetFile(bad).metadata
    col = meta.row_group(0).column(1)  # x: gzip pages (CRC-checked)
    start = col.data_page_offset
    raw = bytearray(bad.read_bytes())
    middle = start + col.total_compressed_size // 2
    raw[middle : middle + 64] = bytes(range(64))
    bad.write_bytes(bytes(raw))
    assert pq.ParquetFile(bad).metadata.num_rows == 4000  # the footer still reads: pre-flight cannot see it
    out = tmp_path / "out"
    rc = run_score(data, model_dir, out)
    err = capsys.readouterr().err
    assert rc == 3 and "bad.parquet" in err and "good.parquet" not in err, err
    assert not (out / f"dt={DATE}").exists()


# ---- 6. versioned models -------------------------------------------------------------------------------
def test_models_are_versioned_and_the_pointer_is_resolved_once(tmp_path):
    mdir = tmp_path / "m"
    first = load_model(tiny_model(mdir, seed=1, versioned=True)).model_id
    second = load_model(tiny_model(mdir, seed=2, versioned=True)).model_id
    assert first != second
    assert json.loads((mdir / artifact.POINTER).read_text())["model_id"] == second
    assert sorted(os.listdir(mdir / artifact.VERSIONS)) == sorted([first, second])
    assert load_model(str(mdir / artifact.VERSIONS / first)).model_id == first  # old versions stay whole
    assert resolve_model(str(mdir)).location == str(mdir / artifact.VERSIONS / second)
    plain = tiny_model(tmp_path / "plain", seed=3)
    assert resolve_model(plain).model_id is None and load_model(plain).location == plain  # plain dirs still load

    # an actor that finds another model than the one the run resolved refuses to score
    settings = ScoreSettings(
        model_dir=plain,
        run_id="r",
        input_schema=serialize_schema(tiny_table().schema),
        expected_model_id=first,
    )
    with pytest.raises(ModelChanged, match=first):
        BatchScorer(settings.to_dict())


def test_a_worker_process_keeps_one_scorer_per_run(model_dir, tmp_path):
    # the scoring tasks of a run share one BatchScorer per worker process (pipeline.score.settings.score_block)
    table = tiny_table(50)
    run = ScoreSettings(
        model_dir=model_dir, run_id="a", input_schema=serialize_schema(table.schema), iw_samples=8,
        expected_model_id=resolve_model(model_dir).model_id,
    )  # fmt: skip
    assert warm_scorer(run.to_dict()) is True
    scorer = process_scorer(run.to_dict())
    first = score_block(table, run.to_dict())
    second = score_block(table, run.to_dict())
    assert process_scorer(run.to_dict()) is scorer and scorer.batches == 2  # built once, by the warm-up
    # the same scores as a scorer of its own: a block's scores do not depend on what the process did before
    alone = BatchScorer(run.to_dict())(table)
    assert first.equals(alone) and second.equals(alone)
    # the next run's settings: a new scorer, the last one let go
    other = ScoreSettings(**(run.to_dict() | {"run_id": "b"}))
    assert process_scorer(other.to_dict()) is not scorer
    # a warm-up that cannot build the scorer reports nothing; the block's own task raises the error
    changed = ScoreSettings(**(run.to_dict() | {"run_id": "c", "expected_model_id": "0" * 16}))
    assert warm_scorer(changed.to_dict()) is False
    with pytest.raises(ModelChanged):
        score_block(table, changed.to_dict())


def test_the_manifest_names_the_resolved_model(model_dir, tmp_path):
    data = write(tiny_table(), tmp_path / "in" / "p.parquet")
    out = tmp_path / "out"
    assert run_score(data, model_dir, out) == 0
    manifest = json.loads((out / f"dt={DATE}" / "_manifest.json").read_text())
    resolved = resolve_model(model_dir)
    assert manifest["model_id"] == resolved.model_id and manifest["model_version"] == resolved.location
    assert set(read_dir(out / f"dt={DATE}").column("model_id").to_pylist()) == {resolved.model_id}


# ---- 7. staging and an interrupted publish -------------------------------------------------------------
_PUBLISH_SCRIPT = """
import sys, pyarrow as pa
sys.path.insert(0, "tests")
from test_publish import SCHEMA, QSCHEMA, stage, ids_table
from pipeline.errors import FailureHook
from pipeline.score import publish
out, run_id, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
shard = list(range(first, first + 10))
st = stage(out, run_id, [shard], [first + 100])
st.begin("2026-02-01")
rec = publish.reconcile(st, ids_table(shard + [first + 100]), ["record_id"])
publish.publish(st, "2026-02-01", rec, {"run_id": run_id}, SCHEMA, QSCHEMA, FailureHook.from_env())
st.discard()
"""


def _publish_in_subprocess(out: Path, run_id: str, first: int, kill_at: str | None = None) -> int:
    env = dict(os.environ)
    env.pop(FAIL_AT_ENV, None)
    if kill_at:
        env[FAIL_AT_ENV] = f"kill:{kill_at}"
    cwd = Path(__file__).parent.parent
    args = [sys.executable, "-c", _PUBLISH_SCRIPT, str(out), run_id, str(first)]
    return subprocess.run(args, env=env, cwd=cwd).returncode


def _run_ids(out: Path, date: str = "2026-02-01") -> tuple[str | None, str | None]:
    ids = []
    for part in (out / f"dt={date}", out / "_quarantine" / f"dt={date}"):
        m = part / "_manifest.json"
        ids.append(json.loads(m.read_text())["run_id"] if m.exists() else None)
    return ids[0], ids[1]


@pytest.mark.parametrize("kill_at", ["journaled", "swapped-quarantine-new", "swapped-scores-new"])
def test_a_publish_killed_between_swaps_is_completed_by_the_next_run(tmp_path, kill_at):
    out = tmp_path / "t"
    assert _publish_in_subprocess(out, "run-old", 0) == 0
    assert _publish_in_subprocess(out, "run-new", 1000, kill_at=kill_at) == -9
    scores_run, quarantine_run = _run_ids(out)
    assert scores_run in ("run-old", "run-new")  # the scores partition is one run's, whole
    if scores_run != quarantine_run:
        with pytest.raises(Exception, match="interrupted"):  # the reader says so instead of mixing runs
            reader.read_scores(str(out))
    assert (out / "_staging" / "run-new").exists()
    assert publish.recover(str(out), "2026-02-01") == ["run-new"]
    assert _run_ids(out) == ("run-new", "run-new")  # rolled forward: the journal was written before any swap
    assert reader.read_scores(str(out)).column("record_id").to_pylist() == list(range(1000, 1010))
    assert not (out / "_staging").exists()


def test_staging_of_a_run_killed_before_publishing_is_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "t"
    assert _publish_in_subprocess(out, "run-a", 0) == 0
    assert _publish_in_subprocess(out, "run-b", 1000, kill_at="prepared-quarantine-new") == -9
    assert _run_ids(out) == ("run-a", "run-a")  # no journal yet: nothing of run-b is published
    assert publish.recover(str(out), "2026-02-01") == ["run-b"]
    assert not (out / "_staging").exists() and _run_ids(out) == ("run-a", "run-a")


def test_an_unreadable_manifest_is_an_error_not_a_listing(tmp_path):
    out = tmp_path / "t"
    assert _publish_in_subprocess(out, "run-a", 0) == 0
    (out / "dt=2026-02-01" / "_manifest.json").write_text("{not json")
    with pytest.raises(Exception, match="unreadable manifest"):
        reader.read_scores(str(out))


# ---- 8. one run per partition ---------------------------------------------------------------------------
def test_a_second_local_run_of_a_date_is_refused_while_one_holds_it(tmp_path):
    out = str(tmp_path)
    with publish.partition_lease(out, DATE, "run-1"):
        with pytest.raises(publish.PartitionBusy, match="another run"), publish.partition_lease(out, DATE, "run-2"):
            pass
        with publish.partition_lease(str(tmp_path), "2026-03-02", "run-3"):  # another date: fine
            pass
    with publish.partition_lease(str(tmp_path), DATE, "run-2"):  # released
        pass


def test_s3_lease_refuses_a_concurrent_run_and_expires(s3):
    out = f"s3://vaepipe-test/lease-{time.time_ns()}"
    key = storage.join(out, "_leases", f"dt={DATE}.json")
    with publish.partition_lease(out, DATE, "run-1") as lease:
        body = json.loads(storage.read_text(key))
        assert body["run_id"] == "run-1" and body["expires_at"] > time.time()
        with pytest.raises(publish.PartitionBusy, match="run-1"), publish.partition_lease(out, DATE, "run-2"):
            pass
        lease.check()
    assert not storage.exists(key)  # released
    # a lease whose holder died without renewing it expires: the next run takes it over
    storage.write_text(key, json.dumps({"run_id": "dead", "expires_at": time.time() - 1}))
    with publish.partition_lease(out, DATE, "run-3"):
        assert json.loads(storage.read_text(key))["run_id"] == "run-3"
    assert not storage.exists(key)
