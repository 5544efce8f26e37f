"""Packaging: pyproject.toml gives compatible ranges whose lower bounds are constraints.txt's exact lock
(what CI, the images and the README install), and `pip install .` keeps the other patch releases an
environment already holds instead of replacing them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = {
    m.group(1).lower().replace("_", "-"): m.group(2)
    for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
}


def requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("vaepipe")]
    return reqs


@pytest.mark.parametrize("req", requirements(), ids=str)
def test_ranges_start_at_the_lock(req):
    name = req.name.lower().replace("_", "-")
    assert name in LOCK, f"{name} is not locked in constraints.txt"
    specs = {s.operator: s.version for s in req.specifier}
    assert "==" not in specs, f"{req}: a range, not a pin"
    assert specs.get(">=") == LOCK[name], f"{req}: the lower bound is the locked (tested) version {LOCK[name]}"
    assert req.specifier.contains(LOCK[name], prereleases=True)
    assert "<" in specs or name == "s3fs", f"{req}: an upper bound (s3fs is calendar-versioned, tied to fsspec)"


def test_the_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {Requirement(r).name for r in extras["iceberg"]} == {"pyiceberg"}
    assert "vaepipe[iceberg]" in extras["test"]


def test_torch_stays_locked_at_the_cpu_wheel_release():
    assert LOCK["torch"] == "2.13.0"
    torch = next(r for r in requirements() if r.name == "torch")
    assert torch.specifier.contains("2.13.5") and not torch.specifier.contains("2.14.0")


@pytest.mark.slow
def test_pip_install_keeps_the_patch_releases_an_environment_holds(tmp_path):
    """A fresh environment holding newer patch releases than the lock (PyYAML 6.0.4, DuckDB 2.0.1): pip's
    resolver installs vaepipe beside them without replacing either (a dry run: nothing is downloaded
    beyond metadata, so this takes about a minute)."""
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    pip = [str(env / "bin" / "python"), "-m", "pip"]
    held = {"pyyaml": "6.0.4", "duckdb": "2.0.1"}
    assert all(LOCK[k] != v for k, v in held.items())
    subprocess.run([*pip, "install", "-q", *(f"{k}=={v}" for k, v in held.items())], check=True)
    report = tmp_path / "report.json"
    subprocess.run([*pip, "install", "--dry-run", "-q", "--report", str(report), str(REPO)], check=True, cwd=tmp_path)
    install = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert "vaepipe" in install
    assert not set(held) & set(install), f"pip would replace {set(held) & set(install)}"
    # what it does install satisfies the ranges
    for req in (Requirement(r) for r in PYPROJECT["project"]["dependencies"]):
        version = install.get(req.name.lower())
        if version is not None:
            assert req.specifier.contains(version.split("+")[0]), (req, version)
    assert sys.version_info >= (3, 11)
