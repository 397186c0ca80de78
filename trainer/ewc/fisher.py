"""Diagonal Fisher estimation: F = (1/K)·Σ_k g_k², one pass over K mini-batches, exact to its definition.

g_k is the gradient of the MEAN loss over the scored tokens of mini-batch k (labels != -100): the mean cross
entropy of the answer letters for MMLU prompts, of every next token for text. Batch size 1 gives the per-sample
Fisher; the reference study used mini-batches of 4. "empirical" scores the data's labels; "sampled" draws each
scored label from the model's own predictive distribution (softmax of its logits, full vocabulary), which is the
Fisher of the model's distribution rather than of the data.

The loss is computed from the final hidden states of the scored positions only, with the chunked LM head +
soft-cap + cross entropy of kernels/linear_cross_entropy.py: for MMLU (one scored token per prompt) the LM head
costs nothing, for text it never materialises the [tokens, 256k] logits.

Precision: the parameters (the master copy) are float32, so gradients arrive in float32; `compute_dtype=bfloat16`
runs the matmuls in bfloat16 through autocast on a plain model (weights stay float32; autocast caches one
bfloat16 copy per forward) and through the model's own FSDP2 MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32) on a sharded one. Squares are accumulated in float32 (float64 for a float64 model) with one
fused `_foreach_addcmul_` per mini-batch: it reads the gradient and the sum and writes the sum, nothing else.
A non-finite gradient is an error naming the parameter and the mini-batch; nothing is capped.

Many processes (FSDP2, parameters are DTensors sharded on dim 0): each rank gets its own part of every global
mini-batch (a disjoint set of rows; every rank must get a part, possibly with no scored token, at every step).
The global mini-batch is the mini-batch: the count of scored tokens is all-reduced first, and each rank's loss is
sum(CE over its scored tokens) · W / N_global, because FSDP2's reduce-scatter averages over the W ranks
(divide factor W): the reduced gradient is then Σ_ranks ∇sum_r / N_global, the global mean-loss gradient. Scaling
the loss rather than calling `set_gradient_divide_factor` leaves the model's settings as they were (training uses
the default). Each rank then squares and accumulates only its own gradient shard, so the result equals the
single-process result on the same global mini-batches, up to summation order.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from tqdm import tqdm

from kernels.linear_cross_entropy import IGNORE_INDEX, default_chunk_rows
from trainer.distributed import is_dtensor, like_param, local_tensor
from trainer.errors import UserError
from trainer.hf import named_hf_parameters

ESTIMATORS = ("empirical", "sampled")


@dataclass
class FisherStats:
    batches: int = 0  # K: mini-batches that entered the average
    samples: int = 0  # sequences (prompts or rows) over all ranks
    scored_tokens: int = 0
    tokens: int = 0  # every input position, padding included (what the model computed)
    data_tokens: int = 0  # the positions holding data (a batch's "num_tokens": prompt tokens, text rows)
    skipped_batches: int = 0  # mini-batches with no scored token anywhere (no mean loss to differentiate)
    seconds: float = 0.0
    world_size: int = 1
    per_batch_tokens: list[int] = field(default_factory=list, repr=False)
    shapes: set[tuple[int, int]] = field(default_factory=set)  # the distinct [B, S] this rank's model saw

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding(self) -> float:
        """The fraction of the computed positions that held no data (padding rows, row tails, dummies)."""
        return 1.0 - self.data_tokens / self.tokens if self.tokens else 0.0


def _register_fsdp_methods(model) -> None:
    # The root FSDP module gathers its own parameters (embedding, final norm) only around hooked methods, and its
    # backward hooks hang on their outputs. The Fisher calls hidden_states instead of forward, so that only the
    # scored positions reach the 256k-wide LM head (one per prompt for MMLU). Imported here: torch.distributed.fsdp
    # takes ~0.6 s to import and only a sharded model needs it.
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule) and not getattr(model, "_ewc_fsdp_methods", False):
        register_fsdp_forward_method(model, "hidden_states")
        model._ewc_fsdp_methods = True


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool: every element of every tensor is finite. max|x| per tensor in one fused pass (ord=inf cannot
    overflow, NaN propagates); empty shards (more ranks than rows) are skipped, inf-norm has no identity."""
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    return torch.stack(torch._foreach_norm(nonempty, ord=float("inf"))).isfinite().all()


