"""Process-group setup shared by every command that may run under torchrun (train, fisher, eval), and a rank's part
of a sharded (DTensor) parameter: the local tensor, where it lies in the full tensor, wrapping a shard back."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from trainer.errors import UserError


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistributedEnv:
    """Initialise torch.distributed (once): from torchrun's environment, or as a single-process group.

    A single process also gets a process group (world size 1), so one code path serves 1 and N ranks: FSDP2,
    DCP checkpoints and the optimizer's reductions behave identically. CUDA ranks use NCCL, CPU ranks gloo.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"device must be auto, cuda or cpu, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA device is available; use device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


@contextlib.contextmanager
def process_group_scope() -> Iterator[None]:
    """Destroy, on leaving, the process group that the code inside created (init_distributed), so that a command
    run in-process (tests, the demo) leaves none behind; a group that existed before is left alone."""
    created = not dist.is_initialized()
    try:
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def is_dtensor(tensor) -> bool:
    # No tensor is a DTensor before torch.distributed.tensor is imported (by FSDP2, or by whoever makes one), so
    # light commands need not import it (0.6 s).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor, or the tensor itself. Under no_grad DTensor.to_local() returns the local
    shard itself (no copy): writes to it land in the parameter."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def like_param(value: torch.Tensor, param) -> torch.Tensor:
    """Wrap a local shard as a DTensor placed exactly like `param` (or return it for a plain parameter)."""
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def local_index(param) -> tuple[slice, ...]:
    """The index of this rank's part of a DTensor parameter within the full tensor (all of it for a plain one).

    Shard(d) on a mesh dimension of size n gives rank r the r-th torch.chunk of dim d (as FSDP2 shards): chunks of
    ceil(size/n), the last one shorter and trailing ones empty; Replicate keeps the whole dimension. Reading
    `full[local_index(p)]` (or a safetensors slice with it) gives exactly `p.to_local()`'s shape.
    """
    if not is_dtensor(param):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor import Replicate, Shard

    ranges = [[0, n] for n in param.shape]
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:  # e.g. _StridedShard (FSDP over tensor parallel): not contiguous rows
            raise ValueError(f"placement {placement} is not supported (only Shard and Replicate)")
        start, stop = ranges[placement.dim]
        parts = param.device_mesh.size(mesh_dim)
        chunk = -(-(stop - start) // parts)
        lo = min(start + param.device_mesh.get_local_rank(mesh_dim) * chunk, stop)
        ranges[placement.dim] = [lo, min(lo + chunk, stop)]
    index = tuple(slice(a, b) for a, b in ranges)
    expected = tuple(b - a for a, b in ranges)
    assert expected == tuple(param.to_local().shape), (expected, tuple(param.to_local().shape))
    return index
