"""Gemma2 against transformers' Gemma2ForCausalLM: logits, packed documents, gradients, KV cache, meta builds."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import hf_twin, random_model, rel_err, small_config
from trainer.model import Gemma2, Gemma2Config, KVCache

pytest.importorskip("transformers")

# Small configs covering GQA, MHA and MQA, windows shorter than the row, both soft-caps on and off,
# query_pre_attn_scalar != head_dim, odd sizes and an odd layer count.
CONFIGS = {
    "gqa": dict(),
    "mha-odd": dict(vocab_size=101, hidden_size=40, intermediate_size=72, num_layers=3, num_heads=5,
                    num_kv_heads=5, head_dim=8, query_pre_attn_scalar=11, sliding_window=7),
    "mqa": dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=1,
                head_dim=12, query_pre_attn_scalar=12, sliding_window=4, attn_softcap=5.0, final_softcap=3.0),
    "no-softcap": dict(num_layers=2, attn_softcap=None, final_softcap=None, sliding_window=9),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_logits_match_transformers(name, dtype, tol, seed):
    config = small_config(**CONFIGS[name])
    model = random_model(config, dtype=dtype, seed=seed)
    reference = hf_twin(model)
    ids = torch.randint(0, config.vocab_size, (2, 3 * config.sliding_window + 5))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    assert ours.dtype == dtype
    assert rel_err(ours, theirs) <= tol


def _packed_row(lengths, vocab):
    docs = [torch.randint(0, vocab, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, ids, pos


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_packed_documents_equal_separate_documents(backend, seed):
    config = small_config(sliding_window=6)
    model = random_model(config, dtype=torch.float32, seed=seed)
    docs, ids, pos = _packed_row([7, 19, 11], config.vocab_size)
    alone = [model(d[None]) for d in docs]
    model.attention_backend = backend
    with torch.no_grad():
        packed = model(ids, position_ids=pos)
    start = 0
    for doc, reference in zip(docs, alone):
        got = packed[:, start:start + len(doc)]
        assert rel_err(got, reference.detach()) <= 1e-5
        start += len(doc)


def test_flex_matches_eager_on_batches_of_packed_rows(seed):
    config = small_config(sliding_window=5)
    model = random_model(config, seed=seed)
    ids = torch.randint(0, config.vocab_size, (3, 40))
    # Rows that begin mid-document (positions > 0 first), hold several documents, or one.
    pos = torch.stack([torch.cat([torch.arange(9, 22), torch.arange(27)]),
                       torch.cat([torch.arange(10), torch.arange(5), torch.arange(25)]),
                       torch.arange(40)])
    with torch.no_grad():
        eager = model(ids, position_ids=pos)
        model.attention_backend = "flex"
        flex = model(ids, position_ids=pos)
    assert rel_err(flex, eager) <= 1e-5


def test_gradients_match_transformers_float64(seed):
    config = small_config(sliding_window=5, num_layers=3)
    model = random_model(config, dtype=torch.float64, seed=seed)
    reference = hf_twin(model)
    ids = torch.randint(0, config.vocab_size, (2, 17))
    weights = torch.randn(2, 17, config.vocab_size, dtype=torch.float64)
    (model(ids) * weights).sum().backward()
    (reference(ids).logits * weights).sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, theirs["model." + name].grad) <= 1e-5, name


def test_kv_cache_decoding_equals_full_recomputation(seed):
    config = small_config(sliding_window=4)
    model = random_model(config, seed=seed)
    prompts = [torch.randint(0, config.vocab_size, (n,)) for n in (9, 5)]
    continuation = torch.randint(0, config.vocab_size, (2, 6))
    width = max(len(p) for p in prompts)
    pads = torch.tensor([width - len(p) for p in prompts])
    batch = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    cache = KVCache(config, batch_size=2, max_length=width + 6, dtype=torch.float32, device="cpu",
                    pad_lengths=pads)
    with torch.no_grad():
        steps = [model(batch, kv_cache=cache)[:, -1]]
        for t in range(continuation.shape[1]):
            steps.append(model(continuation[:, t:t + 1], kv_cache=cache)[:, -1])
        for b, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, continuation[b]])[None])[0]
            expected = full[len(prompt) - 1:]
            got = torch.stack([s[b] for s in steps])
            assert rel_err(got, expected) <= 1e-5


def test_default_position_ids_are_one_document_per_row(seed):
    config = small_config()
    model = random_model(config, seed=seed)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids, position_ids=torch.arange(12).expand(2, 12)))


def test_position_ids_of_another_shape_is_a_clear_error():
    model = random_model(small_config())
    with pytest.raises(ValueError, match="position_ids shape .* differs from input_ids shape"):
        model(torch.zeros(2, 8, dtype=torch.long), position_ids=torch.arange(7)[None])


@pytest.mark.parametrize("preset,billions", [("gemma2-2b", 2.614), ("gemma2-9b", 9.242), ("gemma2-27b", 27.227)])
def test_published_presets_build_on_meta_without_memory(preset, billions):
    config = Gemma2Config.preset(preset)
    with torch.device("meta"):
        model = Gemma2(config)
    count = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert count == config.num_parameters()
    assert abs(count / 1e9 - billions) < 0.01


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="gemma2-2b"):
        Gemma2Config.preset("gemma2-7b")


def test_labels_give_the_summed_cross_entropy_of_the_logits(seed):
    config = small_config()
    model = random_model(config, seed=seed)
    ids = torch.randint(0, config.vocab_size, (2, 30))
    labels = torch.randint(0, config.vocab_size, (2, 30))
    labels[0, :7] = -100
    loss = model(ids, labels=labels)
    (g_loss,) = torch.autograd.grad(loss, model.layers[0].mlp.up_proj.weight)
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, config.vocab_size), labels.view(-1), reduction="sum")
    (g_expected,) = torch.autograd.grad(expected, model.layers[0].mlp.up_proj.weight)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert rel_err(g_loss, g_expected) <= 1e-4


def test_a_row_continuing_a_long_document_equals_the_same_tokens_at_small_positions(seed):
    config = small_config(sliding_window=6)
    model = random_model(config, seed=seed)
    ids = torch.randint(0, config.vocab_size, (1, 20))
    far = torch.cat([torch.arange(100_000, 100_012), torch.arange(8)])[None]
    near = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        assert rel_err(model(ids, position_ids=far), model(ids, position_ids=near)) <= 1e-6
