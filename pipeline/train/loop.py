"""The Ray Train loop: what every data-parallel worker runs, and its checkpoints.

Phases per worker (``train_loop_per_worker(config)``, config a plain dict from :class:`LoopConfig`):

1. **setup** -- rebuild the fitted families and the VAE from the config, seed, set torch threads,
   wrap the model for DDP (``ray.train.torch.prepare_model``: gloo on CPU, NCCL on GPU), AdamW;
2. **resume** -- if Ray Train hands back a checkpoint (after a worker failure, or a re-run with
   ``--resume``), restore weights, optimizer, best weights, early-stopping state and the epoch;
3. **epochs** -- the worker's rows of "train" (its Arrow table from the object store, shuffled each pass,
   for inputs the driver holds; else its ``get_dataset_shard``, Arrow batches, local shuffle) encoded
   with :class:`~pipeline.core.codec.TableCodec`, one :func:`~pipeline.core.training.train_step_sums` per
   batch (the same step as the in-memory loop); then the shard of "valid" through
   :func:`~pipeline.core.training.evaluate`; sums all-reduced across workers, so every worker sees the
   same metrics and takes the same early-stopping decision. When every worker's encoded shards fit
   ``cache_mb``, the first pass keeps them (:class:`ShardCache`) and the later epochs run from memory,
   reshuffled each epoch, without reading or encoding again; every record is still trained on once
   per epoch (uneven shards end under DDP's ``join``);
4. **report** -- metrics every epoch, with a checkpoint from rank 0, and one progress line.

A checkpoint is a directory of two files, nothing to unpickle:
``state.safetensors`` (weights ``model.*``, best weights ``best.*``, optimizer tensors ``opt.*``) and
``state.json`` (epoch, per-epoch history, early-stopping state, optimizer hyper-parameters).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline.core.codec import EncodedBatch, TableCodec, families_from_json
from pipeline.core.model import VAE, VAEConfig
from pipeline.core.training import (
    Phases,
    TrainConfig,
    evaluate,
    iterate_minibatches,
    kl_weight,
    make_optimizer,
    train_step_sums,
)
from pipeline.errors import FailureHook
from pipeline.runtime import retain_freed_memory
from schemas.feature_spec import FeatureSpec

STATE_WEIGHTS = "state.safetensors"
STATE_META = "state.json"


@dataclass
class LoopConfig:
    """Everything a worker needs, crossing to Ray as a plain dict (``asdict``)."""

    spec: dict  # FeatureSpec.to_dict()
    families: list[dict]  # codec.families_to_json(fitted families)
    model: dict  # VAEConfig.to_dict()
    train: dict  # asdict(TrainConfig)
    shuffle_buffer: int = 10_000  # rows in each worker's local shuffle buffer (epochs read from the stream)
    cache_mb: int = 1024  # a worker keeps its encoded shards in memory up to this size (0: stream every epoch)
    use_gpu: bool = False
    bf16: bool = False  # bfloat16 autocast of the networks (GPU only)
    threads: int = 1  # torch threads per worker (its CPUs)
    failure_hook: dict = field(default_factory=dict)  # FailureHook.to_dict(): the test-only failure hook
    # --resume: the newest complete checkpoint the driver found on storage (a URI). Ray Train registers a
    # checkpoint a moment after its files are written, so a killed driver can leave files newer than its
    # snapshot; the worker resumes from whichever of the two is the later epoch.
    resume_from: str | None = None
    # inputs the driver holds: {"train": [ref per rank], "valid": [...]}, ObjectRefs of Arrow tables (None:
    # the datasets Ray Train splits). Kept out of asdict, which would deep-copy the references.
    shards: dict[str, list] | None = None

    def to_dict(self) -> dict:
        return asdict(replace(self, shards=None)) | {"shards": self.shards}


# ---- checkpoints ---------------------------------------------------------------------------------
def save_state(directory: str, model: VAE, optimizer: torch.optim.Optimizer, best: dict | None, meta: dict) -> None:
    """Write a checkpoint directory: weights, best weights and optimizer tensors; the rest as JSON."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if best is not None:
        tensors |= {f"best.{k}": v.detach().cpu().contiguous() for k, v in best.items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = dict(meta) | {"optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    save_file(tensors, os.path.join(directory, STATE_WEIGHTS))
    with open(os.path.join(directory, STATE_META), "w") as f:
        json.dump(meta, f, default=float)


def load_state(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(directory, STATE_WEIGHTS))
    with open(os.path.join(directory, STATE_META)) as f:
        return tensors, json.load(f)


def read_checkpoint(uri: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A checkpoint directory on storage (local or s3://), or None if it is incomplete or unreadable
    (a process killed while writing it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    from pipeline.io import storage

    try:
        meta = json.loads(storage.read_text(storage.join(uri, STATE_META)))
        tensors = load_tensors(storage.read_bytes(storage.join(uri, STATE_WEIGHTS)))
    except (OSError, ValueError, SafetensorError):  # missing, truncated or half-written
        return None
    return (tensors, meta) if isinstance(meta, dict) and "epoch" in meta else None


def newest_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint of the latest epoch under a Ray Train run directory (None if none)."""
    from pipeline.io import storage

    best: tuple[int, str] | None = None
    for name in storage.list_dir(run_dir):
        if not name.startswith("checkpoint_"):
            continue
        uri = storage.join(run_dir, name)
        state = read_checkpoint(uri)
        if state is not None and (best is None or state[1]["epoch"] > best[0]):
            best = (int(state[1]["epoch"]), uri)
    return best[1] if best else None


def _newest_state(checkpoint, resume_from: str | None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The later of Ray Train's checkpoint (a worker restart, or its snapshot on --resume) and the one
    the driver found on storage."""
    states = []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            states.append(load_state(d))
    if resume_from:
        found = read_checkpoint(resume_from)
        if found is not None:
            states.append(found)
    return max(states, key=lambda s: s[1]["epoch"]) if states else None


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in _prefixed(tensors, "opt.").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})


def final_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a finished run publishes: the best validation epoch's, else the last."""
    best = _prefixed(tensors, "best.")
    return best or _prefixed(tensors, "model.")


# ---- data ingest ---------------------------------------------------------------------------------
def exact_split_config():
    """A DataConfig that splits every dataset across workers without dropping rows.

    Ray Train's default ``streaming_split(n, equal=True)`` drops up to n-1 rows per epoch to give every
    worker the same count; here every record is trained on / validated once per epoch, and the uneven
    last batches are handled by DDP's ``join()``.
    """
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    class ExactSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            current = DataContext.get_current().execution_options
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                # Ray Train's default ingest options, less the deprecated exclude_resources
                ds.context.execution_options = ExecutionOptions(
                    resource_limits=current.resource_limits,
                    preserve_order=current.preserve_order,
                    verbose_progress=current.verbose_progress,
                )
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    out[i][name] = split
            return out

    return ExactSplit()


# ---- the worker loop -----------------------------------------------------------------------------
class TableShard:
    """A worker's rows of one side as one Arrow table (from the object store): Arrow batches of
    ``batch_size`` rows, in table order or in a permutation drawn from ``local_shuffle_seed`` (the
    keywords of ``DataIterator.iter_batches``). A full shuffle of the shard, where a streamed shard gets
    a local shuffle buffer."""

    def __init__(self, table):
        self.table = table

    def iter_batches(self, batch_size: int, local_shuffle_seed: int | None = None, **_):
        n = self.table.num_rows
        if local_shuffle_seed is None:
            for i in range(0, n, batch_size):
                yield self.table.slice(i, batch_size)
            return
        order = np.random.default_rng(local_shuffle_seed).permutation(n)
        for i in range(0, n, batch_size):
            yield self.table.take(order[i : i + batch_size])


class _DistributedLoss(torch.nn.Module):
    """forward = VAE.loss, so DDP's gradient hooks see the loss computation."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, batch: EncodedBatch, kl_weight: float = 1.0):
        return self.vae.loss(batch, kl_weight=kl_weight)


class _StepModel:
    """What ``train_step`` uses of a model (train, loss, parameters), routed through DDP."""

    def __init__(self, wrapped: torch.nn.Module, autocast: torch.autocast | None):
        self.wrapped, self.autocast = wrapped, autocast

    def train(self, mode: bool = True):
        self.wrapped.train(mode)
        return self

    def loss(self, batch: EncodedBatch, kl_weight: float = 1.0):
        if self.autocast is None:
            return self.wrapped(batch, kl_weight)
        with self.autocast:
            return self.wrapped(batch, kl_weight)

    def parameters(self):
        return self.wrapped.parameters()


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def validation_sums(vae: VAE, batches, samples: int = 1) -> tuple[int, dict[str, float]]:
    """Rows and sums of recon, kl and per-column log-density over encoded validation batches, through
    the same ``evaluate`` as the in-memory loop (which returns averages)."""
    counter = [0]

    def counted():
        for b in batches:
            counter[0] += len(b)
            yield b

    try:
        val = evaluate(vae, counted(), samples)
    except ZeroDivisionError:  # this worker's shard had no validation rows this epoch
        if counter[0]:
            raise
        return 0, dict.fromkeys(["recon", "kl", *(f.name for f in vae.families)], 0.0)
    n = counter[0]
    return n, {"recon": val["recon_log_density"] * n, "kl": val["kl"] * n} | {
        c: v * n for c, v in val["columns"].items()
    }


class ShardCache:
    """A worker's encoded shard kept in memory after the first pass, when it fits the budget.

    The first epoch streams the shard from Ray Data (read, split, encode) and keeps every encoded
    batch while the total stays within ``budget`` bytes; the later epochs iterate it in memory,
    shuffled by a generator seeded per (seed, epoch, rank). All ranks switch together (the decision is
    all-reduced), because a streaming split starts an epoch only when every worker asks for it.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.parts: list[EncodedBatch] = []
        self.bytes = 0
        self.invalid = 0  # invalid cells per pass (the same every epoch)
        self.batch: EncodedBatch | None = None  # the whole shard, once complete

    def add(self, batch: EncodedBatch) -> None:
        self.invalid += len(batch.invalid)
        if self.parts is None:
            return
        self.bytes += batch.values.numel() * batch.values.element_size() + batch.observed.numel() + batch.keys.nbytes
        if self.bytes > self.budget:
            self.parts = None  # over budget: this shard streams every epoch
        else:
            self.parts.append(EncodedBatch(batch.values, batch.observed, batch.keys))

    @property
    def fits(self) -> bool:
        return self.parts is not None

    @property
    def sealed(self) -> bool:
        return self.batch is not None

    def seal(self) -> None:
        """The pass is complete: one contiguous batch, rows in key order (independent of arrival order).
        Sealing again keeps the batch."""
        if self.sealed:
            return
        parts = self.parts or []
        if not parts:
            self.batch = EncodedBatch(torch.empty(0, 0, dtype=torch.float64), torch.empty(0, 0, dtype=torch.bool),
                                      np.empty(0, dtype=np.uint64))  # fmt: skip
        else:
            keys = np.concatenate([p.keys for p in parts])
            order = np.argsort(keys, kind="stable")
            whole = EncodedBatch(torch.cat([p.values for p in parts]), torch.cat([p.observed for p in parts]), keys)
            self.batch = whole.select(order)
        self.parts = []

    def minibatches(self, batch_size: int, generator: torch.Generator | None):
        batch = self.batch
        if batch is None or len(batch) == 0:
            return
        if generator is None:
            for i in range(0, len(batch), batch_size):
                yield batch.select(np.arange(i, min(i + batch_size, len(batch))))
        else:
            yield from iterate_minibatches(batch, batch_size, generator)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = LoopConfig(**config)
    tcfg = TrainConfig(**cfg.train)
    hook = FailureHook.from_dict(cfg.failure_hook)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    # ---- setup ----
    torch.set_num_threads(max(1, cfg.threads))
    retain_freed_memory()  # a worker process of the job's own: freed tensors' memory kept for the next
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    spec = FeatureSpec.from_dict(cfg.spec)
    families = families_from_json(cfg.families)
    codec = TableCodec(spec, families)
    vae = VAE(families, VAEConfig.from_dict(cfg.model))
    device = ray.train.torch.get_device()
    wrapped = ray.train.torch.prepare_model(_DistributedLoss(vae))
    vae.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else None
    step_model = _StepModel(wrapped, autocast)
    optimizer = make_optimizer(vae, tcfg)

    # ---- resume ----
    start, history, best, resumes = 0, [], None, []
    phases = Phases(tcfg, vae)
    state = _newest_state(ray.train.get_checkpoint(), cfg.resume_from)
    if state is not None:
        tensors, meta = state
        vae.load_state_dict(_prefixed(tensors, "model."))
        restore_optimizer(optimizer, tensors, meta)
        best = _prefixed(tensors, "best.") or None
        start, history = meta["epoch"] + 1, meta["history"]
        # a checkpoint from before the linear start is of a model trained whole
        phases = Phases(tcfg, vae, meta["best_val_elbo"], meta["stale"], linear=meta.get("linear", False),
                        drops=meta.get("linear_lr_drops", 0))  # fmt: skip
        resumes = [*meta.get("resumed_at_epochs", []), start]
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {meta['epoch']}", flush=True)
    phases.start(vae, optimizer, fresh=state is None)
    torch.manual_seed(tcfg.seed * 1_000_003 + rank * 7919 + start)  # reparameterisation noise per rank

    if cfg.shards is not None:
        import ray

        train_shard, valid_shard = (TableShard(ray.get(cfg.shards[side][rank])) for side in ("train", "valid"))
    else:
        train_shard = ray.train.get_dataset_shard("train")
        valid_shard = ray.train.get_dataset_shard("valid")
    names = [f.name for f in families]
    stopped = bool(history and history[-1].get("stop"))
    budget = cfg.cache_mb * 2**20
    train_cache, valid_cache = ShardCache(budget), ShardCache(budget)
    cached = False  # True once every rank holds its whole train and valid shards in memory
    ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    val_batch = max(tcfg.batch_size, 4096)
    val_draws = tcfg.val_samples or 1  # set by the driver from the validation rows (a run from before: 1)

    def stream(shard, cache: ShardCache, batch_size: int, shuffle_seed: int | None):
        for table in shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=cfg.shuffle_buffer if shuffle_seed is not None else None,
            local_shuffle_seed=shuffle_seed,
        ):
            batch = codec.encode(table).to(device)
            cache.add(batch)
            yield batch

    # ---- epochs ----
    for epoch in range(start, tcfg.epochs):
        if stopped:
            break
        if rank == world - 1:
            hook.check(epoch, "epoch")

        beta = kl_weight(epoch, tcfg.kl_warmup_epochs)
        shuffle_seed = tcfg.seed * 1_000_003 + epoch * 1009 + rank
        n = 0
        recon = torch.zeros((), dtype=torch.float64, device=device)
        kl = torch.zeros((), dtype=torch.float64, device=device)
        t0 = epoch_start = time.perf_counter()
        c0 = time.process_time()
        # a small table's epoch makes several passes over the shard (min_epoch_steps); each pass is
        # joined on its own, so that no rank asks the streaming split for the next pass while another
        # still waits on it in a gradient all-reduce of this one
        passes = tcfg.passes_per_epoch or 1
        for p in range(passes):
            with wrapped.join() if ddp else contextlib.nullcontext():
                seed = shuffle_seed + p * 7
                if cached or train_cache.sealed:  # in memory, reshuffled every pass
                    batches = train_cache.minibatches(tcfg.batch_size, torch.Generator().manual_seed(seed))
                elif p == 0:  # from the stream (read, split, encode), kept when it fits
                    train_cache, valid_cache = ShardCache(budget), ShardCache(budget)
                    batches = stream(train_shard, train_cache, tcfg.batch_size, seed if cfg.shuffle_buffer else None)
                else:  # streamed again, not kept (invalid cells are counted on the first pass only)
                    batches = stream(train_shard, ShardCache(0), tcfg.batch_size, seed if cfg.shuffle_buffer else None)
                for batch in batches:
                    bn, br, bk = train_step_sums(step_model, optimizer, batch, beta, tcfg.grad_clip)
                    n, recon, kl = n + bn, recon + br.double(), kl + bk.double()
            # the first pass kept every rank's shard: the epoch's other passes run from memory instead of
            # reading, splitting and encoding it again (decided together, as below; the same on every rank)
            first_of_many = p == 0 and passes > 1 and not cached and not train_cache.sealed
            if first_of_many and _all_reduce([float(budget > 0 and train_cache.fits)])[0] == world:
                train_cache.seal()
        train_seconds = time.perf_counter() - t0
        train_cpu = time.process_time() - c0  # this worker's CPU time (all its threads) for the epoch's steps
        invalid = train_cache.invalid

        if cached:
            vn, vsums = validation_sums(vae, valid_cache.minibatches(val_batch, None), val_draws)
        else:
            vn, vsums = validation_sums(vae, stream(valid_shard, valid_cache, val_batch, None), val_draws)
        fits = float(budget > 0 and train_cache.fits and valid_cache.fits)
        sums = _all_reduce(
            [n, float(recon), float(kl), invalid, vn, vsums["recon"], vsums["kl"], train_seconds, fits,
             train_cpu, *[vsums[c] for c in names]]
        )  # fmt: skip
        if not cached and sums[8] == world:  # every rank holds its shards: the next epochs run in memory
            train_cache.seal()  # a no-op where the epoch's first pass sealed it
            valid_cache.seal()
            cached = True
        elif not cached:
            budget = 0  # some shard does not fit: every epoch streams, nothing is kept
        cpu_sum = sums[9]
        sums = sums[:8] + sums[10:]
        n, recon, kl, invalid, vn, vrecon, vkl, seconds_sum = sums[:8]
        row = {
            "epoch": epoch,
            "kl_weight": beta,
            "train_rows": int(n),
            "train_elbo": (recon - kl) / max(n, 1),
            "train_recon_log_density": recon / max(n, 1),
            "train_kl": kl / max(n, 1),
            "val_rows": int(vn),
            "val_elbo": (vrecon - vkl) / vn if vn else None,
            "val_recon_log_density": vrecon / vn if vn else None,
            "val_kl": vkl / vn if vn else None,
            "val_columns": {c: s / vn for c, s in zip(names, sums[8:], strict=True)} if vn else {},
            "invalid_cells": int(invalid),
            "seconds": seconds_sum / world,
            "rows_per_s": n / max(seconds_sum / world, 1e-9),
            "cpu_seconds": cpu_sum,  # CPU time of all workers' training steps (load-independent cost)
            "rows_per_cpu_s": n / max(cpu_sum, 1e-9),
            "epoch_seconds": time.perf_counter() - epoch_start,  # wall clock, validation included
        }

        # early stopping on validation elbo once the KL weight has reached 1, and the linear start
        # (training.Phases, as the plain loop); every rank sees the same all-reduced sums, so decides the same
        score = row["val_elbo"] if row["val_elbo"] is not None else row["train_elbo"]
        row["linear"] = phases.linear
        improved, switch, stopped = phases.update(epoch, score, beta)
        if improved:
            best = {k: v.detach().cpu().clone() for k, v in vae.state_dict().items()}
        if switch:
            phases.open(vae, optimizer, best)
        row["best"] = improved
        row["stop"] = stopped
        history.append(row)

        # ---- report ----
        metrics = {k: v for k, v in row.items() if k != "val_columns"} | {
            f"val_col/{c}": v for c, v in row["val_columns"].items()
        }
        meta = {
            "epoch": epoch,
            "history": history,
            "best_val_elbo": phases.best_val,
            "stale": phases.stale,
            "linear": phases.linear,
            "linear_lr_drops": phases.drops,
            "resumed_at_epochs": resumes,
        }
        if rank == 0:
            print(progress_line(row, tcfg.epochs), flush=True)
            with tempfile.TemporaryDirectory(prefix="vaepipe-ckpt-") as d:
                save_state(d, vae, optimizer, best, meta)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def progress_line(row: dict, epochs: int) -> str:
    """One line per epoch: metrics, training rows/s, and an ETA from this epoch's wall clock."""

    def f(v):
        return "   n/a" if v is None else f"{v:9.3f}"

    left = 0 if row.get("stop") else epochs - row["epoch"] - 1
    eta = round(left * row.get("epoch_seconds", 0.0))
    return (
        f"epoch {row['epoch'] + 1:>3}/{epochs}  beta {row['kl_weight']:.2f}  "
        f"train elbo {f(row['train_elbo'])}  val elbo {f(row['val_elbo'])}  "
        f"val kl {f(row['val_kl'])}  {row['rows_per_s']:9,.0f} rows/s  ETA {eta // 60}:{eta % 60:02d}"
        + ("  linear" if row.get("linear") else "")
        + ("  *" if row.get("best") else "")
        + ("  (early stop)" if row.get("stop") else "")
    )
