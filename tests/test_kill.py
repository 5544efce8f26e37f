"""Fault tests with real processes and SIGKILL.

One local Ray head for the module (``ray start --head --block`` in its own process group, ended with
that group); every job here is a separate driver process that joins it through RAY_ADDRESS, so a
SIGKILL hits a real driver mid-run. A tiny table and a tiny untrained model keep each run short.

* the scoring driver, killed at random times and at the publish steps, over 20 runs: after each
  kill the partition holds exactly one run's files (the old run's or the new one's); once the next
  run's recovery has run (what the next run does first) scores and quarantine are one run's and
  reconcile with the input; the next run succeeds.
* the training driver killed after a checkpoint: ``--resume`` finishes from it without training the
  epochs before it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_safety import SPEC, tiny_model, tiny_table

from pipeline.core import artifact
from pipeline.score import publish
from pipeline.train.loop import STATE_META

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
DATE = "2026-04-01"
KILLS = 20
AUTH = {"RAY_AUTH_MODE": "disabled"}  # a loopback head private to the test module
PUBLISH_POINTS = ["scored", "prepared-quarantine-new", "journaled", "swapped-quarantine-new", "swapped-scores-new"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head in its own process group; yields its address. Never ``ray stop`` (it would stop
    every Ray instance of the user on the machine)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--node-ip-address=127.0.0.1",
           "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    env = dict(os.environ, **AUTH)
    head = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 180  # a loaded 2-core machine can take a minute and more to bring up a head
    while True:
        probe = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}', log_to_driver=False)"],
            capture_output=True,
            env=env,
        )
        if probe.returncode == 0:
            break
        if time.time() > deadline or head.poll() is not None:
            os.killpg(head.pid, signal.SIGKILL)
            pytest.fail(f"the Ray head did not start: {probe.stderr.decode()[-2000:]}")
        time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    # whatever the head started in its group is gone with it
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


def _env(address: str, kill_at: str | None = None) -> dict[str, str]:
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=str(ROOT), **AUTH)
    env.pop("VAEPIPE_TEST_FAIL_AT", None)
    if kill_at:
        env["VAEPIPE_TEST_FAIL_AT"] = f"kill:{kill_at}"
    return env


def _input(directory: Path) -> tuple[Path, list]:
    t = tiny_table(1200)
    ids = t.column("record_id").to_pylist()
    ids[5] = ids[900] = None
    t = t.set_column(0, "record_id", pa.array(ids, pa.int64()))
    directory.mkdir(parents=True)
    pq.write_table(t.slice(0, 600), directory / "a.parquet")
    pq.write_table(t.slice(600), directory / "b.parquet")
    return directory, ids


def _score_cmd(data: Path, model: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.score", "--data", str(data), "--model-dir", model, "--output", str(out),
            "--run-date", DATE, "--mc-samples", "2", "--iw-samples", "2", "--batch-size", "300"]  # fmt: skip


def _partition_state(out: Path) -> tuple[str | None, str | None]:
    """(scores run id, quarantine run id); checks the scores partition holds exactly its manifest's files."""
    ids = []
    for part in (out / f"dt={DATE}", out / "_quarantine" / f"dt={DATE}"):
        if not part.exists():
            ids.append(None)
            continue
        manifest = json.loads((part / "_manifest.json").read_text())
        key = "output_files" if part.parent == out else "quarantine_files"
        listed = sorted(Path(e["file"]).name for e in manifest[key])
        present = sorted(p.name for p in part.iterdir() if not p.name.startswith("_"))
        assert present == listed, f"{part}: files {present} are not exactly the manifest's {listed}"
        assert (part / "_SUCCESS").exists()
        assert all(manifest["run_id"] in name for name in present)  # every file is that run's
        ids.append(manifest["run_id"])
    return ids[0], ids[1]


def _reconciles(out: Path, ids_in: list) -> None:
    def read(part: Path) -> pa.Table:
        return pa.concat_tables(pq.read_table(p) for p in sorted(part.glob("*.parquet")))

    scored, quarantined = read(out / f"dt={DATE}"), read(out / "_quarantine" / f"dt={DATE}")
    got = scored.column("record_id").to_pylist() + quarantined.column("record_id").to_pylist()
    assert sorted(got, key=lambda v: (v is None, v)) == sorted(ids_in, key=lambda v: (v is None, v))


