"""The run report: one self-contained HTML page (inline CSS, PNG plots embedded as data URIs).

Sections, each from what the model artifact and the scores table already hold:

1. summary -- model, run, rows, and the model against the independent-columns baseline;
2. training curves -- train / validation elbo and KL per epoch (model.json ``metrics``);
3. the run's elbo (and log_marginal) histogram against the validation reference stored with the
   model (``reference``: quantiles, drawn as a piecewise-constant density);
4. top anomalies -- lowest log_marginal (elbo where absent), each with the features that made it
   unlikely: its column log-density minus that column's median in the run, in nats;
5. latent space -- latent_mean in 2-D (first two principal components when D > 2), coloured by elbo;
6. per-column average log-density in the run against validation.

Log-densities of different columns are in different units (per dollar, per count, per label), so
columns are compared by how far a record falls *below the column's typical value*, never raw.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_SCATTER_POINTS = 20_000


@dataclass
class RunScores:
    """The columns of one run the report needs, as numpy."""

    ids: pa.Table  # id columns (+ dt)
    elbo: np.ndarray
    log_marginal: np.ndarray | None
    columns: dict[str, np.ndarray]  # feature -> column log-density, NaN where missing
    latent_mean: np.ndarray  # [N, D]
    n_observed: np.ndarray

    @property
    def score(self) -> np.ndarray:
        """What anomalies are ranked by: log_marginal when present, else elbo (lower = less likely)."""
        return self.log_marginal if self.log_marginal is not None else self.elbo

    @property
    def score_name(self) -> str:
        return "log_marginal" if self.log_marginal is not None else "elbo"


def run_scores(table: pa.Table, id_columns: list[str]) -> RunScores:
    lm = table.column("log_marginal")
    log_marginal = None if lm.null_count == len(lm) else lm.to_numpy(zero_copy_only=False).astype(np.float64)
    cld = table.column("column_log_density").combine_chunks()
    columns = {f.name: cld.field(i).to_numpy(zero_copy_only=False).astype(np.float64) for i, f in enumerate(cld.type)}
    lat = table.column("latent_mean").combine_chunks()
    dim = lat.type.list_size
    latent = lat.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float64)
    keep = [c for c in [*id_columns, "dt"] if c in table.column_names]
    return RunScores(
        ids=table.select(keep),
        elbo=table.column("elbo").to_numpy().astype(np.float64),
        log_marginal=log_marginal,
        columns=columns,
        latent_mean=latent,
        n_observed=table.column("n_observed").to_numpy(),
    )


# ---- analysis (no plotting) ----------------------------------------------------------------------
def column_medians(scores: RunScores) -> dict[str, float]:
    out = {}
    for name, v in scores.columns.items():
        ok = ~np.isnan(v)
        out[name] = float(np.median(v[ok])) if ok.any() else math.nan
    return out


@dataclass
class Anomaly:
    rank: int
    ids: dict[str, Any]
    elbo: float
    log_marginal: float | None
    n_observed: int
    deficits: dict[str, float]  # feature -> column log-density minus the column's run median (nats)
    values: dict[str, Any] = field(default_factory=dict)  # the input values, when the data was given

    def culprits(self, k: int = 3, threshold: float = 1.0) -> list[tuple[str, float]]:
        """The k features furthest below their typical log-density (at least `threshold` nats)."""
        worst = sorted(((d, n) for n, d in self.deficits.items() if not math.isnan(d)), key=lambda x: x[0])
        return [(n, d) for d, n in worst[:k] if d <= -threshold]


def top_anomalies(scores: RunScores, k: int = 20) -> list[Anomaly]:
    medians = column_medians(scores)
    order = np.argsort(scores.score, kind="stable")[:k]
    ids = scores.ids.take(pa.array(order)).to_pylist()
    out = []
    for rank, (i, row_ids) in enumerate(zip(order, ids, strict=True), start=1):
        deficits = {c: float(v[i] - medians[c]) for c, v in scores.columns.items()}
        out.append(
            Anomaly(
                rank=rank,
                ids=row_ids,
                elbo=float(scores.elbo[i]),
                log_marginal=None if scores.log_marginal is None else float(scores.log_marginal[i]),
                n_observed=int(scores.n_observed[i]),
                deficits=deficits,
            )
        )
    return out


def project_2d(latent: np.ndarray) -> tuple[np.ndarray, str, str]:
    """2-D coordinates for a scatter: the latent itself when D <= 2, else its first two PCs."""
    d = latent.shape[1]
    if d == 1:
        return np.column_stack([latent[:, 0], np.zeros(len(latent))]), "z1", ""
    if d == 2:
        return latent, "z1", "z2"
    centred = latent - latent.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    share = s**2 / max((s**2).sum(), 1e-300)
    return centred @ vt[:2].T, f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%})"


def reference_density(ref: dict, step: float = 0.04) -> tuple[np.ndarray, np.ndarray] | None:
    """Piecewise-constant density from stored quantiles: (edges, density) for a step plot.

    Quantiles closer than `step` in probability are merged, so a reference of a few hundred rows
    stored at 1% resolution draws as a readable shape instead of spikes.
    """
    q = np.asarray(ref.get("quantiles") or [], dtype=np.float64)
    p = np.asarray(ref.get("quantile_probs") or [], dtype=np.float64)
    if q.size < 2 or q.size != p.size:
        return None
    keep_idx = [0]
    for i in range(1, p.size):
        if p[i] - p[keep_idx[-1]] >= step - 1e-9 or i == p.size - 1:
            keep_idx.append(i)
    q, p = q[keep_idx], p[keep_idx]
    widths = np.diff(q)
    keep = widths > 0
    dens = np.where(keep, np.diff(p) / np.where(keep, widths, 1.0), 0.0)
    return q, dens


# ---- plotting ------------------------------------------------------------------------------------
def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _fig()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_training(metrics: list[dict], best_epoch: int | None) -> str | None:
    if not metrics:
        return None
    plt = _fig()
    ep = [m["epoch"] for m in metrics]

    def series(key):
        return [np.nan if m.get(key) is None else m[key] for m in metrics]

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.plot(ep, series("train_elbo"), marker="o", ms=3, label="train elbo")
    if any(m.get("val_elbo") is not None for m in metrics):
        a.plot(ep, series("val_elbo"), marker="o", ms=3, label="validation elbo")
    a.set(xlabel="epoch", ylabel="nats per record", title="ELBO per epoch (higher is better)")
    b.plot(ep, series("train_kl"), marker="o", ms=3, label="train KL")
    if any(m.get("val_kl") is not None for m in metrics):
        b.plot(ep, series("val_kl"), marker="o", ms=3, label="validation KL")
    b.set(xlabel="epoch", ylabel="nats per record", title="KL(q(z|x) || p(z)) per epoch")
    if any("kl_weight" in m for m in metrics):
        b2 = b.twinx()
        b2.plot(ep, series("kl_weight"), color="grey", ls=":", label="KL weight (warm-up)")
        b2.set_ylim(0, 1.05)
        b2.set_ylabel("KL weight")
        b2.legend(loc="center right", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch is not None:
            ax.axvline(best_epoch, color="green", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def plot_histograms(scores: RunScores, reference: dict) -> str:
    plt = _fig()
    names = ["elbo"] + (["log_marginal"] if scores.log_marginal is not None else [])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        v = scores.elbo if name == "elbo" else scores.log_marginal
        ref = reference.get(name) or {}
        rd = reference_density({**ref, "quantile_probs": reference.get("quantile_probs")})
        lo, hi = np.quantile(v, [0.01, 1.0])
        if rd is not None:
            edges = rd[0]
            ref_low = float(np.interp(0.01, reference["quantile_probs"], ref["quantiles"]))
            lo, hi = min(lo, ref_low), max(hi, edges[-1])
            rd = (np.clip(edges, lo, None), rd[1])
        lo -= 0.05 * (hi - lo)
        bins = np.linspace(lo, hi, 60)
        ax.hist(np.clip(v, lo, hi), bins=bins, density=True, alpha=0.55, label=f"this run ({len(v):,} rows)")
        if rd is not None:
            edges, dens = rd
            ax.stairs(
                dens, edges, color="black", lw=1.4, label=f"validation reference ({reference.get('rows', '?')} rows)"
            )
        n_out = int((v < lo).sum())
        ax.set(
            xlabel=f"{name} (nats; {n_out} rows below the axis, drawn at its left edge)",
            ylabel="density",
            title=f"{name}: this run against validation",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def plot_anomaly_heatmap(anomalies: list[Anomaly], features: list[str], id_label) -> str | None:
    if not anomalies:
        return None
    plt = _fig()
    m = np.array([[a.deficits[f] for f in features] for a in anomalies])
    shown = np.clip(np.nan_to_num(m, nan=0.0), -20, 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(features), 0.9 + 0.34 * len(anomalies)))
    im = ax.imshow(shown, cmap="Reds_r", vmin=-20, vmax=0, aspect="auto")
    ax.set_xticks(range(len(features)), features, rotation=40, ha="right")
    ax.set_yticks(range(len(anomalies)), [f"#{a.rank} {id_label(a)}" for a in anomalies])
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isnan(m[i, j]):
                ax.text(j, i, "–", ha="center", va="center", fontsize=7, color="grey")
            elif m[i, j] <= -1.0:
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] < -10 else "black",
                )
    fig.colorbar(im, ax=ax, label="log-density minus column median (nats, clipped at -20)", shrink=0.8)
    ax.set_title("Top anomalies: which features made each unlikely (– = missing)")
    return _png(fig)


def plot_latent(scores: RunScores, anomalies: list[Anomaly], rng_seed: int = 0) -> str:
    plt = _fig()
    xy, xl, yl = project_2d(scores.latent_mean)
    n = len(xy)
    idx = np.arange(n)
    if n > MAX_SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(rng_seed).choice(n, MAX_SCATTER_POINTS, replace=False))
    lo, hi = np.quantile(scores.elbo, [0.01, 0.99])
    fig, ax = plt.subplots(figsize=(7, 5.2))
    sc = ax.scatter(xy[idx, 0], xy[idx, 1], c=np.clip(scores.elbo[idx], lo, hi), s=4, cmap="viridis", alpha=0.7)
    fig.colorbar(sc, ax=ax, label="elbo (nats, clipped to 1st-99th percentile)")
    top = np.argsort(scores.score, kind="stable")[: len(anomalies)]
    if len(top):
        ax.scatter(
            xy[top, 0], xy[top, 1], s=40, facecolors="none", edgecolors="red", lw=1.2, label=f"top {len(top)} anomalies"
        )
        ax.legend(fontsize=8, loc="best")
    ax.set(
        xlabel=xl,
        ylabel=yl,
        title=f"latent_mean ({scores.latent_mean.shape[1]}-D) of {n:,} records"
        + (f", {len(idx):,} drawn" if len(idx) < n else ""),
    )
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_columns(scores: RunScores, val_columns: dict[str, float]) -> str:
    """Mean per column over all rows, a missing value counting 0 (as training's validation metric does),
    with the run's median over observed values marked."""
    plt = _fig()
    names = list(scores.columns)
    n = len(scores.elbo)
    run_mean = [float(np.nansum(scores.columns[c]) / max(n, 1)) for c in names]
    medians = column_medians(scores)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.4 * len(names)))
    h = 0.4 if val_columns else 0.7
    ax.barh(y - (h / 2 if val_columns else 0), run_mean, height=h, label="this run: mean")
    if val_columns:
        ax.barh(
            y + h / 2,
            [val_columns.get(c, np.nan) for c in names],
            height=h,
            alpha=0.7,
            label="validation (best epoch): mean",
        )
    ax.scatter(
        [medians[c] for c in names],
        y - (h / 2 if val_columns else 0),
        marker="|",
        s=160,
        color="black",
        zorder=3,
        label="this run: median",
    )
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set(
        xlabel="log-density (nats; each column in its own units; a missing value counts 0 in the means)",
        title="Per-column average log-density",
    )
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


