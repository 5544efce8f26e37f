"""The VAE, read top to bottom: config, then the three phases.

* ``inference(values, observed)``: encoded features and the missing-value mask -> q(z|x), a diagonal
  Gaussian (mean, log-variance bounded so it cannot overflow);
* ``generative(z)``: z -> raw parameters of p(x|z), one head per feature (a fused linear layer; each
  family turns its slice into its distribution's parameters, like features together: ``column_log_prob``
  makes one stacked evaluation per group of like features, not one per column);
* ``loss(batch)``: the negative ELBO with a single reparameterised sample, for training.

The prior p(z) is a learned mixture of ``prior_components`` diagonal Gaussians (weights, means and
variances trained with the rest; 1: N(0, I)). The KL the scores report and training minimises is closed
form: -log sum_c pi_c exp(-KL(q(z|x) || p_c)), the KL of the joint latent (component c, z) with c's
posterior q(c|x) at its optimum; it is >= 0 and bounds KL(q(z|x) || p(z)) from above, so elbo = recon - kl
is still a lower bound on log p(x). log_marginal uses the mixture's exact density. With the linear paths
alone (the linear start) the model is a mixture of common factor analysers: on the smallest table of the
quality benchmark (breast cancer, 409 training rows) it gained 3 nats per held-out record over N(0, I) and
passed a full-covariance Gaussian mixture; adult and wine 0.1 to 0.8 nats, while default_credit lost 0.5
to 1.4 nats (still ahead of the best peer).

Missing values are zeroed in the encoder input, flagged in the mask, and
excluded from log p(x|z); they are never imputed into a score.

Decoder variances cannot grow to absorb a gross error: for every feature with a spread parameter (the
log-variance of ``real`` and ``positive``, the log-dispersion of ``count``) the decoder emits

    spread_j(z) = base_j + var_modulation * tanh(head_j(z))

with ``base_j`` one learned number per feature: a record can widen its variance by at most a factor
exp(var_modulation) over the column's typical one, so a value many standard deviations off is charged to its
column instead of being explained away by a corner of latent space with wide variances.

Beside each MLP runs a linear path (``linear_skip``): x -> q(z|x) and z -> the decoder heads, so a
linear-Gaussian model (factor analysis, probabilistic PCA) is the network with its MLPs at zero, and
tight linear relations between columns are learned in few steps.

Training also teaches an encoder records with features hidden (``train_mask``: each record draws a rate
r ~ U(0, train_mask) and hides each observed feature with probability r): a second ELBO, of the shown
features only, through a frozen decoder. That encoder (``mask_encoder``: a network of its own, beside
the main one) so learns q(z | x_S) for any subset S of the features, the proposal the per-column
conditional scores need, while the main encoder (whose q(z|x) every other score uses) and the decoder
learn from whole records alone. Hiding features in the one pass that also trains the decoder, with
every feature reconstructed (an earlier design), made the decoder learn wider variances for every
column: on the quality benchmark's tables 0.3 to 0.5 nats per record of held-out log-likelihood lost,
and gross errors hidden (adult's unit errors at average precision 0.17 instead of 0.59); sharing one
encoder between the two passes cost the smallest table (409 training rows) 6.6 nats per record.

The table chooses two sizes when the options leave them open: the latent dimension (two thirds of the
features, 8 to 32: :func:`auto_latent_dim`) and the widths (:func:`auto_hidden`: narrower for a few hundred rows).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.core.codec import EncodedBatch
from pipeline.core.likelihoods import Family
from pipeline.core.likelihoods.base import LOG_2PI

# The column's base spread is SPREAD_GAIN * a parameter: Adam moves a parameter by about lr per step, and a
# log-variance may have to travel -7 (a relation 3% as wide as the column) within a few hundred steps.
SPREAD_GAIN = 10.0


def auto_latent_dim(n_features: int) -> int:
    """The latent dimension chosen from the table: two thirds of the features, at least 8 and at most 32
    (measured on the quality benchmark: a wide table of related measurements needs more factors than 8 --
    breast cancer's 31 columns gained 2 nats per record from 16 to 24 -- while more than the table needs
    costs held-out log-likelihood: wine's 13 columns lost 0.6 nats from 10 to 18)."""
    return int(min(32, max(8, math.ceil(2 * n_features / 3))))


SMALL_TABLE_ROWS = 2000  # fewer training rows than this: narrower networks (they generalise better)


def auto_hidden(train_rows: int) -> tuple[int, ...]:
    """The MLP widths chosen from the table: 128-128, or 64-64 below SMALL_TABLE_ROWS training rows (on a
    table of a few hundred records the wider networks fit the training rows at the held-out ones' cost)."""
    return (64, 64) if train_rows < SMALL_TABLE_ROWS else (128, 128)


def sized_config(
    n_features: int,
    train_rows: int,
    latent_dim: int | None = None,
    hidden: tuple[int, ...] | list[int] | None = None,
    prior_components: int | None = None,
) -> VAEConfig:
    """The default configuration with the sizes the options give, or those chosen from the table."""
    return VAEConfig(
        latent_dim=latent_dim or auto_latent_dim(n_features),
        hidden=tuple(hidden) if hidden else auto_hidden(train_rows),
        prior_components=prior_components or VAEConfig.prior_components,
    )


@dataclass
class VAEConfig:
    latent_dim: int = 8  # dimension of z
    hidden: tuple[int, ...] = (128, 128)  # MLP widths; the decoder mirrors the encoder
    min_log_var: float = -12.0  # bounds on the encoder's log-variance: q(z|x) never degenerates
    max_log_var: float = 6.0
    var_modulation: float = 1.5  # a record's decoder log-variance stays within +-this of its column's (0: unbounded)
    train_mask: float = 0.2  # largest rate of features hidden from the encoder in its masked pass (0: none)
    linear_skip: bool = True  # a linear path beside each MLP (x -> q(z|x), z -> heads): factor analysis is nested
    # the masked pass trains an encoder of its own, q(z | x_S), for the conditional scores: the encoder of
    # log_marginal and the decoder learn from whole records only
    mask_encoder: bool = True
    prior_components: int = 8  # p(z): 1 = N(0, I); C > 1 = a learned mixture of C diagonal Gaussians

    def to_dict(self) -> dict:
        return asdict(self) | {"hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        d = dict(d)
        # artifacts written before these options existed: the architecture they were trained with
        d.setdefault("var_modulation", 0.0)
        d.setdefault("train_mask", 0.0)
        d.setdefault("linear_skip", False)
        d.setdefault("mask_encoder", False)
        d.setdefault("prior_components", 1)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU()]
    return nn.Sequential(*layers)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: mean over records of -(recon - kl_weight * kl)
    recon: torch.Tensor  # [N] log p(x|z) at one sample, observed features
    kl: torch.Tensor  # [N]
    column_log_prob: torch.Tensor  # [N, F], 0 where missing


class VAE(nn.Module):
    def __init__(self, families: list[Family], config: VAEConfig | None = None):
        super().__init__()
        self.families = families
        self.config = config = config or VAEConfig()
        enc_in = sum(f.enc_width for f in families) + len(families)
        h = list(config.hidden)
        self.encoder = _mlp([enc_in, *h])
        self.q_head = nn.Linear(h[-1], 2 * config.latent_dim)
        if config.mask_encoder and config.train_mask > 0:
            self.mask_encoder = _mlp([enc_in, *h])
            self.mask_q_head = nn.Linear(h[-1], 2 * config.latent_dim)
            if config.linear_skip:
                self.mask_q_skip = nn.Linear(enc_in, 2 * config.latent_dim, bias=False)
        self.decoder = _mlp([config.latent_dim, *reversed(h)])
        self.heads = nn.Linear(h[0], sum(f.n_params for f in families))
        if config.linear_skip:
            self.q_skip = nn.Linear(enc_in, 2 * config.latent_dim, bias=False)
            self.head_skip = nn.Linear(config.latent_dim, sum(f.n_params for f in families), bias=False)
        # one base spread per feature with a spread parameter, in feature order
        self._spread = sum(f.spread_index is not None for f in families)
        if config.var_modulation > 0 and self._spread:
            self.spread_base = nn.Parameter(torch.zeros(self._spread))
        if config.prior_components > 1:
            # the components start spread over the N(0, I) region (a fixed draw: initial weights elsewhere
            # are as they would be without them), equal weights, unit variances
            c, dim = config.prior_components, config.latent_dim
            self.prior_logits = nn.Parameter(torch.zeros(c))
            self.prior_mean = nn.Parameter(torch.randn(c, dim, generator=torch.Generator().manual_seed(0)))
            self.prior_log_var = nn.Parameter(torch.zeros(c, dim))
        self._layout: dict[str, Layout] = {}  # per device
        # False while training starts linear (training.Phases): the MLPs' outputs are multiplied by 0, so
        # the model is its linear paths alone (factor analysis with these likelihoods) and every parameter
        # still takes part in the graph (DDP reduces all of them). Not stored: a trained model is whole.
        self.nonlinear = True

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def nonlinear_heads(self) -> list[nn.Linear]:
        """The layers that carry the MLPs' outputs (``nonlinear`` gates them)."""
        return [self.heads, self.q_head, *([self.mask_q_head] if self.has_mask_encoder else [])]

    # ---- inference: x -> q(z|x) -------------------------------------------------------------------
    def layout(self, device: torch.device) -> Layout:
        key = str(device)
        if key not in self._layout:
            # ordinary tensors even when first built under inference_mode (scoring): autograd saves the
            # index tensors of a training step, and refuses inference tensors
            with torch.inference_mode(False):
                self._layout[key] = Layout.build(self.families, device)
        return self._layout[key]

    def encoder_views(self, values: torch.Tensor) -> torch.Tensor:
        """[N, F] values -> [N, enc_width] float32: each feature's encoder view, in feature order, whatever
        the mask (a missing value's placeholder has its view too). It depends on the values only: the
        passes that see a record under different masks (training's masked pass, the conditional scores)
        compute it once and hand it to :meth:`encoder_input`."""
        lay = self.layout(values.device)
        x = torch.zeros((values.shape[0], lay.enc_slots), dtype=torch.float32, device=values.device)
        for g in lay.groups:
            x[:, g.enc_positions] = g.family.encoder_input(values[:, g.columns]).reshape(values.shape[0], -1)
        return x[:, : lay.enc_width]

    def encoder_input(
        self, values: torch.Tensor, observed: torch.Tensor, views: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N, F] values and mask -> [N, enc_in] float32: each feature's encoder view (0 where missing),
        in feature order, then the mask. ``views``: :meth:`encoder_views` of these values, if at hand."""
        lay = self.layout(values.device)
        if views is None:
            views = self.encoder_views(values)
        return torch.cat([views * observed[:, lay.enc_features], observed.float()], dim=-1)

    @property
    def has_mask_encoder(self) -> bool:
        return hasattr(self, "mask_encoder")

    def inference(
        self, values: torch.Tensor, observed: torch.Tensor, masked: bool = False, views: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean, log-variance) of q(z|x), each [N, D]. ``masked``: q(z | x_S) of the masked pass's
        encoder (the conditional scores' proposal), where the model has one; else the main encoder.
        ``views``: :meth:`encoder_views` of these values, if at hand."""
        x = self.encoder_input(values, observed, views).to(self.q_head.weight.dtype)
        prefix = "mask_" if masked and self.has_mask_encoder else ""
        head = getattr(self, f"{prefix}q_head")
        weight = head.weight if self.nonlinear else head.weight * 0.0
        out = nn.functional.linear(getattr(self, f"{prefix}encoder")(x), weight, head.bias)
        if self.config.linear_skip:
            out = out + getattr(self, f"{prefix}q_skip")(x)
        mean, log_var = out.chunk(2, dim=-1)
        return mean, log_var.clamp(self.config.min_log_var, self.config.max_log_var)

    # ---- the prior ------------------------------------------------------------------------------
    def kl(self, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """[N] closed-form KL of q(z|x) against the prior, float64 (see the module doc for the mixture's)."""
        if self.config.prior_components <= 1:
            return kl_standard_normal(mean, log_var)
        return kl_mixture_bound(mean, log_var, self.prior_logits, self.prior_mean, self.prior_log_var)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) [...], float64, for z [..., D]: exact (the mixture by logsumexp over its components)."""
        if self.config.prior_components <= 1:
            return log_standard_normal(z)
        # sum_d (z_d - m_cd)^2 / v_cd expanded into two [.., D] x [D, C] products: no [..., C, D] tensor
        z = z.double()
        pm, plv = self.prior_mean.double(), self.prior_log_var.double()
        prec = torch.exp(-plv)  # [C, D]
        const = (pm.pow(2) * prec + plv + LOG_2PI).sum(-1) - 2.0 * torch.log_softmax(self.prior_logits.double(), -1)
        quad = z.pow(2) @ prec.T - 2.0 * (z @ (pm * prec).T)  # [..., C]
        return torch.logsumexp(-0.5 * (quad + const), -1)

    # ---- generative: z -> p(x|z) ----------------------------------------------------------------
    def generative(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """z [..., N, D] -> the raw parameters of every feature, [..., N, P], in the layout's grouped order
        (:class:`Layout`: ``column_log_prob`` reads them). ``frozen``: the decoder's parameters are
        constants (gradients reach z, and through it the encoder, only)."""

        def param(v: torch.Tensor) -> torch.Tensor:
            return v.detach() if frozen else v

        lay = self.layout(z.device)
        if frozen:
            h = torch.func.functional_call(
                self.decoder, {k: v.detach() for k, v in self.decoder.named_parameters()}, (z,)
            )
        else:
            h = self.decoder(z)
        # the heads' rows taken in the grouped order: the regrouping costs a gather of the small weight
        # matrices, not of the [..., N, P] output
        weight = param(self.heads.weight)[lay.head_rows]
        if not self.nonlinear:
            weight = weight * 0.0
        # computed transposed, [P, rows]: the output is laid out parameter by parameter in memory (its shape
        # is still [..., N, P]), so each family's parameters (the means, the variances, a threshold) are
        # contiguous blocks and its elementwise ops take torch's vectorised kernels; on the interleaved
        # layout of a plain linear layer they took its strided loop (adult, 64 samples of 1,024 records:
        # the likelihoods 112 -> 86 ms, the ordinal's thresholds 3x faster; this pass 134 -> 105 ms)
        rows = h.shape[:-1]
        out = torch.addmm(param(self.heads.bias)[lay.head_rows, None], weight, h.reshape(-1, h.shape[-1]).T)
        # in place: neither addmm's nor the index's backward reads ``out``, and each out-of-place op copied
        # the whole [P, rows] output (2 of a pass's 7 copies)
        if self.config.linear_skip:
            out.addmm_(param(self.head_skip.weight)[lay.head_rows], z.reshape(-1, z.shape[-1]).T)
        if self.config.var_modulation > 0 and self._spread:
            base = param(self.spread_base)[lay.spread_base, None]
            spread = SPREAD_GAIN * base + self.config.var_modulation * torch.tanh(out[lay.spread_positions])
            out.index_copy_(0, lay.spread_positions, spread)
        return out.T.reshape(*rows, out.shape[0])

    def column_log_prob(self, raw: torch.Tensor, values: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """log p(x_j | z) for every feature, float64 [..., N, F], 0 where x_j is missing: one stacked
        evaluation per group of like features (:class:`Layout`); ``raw`` from :meth:`generative`."""
        return self.layout(values.device).column_log_prob(raw, values, observed)

    # ---- loss -----------------------------------------------------------------------------------
    def loss(self, batch: EncodedBatch, kl_weight: float = 1.0) -> LossOutput:
        """The negative ELBO of the batch; in training with ``train_mask`` > 0, plus the negative ELBO of
        the records with features hidden at random, of the shown features only, through a frozen
        decoder: the encoder learns q(z | x_S) ~ p(z | x_S) for any subset S (the proposal of the
        conditional scores) while the decoder learns from whole records alone."""
        views = self.encoder_views(batch.values)  # both passes' encoders see the same values
        mean, log_var = self.inference(batch.values, batch.observed, views=views)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        raw = self.generative(z)
        kl = self.kl(mean, log_var)
        masked = None
        if self.training and self.config.train_mask > 0:
            seen = batch.observed
            rate = torch.rand(seen.shape[0], 1, device=seen.device) * self.config.train_mask
            seen = seen & (torch.rand(seen.shape, device=seen.device) >= rate)
            m_mean, m_log_var = self.inference(batch.values, seen, masked=True, views=views)
            zm = m_mean + torch.exp(0.5 * m_log_var) * torch.randn_like(m_mean)
            m_raw = self.generative(zm, frozen=True)
            # both passes' likelihoods in one evaluation, [2, N, F]: half the likelihood ops of two calls,
            # which bound a step of this size; stacked parameter by parameter, generative's layout
            both = torch.stack([raw.movedim(-1, 0), m_raw.movedim(-1, 0)], 1).movedim(0, -1)
            cols = self.column_log_prob(both, batch.values, torch.stack([batch.observed, seen]))
            col, masked = cols[0], cols[1].sum(-1) - kl_weight * self.kl(m_mean, m_log_var)
        else:
            col = self.column_log_prob(raw, batch.values, batch.observed)
        recon = col.sum(-1)
        loss = -(recon - kl_weight * kl).mean()
        if masked is not None:
            loss = loss - masked.mean()
        return LossOutput(loss, recon.detach(), kl.detach(), col.detach())


@dataclass
class _Group:
    """Features of one ``group_key``, evaluated as one stacked family."""

    family: Family  # Family.stack of the members
    columns: torch.Tensor  # [G] their feature indices
    start: int  # their raw parameters: [start, stop) of generative's output, member after member, P each
    stop: int
    enc_positions: torch.Tensor  # [G * W] their encoder views' slots (padding: spare slots past the end)


@dataclass
class Layout:
    """Like features grouped, so that each group is evaluated at once (adult: 15 features, 6 groups).

    The heads' parameters and the encoder input keep the features' own order, as artifacts store them;
    the decoder emits its output in the grouped order (``head_rows``: the heads' row for each output,
    a stack's padding repeating a member's last row), so each group's parameters are one contiguous
    slice [..., N, G * P]."""

    groups: list[_Group]
    head_rows: torch.Tensor  # [P'] the heads' row of each grouped output
    feature_order: torch.Tensor  # [F]: feature j's position in the groups' concatenated log-probabilities
    spread_positions: torch.Tensor  # [S] the spread parameters in the grouped output
    spread_base: torch.Tensor  # [S] which of spread_base (feature order) each one takes
    enc_width: int  # the encoder view's width (the mask follows it)
    enc_slots: int  # enc_width plus the spare slots the padding of stacks writes to
    enc_features: torch.Tensor  # [enc_width] the feature each slot of the encoder view belongs to

    def column_log_prob(self, raw: torch.Tensor, values: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """raw parameters [..., N, P'] in the grouped order -> log p(x_j) float64 [..., N, F], 0 where missing."""
        raw = raw.double()  # the layout kept: generative's output, parameter by parameter
        # one split, not a slice per group: a slice's gradient is a zero-filled copy of the whole raw output
        # (for each group), a split's is one concatenation
        slices = torch.split(raw, [g.stop - g.start for g in self.groups], dim=-1)
        parts = [
            g.family.log_prob(r.unflatten(-1, (len(g.columns), -1)), values[:, g.columns])
            for g, r in zip(self.groups, slices, strict=True)
        ]
        logp = torch.cat(parts, dim=-1)[..., self.feature_order]
        return torch.where(observed, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))

    @classmethod
    def build(cls, families: list[Family], device: torch.device) -> Layout:
        p_off = [0, *itertools.accumulate(f.n_params for f in families)]
        e_off = [0, *itertools.accumulate(f.enc_width for f in families)]
        spread_rank = {j: i for i, j in enumerate(j for j, f in enumerate(families) if f.spread_index is not None)}
        members: dict[tuple, list[int]] = {}
        for j, f in enumerate(families):
            members.setdefault(f.group_key(), []).append(j)
        groups, rows, spread_pos, spread_base, spare = [], [], [], [], e_off[-1]
        for cols in members.values():
            fams = [families[j] for j in cols]
            stacked = type(fams[0]).stack(fams, device)
            start, enc = len(rows), []
            for j, f in zip(cols, fams, strict=True):
                if f.spread_index is not None:
                    spread_pos.append(len(rows) + f.spread_index)
                    spread_base.append(spread_rank[j])
                rows += [p_off[j] + min(k, f.n_params - 1) for k in range(stacked.n_params)]
                for k in range(stacked.enc_width):
                    if k < f.enc_width:
                        enc.append(e_off[j] + k)
                    else:
                        enc.append(spare)
                        spare += 1
            groups.append(
                _Group(stacked, torch.tensor(cols, device=device), start, len(rows), torch.tensor(enc, device=device))
            )
        order = torch.tensor([j for cols in members.values() for j in cols])

        def longs(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.long, device=device)

        return cls(
            groups,
            longs(rows),
            torch.argsort(order).to(device),
            longs(spread_pos),
            longs(spread_base),
            e_off[-1],
            spare,
            longs([j for j, f in enumerate(families) for _ in range(f.enc_width)]),
        )


def kl_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)), closed form, summed over the latent dims, float64."""
    mean, log_var = mean.double(), log_var.double()
    return 0.5 * (mean.pow(2) + torch.exp(log_var) - 1.0 - log_var).sum(-1)


def kl_mixture_bound(mean, log_var, logits, p_mean, p_log_var) -> torch.Tensor:
    """Closed-form upper bound on KL(q || sum_c pi_c N(mu_c, diag s_c^2)): -log sum_c pi_c exp(-KL(q || p_c)),
    the KL of the joint latent (c, z) with q(c | x) the optimal responsibilities; >= the KL of z, >= 0."""
    m, lv = mean.double(), log_var.double()
    pm, plv = p_mean.double(), p_log_var.double()
    prec = torch.exp(-plv)  # [C, D]
    # KL(q || p_c) = 1/2 sum_d [plv - lv + (exp(lv) + (m - pm)^2) / exp(plv) - 1], the square expanded into
    # two [..., D] x [D, C] products as in log_prior: no [..., C, D] tensor (each one, and its gradient, a
    # fresh allocation of N * C * D float64 per op); >= 0 exactly, so the clamp takes off rounding only
    const = (plv + pm.pow(2) * prec - 1.0).sum(-1)  # [C]
    quad = (torch.exp(lv) + m.pow(2)) @ prec.T - 2.0 * (m @ (pm * prec).T)  # [..., C]
    kl_c = (0.5 * (quad + const - lv.sum(-1, keepdim=True))).clamp_min(0.0)
    return -torch.logsumexp(torch.log_softmax(logits.double(), -1) - kl_c, -1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim, float64."""
    z = z.double()
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
