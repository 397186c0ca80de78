"""Apply activation checkpointing, torch.compile and FSDP2 to a built (meta-device) Gemma2, then fill it.

Order (as torchtitan): checkpointing, compile, `fully_shard` on every decoder block, then the root. The root group
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

from trainer.config import ParallelConfig
from trainer.distributed import local_index, local_tensor
from trainer.dtypes import DTYPES
from trainer.errors import UserError
from trainer.hf import HFCheckpoint, to_hf_name
from trainer.model import Gemma2


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


def parallelize(model: Gemma2, config: ParallelConfig, *, mesh: DeviceMesh) -> Gemma2:
    """Shard `model` in place over `mesh` (FSDP2, or HSDP on a 2-D mesh) and return it."""
    n = len(model.layers)
    if config.activation_checkpointing == "full":
        model.set_activation_checkpointing(True)
    elif config.activation_checkpointing == "selective":
        # Every other block: about half the activation memory for about a sixth more compute.
        model.set_activation_checkpointing(list(range(0, n, 2)))
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
