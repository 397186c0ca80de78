"""No host-device synchronisation in a training step on CUDA (marked `gpu`: skipped without CUDA).

A step whose host waits for the device cannot queue the next kernels while the GPU works: every wait leaves the
GPU idle for the launch latency of what follows. Each test runs a few steps first (plan building, Triton and
torch.compile compilation, NCCL communicator set-up may synchronise), then one more under
`torch.cuda.set_sync_debug_mode("error")`, which turns every synchronising CUDA call that torch instruments (a
blocking copy between host and device, `.item()`, a stream or device synchronize, `nonzero`, ...) into a
RuntimeError. It does not see inside torch.distributed (the collectives) or Triton's launcher, which do not block
the host in the paths used here.

The model: the tiny Gemma2 on one GPU through the trainer's FSDP2 path (NCCL, a world-size-1 process group, bf16
mixed precision, flex attention); the optimizer: EWCAdamW's Triton step with an EWC state and drift buckets.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

WARMUP_STEPS = 2  # the first plan build and the compilations happen here; the step after them is checked
ROWS, LENGTH = 2, 256  # two 128-token blocks per row for flex attention


@contextlib.contextmanager
def syncs_forbidden():
    """Every synchronising CUDA call torch instruments raises inside (the mode is process-global: reset after)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.fixture
def single_process_group(monkeypatch):
    """A world-size-1 NCCL process group for the test (destroyed after it), on a fresh port; the environment
    variables init_distributed reads are restored afterwards."""
    from trainer.distributed import free_port, init_distributed, process_group_scope

    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                            LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    with process_group_scope():
        yield init_distributed("cuda")


