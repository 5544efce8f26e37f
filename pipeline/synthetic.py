"""The demo's data: a realistic mixed-type customer table with planted anomalies and their labels.

Every record comes from a small latent structure -- a customer *segment* (4 kinds) and two continuous
factors, *affluence* and *engagement* -- so its columns depend on each other the way real ones do:

==================  ===========  ===========================================================
column              spec type    how it is made
==================  ===========  ===========================================================
age                 count        years; segment mean, rises with affluence
income              positive     yearly, dollars; log-normal in segment and affluence
spend               positive     monthly, dollars; ~ income^0.9, scaled by engagement
refund_amount       positive     zero for ~85% of records, else a share of spend
n_orders            count        Poisson, rate from engagement and segment
net_flow            real         income/12 - spend, in thousands of dollars, plus noise
region              categorical  segment's home region with probability 0.95
channel             categorical  segment's usual channel with probability 0.95
product             categorical  segment's usual product line with probability 0.95
is_member           binary       more likely with engagement
plan_tier           ordinal      1..4 from affluence
satisfaction        ordinal      very_low .. very_high from engagement, lower after a refund
==================  ===========  ===========================================================

Some values are missing (income, age, channel, satisfaction). :func:`generate` makes a *history*
table (to train on) and an *incoming* batch (to score) in which a fraction of records are planted
anomalies of five kinds:

* ``out_of_range`` -- one value far outside anything seen (income x200, age 140, 400 orders, ...);
* ``broken_correlation`` -- every value ordinary on its own, but spend, net_flow and plan_tier belong
  to a customer with a very different income;
* ``rare_combination`` -- region, channel and product each common, together almost never seen;
* ``unseen_label`` -- a region, channel or product label that the history never had;
* ``invalid`` -- a negative amount: cannot be scored at all and must land in quarantine.

The labels (record_id, kind, what was done) are written apart from the input data, so the scorer
never sees them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.feature_spec import FeatureSpec

REGIONS = ["north", "south", "east", "west"]
CHANNELS = ["web", "app", "store", "phone"]
PRODUCTS = ["electronics", "grocery", "fashion", "home"]
SATISFACTION = ["very_low", "low", "neutral", "high", "very_high"]
UNSEEN = {"region": "antarctica", "channel": "fax", "product": "timeshares"}

SEGMENT_P = np.array([0.4, 0.3, 0.2, 0.1])
SEGMENT_AGE = np.array([31.0, 46.0, 63.0, 39.0])
SEGMENT_LOG_INCOME = np.log([38_000.0, 72_000.0, 45_000.0, 140_000.0])
SEGMENT_ORDERS = np.array([0.3, 0.0, -0.6, 0.5])
SEGMENT_MEMBER = np.array([0.0, 0.5, -0.5, 1.0])
HOME_P = 0.95  # probability a segment's record takes its segment's usual region / channel / product

ANOMALY_KINDS = ("out_of_range", "broken_correlation", "rare_combination", "unseen_label")
INVALID_KIND = "invalid"

SPEC = FeatureSpec.from_dict(
    {
        "id_columns": ["record_id"],
        "features": {
            "age": "count",
            "income": "positive",
            "spend": "positive",
            "refund_amount": "positive",
            "n_orders": "count",
            "net_flow": "real",
            "region": "categorical",
            "channel": "categorical",
            "product": "categorical",
            "is_member": "binary",
            "plan_tier": "ordinal",
            "satisfaction": {"ordinal": SATISFACTION},
        },
    },
    source="pipeline.synthetic.SPEC",
)


@dataclass(frozen=True)
class DemoData:
    history_dir: str  # Parquet shards to train on
    incoming_dir: str  # Parquet shards to score (with the planted anomalies)
    labels_path: str  # Parquet: record_id, kind, detail -- one row per planted anomaly
    spec_path: str  # the feature spec (YAML)
    history_rows: int
    incoming_rows: int
    anomalies: int  # planted anomalies that can be scored (all kinds but 'invalid')
    invalid: int  # planted rows that cannot be scored


def _pick(rng: np.random.Generator, segment: np.ndarray, labels: list[str]) -> np.ndarray:
    """Segment k's usual label is labels[k] (probability HOME_P); otherwise any other, uniformly."""
    n = segment.size
    home = rng.random(n) < HOME_P
    other = (segment + rng.integers(1, len(labels), n)) % len(labels)
    return np.array(labels, dtype=object)[np.where(home, segment, other)]


