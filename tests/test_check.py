"""vaepipe check and its statistics; the run summary (--summary-json) and the log format of every job.

The KS distance and its p-value are checked against scipy.stats; the job runs on real scoring runs of
the session's adult model: one of records like its training data, one of drifted records.
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
import scipy.stats
from conftest import DATA

from jobs import check, score
from pipeline import api, summary
from pipeline.check import REFERENCE_PROBS, compare, kolmogorov_sf, ks_statistic, reference_cdf, share_below

ADULT = DATA / "adult" / "adult.parquet"
ROOT = Path(__file__).parent.parent


# ---- statistics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shift,scale,ties", [(0.0, 1.0, False), (0.3, 1.0, False), (0.0, 2.0, False), (0.5, 1.0, True)]
)
def test_ks_against_the_stored_quantiles_matches_scipy_two_sample(shift, scale, ties):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=3000)
    run = rng.normal(shift, scale, size=5000)
    if ties:  # values on a grid: atoms in both samples
        ref, run = np.round(ref, 1), np.round(run, 1)
    quantiles = np.quantile(ref, REFERENCE_PROBS)
    d = ks_statistic(run, quantiles, REFERENCE_PROBS)
    expected = scipy.stats.ks_2samp(run, ref).statistic
    # the 1001 quantiles summarise the reference sample to within 0.1% of probability per step
    assert d == pytest.approx(expected, abs=0.002 + 1 / len(ref))


def test_ks_is_exact_for_the_interpolated_reference():
    """Against the continuous CDF the quantiles define, the statistic is scipy's one-sample KS."""
    probs = REFERENCE_PROBS
    quantiles = scipy.stats.norm.ppf(np.clip(probs, 1e-9, 1 - 1e-9))
    run = np.random.default_rng(2).normal(0.2, 1.0, size=4000)

    def cdf(x):
        return reference_cdf(np.atleast_1d(x), quantiles, probs)[0]

    assert ks_statistic(run, quantiles, probs) == pytest.approx(scipy.stats.kstest(run, cdf).statistic, abs=1e-12)


def test_kolmogorov_distribution_matches_scipy():
    for x in (0.1, 0.3, 0.5, 0.8, 1.0, 1.36, 2.0, 3.0):
        assert kolmogorov_sf(x) == pytest.approx(scipy.stats.kstwobign.sf(x), abs=1e-12)


def test_compare_names_each_threshold_passed():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=2000)
    reference = {"rows": 2000, "quantile_probs": list(REFERENCE_PROBS),
                 "log_marginal": {"quantiles": list(np.quantile(ref, REFERENCE_PROBS))}}  # fmt: skip
    ok = compare(rng.normal(size=5000), reference, 0.005, 0.03, 0.1)
    assert not ok.drift and ok.below_1 == pytest.approx(0.01, abs=0.006)
    tail = np.concatenate([rng.normal(size=4800), np.full(200, -10.0)])  # 4% far below everything
    bad = compare(tail, reference, 0.005, 0.03, 0.1)
    assert bad.drift and len(bad.failures) == 2 and "0.1% quantile" in bad.failures[0]
    assert bad.below_01 == pytest.approx(share_below(tail, np.quantile(ref, 0.001)))
    assert compare(tail + 2.0, reference, 1, 1, 0.1).failures[0].startswith("KS distance")


# ---- the job --------------------------------------------------------------------------------------------
def drifted(table: pa.Table) -> pa.Table:
    """Each column shuffled on its own: every value ordinary, their combinations not."""
    rng = np.random.default_rng(0)
    cols = {c: table.column(c).take(rng.permutation(table.num_rows)) for c in table.column_names if c != "record_id"}
    return pa.table({"record_id": table.column("record_id"), **cols})


