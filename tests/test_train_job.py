"""The training job end to end: real local Ray, real Parquet shards, moto's S3 server on loopback.

Fast tests first (split, checkpoint state, bad input: no training); then the Ray Train runs, kept small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import DATA, dataset_spec

from jobs import train
from pipeline.core import artifact
from pipeline.core.artifact import load_model
from pipeline.core.codec import TableCodec, fit_families, partial_stats
from pipeline.core.model import VAE, VAEConfig
from pipeline.core.scoring import score_batch
from pipeline.core.training import TrainConfig, make_optimizer, train_step
from pipeline.errors import FAIL_AT_ENV
from pipeline.io import storage
from pipeline.io.inputs import preflight
from pipeline.train import data as train_data
from pipeline.train.data import is_validation, statistics_pass
from pipeline.train.loop import ShardCache, TableShard, load_state, restore_optimizer, save_state

ADULT = DATA / "adult" / "adult.parquet"
SMALL = "--latent-dim 4 --hidden 16 16 --batch-size 1024 --kl-warmup-epochs 1 --mc-samples 2 --iw-samples 4"


@pytest.fixture(scope="module")
def adult() -> pa.Table:
    return pq.read_table(ADULT)


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("spec") / "adult.yaml"
    path.write_text(dataset_spec("adult").to_yaml())
    return str(path)


def write_shards(table: pa.Table, directory: Path, n: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-table.num_rows // n)
    for i in range(n):
        pq.write_table(table.slice(i * size, size), directory / f"part-{i:03d}.parquet")
    return directory


# ---- split, statistics, checkpoints ------------------------------------------------------------
def test_split_is_a_function_of_the_id_alone(adult):
    ids = ["record_id"]
    whole = is_validation(adult, ids, 0.1)
    pieces = np.concatenate([is_validation(adult.slice(i, 977), ids, 0.1) for i in range(0, adult.num_rows, 977)])
    np.testing.assert_array_equal(whole, pieces)  # batch layout does not matter
    perm = np.random.default_rng(0).permutation(adult.num_rows)
    np.testing.assert_array_equal(is_validation(adult.take(perm), ids, 0.1), whole[perm])  # nor row order
    assert 0.09 < whole.mean() < 0.11
    # a larger fraction only moves records from train to validation, never back
    assert not (whole & ~is_validation(adult, ids, 0.2)).any()


@pytest.mark.parametrize("local_rows", [10**9, 0], ids=["on the driver", "in ray tasks"])
def test_statistics_pass_over_shards_equals_one_pass_in_memory(adult, tmp_path, ray_local, local_rows):
    spec = dataset_spec("adult")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # row groups of 700 rows: the tasks split files by row group
        pq.write_table(adult.slice(i * 3000, 3000), shards / f"part-{i}.parquet", row_group_size=700)
    got = statistics_pass(preflight(str(shards), spec), spec, 0.1, local_rows=local_rows)
    want = partial_stats(spec, adult.slice(0, 9000).select(spec.columns))
    assert got.rows == 9000 and got.val_rows == int(is_validation(adult.slice(0, 9000), ["record_id"], 0.1).sum())
    for a, b in zip(fit_families(spec, got.stats), fit_families(spec, want), strict=True):
        sa, sb = a.state(), b.state()
        assert sa.keys() == sb.keys(), a.name
        for key in sa:  # merge order changes float rounding only
            same = sa[key] == pytest.approx(sb[key], rel=1e-9) if isinstance(sa[key], float) else sa[key] == sb[key]
            assert same, (a.name, key, sa[key], sb[key])


def test_shard_cache_yields_every_record_once_per_epoch_whatever_the_arrival_order(adult):
    spec = dataset_spec("adult")
    codec = TableCodec(spec, fit_families(spec, partial_stats(spec, adult)))
    table = adult.slice(0, 5000)
    keys = np.sort(codec.encode(table).keys)

    def cached(order: np.ndarray, budget: int) -> ShardCache:
        cache = ShardCache(budget)
        shuffled = table.take(order)
        for i in range(0, 5000, 700):  # arrival in uneven batches, as a stream delivers them
            cache.add(codec.encode(shuffled.slice(i, 700)))
        return cache

    a = cached(np.arange(5000), 2**20)
    b = cached(np.random.default_rng(1).permutation(5000), 2**20)
    assert a.fits and b.fits
    a.seal()
    b.seal()
    np.testing.assert_array_equal(a.batch.keys, keys)  # key order, whatever order the rows came in
    torch.testing.assert_close(a.batch.values, b.batch.values, equal_nan=True)
    for epoch in range(2):  # every record exactly once per epoch; the same order for the same seed
        seen_a = [mb for mb in a.minibatches(512, torch.Generator().manual_seed(epoch))]
        seen_b = [mb for mb in b.minibatches(512, torch.Generator().manual_seed(epoch))]
        got = np.concatenate([mb.keys for mb in seen_a])
        np.testing.assert_array_equal(np.sort(got), keys)
        np.testing.assert_array_equal(got, np.concatenate([mb.keys for mb in seen_b]))
        assert max(len(mb) for mb in seen_a) == 512
    # over the budget: nothing is kept, the invalid-cell count still is
    small = cached(np.arange(5000), 100_000)
    assert not small.fits and small.invalid == a.invalid


def test_table_shard_passes_every_row_once_in_a_seeded_order(adult):
    table = adult.slice(0, 2500)
    shard = TableShard(table)
    in_order = list(shard.iter_batches(batch_size=1000, batch_format="pyarrow"))
    assert [t.num_rows for t in in_order] == [1000, 1000, 500]
    assert pa.concat_tables(in_order).equals(table)
    ages = table.column("age").to_numpy()
    passes = {}
    for seed in (3, 3, 4):
        got = pa.concat_tables(shard.iter_batches(batch_size=700, local_shuffle_seed=seed)).column("age").to_numpy()
        np.testing.assert_array_equal(np.sort(got), np.sort(ages))  # each row once
        passes.setdefault(seed, []).append(got)
    np.testing.assert_array_equal(*passes[3])  # the same order for the same seed
    assert not np.array_equal(passes[3][0], passes[4][0]) and not np.array_equal(passes[3][0], ages)


def test_checkpoint_state_restores_model_and_optimizer_exactly(adult, tmp_path):
    spec = dataset_spec("adult")
    table = adult.slice(0, 512).select(spec.columns)
    families = fit_families(spec, partial_stats(spec, table))
    batch = TableCodec(spec, families).encode(table)

    def fresh():
        torch.manual_seed(0)
        model = VAE(families, VAEConfig(latent_dim=3, hidden=(8,)))
        return model, make_optimizer(model, TrainConfig())

    model, opt = fresh()
    for _ in range(3):
        train_step(model, opt, batch)
    save_state(str(tmp_path), model, opt, None, {"epoch": 2, "history": []})
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.safetensors"]  # nothing to unpickle

    model2, opt2 = fresh()
    tensors, meta = load_state(str(tmp_path))
    model2.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    restore_optimizer(opt2, tensors, meta)
    torch.manual_seed(1)
    train_step(model, opt, batch)
    torch.manual_seed(1)
    train_step(model2, opt2, batch)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---- bad input: exit 3, the file named, nothing written ------------------------------------------
def _missing_column(t):
    return t.drop_columns(["age"])


def _string_for_number(t):
    return t.set_column(t.schema.get_field_index("fnlwgt"), "fnlwgt", t.column("fnlwgt").cast(pa.string()))


@pytest.mark.parametrize(
    ("damage", "column"),
    [(_missing_column, "age"), (_string_for_number, "fnlwgt"), ("truncate", None)],
    ids=["missing-column", "string-for-number", "truncated-file"],
)
def test_bad_shard_exits_3_naming_the_file_and_writes_nothing(adult, spec_file, tmp_path, capsys, damage, column):
    shards = write_shards(adult.slice(0, 3000), tmp_path / "data", 3)
    bad = shards / "part-001.parquet"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        pq.write_table(damage(pq.read_table(bad)), bad)
    model_dir = tmp_path / "model"
    rc = train.main(["--data", str(shards), "--spec", spec_file, "--model-dir", str(model_dir), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert str(bad) in err
    if column:
        assert repr(column) in err
    assert not model_dir.exists()


# ---- training runs -------------------------------------------------------------------------------
def test_two_worker_training_on_adult(adult_model, adult):
    """The adult_model fixture: 2 CPU workers on the real adult data (missing values, zero-heavy money)."""
    meta = json.loads(Path(artifact.meta_path(adult_model)).read_text())
    history = meta["metrics"]
    assert [h["epoch"] for h in history] == list(range(len(history))) and len(history) >= 2
    assert history[-1]["val_elbo"] > history[0]["val_elbo"]  # validation elbo improves over epochs
    for h in history:
        assert h["train_rows"] + h["val_rows"] == adult.num_rows and h["rows_per_s"] > 0
        assert set(h["val_columns"]) == {f.name for f in dataset_spec("adult").features}
    # the held-out elbo (a lower bound on log p(x)) beats the independent-columns baseline
    base = meta["baseline"]
    assert meta["reference"]["elbo"]["mean"] > base["val_log_likelihood"], base
    assert meta["reference"]["log_marginal"]["mean"] >= meta["reference"]["elbo"]["mean"] - 0.05
    ref = meta["reference"]
    assert len(ref["elbo"]["quantiles"]) == len(ref["quantile_probs"]) and 0 < ref["rows"] <= history[-1]["val_rows"]
    assert np.all(np.diff(ref["elbo"]["quantiles"]) >= 0)
    assert meta["data"]["rows"] == adult.num_rows and meta["data"]["files"][0]["rows"] == adult.num_rows
    assert meta["data"]["val_rows"] == history[-1]["val_rows"]  # the split the stats pass saw is the one trained on
    assert meta["train_config"]["epochs"] == 2 and meta["versions"]["ray"]
    # one complete version named by the pointer; the checkpoints are cleaned up
    assert sorted(os.listdir(adult_model)) == [artifact.POINTER, artifact.VERSIONS]
    assert os.listdir(Path(adult_model, artifact.VERSIONS)) == [meta["model_id"]]
    assert sorted(os.listdir(Path(adult_model, artifact.VERSIONS, meta["model_id"]))) == [
        artifact.META,
        artifact.WEIGHTS,
    ]

    # the artifact reloads and scores identically in a fresh process
    code = (
        "import json, sys, torch, pyarrow.parquet as pq\n"
        "from pipeline.core.artifact import load_model\nfrom pipeline.core.scoring import score_batch\n"
        "torch.set_num_threads(1)\n"
        "art = load_model(sys.argv[1])\n"
        "batch = art.codec.encode(pq.read_table(sys.argv[2]).slice(0, 300))\n"
        "s = score_batch(art.model, batch, 4, 8, seed=3)\n"
        "print(json.dumps({'id': art.model_id, 'elbo': s.elbo.tolist(), 'lm': s.log_marginal.tolist()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, adult_model, str(ADULT)], capture_output=True, text=True, check=True
    )
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    art = load_model(adult_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = score_batch(art.model, art.codec.encode(adult.slice(0, 300)), 4, 8, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert fresh["id"] == art.model_id == meta["model_id"]
    np.testing.assert_array_equal(np.array(fresh["elbo"]), here.elbo)
    np.testing.assert_array_equal(np.array(fresh["lm"]), here.log_marginal)


def test_worker_failure_resumes_from_the_checkpoint(adult, spec_file, tmp_path, ray_local, capsys, monkeypatch):
    data = write_shards(adult.slice(0, 8000), tmp_path / "data", 2)
    model_dir = tmp_path / "model"
    base = ["--data", str(data), "--spec", spec_file, "--model-dir", str(model_dir), "--workers", "2"]
    base += ["--epochs", "3", *SMALL.split()]
    monkeypatch.setenv(FAIL_AT_ENV, "1 2")  # the last worker fails at the start of epochs 1 and 2, once each

    # 1. no retries allowed: the run dies at the start of epoch 1, after epoch 0's checkpoint
    rc = train.main([*base, "--max-failures", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "--resume" in err, err
    assert not (model_dir / artifact.POINTER).exists() and not (model_dir / artifact.VERSIONS).exists()
    assert (model_dir / "_checkpoints" / "run.json").exists()

    # 2. --resume continues at epoch 1; the worker lost at epoch 2 is restarted by Ray Train from the
    #    checkpoint of epoch 1 (max_failures=1), not from scratch
    rc = train.main([*base, "--max-failures", "1", "--resume"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(Path(artifact.meta_path(str(model_dir))).read_text())
    assert meta["resumed_at_epochs"] == [1, 2]
    assert [h["epoch"] for h in meta["metrics"]] == [0, 1, 2]
    assert load_model(str(model_dir)).model_id == meta["model_id"]
    assert not (model_dir / "_checkpoints").exists()


def test_streamed_ingest_trains_every_record_once_per_epoch(adult, spec_file, tmp_path, ray_local, monkeypatch):
    """Inputs over LOCAL_STATS_ROWS are read by Ray Data and split across the workers by Ray Train (the
    small ones are handed to the workers as object-store tables): the same split, every record once."""
    data = write_shards(adult.slice(0, 6000), tmp_path / "data", 3)
    monkeypatch.setattr(train_data, "LOCAL_STATS_ROWS", 0)
    model_dir = tmp_path / "model"
    args = ["--data", str(data), "--spec", spec_file, "--model-dir", str(model_dir), "--workers", "2"]
    assert train.main([*args, "--epochs", "2", *SMALL.split()]) == 0
    meta = json.loads(Path(artifact.meta_path(str(model_dir))).read_text())
    cfg = meta["train_config"]
    val = int(is_validation(adult.slice(0, 6000), dataset_spec("adult").id_columns, cfg["val_fraction"]).sum())
    assert cfg["passes_per_epoch"] > 1  # the first pass streams, the others run from the kept shard
    for h in meta["metrics"]:
        assert (h["train_rows"], h["val_rows"]) == (cfg["passes_per_epoch"] * (6000 - val), val)


def test_resume_without_a_run_is_a_usage_error(adult, spec_file, tmp_path):
    data = write_shards(adult.slice(0, 100), tmp_path / "data", 1)
    rc = train.main(["--data", str(data), "--spec", spec_file, "--model-dir", str(tmp_path / "m"), "--resume"])
    assert rc == 2 and not (tmp_path / "m").exists()


def test_training_on_s3(adult, spec_file, s3, ray_local, tmp_path):
    """Data on an S3-compatible server on loopback; the artifact written to s3://."""
    fs = storage.filesystem("s3://vaepipe-test")
    for i, start in enumerate((0, 3000)):
        with fs.open_output_stream(f"vaepipe-test/train-data/part-{i}.parquet") as f:
            pq.write_table(adult.slice(start, 3000), f)
    model_dir = "s3://vaepipe-test/models/adult"
    args = ["--data", "s3://vaepipe-test/train-data/", "--spec", spec_file, "--model-dir", model_dir]
    rc = train.main([*args, "--workers", "2", "--epochs", "1", *SMALL.split(), "--s3-endpoint", s3])
    assert rc == 0
    art = load_model(model_dir)
    assert [f["file"] for f in art.meta["data"]["files"]] == [
        f"s3://vaepipe-test/train-data/part-{i}.parquet" for i in range(2)
    ]
    assert art.meta["data"]["rows"] == 6000
    assert not storage.exists(f"{model_dir}/_checkpoints")
    scores = score_batch(art.model, art.codec.encode(adult.slice(0, 50)), 2, 0)
    assert np.isfinite(scores.elbo).all()


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    """--resume's own look at storage: the latest epoch whose two files read back whole; a checkpoint a
    killed process left half-written (truncated weights, or no state.json yet) is passed over."""
    from safetensors.torch import save_file

    from pipeline.train.loop import STATE_META, STATE_WEIGHTS, newest_checkpoint, read_checkpoint

    run = tmp_path / "train"
    for name, epoch, damage in (("checkpoint_a", 0, None), ("checkpoint_b", 1, None),
                                ("checkpoint_c", 2, "truncated"), ("checkpoint_d", 3, "no-meta")):  # fmt: skip
        d = run / name
        d.mkdir(parents=True)
        save_file({"model.w": torch.full((64,), float(epoch))}, str(d / STATE_WEIGHTS))
        if damage == "truncated":
            blob = (d / STATE_WEIGHTS).read_bytes()
            (d / STATE_WEIGHTS).write_bytes(blob[: len(blob) // 2])
        if damage != "no-meta":
            (d / STATE_META).write_text(json.dumps({"epoch": epoch}))
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own files are not checkpoints
    best = newest_checkpoint(str(run))
    assert best == str(run / "checkpoint_b")
    tensors, meta = read_checkpoint(best)
    assert meta["epoch"] == 1 and float(tensors["model.w"][0]) == 1.0
    assert newest_checkpoint(str(tmp_path / "absent")) is None


def test_a_local_instance_runs_ray_train_without_preemption_watcher_or_metrics_unless_asked():
    # a local instance has no node drains to watch and no dashboard to export metrics to: its processes get
    # both switched off (about 2.5 s of CPU on a job's start); a value the user set wins
    code = (
        "import json, os, ray\n"
        "from pipeline.runtime import init_ray\n"
        "init_ray(prestart_workers=False, num_cpus=1)\n"
        "names = ('RAY_TRAIN_ENABLE_PREEMPTION_WATCHER', 'RAY_TRAIN_METRICS_ENABLED')\n"
        "worker = ray.get(ray.remote(lambda: [os.environ.get(n) for n in names]).remote())\n"
        "print(json.dumps({'driver': [os.environ.get(n) for n in names], 'worker': worker}))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_TRAIN_METRICS_ENABLED": "1"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"driver": ["0", "1"], "worker": ["0", "1"]}