# ---- HTML ----------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px}
h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
.muted{color:#666;font-size:.9em}table{border-collapse:collapse;font-size:.85em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;display:block;margin:6px 0}
.kv td:first-child{font-weight:600;background:#fafafa}code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f'<p class="muted">({html.escape(alt)}: nothing to plot)</p>'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _kv(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def anomalies_table(anomalies: list[Anomaly], id_columns: list[str], score_name: str) -> str:
    has_values = any(a.values for a in anomalies)
    head = ["rank", *id_columns, "elbo", "log_marginal", "n observed", "made unlikely by (nats below typical)"]
    if has_values:
        head.append("input values of those features")
    rows = []
    for a in anomalies:
        culprits = a.culprits()
        cells = [
            str(a.rank),
            *[_fmt(a.ids.get(c)) for c in id_columns],
            _fmt(a.elbo),
            _fmt(a.log_marginal),
            str(a.n_observed),
            ", ".join(f"{n} {d:+.1f}" for n, d in culprits) or "(no single feature)",
        ]
        if has_values:
            cells.append(", ".join(f"{n}={_fmt(a.values.get(n))}" for n, _ in culprits))
        rows.append(
            "<tr>"
            + "".join(
                f'<td class="num">{html.escape(c)}</td>' if i < len(id_columns) + 4 else f"<td>{html.escape(c)}</td>"
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<p class="muted">Ranked by {score_name}, lowest first.</p><table><tr>{header}</tr>{"".join(rows)}</table>'


def render(
    meta: dict,
    scores: RunScores,
    *,
    scores_uri: str,
    model_dir: str,
    run_dates: list[str],
    top: int = 20,
    input_values: pa.Table | None = None,
) -> str:
    """The whole report as an HTML string."""
    spec_ids = list(meta["spec"]["id_columns"])
    features = list(scores.columns)
    anomalies = top_anomalies(scores, top)
    if input_values is not None and input_values.num_rows:
        by_id = {tuple(r[c] for c in spec_ids): r for r in input_values.to_pylist()}
        for a in anomalies:
            a.values = by_id.get(tuple(a.ids[c] for c in spec_ids), {})
    metrics = meta.get("metrics") or []
    best_epoch = meta.get("best_epoch")
    val_columns = {}
    if metrics:
        best_row = next((m for m in metrics if m.get("epoch") == best_epoch), metrics[-1])
        val_columns = best_row.get("val_columns") or {}
    reference = meta.get("reference") or {}
    baseline = meta.get("baseline") or {}

    def id_label(a: Anomaly) -> str:
        return ", ".join(str(a.ids[c]) for c in spec_ids)

    ref_elbo = reference.get("elbo") or {}
    probs = reference.get("quantile_probs") or []
    low_line = None
    if ref_elbo.get("quantiles") and probs:
        j = int(np.argmin(np.abs(np.asarray(probs) - 0.01)))
        cut = ref_elbo["quantiles"][j]
        low_line = (
            f"rows below the validation {probs[j]:.0%} elbo quantile ({cut:,.2f})",
            f"{int((scores.elbo < cut).sum()):,} ({(scores.elbo < cut).mean():.2%})",
        )
    summary = [
        ("model", meta.get("model_id")),
        ("model directory", model_dir),
        ("scores table", scores_uri),
        ("run date(s)", ", ".join(run_dates)),
        ("rows scored", f"{len(scores.elbo):,}"),
        ("latent dimension", scores.latent_mean.shape[1]),
        ("median elbo this run / validation", f"{np.median(scores.elbo):,.2f} / {_fmt(_median(reference, 'elbo'))}"),
    ]
    if scores.log_marginal is not None:
        summary.append(
            (
                "median log_marginal this run / validation",
                f"{np.median(scores.log_marginal):,.2f} / {_fmt(_median(reference, 'log_marginal'))}",
            )
        )
    if low_line:
        summary.append(low_line)
    if baseline.get("val_log_likelihood") is not None:
        summary.append(
            (
                "validation log-likelihood: independent columns / VAE elbo / VAE log_marginal",
                f"{baseline['val_log_likelihood']:,.2f} / {_fmt(baseline.get('model_val_elbo'))} / "
                f"{_fmt(baseline.get('model_val_log_marginal'))} nats per record",
            )
        )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vaepipe report: {html.escape(str(meta.get('model_id')))} on "
        f"{html.escape(', '.join(run_dates))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>vaepipe run report</h1>",
        f'<p class="muted">Generated {generated}. All log-densities are in nats, per record, in the data\'s own '
        "units; higher means more likely.</p>",
        "<h2>Summary</h2>",
        _kv(summary),
        "<h2>Training curves</h2>",
        _img(plot_training(metrics, best_epoch), "training curves"),
        "<h2>This run against the validation reference</h2>",
        '<p class="muted">Histogram of this run\'s scores; the black steps are the validation distribution '
        "stored with the model (from its quantiles). A run that drifts from the data the model was trained on "
        "shifts left of the reference.</p>",
        _img(plot_histograms(scores, reference), "score histograms"),
        f"<h2>Top {len(anomalies)} anomalies</h2>",
        anomalies_table(anomalies, [c for c in spec_ids], scores.score_name),
        _img(plot_anomaly_heatmap(anomalies, features, id_label), "anomaly feature heatmap"),
        "<h2>Latent space</h2>",
        _img(plot_latent(scores, anomalies), "latent space"),
        "<h2>Per-column average log-density</h2>",
        '<p class="muted">Averages over observed values. Compare a column with itself (run against validation), '
        "not with other columns: a continuous column's density depends on its units.</p>",
        _img(plot_columns(scores, val_columns), "per-column log-density"),
        "</body></html>",
    ]
    return "\n".join(parts)


def _median(reference: dict, name: str) -> float | None:
    ref = reference.get(name) or {}
    q, p = ref.get("quantiles"), reference.get("quantile_probs")
    if not q or not p:
        return None
    return float(np.interp(0.5, p, q))


def input_rows(data_uri: str, id_columns: list[str], ids: list[dict]) -> pa.Table:
    """The input rows whose ids are in `ids` (for showing the values behind the top anomalies)."""
    import pyarrow.dataset as ds

    from pipeline.io import storage

    dataset = ds.dataset(storage.list_parquet(data_uri), filesystem=storage.filesystem(data_uri), format="parquet")
    first = id_columns[0]
    t = dataset.to_table(filter=pc.field(first).isin([r[first] for r in ids]))
    return t
