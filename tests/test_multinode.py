"""A real two-node Ray cluster on this machine: train and score submitted as Ray Jobs.

``ray start --head`` and ``ray start --address`` start two nodes, each with its own raylet, object
store and temp dir, with token authentication on (``RAY_AUTH_MODE=token``, the token in
``RAY_AUTH_TOKEN``, as a production cluster sets it). ``ray job submit --working-dir`` runs the
real ``vaepipe train`` and ``vaepipe score`` command lines; data, spec, model and scores live on the
S3-compatible server of the ``s3`` fixture, as they would on S3 for a real cluster. The test checks
the scores table against the contract's invariants, that the Ray Train workers ran on both nodes
(from the cluster's own state API), and the fixture always stops the cluster, even when a step
fails: it stops only the processes it started (never a global ``ray stop``, which would kill every
other Ray instance on the machine) and fails if any of them survives.

Placement: each node declares 3 CPUs and the train job asks for 2 workers of 2 CPUs each, so no
node can hold both workers (Ray Train packs its placement group onto as few nodes as fit) and one
CPU per node stays free for Ray Data's tasks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import DATA, dataset_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv the tests run in: ray, vaepipe, python
CPUS_PER_NODE = 3
TRAIN_WORKERS, CPUS_PER_TRAIN_WORKER = 2, 2  # 2 > CPUS_PER_NODE / 2: one worker per node
RUN_DATE = "2026-11-23"
TRAIN_TIMEOUT_S, SCORE_TIMEOUT_S = 720, 420  # upper bounds for a loaded 2-core machine
BUCKET = "vaepipe-test"
# what the job's working_dir upload leaves out (Ray also honours .gitignore)
WORKING_DIR_EXCLUDES = [".venv", ".git", "**/__pycache__", ".ruff_cache", ".pytest_cache", "*.egg-info", "tests/data"]


# ---- the cluster ---------------------------------------------------------------------------------
def _port_block(size: int) -> int:
    """A base port with `size` free ports above it, below the kernel's ephemeral range (32768+) and
    above Ray's default worker ports (10002-19999) that other local Ray instances use."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - size, 10)
        try:
            for p in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports found")


