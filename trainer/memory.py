"""Activation checkpointing chosen from memory: the least recomputation whose training step fits the device.

    plan = plan_activation_checkpointing(train_config, model_shape, device=device, shard_size=8)
    plan.mode, plan.describe()      # "none", "auto: none (estimated 61.2 of 125.8 GiB usable; op 48.1, ...)"

Recomputation costs time (a checkpointed block runs its forward twice), so a run should checkpoint only what its
memory forces it to. The estimate per rank is

    static  = sharded float32 parameters, gradients, the two Adam moments and the EWC file's F and θ*
              + the gathered compute-dtype parameters (two blocks in flight and the root's embedding; every block
              when the shard group is one rank, which keeps them gathered) and one block's unsharded gradients
              + the LM head's float32 weight gradient and its row-chunk buffers
    per block = what one decoder block adds to memory in its forward and keeps until backward, MEASURED on the
              device: one block of the real shape runs forward on one micro-batch [batch_size, seq_len] under each
              mode and the growth of allocated memory is read (eager mode; a compiled block keeps no more, since
              inductor's partitioner recomputes cheap elementwise work)
    total   = static + num_layers x per block (for "selective", the mean of "none" and "full")

and the first mode, in order of recomputation (none, op, selective, full), whose total is within
`usable_fraction` of the device's free memory is chosen. Only on CUDA: on a CPU, "auto" is "none".
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kernels.linear_cross_entropy import MAX_CHUNK_BYTES, chunk_bytes_per_row
from trainer.attention import build_masks, resolve_backend
from trainer.dtypes import DTYPES
from trainer.model import DecoderLayer, Gemma2Config, rope_cos_sin
from trainer.parallelize import apply_activation_checkpointing, op_needs_compile

# The order in which modes add recomputation: none (nothing), op (elementwise work and every other matmul),
# selective (half of the blocks whole), full (every block whole).
MODES_BY_RECOMPUTATION = ("none", "op", "selective", "full")
GiB = 2**30


@dataclass
class ActivationPlan:
    mode: str  # the resolved mode
    requested: str  # what the config asked for ("auto" or a mode)
    capacity: float = 0.0  # bytes usable on the device
    static: float = 0.0  # bytes independent of the mode
    per_block: dict[str, float] = field(default_factory=dict)  # mode -> measured bytes one block keeps
    num_layers: int = 0

    def total(self, mode: str) -> float:
        per_block = self.per_block
        if mode == "selective":
            block = (per_block["none"] + per_block["full"]) / 2
        else:
            block = per_block[mode]
        return self.static + self.num_layers * block

    def fits(self, mode: str) -> bool:
        return self.total(mode) <= self.capacity

    def describe(self) -> str:
        if self.requested != "auto":
            return self.mode
        if not self.per_block:
            return f"auto: {self.mode} (memory is measured on CUDA only)"
        others = ", ".join(f"{m} {self.total(m) / GiB:.1f}" for m in MODES_BY_RECOMPUTATION if m != self.mode)
        return (f"auto: {self.mode} (estimated {self.total(self.mode) / GiB:.1f} of {self.capacity / GiB:.1f} GiB "
                f"usable; {others})")


def choose_mode(plan: ActivationPlan, *, op_allowed: bool = True) -> str:
    """The first mode by recomputation that fits; "full" when none does (the most a block can save). `op_allowed`
    False leaves "op" out (uncompiled FlexAttention blocks: see `op_needs_compile`)."""
    for mode in MODES_BY_RECOMPUTATION:
        if (op_allowed or mode != "op") and plan.fits(mode):
            return mode
    return "full"


def static_bytes(model: Gemma2Config, *, shard_size: int, param_dtype: torch.dtype, ewc_bytes_per_param: int,
                 lm_head_chunk_bytes: float) -> float:
    """Bytes per rank that do not depend on the checkpointing mode (see the module docstring)."""
    n = model.num_parameters()
    h, v = model.hidden_size, model.vocab_size
    compute = param_dtype.itemsize
    embedding = v * h
    block = (n - embedding - h) / model.num_layers
    sharded = n * (4 + 4 + 8 + ewc_bytes_per_param) / shard_size  # params, grads, Adam moments, F and θ*
    gathered = (n if shard_size == 1 else embedding + 2 * block) * compute
    block_grads = block * (compute + 4)  # one block's unsharded gradient and its float32 reduction copy
    # The float32 weight gradient, and then the larger of the forward's chunk buffers and the backward's scaled
    # float32 copy of it plus its cast to the parameter dtype (both alive with every activation).
    lm_head = embedding * 4 + max(lm_head_chunk_bytes, embedding * (4 + compute))
    return sharded + gathered + block_grads + lm_head


def op_saved_bytes(model: Gemma2Config, *, tokens: int, dtype: torch.dtype) -> float:
    """What op-level checkpointing keeps of a block beyond full checkpointing's input: the outputs of every other
    projection (q, v, gate, down) and of attention (its output and float32 log-sum-exp per head)."""
    per_token = (model.num_heads * model.head_dim + model.num_kv_heads * model.head_dim + model.intermediate_size
                 + model.hidden_size + model.num_heads * model.head_dim) * dtype.itemsize + 4 * model.num_heads
    return float(tokens * per_token)


def measure_block(model: Gemma2Config, *, device: torch.device, dtype: torch.dtype, attention_backend: str,
                  batch_size: int, seq_len: int, modes=("none", "full")) -> dict[str, float]:
    """Bytes one decoder block keeps from its forward to its backward, per mode, measured on `device` (CUDA);
    "op" is full's measurement plus `op_saved_bytes` (measuring it would need a compiled block: under eager
    selective checkpointing FlexAttention runs unfused, pytorch/pytorch#147879)."""
    class _OneBlock(torch.nn.Module):  # apply_activation_checkpointing works on a model's .layers
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([DecoderLayer(model, 1)])

    position_ids = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    masks = build_masks(position_ids, backend=attention_backend, sliding_window=model.sliding_window)
    rope = rope_cos_sin(position_ids, model.head_dim, model.rope_theta, dtype)
    out: dict[str, float] = {}
    for mode in ("warm-up", *modes):  # the first forward's one-time allocations (cuBLAS workspace, kernels) unmeasured
        with torch.device(device):  # initialised where it runs (a 27B block is 0.6B parameters)
            holder = _OneBlock().to(dtype)
        apply_activation_checkpointing(holder, "none" if mode == "warm-up" else mode)
        x = torch.randn(batch_size, seq_len, model.hidden_size, device=device, dtype=dtype, requires_grad=True)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        y = holder.layers[0](x, rope, masks)
        torch.cuda.synchronize(device)
        if mode != "warm-up":
            out[mode] = float(torch.cuda.memory_allocated(device) - before)
        del y, x, holder
        gc.collect()
        torch.cuda.empty_cache()
    if "full" in out:
        out["op"] = out["full"] + op_saved_bytes(model, tokens=batch_size * seq_len, dtype=dtype)
    return out


