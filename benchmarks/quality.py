"""How good the scores are: vaepipe beside peers fitted on the same rows, on real tables.

    python benchmarks/quality.py [--tables adult,default_credit,wine,breast_cancer,diabetes] [--quick] [--seed 0]
        [--max-train 12000] [--max-test 3000] [--variants "name:key=value,...;..."] [--threads 1]
        [--peers independent,gmm,factor,iforest,ecod] [--no-vaepipe]

``--variants`` adds vaepipe arms with other VAEConfig / TrainConfig settings (e.g. ``nomask:train_mask=0``).

Tables: ../shared/data adult, default_credit and wine (or tests/data where present), and two of scikit-learn's
bundled tables: breast cancer (569 rows; 30 positive measurements with tight relations such as radius, perimeter
and area, and the diagnosis as a binary column) and diabetes in its own units (442 rows; age, sex, body mass
index, blood pressure, six serum measurements of which total cholesterol is nearly the sum of LDL, HDL and a
fifth of the triglycerides, and the disease's progression a year on). Each table is split by a hash of its
record ids into train (70%), validation (10%) and test (20%); train and test are capped (--max-train,
--max-test) to keep the run short.

Two measurements on the test rows:

1. **held-out log-likelihood per record** (nats, higher is better), every density model in the data's own
   units, summed over the observed cells of each record (missing cells are left out of every model alike):
   discrete columns as log-mass, continuous ones as log-density. vaepipe: the mean ``log_marginal``
   (importance-weighted, K = --iw-samples); the others exactly. Printed as the mean over the test rows
   (``held-out LL``) and their median (``median LL``): a mean of log-densities is ruled by the few records
   a model finds least likely (a data error kept in a real table costs a light-tailed model thousands of
   nats), the median by the typical record.
2. **average precision** of the anomaly ranking, per corruption kind (benchmarks/corruptions.py: unit error,
   zero, count x10, swap, relation broken, rare category combination, unseen label, 2-3 columns at once),
   each kind measured alone: about 1% of the test rows are replaced by corrupted copies (repeated with fresh
   rows until at least --positives corrupted records were ranked; AP averaged over repeats), every method ranks
   by its own anomaly score (density models: -log p(x); vaepipe: -log_marginal). ``mean`` is the mean over kinds.

Methods (all fitted on the same training rows; validation rows for model size / early stopping only):

* ``vaepipe``: the product's model (pipeline.core) with its default configuration and training defaults;
* ``independent``: the product's independent-columns baseline (pipeline/core/baseline.py), same families;
* ``gmm``: scikit-learn GaussianMixture, full covariance, n_components chosen on validation log-likelihood;
* ``factor``: scikit-learn FactorAnalysis, n_components chosen on validation log-likelihood;
* ``iforest``: scikit-learn IsolationForest (AP only: it has no density);
* ``ecod``: PyOD's ECOD (empirical cumulative distributions per column; AP only), where PyOD installs.

How the scikit-learn peers handle mixed types (stated so the comparison is read right): continuous columns are
modelled jointly by the Gaussian model on a transformed scale, with the exact Jacobian back to data units:
real ``(x - m) / s``; positive ``(log x - m) / s`` for x > 0 (Jacobian ``-log x - log s``), a value of exactly
0 is a discrete event with its own smoothed frequency (the column's dimension is marginalised out of the
Gaussian for that record); count ``(log(k + 1) - m) / s``, fitted on dequantised values k + U(-1/2, 1/2) and
scored as the density at k times a unit bin. Discrete columns (categorical, binary, ordinal) are independent,
with add-1/2 smoothed frequencies; an unseen categorical label gets the Good-Turing mass (labels seen once / N,
floor 1 / N), as vaepipe does. Missing cells and zeros are marginalised out exactly when scoring (the Gaussian
restricted to the observed dimensions); when fitting, scikit-learn needs complete rows, so they are filled by
random draws of the column's observed training values (hot deck). IsolationForest sees the same transformed
continuous matrix (missing filled with the column median) and the discrete codes.

It prints one table per dataset: AP per kind, mean AP and held-out log-likelihood per method, and the settings.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.corruptions import KINDS, NotApplicable, average_precision, corrupt  # noqa: E402
from pipeline.core.baseline import IndependentBaseline  # noqa: E402
from pipeline.core.codec import TableCodec, fit_families, partial_stats, record_keys  # noqa: E402
from pipeline.core.model import VAE, sized_config  # noqa: E402
from pipeline.core.scoring import score_batch  # noqa: E402
from pipeline.core.training import TrainConfig, fit  # noqa: E402
from schemas.feature_spec import FeatureSpec  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TESTS = ROOT / "tests" / "data"
HIVAE_TYPES = {"pos": "positive", "count": "count", "cat": "categorical", "real": "real", "ordinal": "ordinal"}
TABLES = ("adult", "default_credit", "wine", "breast_cancer", "diabetes")
PEERS = ("independent", "gmm", "factor", "iforest", "ecod")


# ---- tables ---------------------------------------------------------------------------------------
def load_table(name: str) -> tuple[pa.Table, FeatureSpec]:
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        cols = {"record_id": pa.array(np.arange(d.data.shape[0]))}
        features = {}
        for j, f in enumerate(d.feature_names):
            key = str(f).replace(" ", "_")
            cols[key] = pa.array(d.data[:, j])
            features[key] = "positive"
        cols["diagnosis"] = pa.array(np.asarray(d.target_names)[d.target].astype(str))
        features["diagnosis"] = "binary"
        return pa.table(cols), FeatureSpec.from_dict({"id_columns": ["record_id"], "features": features})
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        d = load_diabetes(scaled=False)  # the measurements in their own units
        cols = {"record_id": pa.array(np.arange(d.data.shape[0]))}
        features = {}
        for j, f in enumerate(d.feature_names):
            if f == "sex":
                cols[f], features[f] = pa.array(d.data[:, j].astype(int).astype(str)), "binary"
            elif f == "age":
                cols[f], features[f] = pa.array(d.data[:, j].astype(np.int64)), "count"
            else:
                cols[f], features[f] = pa.array(d.data[:, j]), "positive"
        cols["progression"], features["progression"] = pa.array(d.target), "positive"
        return pa.table(cols), FeatureSpec.from_dict({"id_columns": ["record_id"], "features": features})
    folder = SHARED / name if (SHARED / name).exists() else TESTS / name
    table = pq.read_table(folder / f"{name}.parquet")
    import csv

    features = {}
    with open(folder / "types.csv") as f:
        for row in csv.DictReader(f):
            kind = HIVAE_TYPES[row["hivae_type"]]
            features[row["column"]] = "binary" if kind == "categorical" and row["nclass"] == "2" else kind
    return table, FeatureSpec.from_dict({"id_columns": ["record_id"], "features": features})


def split(table: pa.Table, spec: FeatureSpec, max_train: int, max_test: int):
    keys = record_keys(table, spec.id_columns)
    u = (keys % np.uint64(1000)).astype(np.int64)
    order = np.argsort(keys // np.uint64(1000), kind="stable")  # a fixed pseudo-random order of the rows

    def take(mask, cap):
        rows = order[mask[order]][:cap]
        return table.take(pa.array(np.sort(rows)))

    train, valid, test = u < 700, (u >= 700) & (u < 800), u >= 800
    return take(train, max_train), take(valid, max(max_train // 7, 1)), take(test, max_test)


# ---- peers ----------------------------------------------------------------------------------------
def good_turing_oov(counts: dict) -> float:
    n = sum(counts.values())
    return max(sum(1 for c in counts.values() if c == 1), 1) / max(n, 1)


class MixedPeer:
    """Continuous columns jointly (a Gaussian model on a transformed scale), discrete ones independently."""

    def __init__(self, spec: FeatureSpec, train: pa.Table, rng: np.random.Generator):
        self.kinds = {f.name: f.type for f in spec.features}
        self.cont = [c for c, k in self.kinds.items() if k in ("real", "positive", "count")]
        self.disc = [c for c, k in self.kinds.items() if k not in ("real", "positive", "count")]
        self.rng = rng
        self.tf = {}
        for c in self.cont:
            x = _floats(train.column(c))
            x = x[~np.isnan(x)]
            t = self._raw_t(c, x[x > 0] if self.kinds[c] == "positive" else x)
            self.tf[c] = (float(t.mean()), float(t.std()) or 1.0)
        self.zero = {}
        for c in self.cont:
            if self.kinds[c] == "positive":
                x = _floats(train.column(c))
                x = x[~np.isnan(x)]
                nz = int((x == 0).sum())
                self.zero[c] = (nz + 0.5) / (len(x) + 1.0) if nz else 1e-12
        self.freq = {}
        for c in self.disc:
            vals = [str(v) for v in train.column(c).to_pylist() if v is not None]
            counts: dict[str, int] = {}
            for v in vals:
                counts[v] = counts.get(v, 0) + 1
            oov = good_turing_oov(counts) if self.kinds[c] == "categorical" else 0.0
            tot = sum(counts.values()) + 0.5 * len(counts)
            self.freq[c] = ({k: (1 - oov) * (v + 0.5) / tot for k, v in counts.items()}, oov)

    def _raw_t(self, c, x):
        k = self.kinds[c]
        if k == "real":
            return x
        if k == "positive":
            return np.log(np.where(x > 0, x, 1.0))
        return np.log(x + 1.0)

    def transform(self, table: pa.Table, dequantise: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (Z [N, C] standardised, observed [N, C], log-Jacobian [N] summed over observed cells)."""
        n = table.num_rows
        z = np.zeros((n, len(self.cont)))
        obs = np.zeros((n, len(self.cont)), dtype=bool)
        jac = np.zeros(n)
        for j, c in enumerate(self.cont):
            x = _floats(table.column(c))
            o = ~np.isnan(x)
            if self.kinds[c] == "positive":
                o &= x != 0
            xv = np.where(o, x, 1.0)
            if dequantise and self.kinds[c] == "count":
                xv = xv + self.rng.uniform(-0.5, 0.5, n)
            m, s = self.tf[c]
            z[:, j] = (self._raw_t(c, xv) - m) / s
            obs[:, j] = o
            lj = -math.log(s) - (0.0 * xv if self.kinds[c] == "real" else self._raw_t(c, xv))
            jac += np.where(o, lj, 0.0)
        return z, obs, jac

    def discrete_log_mass(self, table: pa.Table) -> np.ndarray:
        out = np.zeros(table.num_rows)
        for c in self.cont:
            if self.kinds[c] == "positive":
                x = _floats(table.column(c))
                p0 = self.zero[c]
                out += np.where(np.isnan(x), 0.0, np.where(x == 0, math.log(p0), math.log1p(-p0)))
        for c in self.disc:
            probs, oov = self.freq[c]
            for i, v in enumerate(table.column(c).to_pylist()):
                if v is None:
                    continue
                p = probs.get(str(v))
                out[i] += math.log(p) if p is not None else math.log(oov if oov > 0 else 1e-12)
        return out

    def filled(self, table: pa.Table) -> np.ndarray:
        """Training matrix with unobserved cells drawn from the column's observed values (hot deck)."""
        z, obs, _ = self.transform(table, dequantise=True)
        for j in range(z.shape[1]):
            pool = z[obs[:, j], j]
            miss = ~obs[:, j]
            if miss.any():
                z[miss, j] = self.rng.choice(pool, miss.sum()) if pool.size else 0.0
        return z

    def log_likelihood(self, table: pa.Table, gaussian_log_density) -> np.ndarray:
        z, obs, jac = self.transform(table)
        return gaussian_log_density(z, obs) + jac + self.discrete_log_mass(table)