def sample_records(rng: np.random.Generator, n: int, first_id: int = 0) -> dict[str, np.ndarray]:
    """n ordinary records as numpy columns (floats with NaN / object arrays with None for missing)."""
    seg = rng.choice(len(SEGMENT_P), size=n, p=SEGMENT_P)
    affluence = rng.standard_normal(n)
    engagement = rng.standard_normal(n)

    age = np.clip(np.round(SEGMENT_AGE[seg] + 5.0 * affluence + 6.0 * rng.standard_normal(n)), 18, 95)
    log_income = SEGMENT_LOG_INCOME[seg] + 0.35 * affluence + 0.15 * rng.standard_normal(n)
    income = np.round(np.exp(log_income), -2)
    spend = np.round(np.exp(0.9 * log_income - 4.6 + 0.35 * engagement + 0.12 * rng.standard_normal(n)), 2)
    refunded = rng.random(n) < 1.0 / (1.0 + np.exp(2.0 - 0.4 * engagement))  # ~ 15%
    refund = np.where(refunded, np.round(spend * rng.beta(2.0, 5.0, n), 2), 0.0)
    n_orders = rng.poisson(np.exp(1.6 + 0.5 * engagement + SEGMENT_ORDERS[seg])).astype(np.float64)
    net_flow = np.round((income / 12.0 - spend) / 1000.0 + 0.15 * rng.standard_normal(n), 3)
    is_member = rng.random(n) < 1.0 / (1.0 + np.exp(-(1.2 * engagement + SEGMENT_MEMBER[seg])))
    tier_cut = np.array([-0.8, 0.2, 1.1])
    plan_tier = 1 + (affluence[:, None] + 0.3 * rng.standard_normal(n)[:, None] > tier_cut).sum(1)
    sat_latent = 1.1 * engagement - 1.2 * refunded + rng.logistic(size=n) * 0.6
    satisfaction = np.array(SATISFACTION, dtype=object)[(sat_latent[:, None] > np.array([-1.8, -0.7, 0.5, 1.5])).sum(1)]

    cols = {
        "record_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "age": age,
        "income": income,
        "spend": spend,
        "refund_amount": refund,
        "n_orders": n_orders,
        "net_flow": net_flow,
        "region": _pick(rng, seg, REGIONS),
        "channel": _pick(rng, seg, CHANNELS),
        "product": _pick(rng, seg, PRODUCTS),
        "is_member": is_member.astype(object),
        "plan_tier": plan_tier.astype(np.float64),
        "satisfaction": satisfaction,
    }
    for name, frac in (("income", 0.04), ("age", 0.02), ("channel", 0.03), ("satisfaction", 0.06)):
        miss = rng.random(n) < frac
        if cols[name].dtype == object:
            cols[name][miss] = None
        else:
            cols[name][miss] = np.nan
    return cols


def _rarest_combinations(k: int = 6) -> list[tuple[str, str, str]]:
    """The k (region, channel, product) combinations least likely under the generator, each label
    being some segment's usual one (so every value on its own is common)."""
    n_seg = len(SEGMENT_P)
    other = (1.0 - HOME_P) / (n_seg - 1)

    def p(label_idx: int, seg: int) -> float:
        return HOME_P if label_idx == seg else other

    combos = []
    for r in range(n_seg):
        for c in range(n_seg):
            for d in range(n_seg):
                prob = sum(SEGMENT_P[s] * p(r, s) * p(c, s) * p(d, s) for s in range(n_seg))
                combos.append((prob, (REGIONS[r], CHANNELS[c], PRODUCTS[d])))
    combos.sort()
    return [c for _, c in combos[:k]]


