"""Apply activation checkpointing, torch.compile and FSDP2 to a built (meta-device) Gemma2, then fill it.

    model = build_sharded_model(model_config, parallel_config, mesh=build_mesh(parallel_config, device_type="cuda"),
                                device=device, pretrained="gemma-2-2b")   # or seed=0 for a seeded initialisation

Order (as torchtitan): checkpointing, compile, `fully_shard` on every decoder block, then the root, so each block's
FSDP hooks wrap its compiled code, which wraps the checkpointed forward. The root group
holds the tied embedding/LM head and the final norm: Gemma2 uses the embedding twice (input lookup and LM head),
and the loss is computed inside the root's forward (`model(ids, labels=...)`), so the embedding must stay unsharded
from the root's pre-forward to its backward; a separate group for the embedding would reshard it between the two
uses. HSDP: a 2-D mesh (replicate across nodes, shard within a node).

Weights are created shard by shard: `materialize` allocates only each rank's slice and fills it either from a
Hugging Face checkpoint (reading only the rows of the local shard) or from a seeded initialisation that does not
depend on the number of ranks, so a 27B model never sits whole on one rank and 1 rank equals N ranks.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from trainer.attention import raise_recompile_limit, resolve_backend
from trainer.config import ParallelConfig
from trainer.distributed import local_index, local_tensor
from trainer.dtypes import DTYPES
from trainer.errors import UserError
from trainer.hf import HFCheckpoint, to_hf_name
from trainer.model import DecoderLayer, Gemma2, Gemma2Config


def build_mesh(config: ParallelConfig, *, device_type: str) -> DeviceMesh:
    world = dist.get_world_size()
    replicate = config.dp_replicate
    shard = config.dp_shard if config.dp_shard > 0 else world // max(replicate, 1)
    if replicate < 1 or replicate * shard != world:
        raise UserError(f"parallel.dp_replicate ({replicate}) x parallel.dp_shard ({shard}) must equal the world "
                        f"size ({world}); e.g. dp_replicate = number of nodes, dp_shard = GPUs per node")
    if replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


class CheckpointedDecoderLayer(DecoderLayer):
    """A decoder block that recomputes its activations in backward instead of storing them.

    Applied by swapping the block's class (as `fully_shard` does) rather than wrapping it in torch's
    `checkpoint_wrapper`, which would insert `_checkpoint_wrapped_module.` into every parameter name: the Hugging
    Face names, DCP checkpoints and EWC files all key on the plain names.
    """

    def forward(self, x, rope, masks, kv_cache=None):
        # Only when there is a backward to recompute for; decoding with a KV cache writes the cache as it goes and
        # must not run twice.
        if kv_cache is None and torch.is_grad_enabled():
            return checkpoint(super().forward, x, rope, masks, use_reentrant=False, **self.checkpoint_options())
        return super().forward(x, rope, masks, kv_cache)

    @staticmethod
    def checkpoint_options() -> dict:
        return {}


# Ops whose outputs op-level selective checkpointing keeps (torchtitan's list, our attention included): the matrix
# products and attention, the expensive part to recompute; everything elementwise (norms, RoPE, GeGLU, soft-caps)
# is recomputed, which costs little time and most of the memory.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.higher_order.flex_attention,
}


def _op_policy(counts: dict):
    def policy(ctx, op, *args, **kwargs):
        # Every other matrix product is recomputed too (as torchtitan does): of a block's seven projections, the
        # outputs of about half are kept, which halves their memory for one extra matmul in two.
        mode = "recompute" if ctx.is_recompute else "forward"
        if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            counts[mode] += 1
            if counts[mode] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _op_selective_context():
    return create_selective_checkpoint_contexts(_op_policy(defaultdict(int)))


class OpCheckpointedDecoderLayer(CheckpointedDecoderLayer):
    """A decoder block under op-level selective checkpointing: matmul and attention outputs are kept (every other
    matmul's recomputed), everything else is recomputed in backward."""

    @staticmethod
    def checkpoint_options() -> dict:
        return {"context_fn": _op_selective_context}


AC_MODES = ("none", "op", "selective", "full")


def apply_activation_checkpointing(model: Gemma2, mode: str) -> Gemma2:
    """Activation checkpointing in place; parameter names do not change. Modes, by memory kept:
    "none"; "op" (op-level selective on every block: matmul and attention outputs kept, the rest recomputed);
    "selective" (every other block checkpointed whole, from the first: about half the activation memory for about a
    sixth more compute); "full" (every block checkpointed whole)."""
    n = len(model.layers)
    blocks = {"none": range(0), "op": range(n), "selective": range(0, n, 2), "full": range(n)}
    if mode not in blocks:
        raise ValueError(f"unknown activation checkpointing {mode!r}; choose one of {AC_MODES}")
    cls = OpCheckpointedDecoderLayer if mode == "op" else CheckpointedDecoderLayer
    for i in blocks[mode]:
        # Before compile and fully_shard, which both build on the block's class.
        assert type(model.layers[i]) is DecoderLayer, f"block {i} is already a {type(model.layers[i]).__name__}"
        model.layers[i].__class__ = cls
    return model


def compiles(config: ParallelConfig, device_type: str) -> bool:
    """parallel.compile, or when unset: on CUDA yes (inductor fuses the norms, RoPE, GeGLU and soft-caps, and the
    flex attention kernel is generated inside the block), on CPU no (compilation costs more than it saves there)."""
    return config.compile if config.compile is not None else device_type == "cuda"


def op_needs_compile(config: ParallelConfig, device_type: str, attention_backend: str) -> bool:
    """Whether op-level checkpointing is unavailable because the blocks would run uncompiled FlexAttention: under
    eager selective checkpointing flex_attention is dispatched unfused (the math reference, memory O(S^2);
    pytorch/pytorch#147879, torchtitan#1631). Inside a compiled block the compiler handles both."""
    return (resolve_backend(attention_backend, device_type) == "flex" and device_type == "cuda"
            and not compiles(config, device_type))


def parallelize(model: Gemma2, config: ParallelConfig, *, mesh: DeviceMesh) -> Gemma2:
    """Checkpoint, compile and shard `model` in place over `mesh` (FSDP2, or HSDP on a 2-D mesh) and return it.

    activation_checkpointing "auto" must have been resolved by the caller (trainer.memory does it from the device's
    memory); here it means "none".
    """
    n = len(model.layers)
    mode = config.activation_checkpointing
    if mode == "op" and op_needs_compile(config, mesh.device_type, model.attention_backend):
        raise UserError("parallel.activation_checkpointing = op needs compiled blocks with FlexAttention on CUDA "
                        "(uncompiled, flex_attention would run unfused): set parallel.compile = true, or choose "
                        "selective or full")
    apply_activation_checkpointing(model, "none" if mode == "auto" else mode)
    if compiles(config, mesh.device_type):
        raise_recompile_limit()
        for layer in model.layers:
            # dynamic=False: a new batch shape is a new graph, never a symbolic-shape one (slower flex kernels).
            # One graph serves every document layout: the masks are inputs, not constants (tests/test_compile.py).
            layer.compile(dynamic=False)
    param_dtype = DTYPES[config.param_dtype]
    policy = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                                  reduce_dtype=DTYPES[config.reduce_dtype])
    # Resharding after forward frees each block's gathered parameters until backward gathers them again; with one
    # rank per shard group there is nothing to free (the shard is the whole) but a second gather-and-cast to pay.
    sharded = mesh.size(mesh.ndim - 1) > 1
    for i, layer in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=sharded and i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def shard_group_size(param: torch.Tensor) -> int:
    """Ranks `param` is split over: the last (dp_shard) dimension of its FSDP2 mesh; 1 for a plain tensor. Pass a
    sharded parameter as the optimizer holds it: a module's registered parameter is the gathered one while FSDP2
    keeps it unsharded."""
    return param.device_mesh.size(param.device_mesh.ndim - 1) if isinstance(param, DTensor) else 1