def _floats(col) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def mixture_log_density(weights, means, covs, z, obs) -> np.ndarray:
    """log sum_k w_k N(z_o; mu_k,o, Sigma_k,oo) per row, over each row's observed dimensions."""
    out = np.zeros(z.shape[0])
    patterns, inv = np.unique(obs, axis=0, return_inverse=True)
    for p, pat in enumerate(patterns):
        rows = np.flatnonzero(inv.ravel() == p)
        d = np.flatnonzero(pat)
        if d.size == 0:
            continue
        comp = []
        for w, mu, cov in zip(weights, means, covs, strict=True):
            sub = cov[np.ix_(d, d)]
            chol = np.linalg.cholesky(sub)
            diff = z[np.ix_(rows, d)] - mu[d]
            sol = np.linalg.solve(chol, diff.T)
            maha = (sol**2).sum(0)
            logdet = 2 * np.log(np.diag(chol)).sum()
            comp.append(math.log(w) - 0.5 * (maha + logdet + d.size * math.log(2 * math.pi)))
        out[rows] = np.logaddexp.reduce(np.stack(comp), axis=0)
    return out


def fit_gmm(peer, train, valid, sizes, seed):
    from sklearn.mixture import GaussianMixture

    x = peer.filled(train)
    best = None
    for k in sizes:
        if k * 5 > len(x):
            break
        g = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed, max_iter=200).fit(x)
        dens = lambda z, o, g=g: mixture_log_density(g.weights_, g.means_, g.covariances_, z, o)  # noqa: E731
        ll = peer.log_likelihood(valid, dens).mean()
        if best is None or ll > best[0]:
            best = (ll, k, dens)
    return best[2], best[1]


