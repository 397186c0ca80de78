"""Activation checkpointing chosen from memory (trainer/memory.py): the decision on given figures, the static
estimate against a hand count, and (on a GPU) the per-block measurement."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from trainer.config import ParallelConfig, load_config
from trainer.errors import UserError
from trainer.memory import (GiB, ActivationPlan, choose_mode, measure_block, op_saved_bytes,
                            plan_activation_checkpointing, static_bytes)
from trainer.model import Gemma2, Gemma2Config
from trainer.parallelize import op_needs_compile, parallelize

PER_BLOCK = {"none": 3 * GiB, "op": 1.5 * GiB, "full": 0.25 * GiB}  # selective: (3 + 0.25) / 2 = 1.625


def _plan(capacity_gib: float) -> ActivationPlan:
    return ActivationPlan("none", "auto", capacity=capacity_gib * GiB, static=40 * GiB, per_block=PER_BLOCK,
                          num_layers=10)


@pytest.mark.parametrize("capacity,expected", [(80, "none"), (70, "none"), (69.9, "op"), (55, "op"),
                                                (56.2, "op"), (54.9, "full"), (43, "full"), (10, "full")])
def test_the_least_recomputation_that_fits_is_chosen(capacity, expected):
    # totals: none 70, op 55, selective 56.25, full 42.5 GiB
    plan = _plan(capacity)
    assert choose_mode(plan) == expected


def test_op_is_left_out_where_it_would_run_uncompiled_flex_attention():
    plan = _plan(56)  # op 55 fits, selective 56.25 does not
    assert choose_mode(plan) == "op" and choose_mode(plan, op_allowed=False) == "full"
    assert choose_mode(_plan(57), op_allowed=False) == "selective"
    eager_blocks = ParallelConfig(compile=False)
    assert op_needs_compile(eager_blocks, "cuda", "flex")
    assert op_needs_compile(eager_blocks, "cuda", "auto") == (importlib.util.find_spec("flash_attn") is None)
    assert not op_needs_compile(ParallelConfig(), "cuda", "flex")  # compiled by default on CUDA
    assert not op_needs_compile(eager_blocks, "cuda", "flash") and not op_needs_compile(eager_blocks, "cpu", "eager")


def test_explicit_op_with_uncompiled_flex_on_cuda_is_a_clear_error():
    class CudaMesh:  # parallelize refuses before it touches the mesh
        device_type = "cuda"

    with torch.device("meta"):
        model = Gemma2(Gemma2Config.preset("tiny"), attention_backend="flex")
    with pytest.raises(UserError, match="parallel.compile = true"):
        parallelize(model, ParallelConfig(activation_checkpointing="op", compile=False), mesh=CudaMesh())


def test_op_keeps_every_other_projection_and_attention_by_hand():
    config = Gemma2Config.preset("gemma2-2b")  # 8 heads x 256, 4 KV heads, hidden 2304, intermediate 9216
    per_token = 2 * (2048 + 1024 + 9216 + 2304 + 2048) + 4 * 8
    assert op_saved_bytes(config, tokens=4096, dtype=torch.bfloat16) == 4096 * per_token


def test_selective_is_chosen_when_it_fits_and_op_does_not():
    plan = ActivationPlan("none", "auto", capacity=60 * GiB, static=40 * GiB, num_layers=10,
                          per_block={"none": 3 * GiB, "op": 2.5 * GiB, "full": 0.5 * GiB})  # selective 1.75
    assert [plan.total(m) / GiB for m in ("none", "op", "selective", "full")] == [70, 65, 57.5, 45]
    assert choose_mode(plan) == "selective"
    plan.mode = choose_mode(plan)
    assert plan.describe().startswith("auto: selective (estimated 57.5 of 60.0 GiB usable; none 70.0, op 65.0")


def test_static_memory_of_gemma2_2b_by_hand():
    config = Gemma2Config.preset("gemma2-2b")
    n, emb = config.num_parameters(), config.vocab_size * config.hidden_size
    block = (n - emb - config.hidden_size) / config.num_layers
    # one GPU: float32 params + grads + two moments (16 B), bf16 F and anchor (4 B); every block stays gathered in
    # bf16 (2 B); one block's bf16 + float32 unsharded gradient; the LM head's float32 weight gradient, and in its
    # backward a float32 scaled copy and its bf16 cast (larger than no chunk buffers)
    one_gpu = static_bytes(config, shard_size=1, param_dtype=torch.bfloat16, ewc_bytes_per_param=4,
                           lm_head_chunk_bytes=0)
    assert one_gpu == pytest.approx(20 * n + 2 * n + 6 * block + 4 * emb + 6 * emb)
    assert 57 * GiB < one_gpu < 62 * GiB  # the H200 run peaked at 68.5 GiB with the activations of 4096 tokens
    eight = static_bytes(config, shard_size=8, param_dtype=torch.bfloat16, ewc_bytes_per_param=4,
                         lm_head_chunk_bytes=0)
    assert eight == pytest.approx(20 * n / 8 + 2 * (emb + 2 * block) + 6 * block + 4 * emb + 6 * emb)


def test_auto_is_none_on_cpu_and_explicit_modes_pass_through():
    config = load_config(None, [])
    shape = Gemma2Config.preset("tiny")
    plan = plan_activation_checkpointing(config, shape, device=torch.device("cpu"), shard_size=1)
    assert (plan.mode, plan.requested) == ("none", "auto") and plan.describe().startswith("auto: none")
    config = load_config(None, ["parallel.activation_checkpointing=op"])
    plan = plan_activation_checkpointing(config, shape, device=torch.device("cpu"), shard_size=1)
    assert (plan.mode, plan.describe()) == ("op", "op")


@pytest.mark.gpu
def test_per_block_memory_falls_with_more_recomputation_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = Gemma2Config.preset("small")
    per_block = measure_block(config, device=torch.device("cuda"), dtype=torch.bfloat16, attention_backend="flex",
                              batch_size=2, seq_len=1024)
    boundary = 2 * 1024 * config.hidden_size * 2  # a checkpointed block keeps its output (the next one's input)
    assert per_block["none"] > per_block["op"] > per_block["full"] >= boundary
    assert per_block["full"] < 4 * boundary
