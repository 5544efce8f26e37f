"""Every likelihood family against its scipy.stats twin: one table of fixtures, generic tests over it.

Each row pairs a fitted family and raw decoder outputs with a function that builds the same
distribution in scipy from the *interpreted* parameters, and values to evaluate. Adding a family
means adding rows here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy import integrate, special, stats

from pipeline.core.likelihoods import Binary, Categorical, Count, Family, Ordinal, Positive, Real
from pipeline.core.likelihoods.positive import ZERO_FLOOR


@dataclass
class Case:
    id: str
    family: Family
    raw: list[float]  # one record's raw decoder output
    values: list[float]  # encoded values (as EncodedColumn.value holds them)
    twin: Callable[[Family, torch.Tensor, np.ndarray], np.ndarray]  # scipy log-density at values
    support: str  # "continuous" (integrate over x), "mixed" (mass at 0 + density), "discrete"


def _real_twin(fam, raw, x):
    mean, log_var = (t.item() for t in fam.params(raw))
    return stats.norm(loc=fam.loc + fam.scale * mean, scale=fam.scale * math.exp(0.5 * log_var)).logpdf(x)


def _positive_twin(fam, raw, x):
    mean, log_var, logit = (t.item() for t in fam.params(raw))
    pi = special.expit(logit)
    ln = stats.lognorm(s=fam.scale * math.exp(0.5 * log_var), scale=math.exp(fam.loc + fam.scale * mean))
    with np.errstate(divide="ignore"):
        return np.where(x == 0, np.log(pi), np.log1p(-pi) + ln.logpdf(np.where(x == 0, 1.0, x)))


def _positive_bound_twin(fam, raw, x):
    """No point mass: a zero has min(floor, the log-normal's mass below the bound) (scipy's logcdf)."""
    mean, log_var, _ = (t.item() for t in fam.params(raw))
    ln = stats.lognorm(s=fam.scale * math.exp(0.5 * log_var), scale=math.exp(fam.loc + fam.scale * mean))
    log_p0 = min(math.log(ZERO_FLOOR), float(ln.logcdf(fam.zero_bound)))
    with np.errstate(divide="ignore"):
        return np.where(x == 0, log_p0, np.log1p(-math.exp(log_p0)) + ln.logpdf(np.where(x == 0, 1.0, x)))


def _count_twin(fam, raw, k):
    log_mu, log_r = (t.item() for t in fam.params(raw))
    mu, r = math.exp(log_mu), math.exp(log_r)
    return stats.nbinom(n=r, p=r / (r + mu)).logpmf(k)


def _count_lognormal_twin(fam, raw, k):
    """scipy's normal CDF over the bin of log(1 + k) (standardised), the upper tail through sf."""
    mean, log_var = (t.item() for t in fam.params(raw))
    g = stats.norm(loc=mean, scale=math.exp(0.5 * log_var))
    hi = (np.log1p(np.asarray(k) + 0.5) - fam.loc) / fam.scale
    lo = np.where(np.asarray(k) == 0, -np.inf, (np.log1p(np.asarray(k) - 0.5) - fam.loc) / fam.scale)
    return np.log(np.where(lo > mean, g.sf(lo) - g.sf(hi), g.cdf(hi) - g.cdf(lo)))


def _count_floor_twin(fam, raw, k):
    """The bins, the zero's mass capped at the floor and the bins above it rescaled to share the rest."""
    mean, log_var = (t.item() for t in fam.params(raw))
    g = stats.norm(loc=mean, scale=math.exp(0.5 * log_var))
    b0 = (math.log1p(0.5) - fam.loc) / fam.scale
    p0 = min(ZERO_FLOOR, float(g.cdf(b0)))
    bins = _count_lognormal_twin(fam, raw, k)
    return np.where(np.asarray(k) == 0, math.log(p0), bins + math.log1p(-p0) - float(g.logsf(b0)))


def _binary_twin(fam, raw, y):
    return stats.bernoulli(special.expit(fam.params(raw).item())).logpmf(y)