@torch.no_grad()
def _sample_labels(model, hidden: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from softmax(logits): the model's own predictive distribution (full vocabulary).

    Rows in chunks so that at most one float32 [chunk, V] block exists at a time.
    """
    rows = default_chunk_rows(model.config.vocab_size)
    out = []
    for start in range(0, hidden.shape[0], rows):
        logits = model.lm_head(hidden[start:start + rows])
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        out.append(torch.multinomial(probs, 1, generator=generator).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=hidden.device)


def _sum_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _fail_nonfinite(names: list[str], grads: list[torch.Tensor], k: int, first_sample: int, n_samples: int,
                    sharded: bool) -> None:
    bad = [n for n, g in zip(names, grads) if not torch.isfinite(g).all()]
    if sharded:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, bad)
        bad = sorted({n for part in gathered for n in part}, key=names.index)
    if not bad:
        return  # every element finite: only the inf-norm overflowed (cannot happen for ord=inf, kept for safety)
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise UserError(f"non-finite gradient in parameter {bad[0]}{more} at mini-batch {k} (samples {first_sample}.."
                    f"{first_sample + n_samples - 1}): the weights or this data give inf/NaN; check the checkpoint "
                    f"(e.g. float16 overflow) or compute in float32 (--dtype float32). Nothing was written.")


def estimate_fisher_with_stats(model, batches: Iterable[Mapping[str, torch.Tensor]], *,
                               estimator: str = "empirical", compute_dtype: torch.dtype | None = None,
                               seed: int = 0, progress: bool = False, total_samples: int | None = None,
                               ) -> tuple[dict[str, torch.Tensor], FisherStats]:
    """`estimate_fisher`, plus counts and timing (see FisherStats)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    named = [(n, p) for n, p in named_hf_parameters(model) if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    master = params[0].dtype
    if master not in (torch.float32, torch.float64):
        raise ValueError(f"the model's parameters are {master}; load them in float32 (the gradients and their "
                         f"squares need it) and pass compute_dtype=torch.bfloat16 for bfloat16 matmuls")
    sharded = is_dtensor(params[0])
    world = dist.get_world_size() if sharded else 1
    rank = dist.get_rank() if sharded else 0
    device = local_tensor(params[0]).device
    if sharded:
        _register_fsdp_methods(model)
    use_autocast = compute_dtype is not None and compute_dtype != master
    autocast = (torch.autocast(device.type, dtype=compute_dtype) if use_autocast else contextlib.nullcontext())
    generator = None
    if estimator == "sampled":
        # One stream per rank: sampled labels are reproducible for a fixed (seed, world size); across world sizes
        # they agree in distribution, not draw by draw.
        generator = torch.Generator(device=device).manual_seed(seed + 1_000_003 * rank)

    sums = [torch.zeros_like(local_tensor(p), dtype=master) for p in params]
    stats = FisherStats(world_size=world)
    bar = None
    if progress and rank == 0:
        bar = tqdm(total=total_samples, unit="sample", desc="fisher", dynamic_ncols=True, smoothing=0.05)
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    iterator = iter(batches)
    k = 0
    try:
        while True:
            batch = next(iterator, None)
            if batch is not None:
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                position_ids = batch.get("position_ids")
                position_ids = None if position_ids is None else position_ids.to(device, non_blocking=True)
                if labels.shape != input_ids.shape:
                    raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids shape "
                                     f"{tuple(input_ids.shape)}")
                scored = labels != IGNORE_INDEX
                local_counts = [float(scored.sum()), 1.0, float(batch.get("num_samples", input_ids.shape[0])),
                                float(input_ids.numel()), float(batch.get("num_tokens", input_ids.numel()))]
            else:
                local_counts = [0.0, 0.0, 0.0, 0.0, 0.0]
            n_scored, n_ranks, n_samples, n_tokens, n_data = (
                _sum_over_ranks(local_counts, device) if sharded else local_counts)
            if n_ranks == 0:
                break
            if n_ranks != world:
                raise ValueError(f"at mini-batch {k} only {int(n_ranks)} of {world} ranks had a batch: every rank "
                                 f"must get a part (possibly without scored tokens) of every global mini-batch")
            if n_scored == 0:
                stats.skipped_batches += 1
                continue
            stats.shapes.add(tuple(input_ids.shape))
            with autocast:
                hidden = model.hidden_states(input_ids, position_ids)
                if local_counts[0] == scored.numel():  # every position scored (text): a view, no gather
                    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
                else:  # [N, H]: the scored positions only (one per prompt for MMLU)
                    hidden, targets = hidden[scored], labels[scored]
                if estimator == "sampled":
                    targets = _sample_labels(model, hidden, generator)
                # Summed CE in row chunks, the [N, V] logits never kept (kernels/linear_cross_entropy.py). Under
                # FSDP2 the root group (the embedding = tied head) stays gathered from hidden_states' pre-forward
                # until backward (FSDP2 never reshards the root after forward), so the head sees the full weight.
                loss = model.lm_head(hidden, labels=targets) * (world / n_scored)
            loss.backward()
            grads = []
            for p in params:
                if p.grad is None:  # a parameter this batch does not reach: its gradient is zero
                    p.grad = torch.zeros_like(p)
                grads.append(local_tensor(p.grad))
            finite = _all_finite(grads)
            if sharded:
                flag = finite.to(torch.float64).reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = flag[0] > 0
            if not bool(finite):
                _fail_nonfinite(names, grads, k, stats.samples, int(n_samples), sharded)
            torch._foreach_addcmul_(sums, grads, grads)
            model.zero_grad(set_to_none=True)
            k += 1
            stats.batches += 1
            stats.samples += int(n_samples)
            stats.scored_tokens += int(n_scored)
            stats.tokens += int(n_tokens)
            stats.data_tokens += int(n_data)
            if bar is not None:
                bar.update(int(n_samples))
                bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - start):.4g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    if stats.batches == 0:
        raise UserError("no mini-batch had a scored token: the data gave nothing to estimate the Fisher from")
    torch._foreach_div_(sums, float(stats.batches))
    # Squares of finite float32 values can still overflow (|g| > 1.8e19): check the sums once.
    finite = torch.stack([_all_finite([s]) for s in sums])
    if sharded:
        finite = finite.to(torch.float64)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = finite > 0
    if not bool(finite.all()):
        bad = names[int((~finite).nonzero()[0])]
        raise UserError(f"the Fisher of {bad} overflowed float32 (squared gradients above 3.4e38): the gradients "
                        f"are absurdly large; check the checkpoint")
    return {n: like_param(s, p) for n, s, p in zip(names, sums, params)}, stats


def estimate_fisher(model, batches: Iterable[Mapping[str, torch.Tensor]], *, estimator: str = "empirical",
                    compute_dtype: torch.dtype | None = None, seed: int = 0, progress: bool = False,
                    total_samples: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher {Hugging Face name: tensor} of `model` over `batches`, F = (1/K)·Σ_k g_k².

    batches: iterable of {"input_ids", "labels", optional "position_ids"}, all [B, S], labels already shifted
    (labels[b, t] is the target predicted at position t; -100 = not scored); optional "num_samples" (int) says how
    many sequences the batch holds when several are packed into one row, and optional "num_tokens" (int) how many
    of its positions hold data (counters only: padding, in documents of its own and never scored, gets a zero
    gradient and changes nothing). One item = one mini-batch k; on many ranks, this rank's part of global
    mini-batch k. Returns float32 tensors (float64 for a float64 model), or DTensors placed like the parameters
    for a sharded model. See the module doc for precision and scaling.
    """
    fisher, _ = estimate_fisher_with_stats(model, batches, estimator=estimator, compute_dtype=compute_dtype,
                                           seed=seed, progress=progress, total_samples=total_samples)
    return fisher
