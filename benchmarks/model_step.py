"""The model step against a minimal float32 VAE of the same widths, in one process, side by side.

    python benchmarks/model_step.py [--steps 200] [--batch-size 512] [--datasets adult wine]

Arms, each timed over the same minibatches of the dataset's encoded training rows (one torch thread, the
job's default model sizes from :func:`pipeline.core.model.sized_config`), interleaved in rounds so that a
change of load hits every arm alike; the median round counts:

* ``minimal f32 VAE``: an MLP encoder and decoder of the same widths (Linear + SiLU), a diagonal Gaussian
  over the encoder's input vector (one-hot labels, standardised numbers) with a learned variance per
  output, one reparameterised sample, AdamW: the floor a step of this size costs in torch;
* ``vaepipe, whole records``: :func:`pipeline.core.training.train_step` with ``train_mask=0`` (one pass:
  encoder, decoder, every column's exact log-likelihood in its family);
* ``vaepipe, default``: the same with the default ``train_mask``: a second pass trains the conditional
  scores' encoder through the frozen decoder, so a step does two encoder and two decoder passes;
* ``vaepipe, scoring pass``: the no-grad decoder pass and column log-likelihoods of the scoring job,
  S = 64 samples of z per record (:func:`pipeline.core.scoring` does this per chunk).

Ratios are against the minimal VAE's step (the scoring pass against the minimal decoder alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from procmem import load_line  # noqa: E402
from torch import nn  # noqa: E402


def minimal_vae(width_in: int, hidden: tuple[int, ...], latent: int) -> nn.Module:
    def mlp(sizes):
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        return nn.Sequential(*layers)

    class Minimal(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(mlp([width_in, *hidden]), nn.Linear(hidden[-1], 2 * latent))
            self.dec = nn.Sequential(mlp([latent, *reversed(hidden)]), nn.Linear(hidden[0], width_in))
            self.log_var = nn.Parameter(torch.zeros(width_in))

        def decode_log_prob(self, z, x):
            mu = self.dec(z)
            return (-0.5 * (self.log_var + (x - mu) ** 2 * torch.exp(-self.log_var) + 1.8378770664093453)).sum(-1)

        def loss(self, x):
            mean, log_var = self.enc(x).chunk(2, -1)
            z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
            kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(-1)
            return -(self.decode_log_prob(z, x) - kl).mean()

    return Minimal()


def load(name: str):
    import pyarrow.parquet as pq
    from helpers import DATA, dataset_spec

    from pipeline.core.codec import TableCodec, fit_families, partial_stats

    spec = dataset_spec(name)
    table = pq.read_table(next((DATA / name).glob("*.parquet")), columns=spec.columns)
    families = fit_families(spec, partial_stats(spec, table))
    return families, TableCodec(spec, families).encode(table)


def bench(name: str, steps: int, batch_size: int, rounds: int, samples: int) -> list[tuple[str, float]]:
    from pipeline.core.model import VAE, sized_config
    from pipeline.core.training import TrainConfig, make_optimizer, train_step_sums

    families, encoded = load(name)
    torch.manual_seed(0)
    cfg = sized_config(len(families), len(encoded))
    whole = VAE(families, type(cfg)(**{**cfg.to_dict(), "hidden": cfg.hidden, "train_mask": 0.0}))
    default = VAE(families, cfg)
    opts = {m: make_optimizer(m, TrainConfig()) for m in (whole, default)}
    gen = torch.Generator().manual_seed(0)
    batches = [encoded.select(torch.randint(len(encoded), (batch_size,), generator=gen).numpy()) for _ in range(steps)]
    with torch.no_grad():
        x_min = [default.encoder_input(b.values, b.observed) for b in batches]
    mini = minimal_vae(x_min[0].shape[1], cfg.hidden, cfg.latent_dim)
    mini_opt = torch.optim.AdamW(mini.parameters(), lr=2e-3, fused=True)  # the fastest update, as vaepipe's
    score_batches = batches[: max(1, steps // 20)]

    def run_minimal():
        for x in x_min:
            loss = mini.loss(x)
            mini_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mini.parameters(), 10.0)
            mini_opt.step()

    def run_vaepipe(model):
        def go():
            for b in batches:
                train_step_sums(model, opts[model], b, 1.0, 10.0)

        return go

    @torch.no_grad()
    def run_minimal_decoder():
        for x in x_min[: len(score_batches)]:
            z = torch.randn(samples, len(x), cfg.latent_dim)
            mini.decode_log_prob(z, x).sum()

    @torch.no_grad()
    def run_scoring():
        default.eval()
        for b in score_batches:
            z = torch.randn(samples, len(b), cfg.latent_dim)
            default.column_log_prob(default.generative(z), b.values, b.observed).sum()

    arms = {
        "minimal f32 VAE, step": run_minimal,
        "vaepipe, whole records, step": run_vaepipe(whole),
        "vaepipe, default, step": run_vaepipe(default),
        f"minimal f32 decoder, S={samples}": run_minimal_decoder,
        f"vaepipe decoder + log p, S={samples}": run_scoring,
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(rounds):
        for k, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    per = {}
    for k, ts in times.items():
        n = len(score_batches) if "S=" in k else steps
        per[k] = statistics.median(ts) / n
    return [(k, v) for k, v in per.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["adult", "wine"], help="tables of tests/data")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    from pipeline.runtime import retain_freed_memory

    retain_freed_memory()  # the allocator as in the job's workers
    torch.set_num_threads(1)
    print(f"model step, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, 1 torch thread; "
          f"{load_line()}")  # fmt: skip
    print(f"{'dataset':<16} {'arm':<34} {'ms/step':>9} {'rows/s':>10} {'vs minimal':>11}")
    for name in args.datasets:
        rows = bench(name, args.steps, args.batch_size, args.rounds, args.samples)
        base_step = rows[0][1]
        base_dec = rows[3][1]
        for k, v in rows:
            base = base_dec if "S=" in k else base_step
            print(f"{name:<16} {k:<34} {v * 1e3:>9.2f} {args.batch_size / v:>10,.0f} {v / base:>10.2f}x")


if __name__ == "__main__":
    main()
