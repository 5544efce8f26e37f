"""Corrupted records with known answers, and average precision: the anomaly-ranking half of the quality benchmark.

:func:`corrupt` takes held-out records and returns corrupted copies of some of them, one corruption kind at a
time, each copy still a record the scorer accepts (no negative value in a positive column, no fractional count,
no unknown binary or ordinal level: those are quarantined by the product, not ranked). The kinds:

* ``unit``: one real or positive value multiplied by 10 or by 0.01 (a unit error);
* ``zero``: one real, positive or count value set to 0, in a column where 0 is outside the central 99% of the
  training values and under 1% of them;
* ``count_x10``: one count >= 1 multiplied by 10;
* ``swap``: two numeric columns (real, positive or count, each accepting the other's value) exchange their
  values, where the two differ by more than the larger of the columns' robust scales (IQR / 1.349);
* ``relation``: one numeric value replaced by the same column's value in another held-out record, where the two
  differ by more than the column's robust scale: each value is plausible alone, the record is not;
* ``rare_combo``: two discrete columns (categorical, binary, ordinal, or counts with at most 20 levels) set to a
  pair of values both common alone (>= 2% of training rows) that occurs in training, but at under 5% of the
  count expected if the columns were independent;
* ``unseen_label``: one categorical value replaced by a label never seen in training;
* ``multi``: two or three columns corrupted at once, each by ``unit``, ``zero`` or ``relation``.

A kind that no column of a table admits is skipped (:class:`NotApplicable`). :func:`average_precision` is the
step-wise area under the precision-recall curve, ties counted as one threshold (scikit-learn's definition).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

KINDS = ("unit", "zero", "count_x10", "swap", "relation", "rare_combo", "unseen_label", "multi")
GROSS_KINDS = ("unit", "zero", "swap")
NUMERIC = ("real", "positive", "count")
DISCRETE = ("categorical", "binary", "ordinal")
UNSEEN_INT = 987_654_321


class NotApplicable(ValueError):
    """No column of the table admits this corruption kind."""


@dataclass
class Corrupted:
    table: pa.Table  # the corrupted copies, in the order of ``source_rows``
    source_rows: np.ndarray  # row of the held-out table each copy was made from
    columns: list[list[str]]  # the columns changed in each copy


@dataclass
class ColumnStats:
    """What the generator needs to know of the training data, per column."""

    kind: str
    robust_scale: float = 0.0
    zero_is_rare: bool = False
    levels: dict | None = None  # value -> training frequency (discrete and small counts)

    @classmethod
    def fit(cls, kind: str, values: list) -> ColumnStats:
        obs = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
        st = cls(kind)
        if kind in NUMERIC and obs:
            x = np.asarray(obs, dtype=np.float64)
            q25, q75 = np.quantile(x, [0.25, 0.75])
            st.robust_scale = float(q75 - q25) / 1.349 or float(x.std()) or 1.0
            lo, hi = np.quantile(x, [0.005, 0.995])
            st.zero_is_rare = bool((x == 0).mean() < 0.01 and (lo > 0 or hi < 0))
        if kind in DISCRETE or (kind == "count" and len(set(obs)) <= 20):
            vals, counts = np.unique(np.asarray([str(v) for v in obs]), return_counts=True)
            st.levels = {v: c / len(obs) for v, c in zip(vals.tolist(), counts.tolist(), strict=True)}
        return st


def fit_stats(train: pa.Table, features: dict[str, str]) -> dict[str, ColumnStats]:
    return {c: ColumnStats.fit(k, train.column(c).to_pylist()) for c, k in features.items()}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _accepts(kind: str, v: float) -> bool:
    if kind == "real":
        return True
    if kind == "positive":
        return v >= 0
    return v >= 0 and float(v).is_integer()  # count


class _Generator:
    def __init__(self, train: pa.Table, held_out: pa.Table, features: dict[str, str], rng: np.random.Generator):
        self.features, self.rng = features, rng
        self.stats = fit_stats(train, features)
        self.rows = {c: held_out.column(c).to_pylist() for c in features}
        self.n = held_out.num_rows
        self.numeric = [c for c, k in features.items() if k in NUMERIC]
        self.combos = self._rare_combos(train)

    # each method: (row dict) -> list of changed columns, or None when this row admits no such corruption
    def unit(self, rec):
        cols = [c for c in self.numeric if self.features[c] != "count" and not _missing(rec[c]) and rec[c] != 0]
        if not cols:
            return None
        c = cols[self.rng.integers(len(cols))]
        rec[c] = float(rec[c]) * (10.0 if self.rng.random() < 0.5 else 0.01)
        return [c]

    def zero(self, rec):
        cols = [c for c in self.numeric if self.stats[c].zero_is_rare and not _missing(rec[c]) and rec[c] != 0]
        if not cols:
            return None
        c = cols[self.rng.integers(len(cols))]
        rec[c] = 0
        return [c]

    def count_x10(self, rec):
        cols = [c for c, k in self.features.items() if k == "count" and not _missing(rec[c]) and rec[c] >= 1]
        if not cols:
            return None
        c = cols[self.rng.integers(len(cols))]
        rec[c] = rec[c] * 10
        return [c]

    def swap(self, rec):
        pairs = []
        for i, a in enumerate(self.numeric):
            for b in self.numeric[i + 1 :]:
                va, vb = rec[a], rec[b]
                if _missing(va) or _missing(vb):
                    continue
                gap = max(self.stats[a].robust_scale, self.stats[b].robust_scale)
                ok = _accepts(self.features[a], vb) and _accepts(self.features[b], va)
                if ok and abs(float(va) - float(vb)) > gap:
                    pairs.append((a, b))
        if not pairs:
            return None
        a, b = pairs[self.rng.integers(len(pairs))]
        rec[a], rec[b] = rec[b], rec[a]
        return [a, b]

    def relation(self, rec, exclude=()):
        cols = [c for c in self.numeric if c not in exclude and not _missing(rec[c])]
        self.rng.shuffle(cols)
        for c in cols:
            donors = self.rows[c]
            for _ in range(20):
                v = donors[self.rng.integers(self.n)]
                if not _missing(v) and abs(float(v) - float(rec[c])) > self.stats[c].robust_scale:
                    rec[c] = v
                    return [c]
        return None

    def _rare_combos(self, train: pa.Table) -> list[tuple[str, str, str, str]]:
        disc = [c for c in self.features if self.stats[c].levels is not None]
        n = train.num_rows
        out = []
        for i, a in enumerate(disc):
            la = [str(v) if not _missing(v) else None for v in train.column(a).to_pylist()]
            for b in disc[i + 1 :]:
                lb = [str(v) if not _missing(v) else None for v in train.column(b).to_pylist()]
                joint: dict[tuple[str, str], int] = {}
                for x, y in zip(la, lb, strict=True):
                    if x is not None and y is not None:
                        joint[(x, y)] = joint.get((x, y), 0) + 1
                for (x, y), cnt in joint.items():
                    pa_, pb_ = self.stats[a].levels[x], self.stats[b].levels[y]
                    if pa_ >= 0.02 and pb_ >= 0.02 and cnt < 0.05 * pa_ * pb_ * n:
                        out.append((a, x, b, y))
        return out

    def rare_combo(self, rec):
        if not self.combos:
            return None
        a, x, b, y = self.combos[self.rng.integers(len(self.combos))]
        if str(rec[a]) == x and str(rec[b]) == y:
            return None
        changed = [c for c, v in ((a, x), (b, y)) if str(rec[c]) != v]
        rec[a], rec[b] = _typed(x, rec[a]), _typed(y, rec[b])
        return changed

    def unseen_label(self, rec):
        cols = [c for c, k in self.features.items() if k == "categorical"]
        if not cols:
            return None
        c = cols[self.rng.integers(len(cols))]
        rec[c] = UNSEEN_INT if isinstance(rec[c], int) or _missing(rec[c]) else "never-seen-label"
        return [c]

    def multi(self, rec):
        want = int(self.rng.integers(2, 4))
        changed: list[str] = []
        for _ in range(12):
            if len(changed) >= want:
                break
            how = ("unit", "zero", "relation")[self.rng.integers(3)]
            trial = dict(rec)
            got = self.relation(trial, exclude=changed) if how == "relation" else getattr(self, how)(trial)
            if got and not set(got) & set(changed):
                rec.update({c: trial[c] for c in got})
                changed += got
        return changed if len(changed) >= 2 else None


def _typed(label: str, like):
    """A label string back in the type of the column's values."""
    if isinstance(like, bool):
        return label == "True"
    if isinstance(like, int):
        return int(label)
    if isinstance(like, float):
        return float(label)
    try:
        return int(label)
    except ValueError:
        return label


