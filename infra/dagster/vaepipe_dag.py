"""A daily vaepipe schedule for Dagster: train weekly, score every day, gate the day's downstream steps on
``vaepipe check``.

* job ``vaepipe_weekly_train`` (Mondays 02:00 UTC): ``vaepipe train`` on the history into
  ``MODEL_ROOT/<ISO week>`` and, when it succeeds, points ``MODEL_ROOT/CURRENT`` at it;
* job ``vaepipe_daily_score`` (daily partitions, 05:00 UTC for the previous day): ``vaepipe score`` of
  that day's input with the current model into the scores table partition ``dt=<day>``, then
  ``vaepipe check`` of that partition against the model's validation reference, then ``vaepipe report``
  -- which, with whatever you add after it, runs only when the check passed: exit 4 (drift) fails the
  check step and Dagster skips everything downstream of it.

Each step runs the ``vaepipe`` command (a local Ray instance, or the cluster named by ``RAY_ADDRESS``
in the run worker's environment) with ``--summary-json``, and attaches the summary to the step's
output metadata (rows in, scored, quarantined, run id, seconds) for the Dagster UI.

Load with ``dagster dev -f infra/dagster/vaepipe_dag.py``; configure through the ``vaepipe`` resource
(or the ``VAEPIPE_*`` environment variables it defaults to).
"""

# no `from __future__ import annotations`: Dagster reads the op signatures' annotations at definition time
import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from dagster import (
    ConfigurableResource,
    DailyPartitionsDefinition,
    Definitions,
    Failure,
    In,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    ScheduleDefinition,
    build_schedule_from_partitioned_job,
    job,
    op,
)

DRIFT_EXIT_CODE = 4


class Vaepipe(ConfigurableResource):
    """Where things live (local paths or s3://) and how the commands run."""

    history: str = os.environ.get("VAEPIPE_HISTORY", "s3://bucket/history/")
    incoming: str = os.environ.get("VAEPIPE_INCOMING", "s3://bucket/incoming/{date}/")  # {date}: the run date
    spec: str = os.environ.get("VAEPIPE_SPEC", "s3://bucket/spec.yaml")
    model_root: str = os.environ.get("VAEPIPE_MODEL_ROOT", "s3://bucket/models")
    scores: str = os.environ.get("VAEPIPE_SCORES", "s3://bucket/scores")
    reports: str = os.environ.get("VAEPIPE_REPORTS", "/tmp/vaepipe-reports")
    command: str = os.environ.get("VAEPIPE_COMMAND", "vaepipe")  # e.g. "python -m pipeline.cli"
    train_args: str = os.environ.get("VAEPIPE_TRAIN_ARGS", "--workers 2")
    score_args: str = os.environ.get("VAEPIPE_SCORE_ARGS", "--workers 2")
    check_args: str = os.environ.get("VAEPIPE_CHECK_ARGS", "")  # thresholds: --max-ks 0.1 ...

    def run(self, context: OpExecutionContext, subcommand: str, *args: str) -> dict:
        """Run one vaepipe command; -> its run summary. A non-zero exit fails the step with the summary's error."""
        with tempfile.TemporaryDirectory(prefix="vaepipe-") as d:
            path = Path(d) / "summary.json"
            argv = [*shlex.split(self.command), subcommand, *args, "--summary-json", str(path), "--log-format", "json"]
            context.log.info("running %s", shlex.join(argv))
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            summary = json.loads(path.read_text()) if path.exists() else {"exit_code": proc.returncode}
        for line in proc.stdout.splitlines():
            context.log.info(line)
        meta = {k: v for k, v in summary.items() if isinstance(v, int | float | str) and v is not None}
        if proc.returncode != 0:
            raise Failure(
                description=f"vaepipe {subcommand} exited {proc.returncode}: "
                + (summary.get("error") or proc.stderr[-2000:]),
                metadata={"exit_code": proc.returncode, "drift": proc.returncode == DRIFT_EXIT_CODE, **meta},
            )
        context.add_output_metadata({"summary": MetadataValue.json(summary)})
        return summary

    def current_model(self) -> str:
        """The model the daily scoring uses: MODEL_ROOT/CURRENT names it (written by the weekly training)."""
        from pipeline.io import storage

        return storage.read_text(storage.join(self.model_root, "CURRENT")).strip()