def _categorical_twin(fam, raw, k):
    p = special.softmax(np.clip(raw.numpy().astype(np.float64), -20, 20))
    if fam.oov_mass is not None:  # a fixed out-of-vocabulary mass, the vocabulary sharing the rest
        p = np.r_[(1.0 - fam.oov_mass) * p, fam.oov_mass]
    m = stats.multinomial(1, p)
    return np.array([m.logpmf(np.eye(len(p))[int(i)]) for i in k])


def _ordinal_twin(fam, raw, k):
    theta = fam.params(raw).numpy()
    cdf = np.concatenate([[0.0], stats.logistic.cdf(theta), [1.0]])
    return np.log(np.diff(cdf))[np.asarray(k, dtype=int)]


REAL = Real("r", loc=3.0, scale=2.5)
POS_ZEROS = Positive("p0", loc=1.2, scale=0.7, zero_fraction=0.6)
POS = Positive("p", loc=-0.5, scale=1.3, zero_fraction=0.0)  # before zero_bound: a zero at the floor
POS_BOUND = Positive("pb", loc=1.7, scale=0.2, zero_fraction=0.0, zero_bound=3.7)  # the default without zeros
COUNT = Count("c", loc=1.0, scale=0.8, log_mean=math.log(4.0))  # negative binomial (models before the default)
COUNT_LN = Count("c", loc=1.0, scale=0.8, log_mean=math.log(4.0), dist="lognormal")  # the default
COUNT_FLOOR = Count("c", loc=1.0, scale=0.8, log_mean=math.log(4.0), dist="lognormal", zero_floor=True)  # no zeros
BINARY = Binary("b", ["no", "yes"])
CAT = Categorical("k", ["a", "b", "c", "d"])  # out-of-vocabulary mass learned (models before Good-Turing)
CAT_GT = Categorical("k", ["a", "b", "c", "d"], oov_mass=0.03)  # out-of-vocabulary mass from counts
ORD = Ordinal("o", ["low", "mid", "high", "top"])

CASES = [
    Case("real-std", REAL, [0.0, 0.0], [-4.0, 0.0, 3.0, 7.5, 20.0], _real_twin, "continuous"),
    Case("real-shifted-narrow", REAL, [1.3, -3.0], [5.0, 6.25, 7.0], _real_twin, "continuous"),
    Case("real-wide", REAL, [-2.0, 2.5], [-30.0, 0.0, 40.0], _real_twin, "continuous"),
    Case("real-var-floor", REAL, [0.2, -40.0], [3.5, 3.52, 3.6], _real_twin, "continuous"),
    Case("positive-zeros", POS_ZEROS, [0.3, -0.5, 0.8], [0.0, 0.5, 3.3, 10.0, 250.0], _positive_twin, "mixed"),
    Case("positive-zeros-rare", POS_ZEROS, [-1.0, 1.0, -6.0], [0.0, 0.01, 1.0, 7.0], _positive_twin, "mixed"),
    Case("positive-nozeros", POS, [0.0, 0.0], [0.05, 0.6, 2.0, 9.0], _positive_twin, "mixed"),
    Case("positive-nozeros-zero", POS, [0.5, -1.0], [0.0, 1e-6, 1.0], _positive_twin, "mixed"),
    Case("positive-bound-floor", POS_BOUND, [-6.0, 2.0], [0.0, 1.0, 3.0, 5.5], _positive_bound_twin, "mixed"),
    Case("positive-bound-tight", POS_BOUND, [0.2, -8.0], [0.0, 3.69, 5.9, 6.1], _positive_bound_twin, "mixed"),
    Case("count-mean4", COUNT, [0.0, 0.0], [0, 1, 4, 10, 40], _count_twin, "discrete"),
    Case("count-overdispersed", COUNT, [1.5, -2.0], [0, 3, 50, 500], _count_twin, "discrete"),
    Case("count-near-poisson", COUNT, [-1.0, 8.0], [0, 1, 2, 9], _count_twin, "discrete"),
    Case("count-lognormal", COUNT_LN, [0.0, 0.0], [0, 1, 4, 10, 40, 300], _count_lognormal_twin, "discrete"),
    Case("count-lognormal-tight", COUNT_LN, [0.9, -5.0], [0, 3, 5, 6, 7, 20], _count_lognormal_twin, "discrete"),
    Case("count-lognormal-wide", COUNT_LN, [-0.5, 1.0], [0, 1, 100, 5000], _count_lognormal_twin, "discrete"),
    Case("count-floor-binding", COUNT_FLOOR, [-1.5, 0.0], [0, 1, 2, 7, 60], _count_floor_twin, "discrete"),
    Case("count-floor-tight", COUNT_FLOOR, [0.9, -5.0], [0, 3, 5, 6, 7, 20], _count_floor_twin, "discrete"),
    Case("binary-p", BINARY, [0.7], [0, 1], _binary_twin, "discrete"),
    Case("binary-extreme", BINARY, [-14.0], [0, 1], _binary_twin, "discrete"),
    Case("categorical", CAT, [0.5, -1.0, 2.0, 0.0, -3.0], [0, 1, 2, 3, 4], _categorical_twin, "discrete"),
    Case("categorical-peaked", CAT, [9.0, -9.0, 0.0, 1.0, -25.0], [0, 2, 4], _categorical_twin, "discrete"),
    Case("categorical-oov-mass", CAT_GT, [0.5, -1.0, 2.0, 0.0], [0, 1, 2, 3, 4], _categorical_twin, "discrete"),
    Case("categorical-oov-peaked", CAT_GT, [19.0, -19.0, 0.0, 1.0], [0, 3, 4], _categorical_twin, "discrete"),
    Case("ordinal", ORD, [-1.0, 0.3, 0.5], [0, 1, 2, 3], _ordinal_twin, "discrete"),
    Case("ordinal-tight", ORD, [2.0, -6.0, -6.0], [0, 1, 2, 3], _ordinal_twin, "discrete"),
    Case("ordinal-shifted", ORD, [-12.0, 3.0, 0.1], [0, 1, 2, 3], _ordinal_twin, "discrete"),
]


