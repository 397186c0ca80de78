"""Compiled decoder blocks (parallel.compile, the default on CUDA) equal eager ones, and one compilation serves every
document layout: the masks are inputs of the compiled graph, never constants baked into it.

Inductor on the CPU stands in for inductor on CUDA (same graphs, same guards; the generated code is C++ instead of
Triton), through the trainer's own build path (meta model -> compile -> FSDP2 -> materialize).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from kernels.linear_cross_entropy import IGNORE_INDEX
from tests.helpers import small_config
from trainer.config import ParallelConfig
from trainer.distributed import init_distributed, process_group_scope
from trainer.parallelize import build_mesh, build_sharded_model, compiles

# float32; inductor fuses and reorders reductions (RMSNorm, softmax), so results differ by rounding only.
LOSS_RTOL = 1e-5
GRAD_REL_ERR = 1e-4


def _layouts(config, seed: int, *, batches: int, rows: int = 2, seq_len: int = 48):
    """`batches` batches of the same shape whose rows hold different numbers of documents at different places."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        pos = torch.empty(rows, seq_len, dtype=torch.long)
        for r in range(rows):
            cuts = torch.randperm(seq_len - 1, generator=g)[:b + r].add(1).sort().values.tolist()
            starts = [0, *cuts, seq_len]
            for start, stop in zip(starts, starts[1:]):
                pos[r, start:stop] = torch.arange(stop - start)
        ids = torch.randint(1, config.vocab_size, (rows, seq_len), generator=g)
        labels = ids.roll(-1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        labels[pos.roll(-1, dims=1) == 0] = IGNORE_INDEX
        out.append((ids, labels, pos))
    return out


def _run(model, batches):
    results = []
    for ids, labels, pos in batches:
        model.zero_grad()
        loss = model(ids, position_ids=pos, labels=labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.full_tensor().clone() for p in model.parameters()]))
    return results


def _build(config, *, compile: bool, checkpointing: str, seed: int):
    parallel = ParallelConfig(param_dtype="float32", compile=compile, activation_checkpointing=checkpointing)
    return build_sharded_model(config, parallel, mesh=build_mesh(parallel, device_type="cpu"), device="cpu",
                               seed=seed, attention_backend="eager").train()


@pytest.mark.parametrize("checkpointing,backend", [("none", "inductor"), ("op", "aot_eager")])
def test_compiled_blocks_equal_eager_and_compile_once_for_all_layouts(checkpointing, backend, seed, monkeypatch):
    if backend == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    if backend != "inductor":  # aot_eager: the same graphs, no code generation (quick)
        monkeypatch.setattr(torch.nn.Module, "compile", _compile_with(backend))
    config = small_config(num_layers=2)
    batches = _layouts(config, seed, batches=3)
    torch._dynamo.reset()
    counters.clear()
    with process_group_scope():
        init_distributed("cpu")
        eager = _run(_build(config, compile=False, checkpointing=checkpointing, seed=seed), batches)
        compiled_model = _build(config, compile=True, checkpointing=checkpointing, seed=seed)
        compiled = _run(compiled_model, batches[:1])
        graphs_after_first = counters["stats"]["unique_graphs"]
        compiled += _run(compiled_model, batches[1:])
    # One graph per kind of block (sliding-window and global layers), made for the first batch and reused by the
    # others although their documents lie elsewhere.
    assert graphs_after_first == 2
    assert counters["stats"]["unique_graphs"] == 2, "a new document layout recompiled the blocks"
    assert not counters["graph_break"], dict(counters["graph_break"])
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        assert torch.allclose(loss_c, loss_e, rtol=LOSS_RTOL)
        for ge, gc in zip(grads_e, grads_c):
            assert (gc - ge).norm() <= GRAD_REL_ERR * ge.norm() + 1e-12


def _compile_with(backend):
    original = torch.nn.Module.compile

    def compile(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, "backend": backend})

    return compile