# ---- weekly training ------------------------------------------------------------------------------------
@op(out=Out(str))
def train_model(context: OpExecutionContext, vaepipe: Vaepipe) -> str:
    """vaepipe train into MODEL_ROOT/<ISO year-week>; -> the model dir."""
    import datetime as dt

    from pipeline.io import storage

    week = dt.date.today().isocalendar()
    model_dir = storage.join(vaepipe.model_root, f"{week.year}-W{week.week:02d}")
    vaepipe.run(context, "train", "--data", vaepipe.history, "--spec", vaepipe.spec, "--model-dir", model_dir,
                *shlex.split(vaepipe.train_args))  # fmt: skip
    return model_dir


@op(ins={"model_dir": In(str)})
def promote_model(context: OpExecutionContext, vaepipe: Vaepipe, model_dir: str) -> None:
    """Point MODEL_ROOT/CURRENT at the new model (one small object written last: the switch)."""
    from pipeline.io import storage

    storage.write_text(storage.join(vaepipe.model_root, "CURRENT"), model_dir + "\n")
    context.log.info("current model: %s", model_dir)


@job(description="vaepipe train on the history, then make it the model the daily scoring uses")
def vaepipe_weekly_train():
    promote_model(train_model())


# ---- daily scoring, gated on the check --------------------------------------------------------------------
daily = DailyPartitionsDefinition(start_date="2026-01-01", timezone="UTC")


@op(out=Out(str))
def score_day(context: OpExecutionContext, vaepipe: Vaepipe) -> str:
    """vaepipe score of the partition's day with the current model; -> the model dir it used."""
    day = context.partition_key
    model_dir = vaepipe.current_model()
    vaepipe.run(context, "score", "--data", vaepipe.incoming.format(date=day), "--model-dir", model_dir,
                "--output", vaepipe.scores, "--run-date", day, *shlex.split(vaepipe.score_args))  # fmt: skip
    return model_dir


@op(ins={"model_dir": In(str)}, out=Out(str))
def check_day(context: OpExecutionContext, vaepipe: Vaepipe, model_dir: str) -> str:
    """vaepipe check: exit 4 (drift) fails this step, and nothing downstream runs."""
    day = context.partition_key
    vaepipe.run(context, "check", "--scores", vaepipe.scores, "--model-dir", model_dir, "--run-date", day,
                *shlex.split(vaepipe.check_args))  # fmt: skip
    return model_dir


@op(ins={"model_dir": In(str)}, out=Out(Nothing))
def report_day(context: OpExecutionContext, vaepipe: Vaepipe, model_dir: str) -> None:
    """The day's HTML report (downstream consumers of the scores go beside or after this step)."""
    day = context.partition_key
    out = str(Path(vaepipe.reports) / f"report-{day}.html")
    Path(vaepipe.reports).mkdir(parents=True, exist_ok=True)
    vaepipe.run(context, "report", "--model-dir", model_dir, "--scores", vaepipe.scores, "--run-date", day,
                "--out", out)  # fmt: skip


@job(partitions_def=daily, description="vaepipe score of one day, gated on vaepipe check, then the report")
def vaepipe_daily_score():
    report_day(check_day(score_day()))


defs = Definitions(
    jobs=[vaepipe_weekly_train, vaepipe_daily_score],
    schedules=[
        ScheduleDefinition(job=vaepipe_weekly_train, cron_schedule="0 2 * * 1", execution_timezone="UTC"),
        build_schedule_from_partitioned_job(vaepipe_daily_score, hour_of_day=5),
    ],
    resources={"vaepipe": Vaepipe()},
)
