"""The FSDP2 training loop with EWC fused into the optimizer step (`gemma-ewc train`, trainer/commands/train.py).

    summary = train(load_config("configs/tiny.toml", ["optim.lr=1e-4"]), "runs/tiny")   # inside a process group

One code path for one CPU process and for torchrun on many GPUs and nodes: a single process also runs in a
(world size 1) process group, so sharding, checkpoints and reductions are the same everywhere.

Per optimizer step: `grad_accum` micro-batches from the packed loader; each micro-batch's loss is its summed token
cross entropy (chunked LM head, no [B, S, vocab] logits) times world_size / (scored tokens of the global batch), so
that FSDP's averaging reduce-scatter yields the gradient of the global mean token loss; then the gradient norms
(and clipping, mode "task" or "total"), a guard that skips non-finite steps, and EWCAdamW's fused step, which adds
λ·F⊙(θ − θ*) on each rank's own shard. Metrics go to RUN_DIR/metrics.jsonl and a one-line display on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from kernels.linear_cross_entropy import IGNORE_INDEX
from trainer.checkpoint import load_newest_checkpoint, save_checkpoint
from trainer.config import TrainConfig, model_shape, to_toml
from trainer.data.loader import PackedLoader
from trainer.distributed import init_distributed
from trainer.dtypes import DTYPES
from trainer.errors import UserError
from trainer.ewc import load_ewc
from trainer.fileio import atomic_path, check_output, sha256_file
from trainer.flops import batch_flops_per_token, device_peak_flops
from trainer.hf import HFCheckpoint, config_to_hf
from trainer.memory import ActivationPlan, plan_activation_checkpointing
from trainer.model import Gemma2, Gemma2Config
from trainer.optim import EWCAdamW, lr_at, set_lr
from trainer.parallelize import (build_mesh, build_sharded_model, compiles, drop_unreduced_gradients,
                                 shard_group_size)


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss stayed non-finite): the message says why and what to change."""


@dataclass
class TrainSummary:
    run_dir: Path
    first_step: int  # 0 for a fresh run, the checkpoint's step after a resume
    last_step: int
    losses: list[float] = field(default_factory=list)  # per step of this invocation
    skipped_steps: int = 0
    checkpoint: Path | None = None


# ----------------------------------------------------------------------------------------------------- building


def model_config_of(config: TrainConfig) -> Gemma2Config:
    """The model's shape: the pretrained checkpoint's, or the preset with [model]'s overrides (config.model_shape)."""
    m = config.model
    if m.pretrained:
        return HFCheckpoint(m.pretrained).config
    return model_shape(m)


def build_model(config: TrainConfig, *, device: torch.device, mesh) -> tuple[Gemma2, ActivationPlan]:
    """Meta-device Gemma2 -> FSDP2 -> each rank's shard filled (pretrained weights or seeded init), with activation
    checkpointing "auto" resolved from the device's memory first (trainer/memory.py)."""
    parallel = config.parallel
    if device.type == "cpu" and parallel.param_dtype == "bfloat16":
        # bfloat16 matmuls on CPU are slow and gain nothing; CPU runs compute in float32.
        parallel = dataclasses.replace(parallel, param_dtype="float32")
    shape = model_config_of(config)
    plan = plan_activation_checkpointing(dataclasses.replace(config, parallel=parallel), shape, device=device,
                                         shard_size=mesh.size(mesh.ndim - 1))
    parallel = dataclasses.replace(parallel, activation_checkpointing=plan.mode)
    model = build_sharded_model(shape, parallel, mesh=mesh, device=device, pretrained=config.model.pretrained,
                                seed=config.seed, attention_backend=config.model.attention)
    return model, plan