def _lp(case: Case, values) -> np.ndarray:
    raw = torch.tensor(case.raw).expand(len(values), -1)
    return case.family.log_prob(raw, torch.tensor(values, dtype=torch.float64)).numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_log_prob_matches_scipy(case: Case):
    ours = _lp(case, case.values)
    ref = case.twin(case.family, torch.tensor(case.raw), np.asarray(case.values, dtype=np.float64))
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_normalised(case: Case):
    """Total probability 1: sum over the support, or integrate the density (plus the zero mass)."""
    fam = case.family
    raw = torch.tensor(case.raw).unsqueeze(0)

    def density(x: float) -> float:
        return math.exp(fam.log_prob(raw, torch.tensor([x], dtype=torch.float64)).item())

    if case.support == "discrete":
        if isinstance(fam, Count):
            k = np.arange(0, 20000, dtype=np.float64)
        else:
            k = np.arange(fam.n_classes if isinstance(fam, Categorical) else len(getattr(fam, "levels", [0, 1])))
        total = np.exp(_lp(case, k.tolist())).sum()
    elif case.support == "continuous":
        mean, log_var = (t.item() for t in fam.params(raw[0]))
        c, s = fam.loc + fam.scale * mean, fam.scale * math.exp(0.5 * log_var)
        total = integrate.quad(density, c - 40 * s, c + 40 * s, points=[c], limit=200)[0]
    else:  # point mass at 0 plus a density on (0, inf), integrated over log x
        mass0 = density(0.0)
        mean, log_var, _ = (t.item() for t in fam.params(raw[0]))
        c, s = fam.loc + fam.scale * mean, fam.scale * math.exp(0.5 * log_var)  # of log x
        inner = integrate.quad(lambda t: density(math.exp(t)) * math.exp(t), c - 40 * s, c + 40 * s, points=[c])[0]
        total = mass0 + inner
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_broadcasts_over_samples(case: Case):
    """raw [S, N, P] with values [N] -> [S, N]; each sample row equals the single-sample result."""
    n = len(case.values)
    raw = torch.tensor(case.raw).expand(3, n, -1)
    out = case.family.log_prob(raw, torch.tensor(case.values, dtype=torch.float64))
    assert out.shape == (3, n)
    np.testing.assert_allclose(out[1].numpy(), _lp(case, case.values), rtol=1e-12)