class TwoNodeCluster:
    """One head and one worker node on this machine, each a `ray start --block` process in its own
    session, so that stopping it stops exactly its node's processes."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.token = env["RAY_AUTH_TOKEN"]
        base = _port_block(300)
        self.gcs_port, self.dashboard_port = base, base + 1
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self._ports = {"head": base + 10, "worker": base + 20}
        self._worker_ports = {"head": base + 100, "worker": base + 200}
        self.procs: dict[str, subprocess.Popen] = {}
        # Ray processes that look for "the" cluster on this machine (address "auto") must find this
        # one, not another Ray instance that shares the machine
        self.env = env | {"RAY_ADDRESS": self.address}

    def _node_args(self, name: str) -> list[str]:
        p, w = self._ports[name], self._worker_ports[name]
        return [
            f"--num-cpus={CPUS_PER_NODE}",
            "--num-gpus=0",
            f"--node-name={name}",
            f"--temp-dir={self.root / name}",
            f"--node-manager-port={p}",
            f"--object-manager-port={p + 1}",
            f"--dashboard-agent-listen-port={p + 2}",
            f"--dashboard-agent-grpc-port={p + 3}",
            f"--runtime-env-agent-port={p + 4}",
            f"--metrics-export-port={p + 5}",
            f"--min-worker-port={w}",
            f"--max-worker-port={w + 99}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            "--block",
        ]

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 -- the process writes it until stopped
        self.procs[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", *args, *self._node_args(name)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",  # never exposed beyond this machine
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.gcs_port + 2}",
            ],
        )
        self._wait(lambda: self._get("/api/version") is not None, 180, "the head node's dashboard")
        self._start("worker", [f"--address={self.address}"])
        self._wait(lambda: len(self.alive_nodes()) == 2, 180, "both nodes ALIVE")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` of the {name} node exited ({proc.returncode}):\n{self.log(name)}")
            if ready():
                return
            time.sleep(1.0)
        raise TimeoutError(f"waited {timeout}s for {what}\n{self.log('head')}")

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    # -- the dashboard's HTTP API, with the token -------------------------------------------------
    def _get(self, path: str, token: str | None = "own"):
        req = urllib.request.Request(self.dashboard + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read() or b"null")
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def http_status(self, path: str, token: str | None) -> int:
        req = urllib.request.Request(self.dashboard + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `ray` CLI against this cluster, with its token."""
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def _list(self, kind: str, *filters: str) -> list[dict] | None:
        """`ray list KIND` as JSON; None when the API did not answer (it prints text when empty)."""
        args = ["list", kind, f"--address={self.dashboard}", "--format=json", "--detail", "--limit=10000"]
        r = self.ray(*args, *[a for f in filters for a in ("--filter", f)])
        if r.returncode != 0:
            return None
        return [] if r.stdout.startswith("No resource") else json.loads(r.stdout)

    def alive_nodes(self) -> list[dict]:
        return self._list("nodes", "state=ALIVE") or []

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(self, submission_id: str, entrypoint: str) -> None:
        runtime_env = {"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES}
        r = self.ray(
            "job",
            "submit",
            f"--address={self.dashboard}",
            f"--submission-id={submission_id}",
            f"--runtime-env-json={json.dumps(runtime_env)}",
            "--no-wait",
            "--",
            *shlex.split(entrypoint),
        )
        assert r.returncode == 0, f"ray job submit failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    def wait_job(self, submission_id: str, timeout: float) -> tuple[str, str]:
        """Poll the job until it ends; returns (status, the job's log)."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            info = self._get(f"/api/jobs/{submission_id}")
            status = info and info.get("status")
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2.0)
        else:
            self.ray("job", "stop", f"--address={self.dashboard}", submission_id)
        logs = self._get(f"/api/jobs/{submission_id}/logs") or {}
        return str(status), logs.get("logs", "")

    def actors(self, class_name: str) -> list[dict]:
        actors = self._list("actors", f"class_name={class_name}")
        assert actors is not None, "the state API did not answer"
        return actors

    # -- stop ---------------------------------------------------------------------------------------
    def _our_processes(self) -> list[int]:
        """Processes whose command line names this cluster's temp dirs or its GCS address."""
        marks = (str(self.root), f"127.0.0.1:{self.gcs_port}")
        ours = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if any(m in cmd for m in marks):
                ours.append(int(d.name))
        return ours

    def stop(self, grace_s: float = 45) -> list[int]:
        """Stop the worker node, then the head (each drains and stops its processes on SIGTERM), kill
        whatever is left of their process groups, and return the pids that still survive."""
        for name in ("worker", "head"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the session we started it in
            proc.wait(10)
        for pid in self._our_processes():  # anything that left the process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        return self._our_processes()


@pytest.fixture(scope="module")
def cluster(s3):
    """The two-node cluster, token auth on, with the S3 server's credentials on every node (as a
    production cluster has credentials from its instance role or a Kubernetes Secret)."""
    import ray._private.utils

    missing = ray._private.utils.get_dashboard_dependency_error()
    if missing:
        pytest.fail(
            f"the Ray Jobs API needs the dashboard, which needs ray[default] ({missing}); "
            "install ray[default,data,train] as pyproject.toml / constraints.txt pin it"
        )
    root = Path(tempfile.mkdtemp(prefix="vpmn-", dir="/tmp"))  # short: Unix socket paths are <= 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        # patience for a loaded CI machine: agents and raylets that start slowly are not failures
        "RAY_raylet_start_wait_time_s": "120",
        "RAY_agent_register_timeout_ms": "120000",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "VAEPIPE_LOG_LEVEL": "INFO",
    }
    c = TwoNodeCluster(root / "a", env)
    try:
        try:
            c.start()
        except (RuntimeError, TimeoutError) as first:
            # a heavily loaded machine can miss Ray's fixed 30 s window for a node to register: one
            # fresh try on new ports; a second failure is a failure
            leftover = c.stop()
            assert not leftover, f"processes of the failed start survived its stop: {leftover}"
            print(f"starting the cluster failed, trying once more: {str(first)[:2000]}")
            c = TwoNodeCluster(root / "b", env)
            c.start()
        yield c
    finally:
        survivors = c.stop()
        logs = {name: c.log(name, 2000) for name in ("head", "worker")}
        if not survivors and not os.environ.get("VAEPIPE_KEEP_CLUSTER_LOGS"):
            import shutil

            shutil.rmtree(root, ignore_errors=True)  # kept when something survived, for its logs
        assert not survivors, f"processes of the test cluster survived its stop: {survivors}\n{logs}"


# ---- the run -------------------------------------------------------------------------------------
def _s3fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")


def _parse(job: str, command: str):
    """The real parser of `vaepipe JOB` accepts the command line (exits 2 otherwise)."""
    import importlib

    argv = shlex.split(command)
    assert argv[:2] == ["vaepipe", job], command
    return importlib.import_module(f"jobs.{job}").build_parser().parse_args(argv[2:])


def test_train_and_score_as_jobs_on_two_nodes(cluster, s3):
    fs = _s3fs(s3)
    prefix = f"{BUCKET}/multinode-{secrets.token_hex(4)}"
    uri = f"s3://{prefix}"

    # token auth is really on: the API refuses a request without the token or with a wrong one
    assert cluster.http_status("/api/jobs/", None) in (401, 403)
    assert cluster.http_status("/api/jobs/", "not-the-token") in (401, 403)
    assert cluster.http_status("/api/jobs/", cluster.token) == 200
    nodes = cluster.alive_nodes()
    node_ids = {n["node_id"]: n["node_name"] for n in nodes}
    assert sorted(node_ids.values()) == ["head", "worker"]

    # the input: wine as two shards, and its spec, on S3
    table = pq.read_table(DATA / "wine" / "wine.parquet")
    half = table.num_rows // 2
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        pq.write_table(part, f"{prefix}/data/part-{i}.parquet", filesystem=fs)
    with fs.open_output_stream(f"{prefix}/wine.yaml") as f:
        f.write(dataset_spec("wine").to_yaml().encode())

    train_cmd = (
        f"vaepipe train --data {uri}/data --spec {uri}/wine.yaml --model-dir {uri}/model"
        f" --workers {TRAIN_WORKERS} --cpus-per-worker {CPUS_PER_TRAIN_WORKER} --epochs 1 --kl-warmup-epochs 0"
        " --latent-dim 4 --hidden 32 32 --batch-size 512 --seed 0 --reference-rows 500 --mc-samples 4"
        " --iw-samples 8 --max-failures 0"
    )
    score_cmd = (
        f"vaepipe score --data {uri}/data --model-dir {uri}/model --output {uri}/scores --run-date {RUN_DATE}"
        " --mc-samples 4 --iw-samples 8 --workers 2 --batch-size 1000"
    )
    train_args, score_args = _parse("train", train_cmd), _parse("score", score_cmd)
    assert (train_args.workers, train_args.cpus_per_worker) == (TRAIN_WORKERS, CPUS_PER_TRAIN_WORKER)
    assert score_args.run_date == RUN_DATE

    job = f"vp-{secrets.token_hex(3)}"

    t0 = time.monotonic()
    cluster.submit(f"{job}-train", train_cmd)
    status, train_log = cluster.wait_job(f"{job}-train", TRAIN_TIMEOUT_S)
    print(f"train job: {status} in {time.monotonic() - t0:.0f}s\n{train_log[-3000:]}")
    assert status == "SUCCEEDED", f"train job {status}:\n{train_log[-6000:]}"

    # the Ray Train workers ran on both nodes: the cluster's own record of the actors
    workers = cluster.actors("RayTrainWorker")
    placed = sorted(node_ids.get(a["node_id"], a["node_id"]) for a in workers)
    print(f"Ray Train workers by node: {placed}")
    assert len(workers) >= TRAIN_WORKERS
    assert set(placed) == {"head", "worker"}, placed

    t1 = time.monotonic()
    cluster.submit(f"{job}-score", score_cmd)
    status, score_log = cluster.wait_job(f"{job}-score", SCORE_TIMEOUT_S)
    print(f"score job: {status} in {time.monotonic() - t1:.0f}s\n{score_log[-3000:]}")
    assert status == "SUCCEEDED", f"score job {status}:\n{score_log[-6000:]}"

    for log in (train_log, score_log):
        assert cluster.token not in log, "the cluster token leaked into a job log"

    model_id = json.loads(fs.open_input_file(f"{prefix}/model/LATEST").read())["model_id"]  # the pointer
    check_scores_table(fs, f"{prefix}/scores", table, model_id, latent_dim=train_args.latent_dim)


# ---- the contract's invariants -------------------------------------------------------------------
def _read_files(fs: pafs.FileSystem, entries: list[dict]) -> pa.Table:
    """The files a manifest lists ({"file": URI, "rows": n}), each checked against its row count."""
    tables = []
    for e in entries:
        t = pq.read_table(io.BytesIO(fs.open_input_file(e["file"].removeprefix("s3://")).read()))
        assert t.num_rows == e["rows"], e
        tables.append(t)
    return pa.concat_tables(tables)


def check_scores_table(fs: pafs.FileSystem, root: str, source: pa.Table, model_id: str, latent_dim: int) -> None:
    part = f"{root}/dt={RUN_DATE}"
    assert fs.get_file_info(f"{part}/_SUCCESS").is_file, "no _SUCCESS in the partition"
    manifest = json.loads(fs.open_input_file(f"{part}/_manifest.json").read())
    assert manifest["model_id"] == model_id
    listed = {i.path for i in fs.get_file_info(pafs.FileSelector(part)) if i.path.endswith(".parquet")}
    assert listed == {e["file"].removeprefix("s3://") for e in manifest["output_files"]}
    scores = _read_files(fs, manifest["output_files"])
    quarantine = _read_files(fs, manifest["quarantine_files"])
    assert scores.num_rows > 0

    # rows reconciled: every input id exactly once, scored or quarantined
    ids = scores["record_id"].to_pylist() + quarantine["record_id"].to_pylist()
    assert len(ids) == len(set(ids)) == source.num_rows
    assert set(ids) == set(source["record_id"].to_pylist())

    recon = scores["recon_log_density"].to_numpy()
    kl = scores["kl"].to_numpy()
    elbo = scores["elbo"].to_numpy()
    log_marginal = scores["log_marginal"].to_numpy(zero_copy_only=False)
    for name, v in (("recon_log_density", recon), ("kl", kl), ("elbo", elbo), ("log_marginal", log_marginal)):
        assert np.isfinite(v).all(), f"{name} has NaN or inf"
    np.testing.assert_allclose(elbo, recon - kl, rtol=1e-12, atol=1e-9)
    assert (kl >= 0).all()
    assert log_marginal.mean() >= elbo.mean()

    for name in ("latent_mean", "latent_var"):
        col = scores[name]
        assert pa.types.is_fixed_size_list(col.type) and col.type.list_size == latent_dim, col.type
        assert col.type.value_type == pa.float32()
        flat = pc.list_flatten(col).to_numpy()
        assert np.isfinite(flat).all(), f"{name} has NaN or inf"
    assert (pc.list_flatten(scores["latent_var"]).to_numpy() > 0).all()

    # the per-column shares sum to recon_log_density; null only where the value is missing
    cld = scores["column_log_density"].combine_chunks()
    fields = [cld.field(i) for i in range(cld.type.num_fields)]
    total = np.zeros(scores.num_rows)
    for f in fields:
        v = f.to_numpy(zero_copy_only=False)
        present = ~np.isnan(v)
        assert np.isfinite(v[present]).all()
        total += np.where(present, v, 0.0)
    np.testing.assert_allclose(total, recon, rtol=1e-6, atol=1e-6)
    n_obs = scores["n_observed"].to_numpy()
    assert scores["n_observed"].type == pa.int32()
    assert ((n_obs >= 1) & (n_obs <= len(fields))).all()
    assert set(scores["model_id"].to_pylist()) == {model_id}
    print(f"scores: {scores.num_rows} rows scored, {quarantine.num_rows} quarantined, model {model_id}")