def param_groups(model, weight_decay: float) -> list[dict]:
    """Matrices decay, norm weights do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_loader(config: TrainConfig, *, rank: int, world_size: int, vocab_size: int):
    d = config.data
    if not d.stores:
        raise UserError("data.stores is empty: give the token store(s) to train on (made by `gemma-ewc tokenize`)")
    for store in d.stores:
        if not Path(store).is_dir():
            raise UserError(f"token store {store} not found; make it with `gemma-ewc tokenize ... --out {store}`")
    tokenizer_hash = sha256_file(d.tokenizer) if d.tokenizer else None
    stores, weights = d.stores, d.weights or None
    if weights is not None:  # a weight of 0 leaves its store out (a replay grid's [1, 0] is "no replay")
        stores, weights = [s for s, w in zip(stores, weights) if w > 0], [w for w in weights if w > 0]
    loader = PackedLoader(stores, weights=weights, seq_len=d.seq_len, batch_size=d.batch_size,
                          seed=d.seed, rank=rank, world_size=world_size, num_workers=d.num_workers,
                          tokenizer_hash=tokenizer_hash, pin_memory=torch.cuda.is_available())
    for store in loader.stores:
        if store.vocab_size > vocab_size:
            raise UserError(f"token store {store.path} has a vocabulary of {store.vocab_size}, the model only "
                            f"{vocab_size}: set model.vocab_size or use a matching tokenizer")
    return loader


def attach_ewc(config: TrainConfig, model, optimizer) -> dict:
    """Load the EWC file sharded like the parameters and hand F, θ*, λ and the mode to the optimizer; returns its
    description (recorded with every checkpoint; the mode as "ewc_mode")."""
    e = config.ewc
    if not e.file:
        return {}
    if not Path(e.file).is_file():
        raise UserError(f"EWC file {e.file} not found (make it with `gemma-ewc fisher`)")
    state = load_ewc(e.file, model, strict=e.strict_anchor, normalize=e.fisher_normalize,
                     fisher_dtype=DTYPES[e.fisher_dtype], anchor_dtype=DTYPES[e.anchor_dtype])
    optimizer.set_ewc_state(ewc=state, ewc_lambda=e.ewc_lambda, ewc_mode=e.mode)
    return {"ewc_file": str(e.file), "ewc_sha256": sha256_file(e.file), "ewc_mode": e.mode,
            "fisher_normalize_divisor": state.normalize_divisor, "anchor_max_diff": state.max_anchor_diff}


def drift_buckets(model) -> tuple[dict, list[str]]:
    """The drift telemetry's buckets by parameter name: embed_tokens -> "embedding", layers.N.* -> "block N",
    norm -> "final_norm" (wrapper prefixes such as _orig_mod. and _checkpoint_wrapped_module. ignored); any
    other parameter is left out. Returns ({parameter: bucket index}, names)."""
    num_layers = model.config.num_layers
    names = ["embedding", *(f"block {i}" for i in range(num_layers)), "final_norm"]
    buckets = {}
    for name, p in model.named_parameters():
        parts = [x for x in name.split(".") if not x.startswith("_")]
        if parts[:1] == ["embed_tokens"]:
            buckets[p] = 0
        elif parts[:1] == ["layers"] and len(parts) > 1 and parts[1].isdigit():
            buckets[p] = 1 + int(parts[1])
        elif parts[:1] == ["norm"]:
            buckets[p] = num_layers + 1
    return buckets, names


# ------------------------------------------------------------------------------------------------------ metrics


def _max_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """metrics.jsonl (rank 0), an optional TensorBoard writer, and the one-line progress display."""

    def __init__(self, run_dir: Path, *, resume_step: int, enabled: bool, progress: bool, tensorboard: bool,
                 label: str = ""):
        self.path = run_dir / "metrics.jsonl"
        self.label = label  # constant facts of the run shown in the progress line (the checkpointing mode)
        self.enabled = enabled
        self.progress = progress and enabled
        self.tty = sys.stderr.isatty()
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # After a resume, the steps logged past the checkpoint are replayed: drop their old lines.
            kept = [line for line in self._records(self.path) if json.loads(line).get("step", 0) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("logging.tensorboard = true but tensorboard is not installed: pip install tensorboard")

    @staticmethod
    def _records(path: Path) -> list[str]:
        """The lines of metrics.jsonl that hold a record; a torn line (a crash or a full disk during an append)
        is dropped with a warning, since its step is replayed after the resume anyway."""
        kept = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                warnings.warn(f"{path}: line {number} is not a complete JSON record (a write was interrupted); "
                              f"dropping it: {line[:80]!r}")
                continue
            kept.append(line)
        return kept

    def write(self, record: dict, max_steps: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
        if self.progress:
            ratio = record.get("ewc_task_ratio")
            line = (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | ewc {record['ewc_penalty']:.3g}"
                    + (f" | ewc/task grad {ratio:.3g}" if ratio is not None else "")
                    + f" | lr {record['lr']:.3g} | {record['tokens_per_s']:,.0f} tok/s"
                    + (f" | mfu {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "")
                    + f" | mem {record['max_memory_gb']:.2f} GB"
                    + (f" | {self.label}" if self.label else ""))
            if record.get("skipped"):
                line += " | SKIPPED (non-finite)"
            print(("\r" + line.ljust(120)) if self.tty else line, file=sys.stderr, end="" if self.tty else "\n",
                  flush=True)

    def close(self) -> None:
        if self.progress and self.tty:
            print(file=sys.stderr)
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------------- train


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class StepResult:
    loss: float  # mean token loss of the global batch
    task_norm: torch.Tensor  # norm of the data gradient (before clipping)
    total_norm: torch.Tensor | None  # norm of data + EWC gradient (clip mode "total" only)
    finite: bool  # False: the step was skipped
    tokens: int  # tokens of the global batch
    flops: float  # model FLOPs of the global batch (forward + backward)
    grad_norm: float = math.nan  # task_norm and total_norm as read by the step's one sync (no second read)
    total_grad_norm: float | None = None


def train_step(model, optimizer, micro_batches: list[dict], *, device: torch.device, world_size: int, clip: float,
               clip_mode: str, defer_replica_all_reduce: bool = False) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's part of the global batch); a collective.

    Each micro-batch loss is the summed token loss times world_size / (scored tokens of the global batch): FSDP's
    reduce-scatter averages over ranks, so the gradient is that of the global mean token loss however the tokens
    are spread over ranks and micro-batches. A non-finite loss or gradient norm skips the update.

    `defer_replica_all_reduce` (HSDP): gradients are reduce-scattered within the shard group after every
    micro-batch (into the float32 sharded gradient, so no memory and no precision is lost) but all-reduced across
    replicas (the nodes) only after the last. Plain FSDP reduce-scatters after every micro-batch: deferring that
    would keep a whole unsharded float32 gradient per rank.

    Where each parameter is whole on its rank (one GPU, or HSDP with dp_shard = 1), sharding has nothing to save
    between micro-batches, so FSDP2 is told not to pay for it until the last: the gathered compute-dtype parameters
    are kept instead of being freed after each backward and cast and copied again by the next forward, and the
    gradients are summed in float32 where autograd leaves them instead of each micro-batch's being copied into a
    reduce buffer, copied out and added to the sharded gradient. The same float32 sums in the same order, no more
    memory (the gathered copy is alive through every forward and backward anyway, and a whole gradient is the
    shard). With 4 micro-batches that is about 70 B fewer moved per parameter and step (read from torch 2.13's
    FSDP2 at world size 1: 3 gathers of 10 B, and 40 B of copies and adds), 180 GB for 2B.

    Host syncs: the forward, the backward and the optimizer step run without one; the step waits for the device
    once, after the backward, to read the loss and the gradient norm together (the non-finite guard needs them
    before the update). The device idles for the host's launch of the optimizer step then, about half a
    millisecond.
    """
    # Pinned by the loader: the copies run asynchronously, and the scored-token count is taken on the device.
    on_device = [{k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids")}
                 for batch in micro_batches]
    scored = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in on_device]).sum().to(torch.float32)
    dist.all_reduce(scored)
    scale = world_size / scored.clamp(min=1.0)
    loss_sum = torch.zeros((), device=device)
    tokens, flops = 0, 0.0
    whole = (len(micro_batches) > 1 and isinstance(model, FSDPModule)
             and shard_group_size(optimizer.param_groups[0]["params"][0]) == 1)
    try:
        for i, (batch, moved) in enumerate(zip(micro_batches, on_device)):
            last = i == len(micro_batches) - 1
            if defer_replica_all_reduce:
                model.set_requires_all_reduce(last)
            if whole:
                model.set_reshard_after_backward(last)
                model.set_requires_gradient_sync(last)
            ids = moved["input_ids"]
            loss = model(ids, position_ids=moved["position_ids"], labels=moved["labels"])
            (loss * scale).backward()
            loss_sum += loss.detach()
            tokens += ids.numel() * world_size
            flops += batch_flops_per_token(model.config, batch["position_ids"]) * ids.numel() * world_size
    except BaseException:
        # Leave the model and optimizer as before the step (a caller may go on: bench catches out-of-memory):
        # FSDP2's default behaviour back, no unreduced or partly reduced gradient left to add to the next step's.
        if defer_replica_all_reduce:
            model.set_requires_all_reduce(True)
        if whole:
            model.set_reshard_after_backward(True)
            model.set_requires_gradient_sync(True)
            drop_unreduced_gradients(model)
        optimizer.zero_grad()
        raise
    dist.all_reduce(loss_sum)
    task_norm, total_norm = optimizer.clip_grad_norm_(clip or None, mode=clip_mode)
    read = [(loss_sum / scored.clamp(min=1.0)).double(), task_norm.to(device=loss_sum.device, dtype=torch.float64)]
    if total_norm is not None:
        read.append(total_norm.to(device=loss_sum.device, dtype=torch.float64))
    loss, norm, *total = torch.stack(read).tolist()  # the one sync
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad()
    return StepResult(loss, task_norm, total_norm, finite, tokens, flops, norm, total[0] if total else None)