# ---- extremes: finite, very low, never NaN or inf -----------------------------------------------
EXTREMES = [
    (REAL, [1e6 * 2.5 + 3.0, -1e12, 1e300]),
    (POS_ZEROS, [1e300, 1e-300, 5e-324]),
    (POS, [0.0, 1e300, 1e-300]),  # a zero where training never had one
    (POS_BOUND, [0.0, 1e300, 1e-300]),
    (COUNT, [1e9, 1e15]),
    (COUNT_FLOOR, [0.0, 1e9, 1e15]),
    (CAT, [4.0]),  # out of vocabulary
    (CAT_GT, [4.0]),
]


@pytest.mark.parametrize("fam,values", EXTREMES, ids=lambda v: getattr(v, "name", None))
@pytest.mark.parametrize("raw_scale", [0.0, 1e3, -1e3, 1e30])
def test_extreme_values_are_finite_and_low(fam: Family, values, raw_scale):
    raw = torch.full((len(values), fam.n_params), raw_scale, requires_grad=True)
    lp = fam.log_prob(raw, torch.tensor(values, dtype=torch.float64))
    assert torch.isfinite(lp).all(), lp
    typical = fam.log_prob(torch.zeros(1, fam.n_params), torch.tensor([_typical(fam)], dtype=torch.float64))
    # under a sane decoder output, extreme values score below a typical one (an unseen label is as likely
    # as the decoder says: low only after training; a density near 0 in x's units can legitimately be high)
    if raw_scale == 0.0 and not isinstance(fam, Categorical):
        assert (lp < typical).all()
    lp.sum().backward()
    assert torch.isfinite(raw.grad).all()


def _typical(fam: Family) -> float:
    if isinstance(fam, Real):
        return fam.loc
    if isinstance(fam, Positive):
        return math.exp(fam.loc)
    if isinstance(fam, Count):
        return 3.0
    return 0.0


def test_unseen_zero_gets_floor_mass():
    lp = POS.log_prob(torch.zeros(1, 2), torch.tensor([0.0], dtype=torch.float64)).item()
    assert lp == pytest.approx(math.log(ZERO_FLOOR), rel=1e-9)


def test_real_variance_floor_bounds_density():
    """On a repeated value the density cannot exceed the floor's: sigma >= sqrt(min_var) * scale."""
    lp = REAL.log_prob(torch.tensor([[0.0, -1e4]]), torch.tensor([REAL.loc], dtype=torch.float64)).item()
    bound = stats.norm(0, REAL.scale * math.sqrt(REAL.min_var)).logpdf(0.0)
    assert lp <= bound + 1e-9
    assert lp == pytest.approx(bound, abs=1e-3)


# ---- codecs ---------------------------------------------------------------------------------------
def test_codecs_flag_what_cannot_be_scored():
    enc = POS_ZEROS.encode(pa.array([1.0, None, float("nan"), -2.0, float("inf"), 0.0]))
    assert enc.observed.tolist() == [True, False, False, False, False, True]
    assert enc.invalid.tolist() == [None, None, None, "negative value in a positive column", "infinite value", None]
    enc = COUNT.encode(pa.array([0, 3, None]))
    assert enc.invalid is None and enc.observed.tolist() == [True, True, False]
    enc = COUNT.encode(pa.array([1.5, -1.0, 2.0]))
    assert enc.invalid.tolist() == ["non-integer value in a count column", "negative value in a count column", None]
    enc = CAT.encode(pa.array(["b", "zzz", None]))
    assert enc.value.tolist()[:2] == [1.0, 4.0] and enc.observed.tolist() == [True, True, False]
    assert enc.invalid is None  # unseen labels are scored with the out-of-vocabulary class
    enc = ORD.encode(pa.array(["high", "nope"]))
    assert enc.value[0] == 2.0 and enc.invalid.tolist() == [None, "value is not an ordinal level"]


def test_ordinal_numeric_levels_match_by_value():
    fam = Ordinal.from_stats("o", Ordinal.partial_stats(pa.array([3, 1, 2, 10, 2])))
    assert fam.levels == ["1", "2", "3", "10"]  # numeric order, not text order
    enc = fam.encode(pa.array([10.0, 2.0, 7.0]))
    assert enc.value[:2].tolist() == [3.0, 1.0]
    assert enc.invalid.tolist() == [None, None, "value is not an ordinal level"]