def plan_activation_checkpointing(config, model: Gemma2Config, *, device: torch.device, shard_size: int,
                                  usable_fraction: float = 0.9) -> ActivationPlan:
    """Resolve parallel.activation_checkpointing of a TrainConfig training `model` on this device (see the module
    docstring)."""
    requested = config.parallel.activation_checkpointing
    if requested != "auto":
        return ActivationPlan(requested, requested)
    if device.type != "cuda":
        return ActivationPlan("none", requested)
    dtype = DTYPES[config.parallel.param_dtype]
    ewc_bytes = 0
    if config.ewc.file:
        ewc_bytes = (DTYPES[config.ewc.fisher_dtype].itemsize + DTYPES[config.ewc.anchor_dtype].itemsize)
    # The LM head sizes its row chunks from the memory free when it runs (half of it, at most 8 GiB): reserve
    # enough for chunks of 1024 rows, beyond which larger chunks gain little.
    rows = min(1024, config.data.batch_size * config.data.seq_len)
    chunk = min(MAX_CHUNK_BYTES, rows * chunk_bytes_per_row(model.vocab_size, model.hidden_size,
                                                            compute_dtype=dtype, softcap=bool(model.final_softcap)))
    free, _ = torch.cuda.mem_get_info(device)
    if dist.is_initialized() and dist.get_world_size() > 1:  # one decision for all ranks: the tightest one's
        least = torch.tensor([free], dtype=torch.int64, device=device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        free = int(least.item())
    plan = ActivationPlan("none", requested, capacity=usable_fraction * free, num_layers=model.num_layers,
                          static=static_bytes(model, shard_size=shard_size, param_dtype=dtype,
                                              ewc_bytes_per_param=ewc_bytes, lm_head_chunk_bytes=chunk))
    plan.per_block = measure_block(model, device=device, dtype=dtype, attention_backend=config.model.attention,
                                   batch_size=config.data.batch_size, seq_len=config.data.seq_len)
    attention = resolve_backend(config.model.attention, device)
    # op keeps the attention products' outputs: [S, S] scores under eager attention, which its count leaves out.
    plan.mode = choose_mode(plan, op_allowed=attention != "eager" and not op_needs_compile(
        config.parallel, device.type, config.model.attention))
    return plan