def fit_factor(peer, train, valid, sizes, seed):
    from sklearn.decomposition import FactorAnalysis

    x = peer.filled(train)
    best = None
    for k in sizes:
        if k >= x.shape[1]:
            break
        fa = FactorAnalysis(k, random_state=seed).fit(x)
        cov = fa.components_.T @ fa.components_ + np.diag(fa.noise_variance_)
        dens = lambda z, o, m=fa.mean_, c=cov: mixture_log_density([1.0], [m], [c], z, o)  # noqa: E731
        ll = peer.log_likelihood(valid, dens).mean()
        if best is None or ll > best[0]:
            best = (ll, k, dens)
    return best[2], best[1]


def iforest_matrix(peer: MixedPeer, table: pa.Table, medians=None):
    z, obs, _ = peer.transform(table)
    if medians is None:
        medians = np.array([np.median(z[obs[:, j], j]) if obs[:, j].any() else 0.0 for j in range(z.shape[1])])
    z = np.where(obs, z, medians)
    codes = []
    for c in peer.disc:
        probs, _ = peer.freq[c]
        index = {k: i for i, k in enumerate(sorted(probs))}
        codes.append([index.get(str(v), -1) if v is not None else -2 for v in table.column(c).to_pylist()])
    extra = np.asarray(codes, dtype=np.float64).T if codes else np.zeros((table.num_rows, 0))
    return np.hstack([z, extra]), medians