def plant_anomalies(
    rng: np.random.Generator, cols: dict[str, np.ndarray], fraction: float, n_invalid: int
) -> list[dict]:
    """Turn a random fraction of records into anomalies, equally of each kind, in place; plus
    n_invalid rows with a negative amount. Returns one label dict per planted record."""
    n = cols["record_id"].size
    n_anom = max(len(ANOMALY_KINDS), round(fraction * n))
    chosen = rng.choice(n, size=n_anom + n_invalid, replace=False)
    labels: list[dict] = []
    rare = _rarest_combinations()
    income = cols["income"]
    q10, q90 = np.nanquantile(income, [0.1, 0.9])
    for i, row in enumerate(chosen[:n_anom]):
        kind = ANOMALY_KINDS[i % len(ANOMALY_KINDS)]
        rid = int(cols["record_id"][row])
        if kind == "out_of_range":
            which = rng.integers(4)
            if which == 0:
                base = income[row] if np.isfinite(income[row]) else 50_000.0
                income[row] = base * 200
                detail = f"income = {income[row]:,.0f} (x200)"
            elif which == 1:
                cols["age"][row] = 140
                detail = "age = 140"
            elif which == 2:
                cols["n_orders"][row] = 400
                detail = "n_orders = 400"
            else:
                cols["spend"][row] = round(cols["spend"][row] * 60, 2)
                detail = f"spend = {cols['spend'][row]:,.2f} (x60)"
        elif kind == "broken_correlation":
            # spend, net_flow and plan_tier of a customer at the other end of the income range
            rich = np.isfinite(income[row]) and income[row] > np.nanmedian(income)
            pool = np.flatnonzero(income < q10) if rich else np.flatnonzero(income > q90)
            donor = rng.choice(pool)
            for c in ("spend", "net_flow", "plan_tier"):
                cols[c][row] = cols[c][donor]
            detail = f"spend/net_flow/plan_tier of a customer with income {income[donor]:,.0f}"
        elif kind == "rare_combination":
            r, c, d = rare[rng.integers(len(rare))]
            cols["region"][row], cols["channel"][row], cols["product"][row] = r, c, d
            detail = f"region={r}, channel={c}, product={d}"
        else:  # unseen_label
            col = ("region", "channel", "product")[rng.integers(3)]
            cols[col][row] = UNSEEN[col]
            detail = f"{col} = {UNSEEN[col]!r} (never in the history)"
        labels.append({"record_id": rid, "kind": kind, "detail": detail})
    for row in chosen[n_anom:]:
        cols["refund_amount"][row] = -abs(cols["spend"][row]) * 0.1 - 1.0
        labels.append(
            {
                "record_id": int(cols["record_id"][row]),
                "kind": INVALID_KIND,
                "detail": f"refund_amount = {cols['refund_amount'][row]:.2f} (negative)",
            }
        )
    return labels


def to_table(cols: dict[str, np.ndarray]) -> pa.Table:
    def nums(x, t):
        return pa.array(x, t, from_pandas=True)  # NaN -> null

    return pa.table(
        {
            "record_id": pa.array(cols["record_id"], pa.int64()),
            "age": nums(cols["age"], pa.float64()).cast(pa.int32()),
            "income": nums(cols["income"], pa.float64()),
            "spend": nums(cols["spend"], pa.float64()),
            "refund_amount": nums(cols["refund_amount"], pa.float64()),
            "n_orders": nums(cols["n_orders"], pa.float64()).cast(pa.int32()),
            "net_flow": nums(cols["net_flow"], pa.float64()),
            "region": pa.array(cols["region"], pa.string()),
            "channel": pa.array(cols["channel"], pa.string()),
            "product": pa.array(cols["product"], pa.string()),
            "is_member": pa.array(cols["is_member"], pa.bool_()),
            "plan_tier": nums(cols["plan_tier"], pa.float64()).cast(pa.int8()),
            "satisfaction": pa.array(cols["satisfaction"], pa.string()),
        }
    )


def write_shards(table: pa.Table, directory: str, shards: int) -> None:
    os.makedirs(directory, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        pq.write_table(table.slice(a, b - a), os.path.join(directory, f"part-{i:03d}.parquet"))


def generate(
    workdir: str,
    history_rows: int = 20_000,
    incoming_rows: int = 10_000,
    anomaly_fraction: float = 0.02,
    invalid_rows: int = 3,
    shards: int = 4,
    seed: int = 7,
) -> DemoData:
    """Write WORKDIR/{history,incoming}/part-*.parquet, WORKDIR/labels/planted_anomalies.parquet and
    WORKDIR/spec.yaml. Directories written here are replaced whole."""
    import shutil

    rng = np.random.default_rng(seed)
    paths = {k: os.path.join(workdir, k) for k in ("history", "incoming", "labels")}
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    history = to_table(sample_records(rng, history_rows, first_id=0))
    write_shards(history, paths["history"], shards)

    cols = sample_records(rng, incoming_rows, first_id=history_rows)
    labels = plant_anomalies(rng, cols, anomaly_fraction, invalid_rows)
    write_shards(to_table(cols), paths["incoming"], max(1, shards // 2))

    os.makedirs(paths["labels"], exist_ok=True)
    labels_path = os.path.join(paths["labels"], "planted_anomalies.parquet")
    pq.write_table(pa.Table.from_pylist(labels), labels_path)
    spec_path = os.path.join(workdir, "spec.yaml")
    with open(spec_path, "w") as f:
        f.write("# the demo table's feature spec (pipeline/synthetic.py)\n" + SPEC.to_yaml())
    n_invalid = sum(1 for lab in labels if lab["kind"] == INVALID_KIND)
    return DemoData(
        history_dir=paths["history"],
        incoming_dir=paths["incoming"],
        labels_path=labels_path,
        spec_path=spec_path,
        history_rows=history_rows,
        incoming_rows=incoming_rows,
        anomalies=len(labels) - n_invalid,
        invalid=n_invalid,
    )