def corrupt(
    train: pa.Table,
    held_out: pa.Table,
    features: dict[str, str],
    kind: str,
    n: int,
    rng: np.random.Generator,
) -> Corrupted:
    """n corrupted copies of distinct held-out rows (fewer only if fewer rows admit ``kind``).

    ``features`` maps each feature column to its spec type; other columns (ids) are copied unchanged.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown corruption kind {kind!r}; known: {', '.join(KINDS)}")
    gen = _Generator(train, held_out, features, rng)
    rows, changed, recs = [], [], []
    names = held_out.column_names
    for r in rng.permutation(held_out.num_rows):
        if len(rows) >= n:
            break
        rec = {c: held_out.column(c)[int(r)].as_py() for c in names}
        got = getattr(gen, kind)(rec)
        if got:
            rows.append(int(r))
            changed.append(got)
            recs.append(rec)
    if not rows:
        raise NotApplicable(f"no held-out row admits a {kind!r} corruption")
    arrays = []
    for c in names:
        vals = [rec[c] for rec in recs]
        typ = held_out.schema.field(c).type
        try:
            arrays.append(pa.array(vals, type=typ))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arrays.append(pa.array([None if v is None else float(v) for v in vals], pa.float64()))
    return Corrupted(pa.Table.from_arrays(arrays, names=names), np.asarray(rows, dtype=np.int64), changed)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve, higher score = more anomalous; tied scores form one threshold.

    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds in decreasing order.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.sum() == 0:
        raise ValueError("average precision needs at least one positive")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
