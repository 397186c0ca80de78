"""Fixed batch shapes for the Fisher (trainer.ewc.batches, fixed_shapes=True, the fisher command on CUDA): few
distinct shapes over a run, every rank and the dummy alike, each prompt exactly once, and the same Fisher."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import random_model, rel_err, small_config
from trainer.ewc import estimate_fisher, estimate_fisher_with_stats
from trainer.ewc.batches import (BLOCK, EncodedPrompt, choose_shapes, pack_prompts, plan_shapes, prompt_batches,
                                 row_batches)
from trainer.hf import to_hf_name

IGNORE = -100
VOCAB = 61


def random_prompts(rng: random.Random, n: int, *, shortest: int, longest: int) -> list[EncodedPrompt]:
    """BOS, then tokens 4.. (never the pad id 0), lengths spread log-uniformly as real prompt lengths are."""
    out = []
    for _ in range(n):
        length = int(round(shortest * (longest / shortest) ** rng.random()))
        out.append(EncodedPrompt([2] + [rng.randrange(4, VOCAB) for _ in range(length - 1)], rng.randrange(4, VOCAB)))
    return out


def unpack(batch) -> list[tuple[tuple[int, ...], int]]:
    """The prompts of a batch as (ids, target), checking that everything else is padding laid out as documented:
    pad ids, never scored, documents of at most BLOCK tokens that do not cross a multiple of BLOCK."""
    found = []
    ids, labels, pos = (batch[k] for k in ("input_ids", "labels", "position_ids"))
    for r in range(ids.shape[0]):
        starts = (pos[r] == 0).nonzero()[:, 0].tolist()
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [ids.shape[1]]):
            assert pos[r, a:b].tolist() == list(range(b - a))
            if labels[r, b - 1] != IGNORE:  # a prompt: scored at its last position only
                assert (labels[r, a:b - 1] == IGNORE).all() and ids[r, a] == 2
                found.append((tuple(ids[r, a:b].tolist()), int(labels[r, b - 1])))
            else:
                assert (ids[r, a:b] == 0).all() and (labels[r, a:b] == IGNORE).all()
                assert b - a <= BLOCK and a // BLOCK == (b - 1) // BLOCK, (a, b)
    return found


@pytest.mark.parametrize("batch_size,world", [(4, 1), (4, 3), (2, 5), (9, 2)],
                         ids=["one-rank", "uneven-parts", "dummies", "multi-row"])
def test_fixed_shapes_are_few_the_same_on_every_rank_and_hold_every_prompt_once(seed, batch_size, world):
    rng = random.Random(seed)
    prompts = random_prompts(rng, 53, shortest=40, longest=1500)
    runs = [list(prompt_batches(prompts, batch_size=batch_size, pad_id=0, rank=r, world_size=world, row_tokens=1024,
                                fixed_shapes=True)) for r in range(world)]
    steps = -(-len(prompts) // batch_size)
    assert all(len(run) == steps for run in runs)
    shapes = set()
    for k, parts in enumerate(zip(*runs)):
        step_shapes = {tuple(b["input_ids"].shape) for b in parts}
        assert len(step_shapes) == 1, (k, step_shapes)  # every rank, a dummy included
        shapes |= step_shapes
        step = prompts[k * batch_size:(k + 1) * batch_size]
        for r, b in enumerate(parts):
            mine = step[r::world]
            assert b["num_samples"] == len(mine) and b["num_tokens"] == sum(len(p.ids) for p in mine)
            assert sorted(unpack(b)) == sorted((tuple(p.ids), p.target) for p in mine)
    cap = -(-max(1024, *(len(p.ids) for p in prompts)) // BLOCK) * BLOCK
    assert len(shapes) <= 4 and all(w % BLOCK == 0 and (rows == 1 or w >= cap) for rows, w in shapes), shapes
    if batch_size < world:
        assert any(b["num_samples"] == 0 for run in runs for b in run)
    if batch_size == 9:
        assert any(rows > 1 for rows, _ in shapes)  # parts over `cap` tokens: several rows of `cap`
    # Packed tight, the same run has a shape per batch, nearly.
    tight = {tuple(b["input_ids"].shape) for r in range(world)
             for b in prompt_batches(prompts, batch_size=batch_size, pad_id=0, rank=r, world_size=world,
                                     row_tokens=1024)}
    assert len(tight) > 8


def test_choose_shapes_is_the_cheapest_choice(seed):
    rng = random.Random(seed)
    for _ in range(20):
        pool = sorted({(1, 128 * rng.randint(1, 12)) for _ in range(6)} | {(rng.randint(2, 4), 1536)})
        needs = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        k = rng.randint(1, 4)
        chosen = choose_shapes(needs, k)

        def cost(kept):
            return sum(min(r * w for r, w in kept if (r, w) >= need) for need in needs)

        distinct = sorted(set(needs))
        best = min(cost(c) for n in range(1, k + 1) for c in itertools.combinations(distinct, n)
                   if distinct[-1] in c)
        assert chosen == sorted(chosen) and len(chosen) <= k and cost(chosen) == best
        assert choose_shapes(needs, len(distinct)) == distinct  # enough shapes: no padding beyond the rounding
    lengths = [300, 200, 700, 100, 1000]  # mini-batches of 2 need (1, 512), (1, 896), (1, 1024)
    assert [plan_shapes(lengths, batch_size=2, row_tokens=1024, max_shapes=k) for k in (1, 2, 3)] == [
        [(1, 1024)] * 3, [(1, 512), (1, 1024), (1, 1024)], [(1, 512), (1, 896), (1, 1024)]]
    assert plan_shapes(lengths, batch_size=2, world_size=2, row_tokens=256) == [(1, 384), (1, 768), (1, 1024)]
    with pytest.raises(ValueError, match="do not fit"):
        pack_prompts(random_prompts(rng, 3, shortest=100, longest=100), pad_id=0, shape=(1, 256))


def per_prompt_reference(model, steps):
    """F = (1/K) sum_k (grad of the mean over mini-batch k of -log p(letter | prompt), each prompt read alone)^2."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in steps:
        losses = [-model(torch.tensor([p.ids]))[0, -1].log_softmax(-1)[p.target] for p in step]
        grads = torch.autograd.grad(sum(losses) / len(losses), list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g ** 2
    return {to_hf_name(n): t / len(steps) for n, t in total.items()}


@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
def test_fixed_shapes_give_the_fisher_of_the_prompts_alone(seed, estimator):
    config = small_config(num_layers=2, vocab_size=VOCAB)
    model = random_model(config, dtype=torch.float64, seed=seed % 1000)
    prompts = random_prompts(random.Random(seed), 11, shortest=5, longest=120)
    fixed_batches = list(prompt_batches(prompts, batch_size=4, pad_id=0, row_tokens=256, fixed_shapes=True))
    fixed, stats = estimate_fisher_with_stats(model, fixed_batches, estimator=estimator, seed=seed)
    tight = estimate_fisher(model, prompt_batches(prompts, batch_size=4, pad_id=0, row_tokens=256),
                            estimator=estimator, seed=seed)
    reference = per_prompt_reference(model, [prompts[i:i + 4] for i in range(0, 11, 4)]) if (
        estimator == "empirical") else tight
    for n, ref in reference.items():
        # RMSNorm computes in float32 even in a float64 model (model.py): its weight's gradient sums float32 terms
        # over the tokens, which different layouts round differently. Everything else agrees to float64.
        tolerance = 1e-6 if n.endswith("norm.weight") else 1e-10
        assert rel_err(fixed[n], ref) < tolerance, n
        assert rel_err(fixed[n], tight[n]) < tolerance, n
    assert (stats.batches, stats.samples, stats.scored_tokens) == (3, 11, 11)
    assert stats.data_tokens == sum(len(p.ids) for p in prompts)
    assert stats.tokens == sum(b["input_ids"].numel() for b in fixed_batches) > stats.data_tokens
    assert stats.padding == pytest.approx(1 - stats.data_tokens / stats.tokens)
    assert stats.shapes == {tuple(b["input_ids"].shape) for b in fixed_batches}


def text_rows(n: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    labels = g.integers(0, VOCAB, (n, seq))
    labels[g.random((n, seq)) < 0.3] = IGNORE
    pos = np.concatenate([np.arange(5), np.arange(seq - 5)])[None].repeat(n, 0)
    return {"input_ids": g.integers(0, VOCAB, (n, seq)), "labels": labels, "position_ids": pos}


def test_text_rows_have_one_shape_and_the_same_fisher(seed):
    rows = text_rows(7, 12, seed)
    for world in (1, 3, 5):  # 5 ranks: a dummy in each of the two mini-batches of 4
        runs = [list(row_batches(rows, batch_size=4, pad_id=0, rank=r, world_size=world, fixed_shapes=True))
                for r in range(world)]
        per_rank = -(-4 // world)
        assert {tuple(b["input_ids"].shape) for run in runs for b in run} == {(per_rank, 12)}
        assert sum(b["num_samples"] for run in runs for b in run) == 7
        assert sum(b["num_tokens"] for run in runs for b in run) == 7 * 12
        for run in runs:
            for b in run:
                pad = b["input_ids"][b["num_samples"]:]
                assert (pad == 0).all() and (b["labels"][b["num_samples"]:] == IGNORE).all()
    model = random_model(small_config(num_layers=1, vocab_size=VOCAB), dtype=torch.float64, seed=seed % 1000)
    fixed, stats = estimate_fisher_with_stats(model, row_batches(rows, batch_size=3, pad_id=0, fixed_shapes=True))
    tight = estimate_fisher(model, row_batches(rows, batch_size=3, pad_id=0))
    for n, f in tight.items():
        assert rel_err(fixed[n], f) < (1e-6 if n.endswith("norm.weight") else 1e-10), n
    assert stats.shapes == {(3, 12)} and (stats.tokens, stats.data_tokens) == (9 * 12, 7 * 12)


def test_a_compiled_forward_compiles_once_per_shape(seed):
    """torch.compile with static shapes, as FlexAttention on CUDA: one dynamo compilation per distinct shape."""
    model = random_model(small_config(num_layers=1, vocab_size=VOCAB), dtype=torch.float32, seed=0)
    prompts = random_prompts(random.Random(seed), 24, shortest=20, longest=300)
    batches = list(prompt_batches(prompts, batch_size=3, pad_id=0, fixed_shapes=True, max_shapes=3))
    shapes = {tuple(b["input_ids"].shape) for b in batches}
    compiled = []

    def count(gm, example_inputs):
        compiled.append(1)
        return gm.forward

    torch._dynamo.reset()
    try:
        forward = torch.compile(model.hidden_states, backend=count, dynamic=False)
        with torch.no_grad():
            forward(batches[0]["input_ids"], batches[0]["position_ids"])
            graphs = len(compiled)  # graphs per compilation (1 unless the model breaks the graph)
            for b in batches:
                forward(b["input_ids"], b["position_ids"])
    finally:
        torch._dynamo.reset()
    assert len(shapes) <= 3 and len(compiled) == graphs * len(shapes)


# ------------------------------------------------------------------------------------------------ two ranks

CONFIG = dict(num_layers=2, vocab_size=VOCAB, hidden_size=40, intermediate_size=99)
N_PROMPTS, BATCH = 7, 3  # the last mini-batch has one prompt: rank 1 runs a dummy


def two_rank_prompts() -> list[EncodedPrompt]:
    return random_prompts(random.Random(5), N_PROMPTS, shortest=10, longest=200)


def sharded_fixed_fisher(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = random_model(small_config(**CONFIG), dtype=torch.float64, seed=7)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    batches = list(prompt_batches(two_rank_prompts(), batch_size=BATCH, pad_id=0, rank=rank, world_size=world,
                                  row_tokens=256, fixed_shapes=True))
    fisher, stats = estimate_fisher_with_stats(model, batches)
    local = {to_hf_name(n): fisher[to_hf_name(n)].to_local().clone() for n, _ in model.named_parameters()}
    return {"local": local, "shapes": [tuple(b["input_ids"].shape) for b in batches],
            "dummies": sum(b["num_samples"] == 0 for b in batches),
            "counts": (stats.batches, stats.samples, stats.scored_tokens, stats.tokens, stats.data_tokens)}


@pytest.mark.slow
def test_two_ranks_with_fixed_shapes_and_a_dummy_equal_one_process_packed_tight():
    results = run_distributed(sharded_fixed_fisher, world_size=2)
    model = random_model(small_config(**CONFIG), dtype=torch.float64, seed=7)
    prompts = two_rank_prompts()
    single = estimate_fisher(model, prompt_batches(prompts, batch_size=BATCH, pad_id=0, row_tokens=256))
    assert results[0]["shapes"] == results[1]["shapes"] and [r["dummies"] for r in results] == [0, 1]
    tokens = 2 * sum(r * w for r, w in results[0]["shapes"])
    expected = (3, N_PROMPTS, N_PROMPTS, tokens, sum(len(p.ids) for p in prompts))
    assert results[0]["counts"] == results[1]["counts"] == expected  # summed over the ranks
    for n, full in single.items():
        got = torch.cat([r["local"][n] for r in results])  # dim-0 shards in rank order
        assert rel_err(got, full) < (1e-6 if n.endswith("norm.weight") else 1e-10), n
