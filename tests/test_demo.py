"""vaepipe demo end to end, at a reduced size: generate, train (2 Ray Train workers), score, evaluate,
report; it must find its planted anomalies, and the query lines it prints must work as printed."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import demo, query
from pipeline import synthetic

SMALL = ["--history-rows", "4000", "--incoming-rows", "2000", "--epochs", "4"]


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    """One demo run in a workdir that already holds a previous run's outputs (a stale partition and
    model file), so the run shows that a re-run replaces its outputs cleanly."""
    work = tmp_path_factory.mktemp("demo") / "work"
    stale = work / "scores" / "dt=1999-01-01"
    stale.mkdir(parents=True)
    (stale / "part-0.parquet").write_bytes(b"stale")
    (stale / "_SUCCESS").write_text("")
    (work / "model").mkdir()
    (work / "model" / "stale.txt").write_text("from an earlier run")
    (work / demo.MARKER).write_text("")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = demo.main(["--workdir", str(work), *SMALL])
    return {"rc": rc, "out": out.getvalue(), "work": work}


def test_demo_finds_its_planted_anomalies(demo_run):
    assert demo_run["rc"] == 0, demo_run["out"]
    out = demo_run["out"]
    print(out)  # shown by pytest on failure, and with -s
    m = re.search(r"How the (\d+) planted anomalies ranked among ([\d,]+) scored rows", out)
    n_anom, n_rows = int(m.group(1)), int(m.group(2).replace(",", ""))
    assert n_rows == 2000 - 3 and n_anom == 40
    ap = {k: float(v) for k, v in re.findall(r"by (elbo|log_marginal) ([0-9.]+)", out)}
    fraction = n_anom / n_rows
    assert set(ap) == {"elbo", "log_marginal"}
    assert min(ap.values()) > 5 * fraction, f"average precision {ap} not well above the anomaly fraction {fraction}"
    # out-of-range values are the easiest kind: most of them rank among the top n_anom
    row = re.search(r"out_of_range\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert int(row.group(2)) >= int(row.group(1)) * 0.6
    assert "planted invalid rows found in quarantine: 3 of 3" in out
    assert "rows scored: 1,997   quarantined: 3" in out


def test_demo_replaced_its_previous_outputs(demo_run):
    work = demo_run["work"]
    assert not (work / "scores" / "dt=1999-01-01").exists()
    assert not (work / "model" / "stale.txt").exists()
    partitions = sorted(p for p in os.listdir(work / "scores") if p.startswith("dt="))
    assert len(partitions) == 1
    assert (work / "report.html").stat().st_size > 50_000
    labels = pq.read_table(work / "labels" / "planted_anomalies.parquet")
    assert labels.num_rows == 43 and set(labels.column("kind").to_pylist()) == {*synthetic.ANOMALY_KINDS, "invalid"}
    # the labels are kept apart from the data that is scored
    assert not any("labels" in str(p) or "kind" in pq.read_schema(p).names for p in (work / "incoming").iterdir())


def test_printed_query_lines_run_as_printed(demo_run, capsys):
    lines = demo_run["out"].splitlines()
    shell = [ln.strip() for ln in lines if ln.strip().startswith("python -c ")]
    assert len(shell) == 2  # polars, DuckDB
    expected_top = _lowest_log_marginal(demo_run["work"] / "scores")
    for cmd in shell:
        cmd = sys.executable + cmd[len("python") :]
        res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        assert str(expected_top) in res.stdout, res.stdout
    vq = [ln.strip() for ln in lines if ln.strip().startswith("vaepipe query ")]
    assert len(vq) == 2
    capsys.readouterr()
    for cmd in vq:
        assert query.main(shlex.split(cmd)[2:]) == 0
    printed = capsys.readouterr().out
    assert str(expected_top) in printed and "mean_elbo" in printed


def _lowest_log_marginal(scores_dir) -> int:
    t = query.run_sql(str(scores_dir), "SELECT record_id FROM scores ORDER BY log_marginal LIMIT 1")
    return t.column("record_id")[0].as_py()


def test_workdir_of_someone_else_is_refused(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("not the demo's")
    assert demo.main(["--workdir", str(tmp_path), *SMALL]) == 2
    assert "not empty and was not made by vaepipe demo" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "not the demo's"


def test_average_precision_exact_values():
    pos = np.array([True, False, True, False])
    assert demo.average_precision(np.array([1.0, 2.0, 3.0, 4.0]), pos) == pytest.approx((1 + 2 / 3) / 2)
    assert demo.average_precision(np.array([4.0, 3.0, 2.0, 1.0]), pos) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert demo.average_precision(np.array([1.0, 3.0, 2.0, 4.0]), pos) == pytest.approx(1.0)