def _batch(vocab_size: int, device: torch.device):
    """ids, positions (three packed documents per row, the first one continuing from an earlier row) and labels
    (next token, -100 at each row's end), all on the device before any check starts."""
    ids = torch.randint(0, vocab_size, (ROWS, LENGTH), device=device)
    pos = torch.cat([torch.arange(100, 100 + LENGTH // 4), torch.arange(LENGTH // 2),
                     torch.arange(LENGTH - LENGTH // 4 - LENGTH // 2)]).expand(ROWS, LENGTH).contiguous()
    pos = pos.pin_memory().to(device, non_blocking=True)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    return ids, pos, labels


def _setup(env, seed: int, *, compile: bool, clip_mode: str = "task", ewc_mode: str = "coupled"):
    """The sharded tiny model, EWCAdamW (Triton) with a random EWC state and drift buckets per block, a batch,
    and WARMUP_STEPS full steps taken."""
    from trainer.config import ParallelConfig
    from trainer.distributed import local_tensor
    from trainer.model import Gemma2Config
    from trainer.optim import EWCAdamW
    from trainer.parallelize import build_mesh, build_sharded_model

    parallel = ParallelConfig(compile=compile, device="cuda")
    config = Gemma2Config.preset("tiny")
    model = build_sharded_model(config, parallel, mesh=build_mesh(parallel, device_type="cuda"), device=env.device,
                                seed=seed, attention_backend="flex")
    named = list(model.named_parameters())
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    with torch.no_grad():  # F float32 and the anchor bfloat16 as local shards (both forms the optimizer takes)
        ewc = {p: (torch.rand_like(local_tensor(p)),
                   (local_tensor(p) + 0.01 * torch.randn_like(local_tensor(p))).to(torch.bfloat16))
               for _, p in named}
    optimizer = EWCAdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                         lr=1e-3, ewc=ewc, ewc_lambda=0.5, ewc_mode=ewc_mode, backend="triton")
    buckets = {p: int(name.split(".")[1]) if name.startswith("layers.") else config.num_layers for name, p in named}
    optimizer.set_drift_buckets(buckets, [f"block {i}" for i in range(config.num_layers)] + ["other"])
    batch = _batch(config.vocab_size, env.device)
    for _ in range(WARMUP_STEPS):
        _forward_backward(model, batch)
        optimizer.clip_grad_norm_(1.0, mode=clip_mode)
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    return model, optimizer, batch


def _forward_backward(model, batch) -> torch.Tensor:
    ids, pos, labels = batch
    loss = model(ids, position_ids=pos, labels=labels)
    (loss * (1.0 / labels.numel())).backward()
    return loss.detach()


def test_pageable_uploads_are_caught_and_pinned_uploads_are_not():
    """The check itself: the debug mode flags a blocking upload from pageable memory (what the pointer tables
    used), and lets `upload` (pinned memory, non-blocking copy) through with the right values."""
    from kernels.ewc_adamw import upload

    rows = torch.arange(1000, dtype=torch.int64) * 7
    with syncs_forbidden():
        with pytest.raises(RuntimeError, match="synchroniz"):
            rows.to("cuda")
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.tensor(0.5, device="cuda")
        on_device = upload(rows, torch.device("cuda"))
    assert torch.equal(on_device.cpu(), rows)


def test_pinned_staging_buffers_are_reused_only_after_their_copy():
    """Many uploads queued behind a slow kernel, each dropping its pinned staging buffer at once: torch's caching
    host allocator must not hand a buffer out again (and let the next upload write into it) before the copy that
    read it has run, or an earlier table would arrive with a later one's values."""
    from kernels.ewc_adamw import upload

    device = torch.device("cuda")
    n = 200
    # Free pinned blocks of the size used below (no copy recorded on them: straight back to the free list), so the
    # uploads take cached blocks and no cudaHostAlloc runs between them.
    warm = [torch.empty(64, dtype=torch.int64).pin_memory() for _ in range(n)]
    del warm
    busy = torch.cuda.Event()
    with syncs_forbidden():
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time ahead of the copies
        busy.record()
        uploaded = [upload(torch.full((64,), i, dtype=torch.int64), device) for i in range(n)]
    assert not busy.query(), "the GPU finished its sleep before the uploads were queued: the check proves nothing"
    for i, t in enumerate(uploaded):
        assert torch.equal(t.cpu(), torch.full((64,), i, dtype=torch.int64)), f"upload {i} was overwritten"


@pytest.mark.parametrize("clip_mode,ewc_mode", [("task", "coupled"), ("total", "coupled"), ("task", "decoupled")])
def test_optimizer_clip_and_step_do_not_sync(single_process_group, seed, clip_mode, ewc_mode):
    """EWCAdamW.clip_grad_norm_() and step() on FSDP2 gradients (new tensors every step): the norm pass, the
    all-reduce of the sums, the clip scale, the gradients' pointer table and the fused step with the drift."""
    model, optimizer, batch = _setup(single_process_group, seed, compile=False, clip_mode=clip_mode,
                                     ewc_mode=ewc_mode)
    before = [p.detach().to_local().clone() for p in model.parameters()]
    _forward_backward(model, batch)
    with syncs_forbidden():
        task_norm, total_norm = optimizer.clip_grad_norm_(1.0, mode=clip_mode)
        optimizer.step()
    # reading the results synchronises (outside the check): the step ran and reduced its sums
    assert math.isfinite(task_norm.item()) and task_norm.item() > 0
    assert (total_norm is None) == (clip_mode == "task")
    assert math.isfinite(optimizer.last_penalty.item()) and optimizer.last_penalty.item() > 0
    drift = optimizer.last_drift
    assert drift is not None and bool(torch.isfinite(drift).all()) and bool((drift[:-1, 1] > 0).all())
    after = [p.detach().to_local() for p in model.parameters()]
    assert all(bool(torch.isfinite(a).all()) for a in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("compile", [False, True], ids=["blocks-eager", "blocks-compiled"])
def test_forward_and_backward_do_not_sync(single_process_group, seed, compile):
    """The model's forward (FSDP2 all-gathers, flex attention's block masks, the chunked loss) and backward
    (reduce-scatters), with the decoder blocks eager or torch.compile'd."""
    model, optimizer, batch = _setup(single_process_group, seed, compile=compile)
    with syncs_forbidden():
        loss = _forward_backward(model, batch)
    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert all(bool(torch.isfinite(g.to_local()).all()) for g in grads)
    optimizer.clip_grad_norm_(1.0)
    optimizer.step()


def test_a_training_step_waits_for_the_device_once(single_process_group, seed):
    """trainer.train.train_step as the training loop runs it (two micro-batches, pinned CPU batches as the loader
    gives them, compiled blocks, EWC, clipping): one synchronisation in all, the read of the loss and the gradient
    norm that the non-finite guard needs before the update."""
    import warnings

    from trainer.train import train_step

    model, optimizer, (ids, pos, labels) = _setup(single_process_group, seed, compile=True)
    half = ROWS // 2
    micro = [{"input_ids": ids[rows].cpu().pin_memory(), "position_ids": pos[rows].cpu().pin_memory(),
              "labels": labels[rows].cpu().pin_memory()} for rows in (slice(0, half), slice(half, ROWS))]

    def step():
        return train_step(model, optimizer, micro, device=single_process_group.device, world_size=1, clip=1.0,
                          clip_mode="task")

    step()  # the step's own first-time work (the two-micro-batch plan) outside the count
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert result.finite and math.isfinite(result.loss)