class PendingRecord:
    """A metrics record whose device values (EWC penalty, EWC-gradient norm, drift per block) are on their way to
    the host: copied into pinned memory without waiting, then written after the NEXT step's own sync (or before a
    checkpoint, or at the end), by when the copies are long done. Reading them at once would make the host wait for
    the optimizer step and leave the GPU idle while the host then prepares the next forward."""

    def __init__(self, fields: dict, optimizer, *, finite: bool, with_ewc: bool, device: torch.device):
        self.fields, self.with_ewc, self.finite = fields, with_ewc, finite
        self.names = optimizer.drift_bucket_names
        values = {}
        if finite:
            values = {"penalty": optimizer.last_penalty, "ewc_norm": optimizer.last_ewc_grad_norm,
                      "drift": optimizer.last_drift}
        self.event = None
        self.values = {}
        for key, value in values.items():
            if value is None:
                continue
            if device.type == "cuda" and value.device.type == "cuda":
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                self.values[key] = host.copy_(value, non_blocking=True)
            else:
                self.values[key] = value
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def record(self) -> dict:
        if self.event is not None:
            self.event.synchronize()
        f, v = self.fields, self.values
        penalty = float(v["penalty"]) if self.finite else float("nan")
        ewc_norm = float(v["ewc_norm"]) if self.finite else float("nan")
        grad_norm = f["grad_norm"]
        record = {"step": f["step"], "loss": f["loss"], "ewc_penalty": penalty, "ewc_grad_norm": ewc_norm,
                  "grad_norm": grad_norm, "total_grad_norm": f["total_grad_norm"],
                  "ewc_task_ratio": ewc_norm / grad_norm if grad_norm > 0 and self.with_ewc else None,
                  **{k: f[k] for k in ("lr", "tokens_per_s", "mfu", "max_memory_gb", "skipped", "skipped_total")}}
        if "drift" in v:
            rows = v["drift"].tolist()
            record["drift"] = {"blocks": self.names, "fisher": [r[0] for r in rows], "plain": [r[1] for r in rows]}
        return record


