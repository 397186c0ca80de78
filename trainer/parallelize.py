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

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

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
            return checkpoint(super().forward, x, rope, masks, use_reentrant=False)
        return super().forward(x, rope, masks, kv_cache)


def apply_activation_checkpointing(model: Gemma2, mode: str) -> Gemma2:
    """Checkpoint every block ("full"), every other block from the first ("selective": about half the activation
    memory for about a sixth more compute) or none ("none"), in place; parameter names do not change."""
    n = len(model.layers)
    blocks = {"none": range(0), "selective": range(0, n, 2), "full": range(n)}
    if mode not in blocks:
        raise ValueError(f"unknown activation checkpointing {mode!r}; choose one of {tuple(blocks)}")
    for i in blocks[mode]:
        # Before compile and fully_shard, which both build on the block's class.
        assert type(model.layers[i]) is DecoderLayer, f"block {i} is already a {type(model.layers[i]).__name__}"
        model.layers[i].__class__ = CheckpointedDecoderLayer
    return model


def parallelize(model: Gemma2, config: ParallelConfig, *, mesh: DeviceMesh) -> Gemma2:
    """Checkpoint, compile and shard `model` in place over `mesh` (FSDP2, or HSDP on a 2-D mesh) and return it."""
    n = len(model.layers)
    apply_activation_checkpointing(model, config.activation_checkpointing)
    if config.compile:
        for layer in model.layers:
            layer.compile()
    param_dtype = DTYPES[config.param_dtype]
    policy = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                                  reduce_dtype=DTYPES[config.reduce_dtype])
    for i, layer in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


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