@pytest.fixture(scope="module")
def runs(adult_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    table = pq.read_table(ADULT).slice(0, 3000)
    pq.write_table(table, root / "same.parquet")
    pq.write_table(drifted(table), root / "drifted.parquet")
    out = root / "scores"
    for name, date in (("same", "2026-01-01"), ("drifted", "2026-01-02")):
        # the reference's own sample counts (mc 4, iw 16)
        args = ["--data", str(root / f"{name}.parquet"), "--model-dir", adult_model, "--output", str(out)]
        assert score.main([*args, "--run-date", date, "--mc-samples", "4", "--iw-samples", "16"]) == 0
    return root, out


def test_check_passes_like_data_and_exits_4_on_drift(runs, adult_model, capsys):
    root, out = runs
    base = ["--scores", str(out), "--model-dir", adult_model]
    assert check.main([*base, "--run-date", "2026-01-01", "--summary-json", str(root / "ok.json")]) == 0
    printed = capsys.readouterr().out
    assert "no drift" in printed and "KS distance" in printed
    ok = json.loads((root / "ok.json").read_text())
    assert ok["status"] == "succeeded" and ok["exit_code"] == 0 and ok["rows_in"] == 3000
    assert ok["check"]["ks"] < 0.1 and not ok["check"]["drift"]

    assert check.main([*base, "--run-date", "2026-01-02", "--summary-json", str(root / "bad.json")]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: drift: ") and "KS distance to the reference log_marginal is" in err
    bad = json.loads((root / "bad.json").read_text())
    assert bad["status"] == "failed" and bad["exit_code"] == 4 and bad["error"].startswith("drift:")
    assert bad["check"]["ks"] > 0.1 and bad["check"]["share_below_q1%"] > ok["check"]["share_below_q1%"]

    # thresholds are the user's: loose enough, the same run passes
    assert check.main([*base, "--run-date", "2026-01-02", "--max-below-01", "1", "--max-below-1", "1",
                       "--max-ks", "1"]) == 0  # fmt: skip
    with pytest.raises(api.DriftDetected) as e:
        api.check(scores=str(out), model_dir=adult_model, run_date="2026-01-02")
    assert e.value.summary["check"]["drift"]
    assert check.main([*base, "--run-date", "2026-01-03"]) == 3  # no such partition


def test_score_summary_json_on_success_and_failure(runs, adult_model):
    root, out = runs
    path = root / "score.json"
    args = ["--data", str(root / "same.parquet"), "--model-dir", adult_model, "--output", str(out)]
    assert score.main([*args, "--run-date", "2026-01-05", "--iw-samples", "4", "--summary-json", str(path)]) == 0
    s = json.loads(path.read_text())
    assert (s["command"], s["status"], s["exit_code"], s["error"]) == ("score", "succeeded", 0, None)
    assert (s["rows_in"], s["scored_rows"], s["quarantined_rows"]) == (3000, 3000, 0)
    assert s["run_id"] in (out / "dt=2026-01-05" / "_manifest.json").read_text()
    assert s["output_uri"] == str(out) and s["model_uri"] == adult_model and s["seconds"] > 0
    assert s["started_at"].endswith(("+00:00", "Z")) or s["started_at"][-6] in "+-"  # ISO 8601 with offset

    # a failure the job itself reports (exit 3), and one the command-line parser reports (exit 2)
    assert score.main(["--data", str(root / "nope.parquet"), *args[2:], "--summary-json", str(path)]) == 3
    s = json.loads(path.read_text())
    assert (s["status"], s["exit_code"]) == ("failed", 3) and "nope.parquet" in s["error"]
    with pytest.raises(SystemExit):
        score.main(["--model-dir", adult_model, "--summary-json", str(path)])
    s = json.loads(path.read_text())
    assert (s["status"], s["exit_code"]) == ("failed", 2) and "--data" in s["error"]


# ---- logs -----------------------------------------------------------------------------------------------
def test_log_lines_carry_date_and_offset_as_text_or_json(tmp_path):
    env = dict(os.environ, TZ="Asia/Kolkata", PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "jobs.check", "--scores", str(tmp_path), "--model-dir", str(tmp_path / "m"),
            "--run-date", "2026-01-01"]  # fmt: skip
    for fmt in ("json", "text"):
        p = subprocess.run([*base, "--log-format", fmt], env=env, capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2, p.stderr  # no model there
        line = next(ln for ln in p.stderr.splitlines() if "checking the run" in ln)
        if fmt == "json":
            rec = json.loads(line)
            stamp = rec["time"]
            assert rec["level"] == "INFO" and rec["logger"] == "vaepipe.check" and rec["run_id"]
        else:
            stamp = line.split(" ", 1)[0]
        assert stamp.endswith("+05:30") and stamp[4] == "-" and stamp[10] == "T"
    assert summary.iso_time(0.0)[:4] in ("1970", "1969")
