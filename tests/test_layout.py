"""Import direction: the model core and io import no Ray; nothing in pipeline/ imports jobs; the core
never imports the Ray layers (pipeline.train, pipeline.score)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import without_package

ROOT = Path(__file__).resolve().parents[1]
NO_RAY_PACKAGES = ["pipeline/core", "pipeline/io", "schemas"]


def modules_under(rel: str) -> list[str]:
    base = ROOT / rel
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module an import statement in the file names (absolute imports; relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_listing_sees_the_packages():
    core = modules_under("pipeline/core")
    assert {"pipeline.core.model", "pipeline.core.likelihoods.base", "pipeline.io.storage"} <= set(
        core + modules_under("pipeline/io")
    )


def test_core_io_and_schemas_import_without_ray():
    modules = [m for rel in NO_RAY_PACKAGES for m in modules_under(rel)]
    assert len(modules) > 10
    code = without_package("ray") + f"""
import importlib
for name in {modules!r}:
    importlib.import_module(name)
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray was imported"
print("ok", len({modules!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_the_drivers_that_build_no_model_import_no_torch():
    """The scoring driver (which reads the model's description; its workers build the model), the drift
    check, query and report start without torch: about 2 s of CPU and 200 MB each (the scoring job's run
    itself is tested without torch in tests/test_score_job.py)."""
    code = without_package("torch") + """
import importlib

for name in ["jobs.score", "jobs.check", "jobs.query", "jobs.report", "pipeline.score.run", "pipeline.score.settings",
             "pipeline.core.artifact", "pipeline.core.defaults", "pipeline.check"]:
    importlib.import_module(name)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_imports_point_one_way():
    offences = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name in imported_modules(path):
            if name == "jobs" or name.startswith("jobs."):
                offences.append(f"{rel} imports {name}")
            if rel.startswith("pipeline/core/") and name.startswith(("pipeline.train", "pipeline.score", "ray")):
                offences.append(f"{rel} imports {name}")
    assert not offences, "\n".join(offences)


def test_the_check_sees_an_offending_import(tmp_path):
    """The ast walk finds plain, from- and function-local imports (else the test above proves nothing)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.score import publish\n    import jobs.score\n")
    probe.write_text(probe.read_text() + "    from ..train import loop\n")
    found = imported_modules(probe, package="pipeline.core")
    assert {"pipeline.score.publish", "jobs.score", "pipeline.train.loop"} <= found