def test_rare_zeros_get_no_point_mass():
    """Zeros rarer than 1 in 1,000 of a positive column are errors: they score at the floor, charged to
    the column; a column whose zeros are common keeps a point mass at its zero fraction."""
    from pipeline.core.likelihoods.positive import MIN_ZERO_FRACTION

    x = np.r_[np.zeros(3), np.random.default_rng(0).lognormal(0.0, 0.3, 9997)]
    rare = Positive.from_stats("p", Positive.partial_stats(pa.array(x)))
    assert MIN_ZERO_FRACTION > 3 / 10_000 and not rare.has_zeros
    lp = rare.log_prob(torch.zeros(1, rare.n_params), torch.tensor([0.0], dtype=torch.float64)).item()
    assert lp == pytest.approx(math.log(ZERO_FLOOR), rel=1e-9)
    common = Positive.from_stats("p", Positive.partial_stats(pa.array(np.r_[np.zeros(30), x[3:]])))
    assert common.has_zeros and common.zero_fraction == pytest.approx(30 / 10_027)
    assert rare.zero_bound == x[3:].min() and common.zero_bound is None


def test_zero_without_point_mass_is_charged_by_the_model():
    """A zero in a column without a point mass costs at least the floor; where the model is sure the value
    is far above the column's smallest, it costs the log-normal's tail (thousands of nats, exact), and a
    rescaled column (its bound rescaled with it) gives the zero the same mass."""
    # v = (log x - 1.7) / 0.2 ~ N(0, 2e-4) (the variance floor's 1e-4 plus 1e-4): x ~ 5.47 within 0.3%;
    # the bound 3.7 is 138 sigmas below
    tight = torch.tensor([[0.0, math.log(1e-4)]], dtype=torch.float64)
    zero = torch.tensor([0.0], dtype=torch.float64)
    lp = POS_BOUND.log_prob(tight, zero).item()
    ref = stats.norm.logcdf((math.log(3.7) - 1.7) / 0.2 / math.sqrt(2e-4))
    assert lp == pytest.approx(ref, rel=1e-9) and lp < -9000
    wide = POS_BOUND.log_prob(torch.tensor([[-6.0, 2.0]]), zero).item()
    assert wide == pytest.approx(math.log(ZERO_FLOOR), rel=1e-12)  # small values plausible: the floor
    c = 1000.0
    scaled = Positive("pb", loc=1.7 + math.log(c), scale=0.2, zero_fraction=0.0, zero_bound=3.7 * c)
    assert scaled.log_prob(tight, zero).item() == pytest.approx(lp, rel=1e-9)


def test_count_zeros_training_never_had_cost_the_floor():
    """A count column whose zeros are rarer than 1 in 1,000 caps a zero's mass at the floor, however low
    the decoder puts the count (an age of 0 cannot pass for an ordinary value); a column with common zeros
    keeps the plain bins, and the cap needs no more than the column's statistics."""
    rng = np.random.default_rng(0)
    ages = np.r_[0, rng.integers(17, 90, 9999)]
    rare = Count.from_stats("age", Count.partial_stats(pa.array(ages)))
    kids = Count.from_stats("kids", Count.partial_stats(pa.array(rng.poisson(1.2, 10_000))))
    assert rare.zero_floor and not kids.zero_floor and rare.dist == "lognormal"
    zero = torch.tensor([0.0], dtype=torch.float64)
    below = torch.tensor([[-20.0, -8.0]])  # the decoder sure the count is far below anything seen: p(0) ~ 1
    assert rare.log_prob(below, zero).item() == pytest.approx(math.log(ZERO_FLOOR), rel=1e-9)
    assert kids.log_prob(below, zero).item() > -1e-6
    merged = Count.merge_stats(Count.partial_stats(pa.array(ages[:5000])), Count.partial_stats(pa.array(ages[5000:])))
    whole, split = rare.state(), Count.from_stats("age", merged).state()
    assert split.keys() == whole.keys() and split["zero_floor"] is True
    for k in ("loc", "scale", "log_mean"):
        assert split[k] == pytest.approx(whole[k], rel=1e-12)
    assert Count("c", **COUNT_LN.state()).zero_floor is False  # artifacts written before it: plain bins