def fit_ecod(peer: MixedPeer, train: pa.Table):
    """PyOD's ECOD (empirical-CDF outlier scores; AP only) on the IsolationForest matrix, where PyOD installs."""
    try:
        from pyod.models.ecod import ECOD
    except ImportError:
        print("ecod: PyOD is not installed (pip install pyod); left out")
        return None
    xm, med = iforest_matrix(peer, train)
    model = ECOD().fit(xm)
    return lambda tb: model.decision_function(iforest_matrix(peer, tb, med)[0])


# ---- vaepipe ---------------------------------------------------------------------------------------
@dataclass
class VaepipeArm:
    model: VAE
    codec: TableCodec
    iw_samples: int

    def log_marginal(self, table: pa.Table) -> np.ndarray:
        enc = self.codec.encode(table)
        if enc.invalid:
            raise RuntimeError(f"benchmark produced unscorable rows: {enc.invalid[:3]}")
        out = []
        for i in range(0, len(enc), 1024):
            b = enc.select(np.arange(i, min(i + 1024, len(enc))))
            out.append(score_batch(self.model, b, mc_samples=1, iw_samples=self.iw_samples).log_marginal)
        return np.concatenate(out)


def fit_vaepipe(spec, train, valid, args, overrides: dict | None = None) -> VaepipeArm:
    """The product's model with its defaults; ``overrides`` (a variant) may set VAEConfig / TrainConfig fields."""
    families = fit_families(spec, partial_stats(spec, train))
    codec = TableCodec(spec, families)
    torch.manual_seed(args.seed)
    mcfg = sized_config(len(spec.features), train.num_rows)
    cfg = TrainConfig(seed=args.seed)
    if args.epochs:
        cfg.epochs = args.epochs
    for k, v in (overrides or {}).items():
        target = mcfg if hasattr(mcfg, k) else cfg
        if not hasattr(target, k):
            raise SystemExit(f"unknown variant setting {k!r}")
        old = getattr(target, k)
        if isinstance(old, bool):
            new = v.lower() in ("1", "true")
        elif isinstance(old, tuple):  # hidden=64x64
            new = tuple(int(w) for w in v.split("x"))
        else:
            new = type(old)(v) if old is not None else int(v)
        setattr(target, k, new)
    model = VAE(families, mcfg)
    fit(model, codec.encode(train), cfg, codec.encode(valid))
    return VaepipeArm(model, codec, args.iw_samples)