RUN_DIR_ENTRIES = ("checkpoints", "metrics.jsonl", "tensorboard")


def check_run_dir(config: TrainConfig, run_dir: Path, *, config_file: str | Path | None = None) -> None:
    """A run directory is new, empty or an earlier run's (resumed); never an input, nor a folder of other files."""
    inputs = [*config.data.stores, config.data.tokenizer, config.ewc.file, config.model.pretrained, config_file]
    check_output(run_dir, inputs=[p for p in inputs if p], overwrite=True, directory=True)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not any((run_dir / e).exists() for e in RUN_DIR_ENTRIES):
        raise UserError(f"--out {run_dir} is a non-empty directory but not a run directory (no checkpoints or "
                        f"metrics.jsonl); choose another --out")


def train(config: TrainConfig, run_dir: str | Path, *, stop_after: int | None = None, save_final: bool = True,
          step_hook=None) -> TrainSummary:
    """Train (or resume) the run in `run_dir`. `stop_after`: at most this many steps in this invocation, then
    checkpoint and return (for job time limits; the schedule still spans optim.max_steps). `step_hook(step, model=,
    optimizer=)` is called after every step (the profiler advances its schedule there)."""
    env = init_distributed(config.parallel.device)
    device = env.device
    run_dir = Path(run_dir)
    if config.parallel.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed + env.rank)
    config_toml = to_toml(config)
    check_run_dir(config, run_dir)
    if env.is_main:
        print(f"# resolved configuration ({env.world_size} rank(s), {device.type})\n{config_toml}", file=sys.stderr)

    mesh = build_mesh(config.parallel, device_type=device.type)
    model, activation_plan = build_model(config, device=device, mesh=mesh)
    if env.is_main:
        print(f"# activation checkpointing: {activation_plan.describe()}; compiled blocks: "
              f"{'yes' if compiles(config.parallel, device.type) else 'no'}", file=sys.stderr)
    model.train()
    o = config.optim
    optimizer = EWCAdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                         weight_decay=o.weight_decay, backend=o.backend)
    ewc_info = attach_ewc(config, model, optimizer)
    if ewc_info:
        optimizer.set_drift_buckets(*drift_buckets(model))
    loader = build_loader(config, rank=env.rank, world_size=env.world_size, vocab_size=model.config.vocab_size)

    checkpoint_dir = run_dir / "checkpoints"
    start_step = 0
    resumed = (load_newest_checkpoint(checkpoint_dir, model=model, optimizer=optimizer)
               if config.checkpoint.resume else None)
    latest = None
    if resumed is not None:
        latest, state, rank_state = resumed
        if ewc_info.get("ewc_sha256") != state.get("ewc_sha256"):
            raise UserError(f"{latest} was trained with EWC file {state.get('ewc_file')} "
                            f"(sha256 {str(state.get('ewc_sha256'))[:12]}), this run has {ewc_info.get('ewc_file')} "
                            f"(sha256 {str(ewc_info.get('ewc_sha256'))[:12]}); resume with the same EWC file")
        # Checkpoints from before ewc.mode existed were coupled.
        if ewc_info and ewc_info["ewc_mode"] != state.get("ewc_mode", "coupled"):
            raise UserError(f"{latest} was trained with ewc.mode = {state.get('ewc_mode', 'coupled')}, this run has "
                            f"{ewc_info['ewc_mode']}; resume with the same mode")
        loader.load_state_dict(rank_state["loader"])
        _set_rng_state(rank_state["rng"], device)
        start_step = int(state["step"])
        if env.is_main:
            print(f"# resumed from {latest} at step {start_step}", file=sys.stderr)

    if env.is_main:  # only now: a mistake found while building leaves no empty run directory behind
        run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, resume_step=start_step, enabled=env.is_main, progress=config.logging.progress,
                     tensorboard=config.logging.tensorboard, label=f"ac {activation_plan.mode}")
    peak_flops, _ = device_peak_flops(str(device), DTYPES[config.parallel.param_dtype]
                                      if device.type == "cuda" else torch.float32)
    summary = TrainSummary(run_dir, start_step, start_step)
    end_step = o.max_steps if stop_after is None else min(o.max_steps, start_step + stop_after)
    batches = iter(loader)
    bad_in_a_row = 0
    pending: PendingRecord | None = None
    interval_tokens, interval_flops, interval_start = 0, 0.0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save(step: int) -> Path:
        state = {**ewc_info, "loss": summary.losses[-1] if summary.losses else None}
        return save_checkpoint(checkpoint_dir, step, model=model, optimizer=optimizer,
                               rank_state={"loader": loader.state_dict(), "rng": _rng_state(device)},
                               state=state, config_toml=config_toml,
                               model_config_json=config_to_hf(model.config), keep=config.checkpoint.keep)

    for step in range(start_step, end_step):
        lr = lr_at(step, base_lr=o.lr, total_steps=o.max_steps, schedule=o.schedule,
                   warmup=int(o.warmup) if o.warmup >= 1 else o.warmup, min_lr_ratio=o.min_lr_ratio)
        set_lr(optimizer, lr)
        micro = [next(batches) for _ in range(config.data.grad_accum)]
        result = train_step(model, optimizer, micro, device=device, world_size=env.world_size, clip=o.clip,
                            clip_mode=config.ewc.clip, defer_replica_all_reduce=mesh.ndim == 2)
        interval_tokens += result.tokens
        interval_flops += result.flops
        step_loss, finite = result.loss, result.finite
        if finite:
            bad_in_a_row = 0
        else:
            summary.skipped_steps += 1
            bad_in_a_row += 1
            if bad_in_a_row >= config.max_bad_steps:
                raise TrainingError(f"the loss or gradient was non-finite in {bad_in_a_row} consecutive steps "
                                    f"(last: step {step + 1}, loss {step_loss}); lower optim.lr, check the data, "
                                    f"or resume from an earlier checkpoint")
        summary.losses.append(step_loss)
        summary.last_step = step + 1

        if pending is not None:  # the previous logging step's values: copied while this step ran
            log.write(pending.record(), o.max_steps)
            pending = None
        if (step + 1) % config.logging.every == 0 or step + 1 == end_step:
            elapsed = time.perf_counter() - interval_start
            fields = {"step": step + 1, "loss": step_loss, "grad_norm": result.grad_norm,
                      "total_grad_norm": result.total_grad_norm, "lr": lr,
                      "tokens_per_s": interval_tokens / elapsed,
                      "mfu": interval_flops / elapsed / (peak_flops * env.world_size),
                      "max_memory_gb": _max_memory_gb(device), "skipped": not finite,
                      "skipped_total": summary.skipped_steps}
            pending = PendingRecord(fields, optimizer, finite=finite, with_ewc=bool(ewc_info), device=device)
            interval_tokens, interval_flops, interval_start = 0, 0.0, time.perf_counter()
        if step_hook is not None:
            step_hook(step + 1, model=model, optimizer=optimizer)
        every = config.checkpoint.every
        if every and (step + 1) % every == 0 and step + 1 != end_step:
            if pending is not None:  # a resume from this checkpoint keeps only the records written before it
                log.write(pending.record(), o.max_steps)
                pending = None
            summary.checkpoint = save(step + 1)
            interval_start = time.perf_counter()  # checkpoint time is not training time
    if pending is not None:
        log.write(pending.record(), o.max_steps)
    if save_final and (summary.last_step > start_step or latest is None):
        summary.checkpoint = save(summary.last_step)
    log.close()
    return summary