@pytest.mark.parametrize("kind", ["real", "positive", "count"])
def test_decoder_mean_held_within_the_training_range(kind):
    """The decoder's mean cannot leave the training values' range widened by one standard deviation (on the
    column's modelling scale): a raw mean far beyond scores exactly as the bound does, one inside is
    untouched; the bounds come from the statistics alone, merged or whole, and a rescaled column has the
    same standardised bounds."""
    from pipeline.core.likelihoods.base import MEAN_MARGIN

    rng = np.random.default_rng(1)
    x = {"real": rng.normal(50.0, 10.0, 4000), "positive": rng.lognormal(2.0, 0.4, 4000),
         "count": rng.poisson(30.0, 4000).astype(float)}[kind]
    cls = {"real": Real, "positive": Positive, "count": Count}[kind]
    fam = cls.from_stats("c", cls.partial_stats(pa.array(x)))
    t = {"real": x, "positive": np.log(x), "count": np.log1p(x)}[kind]
    assert fam.mean_low == pytest.approx((t.min() - fam.loc) / fam.scale - MEAN_MARGIN, rel=1e-9)
    assert fam.mean_high == pytest.approx((t.max() - fam.loc) / fam.scale + MEAN_MARGIN, rel=1e-9)
    parts = [cls.partial_stats(pa.array(c)) for c in np.array_split(x, 5)]
    merged = parts[0]
    for q in parts[1:]:
        merged = cls.merge_stats(merged, q)
    assert cls.from_stats("c", merged).mean_high == pytest.approx(fam.mean_high, rel=1e-9)
    assert cls(fam.name, **fam.state()).state() == fam.state()  # stored and rebuilt
    values = torch.tensor([float(np.median(x))] * 3, dtype=torch.float64)
    far = torch.zeros(3, fam.n_params, dtype=torch.float64)
    far[:, 0] = torch.tensor([1e4, fam.mean_high, 0.5 * fam.mean_high], dtype=torch.float64)
    lp = fam.log_prob(far, values)
    assert lp[0].item() == pytest.approx(lp[1].item(), rel=1e-12)
    assert fam.params(far)[0][2].item() == pytest.approx(0.5 * fam.mean_high, rel=1e-12)
    if kind != "count":
        scaled = cls.from_stats("c", cls.partial_stats(pa.array(x * 1000.0)))
        assert scaled.mean_low == pytest.approx(fam.mean_low, rel=1e-9, abs=1e-9)
        assert scaled.mean_high == pytest.approx(fam.mean_high, rel=1e-9)
    old = {k: v for k, v in fam.state().items() if k not in ("mean_low", "mean_high")}
    assert cls("c", **old).params(far)[0][0].item() == 1e4  # artifacts written before the bound


def test_stacked_mean_bounds_are_per_column():
    a = Real("a", 0.0, 1.0, mean_low=-2.0, mean_high=2.0)
    b = Real("b", 5.0, 2.0, mean_low=-1.0, mean_high=6.0)
    stack = Real.stack([a, b])
    raw = torch.tensor([[[9.0, 0.0], [9.0, 0.0]]])  # [1 record, 2 columns, 2 params]
    values = torch.tensor([[1.0, 7.0]], dtype=torch.float64)
    got = stack.log_prob(raw, values)[0]
    for j, fam in enumerate((a, b)):
        assert got[j].item() == pytest.approx(fam.log_prob(raw[:, j], values[:, j]).item(), rel=1e-12)
    assert Real("c", 0.0, 1.0).group_key() != a.group_key()


