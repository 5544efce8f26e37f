"""Quality of the scores: corruptions and average precision with known answers, a broken relation ranked first
and named by the per-column conditional scores, tail probabilities, the unseen-label mass."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import reference_prior
from sklearn.metrics import average_precision_score

from benchmarks.corruptions import KINDS, NotApplicable, average_precision, corrupt
from pipeline.core.codec import TableCodec, fit_families, partial_stats
from pipeline.core.likelihoods import Categorical
from pipeline.core.likelihoods.categorical import good_turing_oov_mass
from pipeline.core.model import VAE, VAEConfig
from pipeline.core.scoring import conditional_log_density, reference_values, score_batch, tail_probability
from pipeline.core.training import TrainConfig, fit
from schemas.feature_spec import FeatureSpec


# ---- average precision ----------------------------------------------------------------------------
def test_average_precision_known_case():
    # ranked: pos, neg, pos, neg, neg -> precision at the positives 1 and 2/3: AP = (1 + 2/3) / 2
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    assert average_precision(labels, scores) == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
    assert average_precision(labels, scores[::-1] * 0 + np.array([5, 4, 3, 2, 1])) == pytest.approx(5 / 6)
    assert average_precision([0, 0, 1], [3.0, 2.0, 1.0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        average_precision([0, 0], [1.0, 2.0])


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.1
    labels[0] = True
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounding makes ties, across classes too
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


# ---- the corruption generator ------------------------------------------------------------------------
FEATURES = {"a": "real", "b": "positive", "n": "count", "c": "categorical", "d": "categorical", "s": "binary"}


def _small_tables(n=400, seed=0):
    rng = np.random.default_rng(seed)

    def table(m, offset):
        c = rng.choice(["x", "y"], m, p=[0.5, 0.5])
        # d mostly follows c: (x, q) and (y, p) are rare but valid
        d = np.where(rng.random(m) < 0.995, np.where(c == "x", "p", "q"), np.where(c == "x", "q", "p"))
        return pa.table({
            "id": np.arange(offset, offset + m),
            "a": rng.normal(100.0, 1.0, m),
            "b": rng.lognormal(2.0, 0.2, m),
            "n": rng.poisson(5.0, m) + 1,
            "c": c,
            "d": d,
            "s": rng.choice([0, 1], m),
        })

    return table(n, 0), table(200, 10_000)


@pytest.mark.parametrize("kind", KINDS)
def test_corruptions_change_what_they_say(kind):
    train, held = _small_tables()
    bad = corrupt(train, held, FEATURES, kind, 5, np.random.default_rng(1))
    assert bad.table.num_rows == 5 and len(set(bad.source_rows.tolist())) == 5
    vocab = {c: set(train.column(c).to_pylist()) for c in ("c", "d", "s")}
    for i, (row, cols) in enumerate(zip(bad.source_rows, bad.columns, strict=True)):
        before = {c: held.column(c)[int(row)].as_py() for c in held.column_names}
        after = {c: bad.table.column(c)[i].as_py() for c in held.column_names}
        assert after["id"] == before["id"]
        assert {c for c in FEATURES if after[c] != before[c]} == set(cols)  # exactly the named columns changed
        if kind == "unit":
            (c,) = cols
            assert after[c] / before[c] in (pytest.approx(10.0), pytest.approx(0.01))
        elif kind == "zero":
            assert after[cols[0]] == 0 and cols[0] in ("a", "b", "n")
        elif kind == "count_x10":
            assert cols == ["n"] and after["n"] == 10 * before["n"]
        elif kind == "swap":
            x, y = cols
            assert (after[x], after[y]) == (before[y], before[x])
        elif kind == "relation":
            (c,) = cols
            assert after[c] in held.column(c).to_pylist()
        elif kind == "rare_combo":
            assert {(after["c"], after["d"])} <= {("x", "q"), ("y", "p")}
        elif kind == "unseen_label":
            assert after[cols[0]] not in vocab[cols[0]]
        elif kind == "multi":
            assert 2 <= len(cols) <= 3
    # every copy is a record the product scores, none is quarantined
    spec = FeatureSpec.from_dict({"id_columns": ["id"], "features": FEATURES})
    codec = TableCodec(spec, fit_families(spec, partial_stats(spec, train)))
    assert codec.encode(bad.table).invalid == []


def test_corruption_kind_that_no_column_admits():
    train, held = _small_tables()
    with pytest.raises(NotApplicable):
        corrupt(train, held, {"a": "real", "b": "positive"}, "unseen_label", 3, np.random.default_rng(0))


# ---- a broken relation: ranked first, named by the conditional scores ---------------------------------
def _relation_data(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(10.0, 2.0, n)
    noise = 0.2  # 3% of y's standard deviation
    y = 3.0 * x + 1.0 + rng.normal(0.0, noise, n)  # near-deterministic: y = 3x + 1
    table = pa.table({
        "id": np.arange(n),
        "x": x,
        "y": y,
        "u": rng.normal(0.0, 1.0, n),
        "k": rng.poisson(4.0, n),
        "c": rng.choice(["r", "g", "b"], n),
    })
    spec = FeatureSpec.from_dict(
        {"id_columns": ["id"], "features": {"x": "real", "y": "real", "u": "real", "k": "count", "c": "categorical"}}
    )
    return spec, table, noise


@pytest.fixture(scope="module")
def relation_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small network: one thread is faster, and the machine may be shared
    spec, table, noise = _relation_data()
    families = fit_families(spec, partial_stats(spec, table))
    codec = TableCodec(spec, families)
    torch.manual_seed(0)
    model = VAE(families, VAEConfig(latent_dim=3, hidden=(48, 48)))
    fit(model, codec.encode(table.slice(0, 1300)),
        TrainConfig(epochs=12, batch_size=128, lr=3e-3, kl_warmup_epochs=3, patience=0, seed=0))
    yield spec, table, noise, codec, model
    torch.set_num_threads(threads)


def test_broken_relation_ranks_first_and_is_named(relation_model):
    spec, table, noise, codec, model = relation_model
    held = table.slice(1300)
    y = held.column("y").to_numpy().copy()
    y[17] += 50 * noise  # 50 standard deviations of the relation; y alone stays ordinary (1.7 sd of y)
    held = held.set_column(2, "y", pa.array(y))
    batch = codec.encode(held)
    s = score_batch(model, batch, mc_samples=4, iw_samples=64, conditional_samples=32)
    assert np.argmin(s.log_marginal) == 17
    cond = s.column_conditional_log_density
    names = spec.feature_names
    # the two columns of the broken relation have the lowest conditional scores of that record, far below
    # their usual values; the unrelated columns keep theirs
    order = [names[j] for j in np.argsort(cond[17])]
    assert set(order[:2]) == {"x", "y"}
    median = np.median(cond, axis=0)
    for j, name in enumerate(names):
        others = np.delete(cond[:, j], 17)
        if name in ("x", "y"):  # the lowest of all records in both columns, and far below the usual
            assert cond[17, j] < min(others.min(), median[j] - 8.0), (name, cond[17, j], median[j], others.min())
        else:
            assert cond[17, j] > np.quantile(cond[:, j], 0.01) - 1.0, name
    # and on clean records the conditional score of y (given x) is far higher than its unconditional share
    # would be under the independent model: the relation was learned (log p(y|x) ~ log N(0; 0, noise^2))
    assert np.median(cond[:, 1]) > math.log(1 / (noise * math.sqrt(2 * math.pi))) - 2.0


def test_conditional_scores_match_a_direct_computation(relation_model):
    """log p(x_j | x_-j) ~= logsumexp_c(log w_c + log p(x_j|z_c)) - logsumexp_c(log w_c), z_c ~ q(z | x_-j),
    recomputed here one column at a time with torch.distributions; NaN where x_j is missing."""
    from helpers import reference_noise
    from torch.distributions import Normal

    from pipeline.core.scoring import _COLUMN_STREAM

    spec, table, _, codec, model = relation_model
    batch = codec.encode(table.slice(1300, 40))
    batch.observed[3, 2] = False  # a missing cell
    got = conditional_log_density(model, batch, samples=8, seed=5)
    assert np.isnan(got[3, 2]) and np.isfinite(np.delete(got, 2, axis=1)).all()
    with torch.no_grad():
        for j in range(len(spec.feature_names)):
            hidden = batch.observed.clone()
            hidden[:, j] = False
            mean, log_var = model.inference(batch.values, hidden, masked=True)  # the masked pass's encoder
            q = Normal(mean.double(), torch.exp(0.5 * log_var.double()))
            eps = torch.from_numpy(reference_noise(batch.keys, 5 + (j + 1) * _COLUMN_STREAM, 0, 8, model.latent_dim))
            lw_rest, lw_all = [], []
            for c in range(8):
                z = mean + torch.exp(0.5 * log_var) * eps[c]
                col = model.column_log_prob(model.generative(z), batch.values, batch.observed)
                prior = reference_prior(model).log_prob(z.double())
                lw = col.sum(-1) - col[:, j] + prior - q.log_prob(z.double()).sum(-1)
                lw_rest.append(lw)
                lw_all.append(lw + col[:, j])
            want = (torch.logsumexp(torch.stack(lw_all), 0) - torch.logsumexp(torch.stack(lw_rest), 0)).numpy()
            ok = batch.observed[:, j].numpy()
            # float32 networks: the difference of two log-sums of terms of size ~10 agrees to ~1e-6 absolute
            np.testing.assert_allclose(got[ok, j], want[ok], rtol=1e-6, atol=2e-5)


def test_conditional_scores_do_not_depend_on_the_batch(relation_model):
    _, table, _, codec, model = relation_model
    batch = codec.encode(table.slice(1300, 60))
    whole = conditional_log_density(model, batch, samples=6, seed=2)
    parts = np.concatenate([conditional_log_density(model, batch.select(np.arange(i, i + 7)[np.arange(i, i + 7) < 60]),
                                                    samples=6, seed=2) for i in range(0, 60, 7)])
    # the same noise and the same record: only float32 rounding of the networks differs with the batch's
    # shape (as in the direct computation above: ~1e-6 on a difference of two log-sums)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=2e-5)


# ---- tail probability ----------------------------------------------------------------------------
def test_tail_probability_interpolates_mid_ranks():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    got = tail_probability(np.array([0.5, 1.0, 2.5, 3.0, 4.0, 9.0]), ref)
    np.testing.assert_allclose(got, [0.0, 0.125, 0.5, 0.625, 0.875, 1.0])
    # ties share their mean mid-rank
    np.testing.assert_allclose(tail_probability(np.array([2.0]), np.array([1.0, 2.0, 2.0, 5.0])), [0.5])
    # against the plain empirical share on a large sample: within one step of 1/n
    rng = np.random.default_rng(0)
    ref = np.sort(rng.normal(size=2000))
    x = rng.normal(size=500)
    share = (ref[None, :] < x[:, None]).mean(1)
    assert np.abs(tail_probability(x, ref) - share).max() <= 1.0 / 2000 + 1e-12


def test_reference_values_sorted_and_thinned():
    v = np.random.default_rng(1).normal(size=25_000)
    ref = reference_values(v, keep=1000)
    assert len(ref) == 1000 and ref == sorted(ref) and ref[0] == v.min() and ref[-1] == v.max()
    assert reference_values(v[:10]) == sorted(v[:10].tolist())


# ---- unseen labels: Good-Turing mass -----------------------------------------------------------------
def test_good_turing_oov_mass_and_normalisation():
    counts = {"a": 5, "b": 1, "c": 1, "d": 3}
    assert good_turing_oov_mass(counts, kept=10) == pytest.approx(2 / 11)
    assert good_turing_oov_mass(counts, kept=2) == pytest.approx((0 + 1 + 1) / 11)  # b, c cut off: unseen
    assert good_turing_oov_mass({"a": 7, "b": 9}, kept=10) == pytest.approx(1 / 17)  # the floor
    fam = Categorical.from_stats("k", {"counts": counts})
    raw = torch.randn(6, fam.n_params, dtype=torch.float64)
    lp = fam.params(raw)
    np.testing.assert_allclose(torch.logsumexp(lp, -1).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(lp[:, -1].numpy(), math.log(2 / 11), rtol=1e-12)
    enc = fam.encode(pa.array(["a", "never"]))
    got = fam.log_prob(raw[:2], torch.from_numpy(enc.value))
    assert got[1].item() == pytest.approx(math.log(2 / 11))


# ---- the new columns in the scores table ---------------------------------------------------------------
def test_scores_table_new_columns_and_switches(relation_model, tmp_path):
    from pipeline.core.artifact import load_model, save_model
    from pipeline.score.scorer import split_and_score
    from pipeline.score.settings import ScoreSettings, output_schemas, serialize_schema

    spec, table, _, codec, model = relation_model
    valid = codec.encode(table.slice(1300, 100))
    ref = score_batch(model, valid, mc_samples=1, iw_samples=16).log_marginal
    save_model(str(tmp_path / "m"), model, spec, reference={"log_marginal": {"sorted": reference_values(ref)}})
    art = load_model(str(tmp_path / "m"))
    rows = table.slice(1300, 100)
    settings = ScoreSettings(model_dir=str(tmp_path / "m"), run_id="r", input_schema=serialize_schema(rows.schema))
    scores_schema, q_schema = output_schemas(art, settings)
    on, _ = split_and_score(art, rows, scores_schema, q_schema, 1, 16, 0, conditional_samples=4)
    # the validation rows themselves: their tail probabilities are their mid-ranks among themselves
    tail = on.column("tail_probability").to_numpy()
    np.testing.assert_allclose(np.sort(tail), (np.arange(100) + 0.5) / 100, atol=1e-9)
    cond = on.column("column_conditional_log_density")
    assert cond.null_count == 0 and cond.type == on.schema.field("column_log_density").type
    want = conditional_log_density(model, codec.encode(rows), samples=4, seed=0)
    np.testing.assert_allclose(cond.combine_chunks().field("y").to_numpy(), want[:, 1], rtol=1e-12)
    off, _ = split_and_score(art, rows, scores_schema, q_schema, 1, 0, 0, conditional_samples=0)
    assert off.column("tail_probability").null_count == 100  # no log_marginal: no tail probability
    assert off.column("column_conditional_log_density").null_count == 100
    assert off.schema == on.schema