def drop_unreduced_gradients(model: torch.nn.Module) -> None:
    """Forget the gradients FSDP2 holds unreduced between micro-batches (`set_requires_gradient_sync(False)`) and
    put the parameters back in their sharded state: after a step that failed part-way, the model is as if it had
    not started. FSDP2 has no public call that drops them (its `reshard` frees the gathered parameters only, and
    the next backward would add to what is left), so this clears its per-parameter fields, by the names torch has
    used since 2.4."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch before the list: one group or none
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for fsdp_param in group.fsdp_params:
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None
        # A block whose forward raised stays gathered (FSDP2 keeps it for its backward): its values are the
        # shards' (no step ran), and the next forward uses them as they are.
        module.reshard()


def build_sharded_model(model_config: Gemma2Config, parallel_config: ParallelConfig, *, mesh: DeviceMesh,
                        device: torch.device | str, pretrained: str | None = None, seed: int = 0,
                        attention_backend: str = "auto") -> Gemma2:
    """Gemma2 built on the meta device, `parallelize`d over `mesh`, then each rank's shard filled on `device` from
    the Hugging Face directory `pretrained` or from the seeded initialisation (`materialize`)."""
    with torch.device("meta"):
        model = Gemma2(model_config, attention_backend=attention_backend)
    parallelize(model, parallel_config, mesh=mesh)
    return materialize(model, device=device, pretrained=pretrained, seed=seed)


def initial_value(name: str, shape: torch.Size, *, seed: int, std: float = 0.02) -> torch.Tensor:
    """The seeded initial value of one full parameter: independent of sharding and of the other parameters."""
    if name.endswith("norm.weight"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=g)


@torch.no_grad()
def materialize(model: Gemma2, *, device: torch.device | str, pretrained: str | None = None,
                seed: int = 0) -> Gemma2:
    """Allocate a meta-device (possibly sharded) model on `device` and fill each rank's slice."""
    model.to_empty(device=device)
    checkpoint = HFCheckpoint(pretrained) if pretrained else None
    if checkpoint is not None:
        if checkpoint.config != model.config:
            raise UserError(f"{pretrained}: its config.json describes another model shape than the one built")
        missing = [to_hf_name(n) for n, _ in model.named_parameters() if to_hf_name(n) not in checkpoint.file_of]
        if missing:
            raise UserError(f"{pretrained}: {len(missing)} parameter(s) missing from the checkpoint, e.g. "
                            f"{missing[:3]}")
    for name, param in model.named_parameters():
        index = local_index(param)
        if checkpoint is not None:
            shape = checkpoint.shape(to_hf_name(name))
            if shape != tuple(param.shape):
                raise UserError(f"{pretrained}: tensor {to_hf_name(name)!r} has shape {shape}, config.json "
                                f"implies {tuple(param.shape)}")
            value = checkpoint.read(to_hf_name(name), index=index)
        else:
            value = initial_value(name, param.shape, seed=seed)[index]
        local_tensor(param).copy_(value)
    return model