def test_partial_stats_merge_equals_whole():
    rng = np.random.default_rng(0)
    x = np.where(rng.random(1000) < 0.3, 0.0, rng.lognormal(1.0, 0.5, 1000))
    whole = Positive.from_stats("p", Positive.partial_stats(pa.array(x)))
    parts = [Positive.partial_stats(pa.array(c)) for c in np.array_split(x, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = Positive.merge_stats(merged, p)
    split = Positive.from_stats("p", merged)
    for k, v in whole.state().items():
        assert split.state()[k] == pytest.approx(v, rel=1e-12)
    assert whole.zero_fraction == pytest.approx((x == 0).mean())
    assert whole.loc == pytest.approx(np.log(x[x > 0]).mean())
    assert whole.scale == pytest.approx(np.log(x[x > 0]).std(ddof=1))




def test_log_ndtr_matches_scipy_in_both_tails_with_its_gradient():
    # the count and positive families' log Phi: erfc on most of the line, torch's own far in the lower tail
    from pipeline.core.likelihoods.base import LOG_NDTR_ERFC_MIN, log_ndtr

    ends = [LOG_NDTR_ERFC_MIN, -29.999, -1e-300, 0.0, 1e-300, 38.5, 1e5, -1e5]
    x = np.concatenate([np.linspace(-80, 40, 24001), ends])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ours = log_ndtr(xt)
    ours.sum().backward()
    ref = special.log_ndtr(x)
    np.testing.assert_allclose(ours.detach().numpy(), ref, rtol=1e-13, atol=1e-300)
    # d/dx log Phi(x) = phi(x) / Phi(x), finite everywhere (the branch not taken included); the reference
    # loses digits beyond |x| = 80, a difference of two numbers of 3,200 nats
    assert np.isfinite(xt.grad.numpy()).all()
    near = np.abs(x) <= 80
    grad = np.exp(stats.norm.logpdf(x[near]) - ref[near])
    np.testing.assert_allclose(xt.grad.numpy()[near], grad, rtol=1e-10, atol=1e-300)


def test_logsumexp_classes_is_logsumexp_in_any_layout_with_its_gradient():
    # the categorical log-normaliser, reduced in the decoder's parameter-major layout: the same numbers as
    # scipy's logsumexp over the classes, padding (-inf) included, in that layout and in a row-major one
    from pipeline.core.likelihoods.base import logsumexp_classes

    gen = torch.Generator().manual_seed(0)
    c, n, g, k = 3, 50, 4, 7
    flat = torch.randn(g * k, c * n, generator=gen, dtype=torch.float64) * 20.0
    param_major = flat.T.reshape(c, n, g * k).unflatten(-1, (g, k))  # as generative's output
    row_major = param_major.contiguous()
    pad = torch.zeros(g, k, dtype=torch.float64)
    pad[1, 5:] = -math.inf  # a shorter vocabulary in the stack
    for logits in (param_major + pad, row_major + pad, (row_major + pad)[0]):
        x = logits.detach().clone().requires_grad_(True)
        ours = logsumexp_classes(x)
        ref = special.logsumexp(logits.detach().numpy(), axis=-1)
        assert ours.shape == logits.shape[:-1]
        np.testing.assert_allclose(ours.detach().numpy(), ref, rtol=1e-14)
        ours.sum().backward()
        softmax = np.exp(logits.detach().numpy() - ref[..., None])  # d/dx logsumexp: the softmax, 0 at padding
        np.testing.assert_allclose(x.grad.numpy(), softmax, rtol=1e-12, atol=1e-300)


def test_broadcast_shape_is_torchs_rule_without_importing_sympy():
    # torch.broadcast_shapes imports sympy on its first call (half a second of CPU in every new process's
    # first batch); the families' own rule must give torch's shapes and leave sympy unimported
    import subprocess
    import sys

    from pipeline.core.likelihoods.base import broadcast_shape

    for shapes in [((3, 1, 5), (4, 5)), ((1,), (7, 2)), ((2, 3), ()), ((0, 1), (1, 6)), ((5,), (5,))]:
        assert broadcast_shape(*shapes) == torch.broadcast_shapes(*shapes)
    with pytest.raises(ValueError):
        broadcast_shape((3, 2), (4, 2))
    code = (
        "import sys, torch\n"
        "from pipeline.core.likelihoods import Categorical, Ordinal\n"
        "for fam in (Categorical('k', ['a', 'b', 'c'], oov_mass=0.1), Categorical('k', ['a', 'b', 'c']),"
        " Ordinal('o', ['lo', 'mid', 'hi'])):\n"
        "    raw = torch.zeros(1, fam.n_params, dtype=torch.float64)\n"
        "    fam.log_prob(raw, torch.tensor([0.0, 1.0, 2.0]))\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