def parse_variants(text: str) -> dict[str, dict]:
    """'name:key=value,key=value;name2:...' -> {name: {key: value}}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, body = part.partition(":")
        out[name] = dict(kv.split("=", 1) for kv in body.split(",") if kv)
    return out


# ---- the run -------------------------------------------------------------------------------------
def run_table(name: str, args) -> dict:
    t0 = time.perf_counter()
    table, spec = load_table(name)
    train, valid, test = split(table, spec, args.max_train, args.max_test)
    features = {f.name: f.type for f in spec.features}
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(args.threads)

    scorers: dict = {}  # method -> table -> anomaly score (higher = more anomalous)
    ll: dict = {}
    timing: dict = {}

    arms = ({} if args.no_vaepipe else {"vaepipe": {}}) | parse_variants(args.variants)
    for label, overrides in arms.items():
        t = time.perf_counter()
        arm = fit_vaepipe(spec, train, valid, args, overrides)
        scorers[label] = lambda tb, arm=arm: -arm.log_marginal(tb)
        timing[label] = time.perf_counter() - t

    peers = set(args.peers.split(",")) if args.peers else set(PEERS)
    k_gmm = k_fa = None
    if "independent" in peers:
        t = time.perf_counter()
        fams = fit_families(spec, partial_stats(spec, train))
        codec = TableCodec(spec, fams)
        base = IndependentBaseline(fams).fit(codec.encode(train))

        def base_score(tb):
            with torch.no_grad():
                return -base.log_likelihood(codec.encode(tb)).numpy()

        scorers["independent"] = base_score
        timing["independent"] = time.perf_counter() - t

    peer = MixedPeer(spec, train, np.random.default_rng(args.seed))
    if "gmm" in peers:
        sizes = (1, 2, 4, 8, 16, 32) if not args.quick else (1, 4, 16)
        t = time.perf_counter()
        gmm, k_gmm = fit_gmm(peer, train, valid, sizes, args.seed)
        scorers["gmm"] = lambda tb: -peer.log_likelihood(tb, gmm)
        timing["gmm"] = time.perf_counter() - t
    if "factor" in peers:
        t = time.perf_counter()
        fa, k_fa = fit_factor(peer, train, valid, (1, 2, 4, 8, 16) if not args.quick else (2, 4, 8), args.seed)
        scorers["factor"] = lambda tb: -peer.log_likelihood(tb, fa)
        timing["factor"] = time.perf_counter() - t
    if "iforest" in peers:
        from sklearn.ensemble import IsolationForest

        t = time.perf_counter()
        xm, med = iforest_matrix(peer, train)
        iso = IsolationForest(n_estimators=200, random_state=args.seed).fit(xm)
        scorers["iforest"] = lambda tb: -iso.score_samples(iforest_matrix(peer, tb, med)[0])
        timing["iforest"] = time.perf_counter() - t
    if "ecod" in peers:
        t = time.perf_counter()
        ecod = fit_ecod(peer, train)
        if ecod is not None:
            scorers["ecod"] = ecod
            timing["ecod"] = time.perf_counter() - t

    clean = {m: f(test) for m, f in scorers.items()}
    median_ll: dict = {}
    for m in scorers:
        if m not in ("iforest", "ecod"):
            ll[m] = float(-clean[m].mean())
            median_ll[m] = float(np.median(-clean[m]))

    n_pos = max(1, round(0.01 * test.num_rows))
    ap: dict = {m: {} for m in scorers}
    for kind in KINDS:
        per = {m: [] for m in scorers}
        got = 0
        for _ in range(max(1, math.ceil(args.positives / n_pos)) * 3):
            if got >= args.positives:
                break
            try:
                bad = corrupt(train, test, features, kind, n_pos, rng)
            except NotApplicable:
                break
            got += bad.table.num_rows
            keep = np.setdiff1d(np.arange(test.num_rows), bad.source_rows)
            labels = np.r_[np.zeros(keep.size, bool), np.ones(bad.table.num_rows, bool)]
            for m, f in scorers.items():
                s = np.r_[clean[m][keep], f(bad.table)]
                per[m].append(average_precision(labels, s))
        for m in scorers:
            ap[m][kind] = float(np.mean(per[m])) if per[m] else None
    return {
        "name": name, "train": train.num_rows, "valid": valid.num_rows, "test": test.num_rows, "ap": ap, "ll": ll,
        "median_ll": median_ll, "sizes": {"gmm": k_gmm, "factor": k_fa}, "seconds": time.perf_counter() - t0,
        "fit_seconds": timing, "n_pos": n_pos,
    }


def print_timing(r: dict) -> None:
    print("fit seconds: " + ", ".join(f"{m} {s:.0f}" for m, s in r["fit_seconds"].items()))


def print_table(r: dict) -> None:
    print(f"\n## {r['name']}: train {r['train']}, valid {r['valid']}, test {r['test']} rows; "
          f"{r['n_pos']} corrupted per repeat; gmm k={r['sizes']['gmm']}, factor k={r['sizes']['factor']}; "
          f"{r['seconds']:.0f} s")
    kinds = [k for k in KINDS if any(r["ap"][m][k] is not None for m in r["ap"])]
    head = (f"| {'method':<12}| " + " | ".join(f"{k:>12}" for k in kinds)
            + f" | {'mean AP':>8} | {'held-out LL':>12} | {'median LL':>10} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for m, per in r["ap"].items():
        vals = [per[k] for k in kinds]
        mean = np.mean([v for v in vals if v is not None])
        llv = f"{r['ll'][m]:>12.3f}" if m in r["ll"] else f"{'-':>12}"
        med = f"{r['median_ll'][m]:>10.3f}" if m in r["median_ll"] else f"{'-':>10}"
        cells = " | ".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in vals)
        print(f"| {m:<12}| {cells} | {mean:>8.3f} | {llv} | {med} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--quick", action="store_true", help="smaller splits and model-size grids (a smoke run)")
    p.add_argument("--max-train", type=int, default=None, help="training rows cap (default 12000; quick 3000)")
    p.add_argument("--max-test", type=int, default=None, help="test rows cap (default 3000; quick 1000)")
    p.add_argument("--positives", type=int, default=30, help="corrupted records ranked per kind (at least)")
    p.add_argument("--iw-samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=0, help="vaepipe epochs (0: the training default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for these small networks)")
    p.add_argument("--variants", default="", help="extra vaepipe arms, 'name:key=value,...;name2:...' setting "
                   "VAEConfig or TrainConfig fields (e.g. 'unbounded:var_modulation=0')")
    p.add_argument("--peers", default="", help=f"peers to fit beside vaepipe (default all: {','.join(PEERS)})")
    p.add_argument("--no-vaepipe", action="store_true", help="leave out the default vaepipe arm (variants only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # BLAS threads of numpy / scikit-learn, like torch's
    args.max_train = args.max_train or (3000 if args.quick else 12000)
    args.max_test = args.max_test or (1000 if args.quick else 3000)
    print(f"settings: {vars(args)}")
    for name in args.tables.split(","):
        r = run_table(name.strip(), args)
        print_table(r)
        print_timing(r)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
