"""infra/dagster/vaepipe_dag.py, loaded by Dagster itself: its jobs, schedules and the gate, and one day run
in process (real vaepipe commands, joining the session's Ray instance): drift fails the check step and the
report after it does not run; a day like the training data gets its report."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

dagster = pytest.importorskip("dagster")

ROOT = Path(__file__).parent.parent
DAG = ROOT / "infra" / "dagster" / "vaepipe_dag.py"


@pytest.fixture(scope="module")
def dag():
    spec = importlib.util.spec_from_file_location("vaepipe_dag", DAG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upstream(job_def, node: str) -> set[str]:
    deps = job_def.graph.dependency_structure
    return {out.node_name for outs in deps.input_to_upstream_outputs_for_node(node).values() for out in outs}


def test_jobs_schedules_and_the_gate(dag):
    defs = dag.defs
    daily = defs.resolve_job_def("vaepipe_daily_score")
    weekly = defs.resolve_job_def("vaepipe_weekly_train")
    assert upstream(daily, "check_day") == {"score_day"} and upstream(daily, "report_day") == {"check_day"}
    assert upstream(weekly, "promote_model") == {"train_model"}
    assert isinstance(daily.partitions_def, dagster.DailyPartitionsDefinition)
    crons = {s.job_name: s.cron_schedule for s in defs.schedules}
    assert crons == {"vaepipe_weekly_train": "0 2 * * 1", "vaepipe_daily_score": "0 5 * * *"}


def test_a_day_runs_and_drift_stops_the_report(dag, adult_model, ray_local, tmp_path, monkeypatch):
    # the commands join this session's Ray instance
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    table = pq.read_table(DATA / "adult" / "adult.parquet").slice(0, 1500)
    rng = np.random.default_rng(0)
    drifted = pa.table({c: table.column(c) if c == "record_id" else table.column(c).take(rng.permutation(1500))
                        for c in table.column_names})  # fmt: skip
    for day, t in (("2026-03-01", table), ("2026-03-02", drifted)):
        (tmp_path / "in" / day).mkdir(parents=True)
        pq.write_table(t, tmp_path / "in" / day / "part-0.parquet")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "CURRENT").write_text(adult_model + "\n")
    resource = dag.Vaepipe(
        incoming=str(tmp_path / "in" / "{date}"),
        model_root=str(tmp_path / "models"),
        scores=str(tmp_path / "scores"),
        reports=str(tmp_path / "reports"),
        command=f"{sys.executable} -m pipeline.cli",
        score_args="--workers 1 --mc-samples 4 --iw-samples 16",
    )
    job = dag.defs.resolve_job_def("vaepipe_daily_score")

    ok = job.execute_in_process(partition_key="2026-03-01", resources={"vaepipe": resource})
    assert ok.success
    assert (tmp_path / "reports" / "report-2026-03-01.html").exists()

    bad = job.execute_in_process(partition_key="2026-03-02", resources={"vaepipe": resource}, raise_on_error=False)
    assert not bad.success
    steps = {e.step_key: e.event_type_value for e in bad.all_events if e.step_key}
    assert steps["score_day"] == "STEP_SUCCESS" and steps["check_day"] == "STEP_FAILURE"
    assert "report_day" not in steps or steps["report_day"] != "STEP_SUCCESS"
    assert not (tmp_path / "reports" / "report-2026-03-02.html").exists()
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    assert "exited 4" in str(failure.event_specific_data.error.message) or "drift" in str(failure.event_specific_data)
    assert os.path.isdir(tmp_path / "scores" / "dt=2026-03-02")  # the scores are there, gated, not lost
