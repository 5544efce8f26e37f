"""The VAE and its scoring core (no Ray): KL, Jacobians, importance weighting, invariance, learning."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import DATA, dataset_spec, reference_noise, reference_prior
from scipy import stats
from torch.distributions import Independent, Normal, kl_divergence

from pipeline.core import scoring
from pipeline.core.artifact import load_model, save_model
from pipeline.core.baseline import IndependentBaseline
from pipeline.core.codec import TableCodec, fit_families, partial_stats, record_keys
from pipeline.core.model import SPREAD_GAIN, VAE, VAEConfig, kl_standard_normal
from pipeline.core.scoring import device_keys, record_noise, score_batch
from pipeline.core.training import TrainConfig, fit
from schemas.feature_spec import FeatureSpec


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wine():
    """Wine split 80/20 by hashing record ids, and a VAE fitted on the 80%."""
    table = pq.read_table(DATA / "wine" / "wine.parquet")
    spec = dataset_spec("wine")
    holdout = record_keys(table, spec.id_columns) % np.uint64(5) == 0
    train, valid = table.filter(pa.array(~holdout)), table.filter(pa.array(holdout))
    families = fit_families(spec, partial_stats(spec, train))
    codec = TableCodec(spec, families)
    enc_train, enc_valid = codec.encode(train), codec.encode(valid)
    torch.manual_seed(0)
    model = VAE(families, VAEConfig(latent_dim=4, hidden=(64, 64)))
    cfg = TrainConfig(epochs=30, batch_size=256, kl_warmup_epochs=5, patience=5, min_epoch_steps=0)
    history = fit(model, enc_train, cfg, enc_valid)
    return {"spec": spec, "codec": codec, "train": enc_train, "valid": enc_valid, "model": model,
            "history": history, "valid_table": valid}


def _mixed_table(scale_real: float = 1.0, scale_pos: float = 1.0, n: int = 400) -> tuple[FeatureSpec, pa.Table]:
    rng = np.random.default_rng(1)
    z = rng.normal(size=n)
    real = (2.0 + z + 0.3 * rng.normal(size=n)) * scale_real
    pos = np.where(rng.random(n) < 0.4, 0.0, np.exp(0.5 * z + 0.2 * rng.normal(size=n))) * scale_pos
    cat = np.where(z > 0, "hi", "lo")
    real[::17] = np.nan  # missing values
    table = pa.table({"id": np.arange(n), "x": real, "amount": pos, "kind": cat, "k": rng.poisson(3, n)})
    spec = FeatureSpec.from_dict(
        {"id_columns": ["id"], "features": {"x": "real", "amount": "positive", "kind": "categorical", "k": "count"}}
    )
    return spec, table


def _untrained(spec, table, seed=0, prior_components=1):
    families = fit_families(spec, partial_stats(spec, table))
    torch.manual_seed(seed)
    model = VAE(families, VAEConfig(latent_dim=3, hidden=(32,), prior_components=prior_components))
    if prior_components > 1:  # a prior away from its initial values: unequal weights, means and scales
        with torch.no_grad():
            model.prior_logits.normal_()
            model.prior_mean.normal_(0.0, 1.5)
            model.prior_log_var.uniform_(-1.0, 0.5)
    return model, TableCodec(spec, families)


def _reference_kl(model: VAE, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """The closed-form KL the scores report, from torch.distributions: KL(q || N(0, I)), or for a mixture
    prior -log sum_c pi_c exp(-KL(q || p_c)) (the KL of the joint latent (c, z), c's posterior optimal)."""
    q = Normal(mean.double(), torch.exp(0.5 * log_var.double()))
    if model.config.prior_components == 1:
        return kl_divergence(q, Normal(0.0, 1.0)).sum(-1)
    prior = reference_prior(model)
    comps = prior.component_distribution.base_dist
    kl_c = kl_divergence(
        Normal(q.loc[:, None, :], q.scale[:, None, :]), Normal(comps.loc[None], comps.scale[None])
    ).sum(-1)
    return -torch.logsumexp(prior.mixture_distribution.logits.log_softmax(-1) - kl_c, -1)


# ---- KL -------------------------------------------------------------------------------------------
def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, log_var = torch.randn(50, 6, generator=g) * 2, torch.randn(50, 6, generator=g) * 3
    ref = kl_divergence(Normal(mean.double(), torch.exp(0.5 * log_var.double())), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_standard_normal(mean, log_var), ref, rtol=1e-10, atol=1e-10)


def test_mixture_prior_density_and_kl_against_torch_distributions():
    """log p(z) of a mixture prior is the mixture's exact density; the reported KL is closed form, >= 0, and
    bounds the KL of z from above (checked against a 200k-sample Monte Carlo estimate of the true one)."""
    spec, table = _mixed_table()
    model, _ = _untrained(spec, table, prior_components=4)
    prior = reference_prior(model)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 30, 3, generator=g, dtype=torch.float64) * 2
    with torch.no_grad():
        torch.testing.assert_close(model.log_prior(z), prior.log_prob(z), rtol=1e-10, atol=1e-10)
        far = torch.randn(200, 3, generator=g, dtype=torch.float64) * 1e3  # the expanded square stays exact
        torch.testing.assert_close(model.log_prior(far), prior.log_prob(far), rtol=1e-10, atol=1e-10)
        mean, log_var = torch.randn(30, 3, generator=g) * 1.5, torch.randn(30, 3, generator=g) - 1
        kl = model.kl(mean, log_var)
    torch.testing.assert_close(kl, _reference_kl(model, mean, log_var), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # far from the prior (the expanded square stays exact) and on a component (KL 0)
        far_mean, far_lv = torch.randn(30, 3, generator=g) * 1e3, torch.randn(30, 3, generator=g) * 4
        torch.testing.assert_close(
            model.kl(far_mean, far_lv), _reference_kl(model, far_mean, far_lv), rtol=1e-10, atol=1e-10
        )
        on = model.kl(model.prior_mean.detach(), model.prior_log_var.detach())
    assert (on >= 0).all()
    torch.testing.assert_close(on, _reference_kl(model, model.prior_mean.detach(), model.prior_log_var.detach()),
                               rtol=1e-10, atol=1e-10)
    q = Independent(Normal(mean.double(), torch.exp(0.5 * log_var.double())), 1)
    zs = q.sample((200_000,))
    true_kl = (q.log_prob(zs) - prior.log_prob(zs)).mean(0)
    se = (q.log_prob(zs) - prior.log_prob(zs)).std(0) / math.sqrt(zs.shape[0])
    assert (kl >= 0).all()
    assert (kl >= true_kl - 4 * se).all()
    # the standard normal prior: the exact KL
    plain, _ = _untrained(spec, table)
    torch.testing.assert_close(plain.kl(mean, log_var), kl_standard_normal(mean, log_var))


def test_scores_kl_and_elbo_identities(wine):
    s = score_batch(wine["model"], wine["valid"], mc_samples=8, iw_samples=0)
    ref = _reference_kl(wine["model"], torch.from_numpy(s.latent_mean), torch.from_numpy(s.latent_var).log()).numpy()
    np.testing.assert_allclose(s.kl, ref, rtol=1e-5)
    assert (s.kl >= 0).all() and (s.latent_var > 0).all()
    np.testing.assert_allclose(s.elbo, s.recon_log_density - s.kl, rtol=1e-12)
    np.testing.assert_allclose(np.nansum(s.column_log_density, 1), s.recon_log_density, rtol=1e-10)
    assert s.log_marginal is None


# ---- the estimators against a direct reference ----------------------------------------------------
@pytest.mark.parametrize("prior_components", [1, 3])
def test_estimators_match_direct_computation(prior_components):
    """recon = mean_s log p(x|z_s); log_marginal = logsumexp_s(log p(x|z_s) + log p(z_s) - log q(z_s|x)) - log K,
    recomputed here with torch.distributions, one sample at a time (p(z): N(0, I), or a mixture)."""
    spec, table = _mixed_table()
    model, codec = _untrained(spec, table, prior_components=prior_components)
    prior = reference_prior(model)
    batch = codec.encode(table.slice(0, 60))
    S, K, seed = 5, 12, 3
    got = score_batch(model, batch, mc_samples=S, iw_samples=K, seed=seed)
    with torch.no_grad():
        mean, log_var = model.inference(batch.values, batch.observed)
        q = Normal(mean.double(), torch.exp(0.5 * log_var.double()))
        eps = torch.from_numpy(reference_noise(batch.keys, seed, 0, K, model.latent_dim))
        log_px, log_w = [], []
        for s in range(K):
            z = mean + torch.exp(0.5 * log_var) * eps[s]
            lp = model.column_log_prob(model.generative(z), batch.values, batch.observed).sum(-1)
            log_px.append(lp)
            zd = z.double()
            log_w.append(lp + prior.log_prob(zd) - q.log_prob(zd).sum(-1))
    recon = torch.stack(log_px[:S]).mean(0).numpy()
    lm = (torch.logsumexp(torch.stack(log_w), 0) - math.log(K)).numpy()
    np.testing.assert_allclose(got.recon_log_density, recon, rtol=1e-6)
    np.testing.assert_allclose(got.log_marginal, lm, rtol=1e-5)


def test_sample_chunking_does_not_change_results(monkeypatch):
    spec, table = _mixed_table()
    model, codec = _untrained(spec, table)
    batch = codec.encode(table)
    whole = score_batch(model, batch, mc_samples=7, iw_samples=20)
    monkeypatch.setattr(scoring, "SAMPLE_ROWS_PER_PASS", 3 * len(batch))  # 3 samples per decoder pass
    chunked = score_batch(model, batch, mc_samples=7, iw_samples=20)
    np.testing.assert_allclose(chunked.recon_log_density, whole.recon_log_density, rtol=1e-9)
    np.testing.assert_allclose(chunked.log_marginal, whole.log_marginal, rtol=1e-9)
    # the Monte Carlo estimate uses the first S of the shared samples: independent of K
    no_iw = score_batch(model, batch, mc_samples=7, iw_samples=0)
    np.testing.assert_allclose(no_iw.recon_log_density, whole.recon_log_density, rtol=1e-9)


def _noise(keys: np.ndarray, **kw) -> np.ndarray:
    return record_noise(device_keys(keys, torch.device("cpu")), **kw).numpy()


def test_noise_is_standard_normal_and_a_function_of_key_and_sample():
    keys = np.arange(5000, dtype=np.uint64) * np.uint64(7919)
    eps = _noise(keys, seed=11, first=0, last=4, dim=3)
    assert eps.dtype == np.float32 and eps.shape == (4, 5000, 3)
    assert stats.kstest(eps.reshape(-1).astype(np.float64), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(eps[0, :, 0], eps[1, :, 0])[0, 1]) < 0.05  # samples independent
    again = _noise(keys[::-1].copy(), seed=11, first=2, last=4, dim=3)
    np.testing.assert_array_equal(again[:, ::-1], eps[2:4])  # order and offset do not matter
    assert not np.allclose(_noise(keys, seed=12, first=0, last=1, dim=3), eps[:1])


def test_noise_made_by_torch_is_the_unsigned_reference_bit_for_bit():
    """The scorer makes its noise with torch on the scoring device (int64 bits: wrapping adds and multiplies,
    logical shifts by mask); numpy's uint64 arithmetic is the reference. Keys and seeds with the top bit set,
    offsets past 2**32 draws."""
    rng = np.random.default_rng(4)
    keys = rng.integers(0, np.iinfo(np.uint64).max, 3000, dtype=np.uint64, endpoint=True)
    keys[:4] = [0, np.iinfo(np.uint64).max, 1 << 63, (1 << 63) - 1]
    for seed, first, last, dim in [(0, 0, 5, 8), (2**63 - 1, 3, 9, 5), (123_456_789_123, 2**31, 2**31 + 2, 16)]:
        want = reference_noise(keys, seed, first, last, dim)
        np.testing.assert_array_equal(_noise(keys, seed=seed, first=first, last=last, dim=dim), want)


# ---- invariances ----------------------------------------------------------------------------------
def test_batch_invariance(wine):
    """The same records in other batch sizes and orders give the same outputs.

    Relative to the size of the terms summed: a record's recon_log_density is a sum of per-column
    log-densities of either sign, so its tolerance is 1e-5 of the sum of their magnitudes."""
    model, valid = wine["model"], wine["valid"]
    ref = score_batch(model, valid, mc_samples=4, iw_samples=16, seed=5)
    scale = np.nansum(np.abs(ref.column_log_density), 1) + np.abs(ref.kl)
    perm = np.random.default_rng(0).permutation(len(valid))[:300]
    for size in (1, 37, 300):
        chunks = [score_batch(model, valid.select(perm[i : i + size]), 4, 16, 5) for i in range(0, len(perm), size)]
        for name in ("recon_log_density", "elbo", "log_marginal", "kl"):
            got = np.concatenate([getattr(c, name) for c in chunks])
            want = getattr(ref, name)[perm]
            assert (np.abs(got - want) <= 1e-5 * scale[perm]).all(), (size, name)
        got_mean = np.concatenate([c.latent_mean for c in chunks])
        np.testing.assert_allclose(got_mean, ref.latent_mean[perm], rtol=1e-5, atol=1e-6)


def test_missing_values_are_masked_not_imputed():
    spec, table = _mixed_table()
    model, codec = _untrained(spec, table)
    batch = codec.encode(table)
    missing = ~batch.observed[:, 0]
    assert missing.sum() > 10
    s = score_batch(model, batch, 4, 8)
    assert np.isnan(s.column_log_density[missing.numpy(), 0]).all()
    assert (s.n_observed[missing.numpy()] == 3).all() and (s.n_observed[~missing.numpy()] == 4).all()
    # whatever stands in a missing cell cannot change any score
    batch.values[missing, 0] = 1e9
    s2 = score_batch(model, batch, 4, 8)
    np.testing.assert_array_equal(s2.recon_log_density, s.recon_log_density)
    np.testing.assert_array_equal(s2.log_marginal, s.log_marginal)


@pytest.mark.parametrize("c", [7.3, 0.01])
def test_jacobian_rescaling_a_column_shifts_its_log_density_by_log_c(c):
    """x -> c x (statistics refitted, same weights): log p changes by exactly -log c for every record
    where x > 0; the point mass at 0 has no units and does not change."""
    spec, table = _mixed_table()
    _, table_c = _mixed_table(scale_real=c, scale_pos=c)
    model, codec = _untrained(spec, table)
    fams_c = fit_families(spec, partial_stats(spec, table_c))
    model_c = VAE(fams_c, model.config)
    model_c.load_state_dict(model.state_dict())
    a = score_batch(model, codec.encode(table), 6, 10, seed=1)
    b = score_batch(model_c, TableCodec(spec, fams_c).encode(table_c), 6, 10, seed=1)
    x_obs = ~np.isnan(table.column("x").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(b.column_log_density[x_obs, 0] - a.column_log_density[x_obs, 0], -math.log(c),
                               rtol=0, atol=1e-8)
    amount = table.column("amount").to_numpy()
    delta = b.column_log_density[:, 1] - a.column_log_density[:, 1]
    np.testing.assert_allclose(delta[amount > 0], -math.log(c), atol=1e-8)
    np.testing.assert_allclose(delta[amount == 0], 0.0, atol=1e-10)
    np.testing.assert_allclose(b.column_log_density[:, 2:], a.column_log_density[:, 2:], rtol=1e-10)
    np.testing.assert_allclose(b.kl, a.kl, rtol=1e-10)


def test_extreme_records_score_finite():
    spec, table = _mixed_table()
    model, codec = _untrained(spec, table)
    extreme = pa.table({
        "id": [10_000, 10_001, 10_002, 10_003],
        "x": [1e250, -3e5, 2.0, None],
        "amount": [1e300, 1e-300, 0.0, 5e8],
        "kind": ["never-seen", "hi", "lo", None],
        "k": [10**12, 0, 3, 99999],
    })
    batch = codec.encode(extreme)
    assert not batch.invalid
    s = score_batch(model, batch, 4, 16)
    for name in ("recon_log_density", "kl", "elbo", "log_marginal"):
        assert np.isfinite(getattr(s, name)).all(), name
    assert np.isfinite(s.latent_mean).all() and (s.latent_var > 0).all()
    typical = score_batch(model, codec.encode(table.slice(0, 50)), 4, 16)
    assert s.recon_log_density[0] < typical.recon_log_density.min() - 1e3


# ---- trained-model properties ---------------------------------------------------------------------
def test_importance_weighting_tightens_toward_a_limit(wine):
    model, valid = wine["model"], wine["valid"]
    per = {k: score_batch(model, valid, mc_samples=16, iw_samples=k, seed=2).log_marginal for k in (1, 4, 16, 64, 256)}
    lm = {k: v.mean() for k, v in per.items()}
    elbo = score_batch(model, valid, mc_samples=256, iw_samples=0, seed=2).elbo.mean()
    print(f"\nwine held-out: mean elbo {elbo:.4f}; mean log_marginal by K: "
          + ", ".join(f"K={k}: {v:.4f}" for k, v in lm.items()))
    # K = 1 is a one-sample estimate of the ELBO with the exact KL of z; the reported elbo's KL (the mixture
    # prior's closed form, that of the joint latent) bounds it from above: elbo is lower, by a little
    assert elbo - 0.05 <= lm[1] <= elbo + 0.5
    ks = sorted(lm)
    # the bound's expectation rises with K; each mean is one estimate: it may not fall by more than its noise
    # (three standard errors of the per-record difference), and rises clearly where the steps are large
    for a, b in itertools.pairwise(ks):
        d = per[b] - per[a]
        assert d.mean() > -3 * d.std(ddof=1) / np.sqrt(len(d)), (a, b)
    assert lm[16] > lm[4] > lm[1]
    assert lm[256] - lm[64] < lm[4] - lm[1]  # by less and less: toward a limit
    assert lm[64] >= elbo


def test_learns_more_than_independent_columns(wine):
    """Held-out mean ELBO (a lower bound on log p(x)) beats the exact held-out log-likelihood of the
    independent-columns baseline with the same families, by a clear margin."""
    base = IndependentBaseline(wine["model"].families).fit(wine["train"], steps=600)
    with torch.no_grad():
        base_ll = base.log_likelihood(wine["valid"]).mean().item()
    elbo = score_batch(wine["model"], wine["valid"], mc_samples=32, iw_samples=0).elbo.mean()
    print(f"\nwine held-out per record: VAE mean elbo {elbo:.3f} nats, independent-columns baseline {base_ll:.3f} nats")
    assert elbo > base_ll + 2.0
    assert wine["history"][-1]["val_elbo"] > wine["history"][0]["val_elbo"]


def test_artifact_roundtrip_scores_identically(wine, tmp_path):
    model_id = save_model(str(tmp_path / "m"), wine["model"], wine["spec"], metrics=wine["history"])
    art = load_model(str(tmp_path / "m"))
    assert art.model_id == model_id and art.spec == wine["spec"]
    a = score_batch(wine["model"], wine["valid"], 4, 8)
    b = score_batch(art.model, art.codec.encode(wine["valid_table"]), 4, 8)
    np.testing.assert_array_equal(a.elbo, b.elbo)
    np.testing.assert_array_equal(a.log_marginal, b.log_marginal)
    # a tampered artifact is refused, not silently loaded
    meta = (tmp_path / "m" / "model.json").read_text().replace('"latent_dim": 4', '"latent_dim": 5')
    (tmp_path / "m" / "model.json").write_text(meta)
    with pytest.raises(Exception, match="model_id"):
        load_model(str(tmp_path / "m"))


# ---- the masked pass -------------------------------------------------------------------------------
def test_masked_pass_trains_its_own_encoder_and_leaves_the_decoder_to_whole_records():
    """The masked pass's ELBO reaches the mask encoder only: through the frozen decoder no gradient
    reaches a decoder parameter, and the main encoder gets none from it."""
    spec, table = _mixed_table()
    families = fit_families(spec, partial_stats(spec, table))
    torch.manual_seed(0)
    model = VAE(families, VAEConfig(latent_dim=3, hidden=(32,), train_mask=0.5))
    batch = TableCodec(spec, families).encode(table)
    assert model.has_mask_encoder
    seen = batch.observed & (torch.rand(batch.observed.shape) > 0.5)
    mean, log_var = model.inference(batch.values, seen, masked=True)
    z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
    model.column_log_prob(model.generative(z, frozen=True), batch.values, seen).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    decoder = [k for k in grads if k.startswith(("decoder.", "heads.", "head_skip.", "spread_base"))]
    main = [k for k in grads if k.startswith(("encoder.", "q_head.", "q_skip."))]
    assert decoder and all(grads[k] is None for k in decoder + main)
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in grads if k.startswith("mask_"))
    # the frozen decoder computes what the trained one does
    torch.testing.assert_close(model.generative(z.detach(), frozen=True), model.generative(z.detach()))


def test_stacked_evaluation_is_each_column_by_itself():
    """The model evaluates like features together (one stacked family per group, categoricals of different
    vocabularies padded); every column's log-probability, its gradient (to the heads' outputs in their
    stored order) and its encoder view are what the column's own family gives alone."""
    from pipeline.core.likelihoods import Categorical, Count

    rng = np.random.default_rng(3)
    n = 300
    cat = lambda k: np.array([f"c{i}" for i in rng.integers(0, k, n)], dtype=object)  # noqa: E731
    cols = {
        "id": np.arange(n),
        "r1": rng.normal(5, 2, n), "r2": rng.normal(-1, 0.1, n),
        "p0": np.where(rng.random(n) < 0.3, 0.0, rng.lognormal(1, 1, n)), "p1": rng.lognormal(0, 2, n),
        "p2": rng.lognormal(3, 0.5, n), "k1": rng.poisson(2, n), "k2": rng.poisson(40, n),
        "c7": cat(7), "c5": cat(5), "c9": cat(9), "b1": cat(2), "b2": cat(2), "o1": rng.integers(0, 4, n),
        "o2": rng.integers(0, 6, n),
    }  # fmt: skip
    table = pa.table(cols)
    kinds = {"r1": "real", "r2": "real", "p0": "positive", "p1": "positive", "p2": "positive", "k1": "count",
             "k2": "count", "c7": "categorical", "c5": "categorical", "c9": "categorical", "b1": "binary",
             "b2": "binary", "o1": "ordinal", "o2": "ordinal"}  # fmt: skip
    spec = FeatureSpec.from_dict({"id_columns": ["id"], "features": kinds})
    families = fit_families(spec, partial_stats(spec, table))
    # an older artifact's families beside the new: a negative binomial count, a learned out-of-vocabulary logit
    families[6] = Count("k2", **{k: v for k, v in families[6].state().items() if k in ("loc", "scale", "log_mean")})
    families[9] = Categorical("c9", families[9].vocab)
    # unseen labels, missing values and extreme values in the scored rows
    scored = table.to_pydict()
    scored["c7"][:5] = ["new"] * 5
    scored["c5"][5:8] = ["other"] * 3
    scored["c9"][8:10] = ["x", "y"]
    scored["r1"][10:20] = [None] * 10
    scored["r2"][20] = 1e9
    scored["k2"][21] = 10**7
    scored["p1"][22] = 0.0
    batch = TableCodec(spec, families).encode(pa.table(scored))
    torch.manual_seed(0)
    model = VAE(families, VAEConfig(latent_dim=3, hidden=(16,)))
    groups = model.layout(batch.values.device).groups
    assert len(groups) < len(families)
    assert any(g.family.name == "c7,c5" for g in groups)  # two vocabulary sizes padded into one stack
    raw = (3.0 * torch.randn(2, n, sum(f.n_params for f in families))).requires_grad_()
    # the decoder emits the parameters grouped (the heads' rows regathered): the same regrouping here
    got = model.column_log_prob(raw[..., model.layout(raw.device).head_rows], batch.values, batch.observed)
    got.sum().backward()
    got_grad, raw.grad = raw.grad, None
    parts = raw.split([f.n_params for f in families], dim=-1)
    want = torch.stack(
        [f.log_prob(r, batch.values[:, j]) for j, (f, r) in enumerate(zip(families, parts, strict=True))], -1
    )
    want = torch.where(batch.observed, want, torch.zeros((), dtype=want.dtype))
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got_grad, raw.grad, rtol=1e-12, atol=1e-12)
    # the decoder's output is laid out parameter by parameter in memory (model.generative): the same numbers
    lay = model.layout(raw.device)
    by_param = raw.detach()[..., lay.head_rows].movedim(-1, 0).contiguous().movedim(0, -1)
    assert not by_param.is_contiguous()
    torch.testing.assert_close(
        model.column_log_prob(by_param, batch.values, batch.observed), got.detach(), rtol=1e-12, atol=1e-12
    )
    # and it is the heads' linear layers on the decoder's last layer and on z, the spreads bounded
    z = torch.randn(2, n, 3)
    with torch.no_grad():
        out = model.generative(z)
        want_out = (model.heads(model.decoder(z)) + model.head_skip(z))[..., lay.head_rows]
        m = model.config.var_modulation
        base = model.spread_base[lay.spread_base] * SPREAD_GAIN
        want_out[..., lay.spread_positions] = base + m * torch.tanh(want_out[..., lay.spread_positions])
    assert out.stride()[-1] == 2 * n  # parameter by parameter
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    # the encoder input, feature after feature, then the mask
    views = [f.encoder_input(batch.values[:, j]) * batch.observed[:, j : j + 1] for j, f in enumerate(families)]
    want_x = torch.cat([*views, batch.observed.float()], -1)
    torch.testing.assert_close(model.encoder_input(batch.values, batch.observed), want_x, rtol=0, atol=0)
    # the views computed once serve any mask (the masked pass, the conditional scores): the same input
    views = model.encoder_views(batch.values)
    seen = batch.observed & (torch.rand(batch.observed.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    for mask in (batch.observed, seen):
        torch.testing.assert_close(
            model.encoder_input(batch.values, mask, views), model.encoder_input(batch.values, mask), rtol=0, atol=0
        )
    want_seen = torch.cat([*(f.encoder_input(batch.values[:, j]) * seen[:, j : j + 1] for j, f in enumerate(families)),
                           seen.float()], -1)  # fmt: skip
    torch.testing.assert_close(model.encoder_input(batch.values, seen, views), want_seen, rtol=0, atol=0)


# ---- the linear start ------------------------------------------------------------------------------
def test_phases_switch_after_patience_or_half_the_epochs_and_need_early_stopping():
    from pipeline.core.training import Phases

    spec, table = _mixed_table()
    model, _ = _untrained(spec, table)
    cfg = TrainConfig(epochs=20, patience=2, linear_patience=3, kl_warmup_epochs=1, linear_lr_drops=0)
    p = Phases(cfg, model)
    assert p.linear and p.linear_epochs == 10
    # epoch 0 (beta < 1) never counts; the linear phase ends after 3 epochs without improvement
    assert p.update(0, 5.0, 0.5) == (False, False, False)
    assert p.update(1, 1.0, 1.0) == (True, False, False)
    assert p.update(2, 0.5, 1.0) == (False, False, False)
    assert p.update(3, 0.9, 1.0) == (False, False, False)
    assert p.update(4, 0.7, 1.0) == (False, True, False) and not p.linear and p.stale == 0
    # the full phase keeps the best so far and stops after its own patience
    assert p.update(5, 0.8, 1.0) == (False, False, False)
    assert p.update(6, 1.5, 1.0) == (True, False, False)
    assert p.update(7, 1.0, 1.0) == (False, False, False)
    assert p.update(8, 1.0, 1.0) == (False, False, True)
    # linear_patience 0: the linear phase ends after --patience, like the full one
    r = Phases(TrainConfig(epochs=20, patience=2, linear_patience=0, linear_lr_drops=0), model)
    assert [r.update(e, s, 1.0)[1] for e, s in enumerate([1.0, 0.5, 0.5])] == [False, False, True]
    # always improving: the linear phase still ends at half the epochs
    q = Phases(cfg, model)
    switched = [q.update(e, float(e), 1.0)[1] for e in range(12)]
    assert switched.index(True) == 9 and sum(switched) == 1
    # no early stopping (patience 0), no linear paths, or the option off: trained whole from the start
    assert not Phases(TrainConfig(epochs=20, patience=0), model).linear
    assert not Phases(TrainConfig(epochs=20, linear_start=False), model).linear
    flat = VAE(model.families, VAEConfig(latent_dim=2, hidden=(8,), linear_skip=False))
    assert not Phases(cfg, flat).linear


def test_the_linear_phase_cuts_its_rate_on_each_plateau_before_its_patience_ends_it():
    from pipeline.core.training import LINEAR_DROP_FACTOR, Phases, make_optimizer

    spec, table = _mixed_table()
    model, _ = _untrained(spec, table)
    cfg = TrainConfig(epochs=60, patience=2, linear_patience=4, linear_lr=0.1, linear_lr_drops=2, kl_warmup_epochs=0)
    opt = make_optimizer(model, cfg)
    p = Phases(cfg, model)
    p.start(model, opt, fresh=True)
    rates = []
    # improves at epoch 0, then a plateau: two epochs (half the patience) -> a cut, twice; then 4 -> the switch
    for epoch, score in enumerate([1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]):
        improved, switch, stop = p.update(epoch, score, 1.0)
        rates.append(opt.param_groups[0]["lr"])
        assert not stop and switch == (epoch == 8) and improved == (epoch == 0)
    f = LINEAR_DROP_FACTOR
    assert rates[:8] == pytest.approx([0.1, 0.1, 0.1 * f, 0.1 * f, 0.1 * f * f, 0.1 * f * f, 0.1 * f * f, 0.1 * f * f])
    assert p.drops == 2 and not p.linear
    # an improvement resets the count: no cut while the phase still climbs
    q = Phases(cfg, model)
    q.start(model, opt, fresh=True)
    for epoch, score in enumerate([1.0, 0.5, 2.0, 1.0, 3.0, 1.0, 4.0]):
        q.update(epoch, score, 1.0)
    assert q.drops == 0 and opt.param_groups[0]["lr"] == 0.1 and q.linear
    # the full phase joins at --lr, whatever the cuts left
    p.open(model, opt, None)
    assert opt.param_groups[0]["lr"] == cfg.lr
    # a resumed run goes on with the cuts it had made
    r = Phases(cfg, model, best_val=1.0, stale=0, linear=True, drops=2)
    r.start(model, opt, fresh=False)
    assert [r.update(e, 0.5, 1.0)[1] for e in range(4)] == [False, False, False, True]


def test_validation_averages_more_draws_of_z_on_a_small_validation_set():
    from pipeline.core.training import MAX_VAL_SAMPLES, evaluate, val_samples

    assert val_samples(TrainConfig(), 57) == MAX_VAL_SAMPLES
    assert val_samples(TrainConfig(), 1714) == 2 and val_samples(TrainConfig(), 10**6) == 1
    assert val_samples(TrainConfig(val_samples=3), 10**6) == 3
    spec, table = _mixed_table()
    model, codec = _untrained(spec, table)
    batch = codec.encode(table.slice(0, 50))
    torch.manual_seed(4)
    averaged = evaluate(model, [batch], samples=3)
    torch.manual_seed(4)
    draws = [evaluate(model, [batch]) for _ in range(3)]  # the same three draws, one at a time
    for key in ("elbo", "recon_log_density", "kl"):
        assert averaged[key] == pytest.approx(np.mean([d[key] for d in draws]), rel=1e-9)
    for name in averaged["columns"]:
        assert averaged["columns"][name] == pytest.approx(np.mean([d["columns"][name] for d in draws]), rel=1e-9)


def test_linear_phase_is_the_linear_paths_alone_with_every_parameter_in_the_graph():
    from pipeline.core.training import Phases, make_optimizer

    spec, table = _mixed_table()
    families = fit_families(spec, partial_stats(spec, table))
    batch = TableCodec(spec, families).encode(table)
    torch.manual_seed(0)
    model = VAE(families, VAEConfig(latent_dim=3, hidden=(16, 16)))
    opt = make_optimizer(model, TrainConfig())
    Phases(TrainConfig(epochs=10, patience=3), model).start(model, opt, fresh=True)
    assert not model.nonlinear and all(float(h.weight.detach().abs().sum()) == 0 for h in model.nonlinear_heads())
    assert opt.param_groups[0]["lr"] == TrainConfig().linear_lr
    z = torch.randn(5, len(batch), 3)
    before = model.generative(z)
    q_before = model.inference(batch.values, batch.observed)
    with torch.no_grad():  # the MLPs' own weights change nothing while they are gated off
        for p in [*model.decoder.parameters(), *model.encoder.parameters()]:
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(model.generative(z), before)
    for a, b in zip(model.inference(batch.values, batch.observed), q_before, strict=True):
        torch.testing.assert_close(a, b)
    # a step reaches every parameter (DDP reduces them all), and the gated heads stay at zero
    model.train()
    opt.zero_grad()
    model.loss(batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert all(float(h.weight.detach().abs().sum()) == 0 for h in model.nonlinear_heads())
    # the gate open: the MLPs' outputs count again
    model.nonlinear = True
    with torch.no_grad():
        model.heads.weight.normal_()
    assert not torch.allclose(model.generative(z), before)


def test_fit_starts_linear_then_trains_the_whole_model(wine):
    history = wine["history"]
    phases = [h["linear"] for h in history]
    assert phases[0] and not phases[-1] and phases == sorted(phases, reverse=True)  # linear first, then whole
    assert wine["model"].nonlinear


FAULTS_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import pyarrow.parquet as pq, torch
from helpers import DATA, dataset_spec
from pipeline.core.codec import TableCodec, fit_families, partial_stats
from pipeline.core.model import VAE
from pipeline.core.scoring import score_batch
from pipeline.runtime import retain_freed_memory
assert retain_freed_memory()
torch.set_num_threads(1)
spec = dataset_spec("adult")
table = pq.read_table(DATA / "adult" / "adult.parquet", columns=spec.columns).slice(0, 8192)
families = fit_families(spec, partial_stats(spec, table))
batch = TableCodec(spec, families).encode(table)
torch.manual_seed(0)
model = VAE(families)
for part in (1, 2):  # the process's working set: the heap grows to it over the first batches
    score_batch(model, batch.select(list(range(part * 4096 - 4096, part * 4096))), 16, 64)
for part in (1, 2, 1, 2, 1):  # the minor faults of each batch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    score_batch(model, batch.select(list(range(part * 4096 - 4096, part * 4096))), 16, 64)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_scoring_process_reuses_freed_memory():
    """A scoring process that called runtime.retain_freed_memory scores batch after batch without faulting
    pages in (glibc had handed the passes' freed tensors back to the kernel: tens of thousands of minor
    faults for each batch of 4,096 records; with the thresholds fixed, none in most batches, a few thousand
    in the odd one where a pass first needs a block larger than any before: the median batch counts)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent

    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, str(tests)], cwd=tests.parent,
                         capture_output=True, text=True, check=True)  # fmt: skip
    # no assertion on a run without the setting: glibc's own thresholds move with what was freed, and such
    # a run's median batch made 0 to 130,000 faults
    assert float(np.median([int(x) for x in out.stdout.split()])) < 1000


def test_model_scored_then_trained():
    """A model that has scored (under inference_mode) trains on: its layout's index tensors, built on the
    first use, are ordinary tensors that autograd may save, whichever mode built them."""
    spec, table = _mixed_table()
    model, codec = _untrained(spec, table)
    batch = codec.encode(table)
    score_batch(model, batch, 2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    out = model.loss(batch)
    out.loss.backward()
    opt.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