def test_scoring_driver_killed_at_random_points(ray_head, tmp_path):
    data, ids_in = _input(tmp_path / "in")
    model = tiny_model(tmp_path / "model", versioned=True)
    out = tmp_path / "out"
    t0 = time.monotonic()
    first = subprocess.run(_score_cmd(data, model, out), env=_env(ray_head), cwd=ROOT, capture_output=True, text=True)
    full = time.monotonic() - t0
    assert first.returncode == 0, first.stderr[-3000:]
    published = {_partition_state(out)[0]}
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0, "completed": 0}
    for i in range(KILLS):
        before = _partition_state(out)
        point = PUBLISH_POINTS[i // 2] if i % 2 == 1 and i // 2 < len(PUBLISH_POINTS) else None
        proc = subprocess.Popen(
            _score_cmd(data, model, out), env=_env(ray_head, point), cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if point is None:  # a random moment of the run: starting, reading, scoring, writing or publishing
            try:
                proc.wait(timeout=rng.uniform(0.5, full))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=600)
        scores_run, quarantine_run = _partition_state(out)
        assert scores_run == before[0] or scores_run not in published, (i, before, scores_run)  # old, or new
        outcomes["completed" if rc == 0 else ("old" if scores_run == before[0] else "new")] += 1
        if rc == 0:
            assert scores_run == quarantine_run
        # what the next run does first, under the partition's lease: complete or discard what was left
        with publish.partition_lease(str(out), DATE, f"test-{i}"):
            publish.recover(str(out), DATE)
        scores_run, quarantine_run = _partition_state(out)
        assert scores_run == quarantine_run, (i, point, scores_run, quarantine_run)
        _reconciles(out, ids_in)
        published.add(scores_run)
        print(f"kill {i}: {point or 'random'} -> exit {rc}, partition of run {scores_run}", flush=True)
        assert not (out / "_staging").exists() or not list((out / "_staging").iterdir())
    print(f"\n{KILLS} killed runs (full run {full:.1f}s): {outcomes}")
    last = subprocess.run(_score_cmd(data, model, out), env=_env(ray_head), cwd=ROOT, capture_output=True, text=True)
    assert last.returncode == 0, last.stderr[-3000:]
    scores_run, quarantine_run = _partition_state(out)
    assert scores_run == quarantine_run and scores_run not in published
    _reconciles(out, ids_in)


def _last_checkpoint_epoch(ck: Path) -> int:
    epochs = [-1]
    for meta in ck.glob(f"train/checkpoint_*/{STATE_META}"):
        with contextlib.suppress(ValueError, KeyError, OSError):  # being written
            epochs.append(int(json.loads(meta.read_text())["epoch"]))
    return max(epochs)


def test_training_driver_killed_then_resumed(ray_head, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(tiny_table(3000), data / "p.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.to_yaml())
    model = tmp_path / "model"
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "jobs.train", "--data", str(data), "--spec", str(spec), "--model-dir", str(model),
           "--checkpoint-dir", str(ck), "--epochs", "4", "--latent-dim", "2", "--hidden", "8", "--batch-size", "256",
           "--patience", "0", "--kl-warmup-epochs", "1", "--reference-rows", "200", "--baseline-rows", "200",
           "--mc-samples", "2", "--iw-samples", "2"]  # fmt: skip
    log = tmp_path / "train.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=_env(ray_head), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while _last_checkpoint_epoch(ck) < 1:
        assert proc.poll() is None, f"training ended before it could be killed: {log.read_text()[-3000:]}"
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint of epoch 1 in time: {log.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (model / artifact.POINTER).exists()  # no model published
    assert (ck / "_vaepipe_checkpoints.json").exists()
    done = subprocess.run([*cmd, "--resume"], env=_env(ray_head), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(Path(artifact.meta_path(str(model))).read_text())
    resumed = meta["resumed_at_epochs"]
    assert resumed and resumed[0] >= 2, resumed  # epochs 0 and 1 were not trained again
    assert [h["epoch"] for h in meta["metrics"]] == [0, 1, 2, 3]
    assert not ck.exists()