def test_blocks_compile_by_default_on_cuda_only():
    assert compiles(ParallelConfig(), "cuda") and not compiles(ParallelConfig(), "cpu")
    assert compiles(ParallelConfig(compile=True), "cpu") and not compiles(ParallelConfig(compile=False), "cuda")


def test_compiled_blocks_with_flex_attention_compile_once_for_all_layouts(seed):
    """The CUDA backend's path as far as a CPU can follow it (FlexAttention has no CPU backward): compiled blocks
    generate the flex kernel inside their graph, whose block masks (built per batch from new closures) are inputs:
    forward equals the eager reference on every layout, with one compilation per kind of block."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    from trainer.model import Gemma2

    config = small_config(num_layers=2)
    reference = Gemma2(config, attention_backend="eager")
    reference.init_weights(generator=torch.Generator().manual_seed(seed))
    compiled = Gemma2(config, attention_backend="flex")
    compiled.load_state_dict(reference.state_dict())
    for layer in compiled.layers:
        layer.compile(dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for ids, _, pos in _layouts(config, seed, batches=3, seq_len=64):
            want = reference(ids, position_ids=pos)
            got = compiled(ids, position_ids=pos)
            assert (got - want).norm() <= 1e-5 * want.norm()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_every_batch_shape_keeps_compiled_blocks(seed, monkeypatch):
    """All blocks share one code object, so shapes x block kinds fill ONE dynamo cache: 5 shapes are 10 graphs, past
    dynamo's default limit of 8, after which blocks would silently run uncompiled. parallelize raises the limit."""
    monkeypatch.setattr(torch.nn.Module, "compile", _compile_with("aot_eager"))
    config = small_config(num_layers=2)
    torch._dynamo.reset()
    counters.clear()
    # (monkeypatch would delete the config entry on undo: torch's config module needs its own patch)
    with torch._dynamo.config.patch(recompile_limit=8), process_group_scope():
        init_distributed("cpu")
        model = _build(config, compile=True, checkpointing="none", seed=seed)
        for seq_len in (24, 32, 40, 48, 56):
            _run(model, _layouts(config, seed, batches=1, seq_len=seq_len))
    assert counters["stats"]["unique_graphs"] == 10
    assert not counters["recompile_limit"] and not counters["graph_break"]


def test_accumulating_steps_keep_one_graph_per_kind_of_block(seed, monkeypatch):
    """train_step with several micro-batches on one rank keeps the gathered parameters between them (the same
    parameter objects enter the compiled blocks each time): no recompilation, and the same training as eager
    blocks. aot_eager stands in for inductor: the graphs and guards are the ones inductor would get."""
    from trainer.optim import EWCAdamW
    from trainer.train import param_groups, train_step

    monkeypatch.setattr(torch.nn.Module, "compile", _compile_with("aot_eager"))
    config = small_config(num_layers=2)
    layouts = _layouts(config, seed, batches=6)
    steps = [[{"input_ids": ids, "labels": labels, "position_ids": pos} for ids, labels, pos in layouts[i:i + 3]]
             for i in (0, 3)]
    torch._dynamo.reset()
    counters.clear()
    results = {}
    with process_group_scope():
        init_distributed("cpu")
        for compile in (False, True):
            model = _build(config, compile=compile, checkpointing="none", seed=seed)
            optimizer = EWCAdamW(param_groups(model, 0.01), lr=1e-3)
            losses = [train_step(model, optimizer, micro, device=torch.device("cpu"), world_size=1, clip=1.0,
                                 clip_mode="task").loss for micro in steps]
            results[compile] = losses, [p.full_tensor().detach().clone() for p in model.parameters()]
    assert counters["stats"]["unique_graphs"] == 2, "a micro-batch recompiled the blocks"
    assert not counters["graph_break"], dict(counters["graph_break"])
    (losses_e, weights_e), (losses_c, weights_c) = results[False], results[True]
    assert losses_c == pytest.approx(losses_e, rel=LOSS_RTOL)
    for we, wc in zip(weights_e, weights_c):
        assert (wc - we).norm() <= GRAD_REL_ERR * we.norm() + 1e-6
