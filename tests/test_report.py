"""vaepipe report on a small real run: the adult_model fixture (the train job) scored by the score job."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import report as report_job
from pipeline import report
from pipeline.core import artifact

DATA = Path(__file__).parent / "data"
RUN_DATE = "2026-11-23"
ROWS = 3000


class _Page(HTMLParser):
    """Collects tags, <img> sources and headings; fails on unbalanced structural tags."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.headings, self.rows = [], [], [], 0
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "tr":
            self.rows += 1
        if tag not in self.VOID:
            self.stack.append(tag)
        self._in_heading = tag in ("h1", "h2")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()
        self._in_heading = False

    def handle_data(self, data):
        if self._in_heading and data.strip():
            self.headings.append(data.strip())


@pytest.fixture(scope="module")
def adult_run(adult_model, tmp_path_factory):
    """The first ROWS adult records scored by the score job into a scores table."""
    from jobs import score

    root = tmp_path_factory.mktemp("adult_run")
    data = root / "adult_head.parquet"
    pq.write_table(pq.read_table(DATA / "adult" / "adult.parquet").slice(0, ROWS), data)
    scores = str(root / "scores")
    argv = ["--data", str(data), "--model-dir", adult_model, "--output", scores, "--run-date", RUN_DATE]
    assert score.main([*argv, "--workers", "1", "--mc-samples", "4", "--iw-samples", "16"]) == 0
    return {"model_dir": adult_model, "scores": scores, "data": str(data), "root": root}


@pytest.fixture(scope="module")
def adult_report(adult_run):
    out = adult_run["root"] / "report.html"
    argv = ["--model-dir", adult_run["model_dir"], "--scores", adult_run["scores"], "--out", str(out)]
    assert report_job.main([*argv, "--top", "12", "--data", adult_run["data"]]) == 0
    return out


def test_report_is_one_valid_page_whose_images_all_decode(adult_report):
    from PIL import Image

    text = adult_report.read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert page.stack == [], f"unclosed tags {page.stack}"
    for section in (
        "Summary",
        "Training curves",
        "This run against the validation reference",
        "Top 12 anomalies",
        "Latent space",
        "Per-column average log-density",
    ):
        assert section in page.headings
    # self-contained: nothing fetched from elsewhere
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert len(page.images) == 5  # curves, histograms, anomaly heatmap, latent, columns
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img.get("alt")
        im = Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix) :], validate=True)))
        im.load()
        assert im.format == "PNG" and im.width > 300 and im.height > 150
        pixels = np.asarray(im.convert("L"), dtype=float)
        assert pixels.std() > 10, f"{img['alt']} is blank"
    # the anomalies table: header + 12 rows, plus the summary rows
    assert page.rows >= 13 + 6


def test_report_content_matches_the_run(adult_run, adult_report):
    import json

    text = adult_report.read_text()
    with open(artifact.meta_path(adult_run["model_dir"])) as f:
        meta = json.load(f)
    assert meta["model_id"] in text
    assert f"{ROWS - _quarantined(adult_run):,}" in text  # rows scored
    table = pq.ParquetDataset(os.path.join(adult_run["scores"], f"dt={RUN_DATE}")).read()
    run = report.run_scores(table, ["record_id"])
    top = report.top_anomalies(run, 12)
    # the least likely record heads the table, and its ranking score is the minimum of the run
    assert top[0].log_marginal == pytest.approx(float(np.min(run.log_marginal)))
    assert f'<td class="num">{top[0].ids["record_id"]}</td>' in text
    culprit, deficit = top[0].culprits(1, threshold=0.0)[0]
    assert deficit < 0 and f"{culprit} {deficit:+.1f}" in text


def _quarantined(run) -> int:
    qdir = os.path.join(run["scores"], "_quarantine", f"dt={RUN_DATE}")
    return sum(pq.read_metadata(os.path.join(qdir, f)).num_rows for f in os.listdir(qdir) if f.endswith(".parquet"))


@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"),
    reason="Debian's chromium package is not installed (.ci/run installs it; in CI this test never skips)",
)
def test_report_renders_in_headless_chromium(adult_report, tmp_path):
    from PIL import Image

    assert shutil.which("chromium"), "CI installs Debian's chromium (.ci/run)"
    base = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    # the DOM as the browser built it, after layout and image decoding: every plot decoded to real pixels
    probe = tmp_path / "probe.html"
    probe.write_text(
        adult_report.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
            " document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
            " document.body.dataset.images = imgs.length;"
            " document.body.dataset.height = document.documentElement.scrollHeight; });</script></body>",
        )
    )
    dom = subprocess.run(
        [*base, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        check=True, timeout=120, capture_output=True, text=True,
    ).stdout  # fmt: skip
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body))
    assert int(attrs["images"]) >= 4 and attrs["decoded"] == attrs["images"], attrs
    assert int(attrs["height"]) > 2000, attrs  # laid out as a long page, not an error page

    shot = tmp_path / "shot.png"
    cmd = [*base, "--hide-scrollbars", "--window-size=1280,4000", f"--screenshot={shot}", adult_report.as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    im = Image.open(shot).convert("L")
    px = np.asarray(im, dtype=float)
    assert im.size == (1280, 4000)
    # rendered content (text and plots) all the way down the first 3500 px, not a blank or error page
    for band in range(0, 3500, 500):
        assert px[band : band + 500].std() > 5, f"rows {band}-{band + 500} of the screenshot are blank"


def test_missing_model_is_usage_error_and_missing_scores_input_error(adult_run, tmp_path, capsys):
    out = str(tmp_path / "r.html")
    assert report_job.main(["--model-dir", str(tmp_path / "none"), "--scores", adult_run["scores"], "--out", out]) == 2
    assert "no model" in capsys.readouterr().err
    rc = report_job.main(["--model-dir", adult_run["model_dir"], "--scores", str(tmp_path / "none"), "--out", out])
    assert rc == 3
    rc = report_job.main(
        ["--model-dir", adult_run["model_dir"], "--scores", adult_run["scores"], "--run-date", "1999-01-01",
         "--out", out]
    )  # fmt: skip
    assert rc == 3 and not os.path.exists(out)


# ---- the pieces, on small exact inputs --------------------------------------------------------------
def test_reference_density_integrates_to_one_and_merges_close_quantiles():
    probs = np.linspace(0, 1, 101)
    q = np.quantile(np.random.default_rng(0).standard_normal(500), probs)
    edges, dens = report.reference_density({"quantiles": q.tolist(), "quantile_probs": probs.tolist()})
    assert float((np.diff(edges) * dens).sum()) == pytest.approx(1.0)
    assert edges[0] == q[0] and edges[-1] == q[-1] and len(edges) <= 27
    assert report.reference_density({"quantiles": [1.0], "quantile_probs": [0.5]}) is None


def test_project_2d_is_pca_for_more_than_two_dims():
    rng = np.random.default_rng(1)
    z = np.column_stack([10 * rng.standard_normal(400), rng.standard_normal(400), 0.1 * rng.standard_normal(400)])
    xy, xl, _ = report.project_2d(z)
    assert xy.shape == (400, 2) and xl.startswith("PC1")
    assert abs(np.corrcoef(xy[:, 0], z[:, 0])[0, 1]) > 0.99  # the first component is the widest axis
    same, _, _ = report.project_2d(z[:, :2])
    assert np.array_equal(same, z[:, :2])
