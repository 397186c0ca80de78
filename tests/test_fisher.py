"""Fisher estimation against a hand-written autograd reference; the MMLU prompt and its answer-letter loss."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import random_model, rel_err, small_config, train_tiny_tokenizer
from trainer.errors import UserError
from trainer.ewc import estimate_fisher, estimate_fisher_with_stats
from trainer.ewc.batches import EncodedPrompt, encode_mmlu, pack_prompts, prompt_batches
from trainer.hf import to_hf_name
from trainer.prompts import answer_letter_tokens, format_mmlu_prompt
from trainer.task_files import MCItem

IGNORE = -100
nan = float("nan")


def fisher_ref(model, batches, *, estimator="empirical", seed=0):
    """F = (1/K) sum_k (grad of the mean CE over mini-batch k's scored tokens)^2, straight from the definition:
    full logits from model.forward, torch.autograd.grad, no packing tricks, no fused ops."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    k = 0
    for batch in batches:
        logits = model(batch["input_ids"], batch.get("position_ids"))  # [B, S, V]
        mask = batch["labels"] != IGNORE
        if not mask.any():
            continue
        scored = logits[mask]
        if estimator == "sampled":
            y = torch.multinomial(scored.detach().float().softmax(-1), 1, generator=g).squeeze(1)
        else:
            y = batch["labels"][mask]
        loss = F.cross_entropy(scored, y)  # mean over the scored tokens of this mini-batch
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, _), gr in zip(params.items(), grads):
            total[n] += gr ** 2
        k += 1
    return {to_hf_name(n): t / k for n, t in total.items()}


def random_batches(config, *, n_batches, rows, seq_len, seed):
    """Packed rows (two documents each); the first batch scores every position, the others about 70%."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        ids = torch.randint(0, config.vocab_size, (rows, seq_len), generator=g)
        labels = torch.randint(0, config.vocab_size, (rows, seq_len), generator=g)
        labels[torch.rand(rows, seq_len, generator=g) < (0.3 if b else 0.0)] = IGNORE
        pos = torch.empty(rows, seq_len, dtype=torch.long)
        for r in range(rows):
            cut = int(torch.randint(3, seq_len - 3, (1,), generator=g))
            pos[r] = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)])
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
@pytest.mark.parametrize("rows", [1, 3], ids=["per-sample", "mini-batch"])
def test_estimate_fisher_matches_autograd_reference(estimator, rows, seed):
    config = small_config(num_layers=2, vocab_size=97)
    model = random_model(config, dtype=torch.float64, seed=seed % 1000)
    batches = random_batches(config, n_batches=3, rows=rows, seq_len=13, seed=seed)
    fisher = estimate_fisher(model, batches, estimator=estimator, seed=seed)
    ref = fisher_ref(model, batches, estimator=estimator, seed=seed)
    assert set(fisher) == set(ref) and all(n.startswith("model.") for n in fisher)
    for n in ref:
        assert fisher[n].dtype == torch.float64 and fisher[n].shape == ref[n].shape
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-9, atol=1e-18, msg=n)


def test_per_sample_fisher_is_the_mean_of_squared_sample_gradients_not_of_the_batch(seed):
    """Batch size changes the estimate: per-sample F averages g_i^2, a mini-batch of 2 averages ((g_1+g_2)/2)^2."""
    config = small_config(num_layers=1, vocab_size=61)
    model = random_model(config, dtype=torch.float64, seed=seed % 1000)
    rows = random_batches(config, n_batches=1, rows=2, seq_len=9, seed=seed)[0]
    # Equal scored counts per row make the batch mean the average of the two row means.
    rows["labels"][:, :4] = IGNORE
    rows["labels"][:, 4:] = rows["input_ids"][:, 4:]
    singles = [{k: v[i:i + 1] for k, v in rows.items()} for i in range(2)]
    per_sample = estimate_fisher(model, singles)
    pair = estimate_fisher(model, [rows])
    grads = []
    for b in singles:
        logits = model(b["input_ids"], b["position_ids"])
        mask = b["labels"] != IGNORE
        grads.append(torch.autograd.grad(F.cross_entropy(logits[mask], b["labels"][mask]),
                                         model.embed_tokens.weight)[0])
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(per_sample[name], (grads[0] ** 2 + grads[1] ** 2) / 2)
    torch.testing.assert_close(pair[name], ((grads[0] + grads[1]) / 2) ** 2)


def test_bfloat16_compute_keeps_float32_sums_and_is_close_to_float32(seed):
    config = small_config(num_layers=1, vocab_size=61)
    model = random_model(config, dtype=torch.float32, seed=seed % 1000)
    batches = random_batches(config, n_batches=2, rows=2, seq_len=11, seed=seed)
    f32 = estimate_fisher(model, batches)
    bf16 = estimate_fisher(model, batches, compute_dtype=torch.bfloat16)
    for n in f32:
        assert bf16[n].dtype == torch.float32
        rel = (bf16[n] - f32[n]).norm() / f32[n].norm()
        assert rel < 0.1, (n, rel.item())
    with pytest.raises(ValueError, match="load them in float32"):
        estimate_fisher(model.to(torch.bfloat16), batches)


def test_non_finite_gradient_names_parameter_and_batch():
    config = small_config(num_layers=2, vocab_size=61)
    model = random_model(config, dtype=torch.float32, seed=3)
    batches = random_batches(config, n_batches=3, rows=1, seq_len=8, seed=1)
    calls = []

    def overflow_on_second_batch(module, inputs, output):
        calls.append(1)
        return output * float("inf") if len(calls) == 2 else output  # as a float16 overflow would

    model.layers[1].mlp.register_forward_hook(overflow_on_second_batch)
    with pytest.raises(UserError, match=r"non-finite gradient in parameter model\.\S+.* at mini-batch 1 "):
        estimate_fisher(model, batches)


def test_stats_count_samples_tokens_and_skip_unscored_batches():
    config = small_config(num_layers=1, vocab_size=61)
    model = random_model(config, dtype=torch.float32, seed=0)
    batches = random_batches(config, n_batches=3, rows=2, seq_len=8, seed=2)
    batches[1]["labels"][:] = IGNORE
    batches[2]["num_samples"] = 5
    _, stats = estimate_fisher_with_stats(model, batches)
    assert (stats.batches, stats.skipped_batches, stats.samples, stats.tokens) == (2, 1, 7, 32)
    assert stats.scored_tokens == int((batches[0]["labels"] != IGNORE).sum() + (batches[2]["labels"] != IGNORE).sum())
    from trainer.ewc.fisher import _all_finite

    assert _all_finite([torch.zeros(0), torch.ones(2)]) and not _all_finite([torch.zeros(0), torch.tensor([0, nan])])
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_fisher(model, batches, estimator="exact")


# ------------------------------------------------------------------------------------------------ MMLU prompts

def train_prompt_tokenizer(path) -> Path:
    """A small Gemma-like SentencePiece model (no dummy prefix, newline piece, byte fallback), trained here."""
    rng = random.Random(0)
    words = ("the of and to in is that for it as with was on be by this are or an at which from have not but all "
             "can more one their about water energy cell question answer following multiple choice").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    lines += ["The following is a multiple choice question (with answers) about physics. A. B. C. D. Answer:"] * 20
    return train_tiny_tokenizer(path, lines, vocab_size=400, normalization_rule_name="identity",
                                remove_extra_whitespaces=False, add_dummy_prefix=False, user_defined_symbols=["\n"],
                                hard_vocab_limit=False)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    import sentencepiece as spm

    path = train_prompt_tokenizer(tmp_path_factory.mktemp("sp") / "tokenizer.model")
    return spm.SentencePieceProcessor(model_file=str(path))


ITEM = MCItem("What is the boiling point of water at sea level?", ("50 C", "100 C", "150 C", "200 C"), 1,
              "high_school_physics")


def test_default_mmlu_prompt_is_the_documented_text():
    p = format_mmlu_prompt(ITEM.question, ITEM.choices, ITEM.subject)
    assert p.prompt == (
        "The following is a multiple choice question (with answers) about high school physics. Respond only with "
        "the letter corresponding to the right answer.\n"
        "Example:\nHow much is 2+2?\nA. 0\nB. 2\nC. 4\nD. 9\nAnswer:\nC\n"
        "What is the boiling point of water at sea level?\n"
        "A. 50 C\nB. 100 C\nC. 150 C\nD. 200 C\n"
        "Answer:\n")
    assert p.answer(ITEM.answer) == "B"
    shot = MCItem("2+3?", ("5", "6"), 0)
    with_example = format_mmlu_prompt(ITEM.question, ITEM.choices, ITEM.subject, examples=[shot])
    assert "Answer:\nC\n2+3?\nA. 5\nB. 6\nAnswer:\nA\nWhat is the boiling" in with_example.prompt
    custom = format_mmlu_prompt("Q?", ("x", "y", "z", "w"), "law", template="{subject}: {question}\n{options}\n"
                                                                             "Answer: {answer}")
    assert (custom.prompt, custom.answer(3)) == ("law: Q?\nA. x\nB. y\nC. z\nD. w\nAnswer: ", "D")


@pytest.mark.parametrize("template", ["default", "Question: {question}\n{options}\nAnswer: {answer}"])
def test_answer_letter_is_the_only_scored_token(sp, template):
    kwargs = {} if template == "default" else {"template": template}
    items = [ITEM, MCItem("Which is a cell part?", ("wall", "energy", "water", "answer"), 0, "biology"),
             MCItem("Pick the last one.", ("one", "two", "three", "four"), 3, "misc")]
    prompts = encode_mmlu(items, sp, bos_id=2, **kwargs)
    for item, p in zip(items, prompts):
        assert p.ids[0] == 2
        letter = "ABCD"[item.answer]
        assert sp.id_to_piece(p.target).replace("▁", "") == letter
        # The model reads exactly the prompt: the prompt's tokens, without the answer, decode back to it
        # (up to a trailing space that the letter's token would absorb).
        text = format_mmlu_prompt(item.question, item.choices, item.subject, **kwargs).prompt
        assert sp.decode(p.ids[1:]) in (text, text.rstrip(" "))
    batch = pack_prompts(prompts, pad_id=0, row_tokens=10_000)
    assert batch["input_ids"].shape[0] == 1 and batch["num_samples"] == 3
    scored = (batch["labels"] != IGNORE).nonzero()[:, 1].tolist()
    ends = [sum(len(p.ids) for p in prompts[:i + 1]) - 1 for i in range(3)]
    assert scored == ends
    assert batch["labels"][0, ends].tolist() == [p.target for p in prompts]
    starts = (batch["position_ids"][0] == 0).nonzero()[:, 0].tolist()
    assert starts[:3] == [0, ends[0] + 1, ends[1] + 1]


def test_letter_split_into_pieces_scores_its_first_piece(sp):
    ids, target = answer_letter_tokens(sp, "Answer:\n", "Ω", bos_id=2)
    assert sp.encode("Answer:\nΩ")[len(ids) - 1] == target
    assert sp.id_to_piece(target) == "<0xCE>"  # byte fallback: Ω is two byte pieces, the first is scored


def test_packed_prompt_loss_is_the_answer_letter_cross_entropy(sp, seed):
    """Fisher over packed prompts == Fisher from each prompt alone, scored on -log p(letter | prompt)."""
    config = small_config(num_layers=2, vocab_size=sp.vocab_size())
    model = random_model(config, dtype=torch.float64, seed=seed % 1000)
    items = [ITEM, MCItem("Which is a cell part?", ("wall", "energy", "water", "answer"), 2, "biology")] * 2
    prompts = encode_mmlu(items, sp, bos_id=2)
    fisher = estimate_fisher(model, prompt_batches(prompts, batch_size=2, pad_id=0, row_tokens=64))
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for pair in (prompts[:2], prompts[2:]):
        losses = []
        for p in pair:
            logits = model(torch.tensor([p.ids]))[0, -1]
            losses.append(-logits.log_softmax(-1)[p.target])
        grads = torch.autograd.grad(sum(losses) / 2, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            ref[n] += g ** 2 / 2
    for n, r in ref.items():
        # RMSNorm computes in float32 even for a float64 model (model.py): a norm weight's gradient sums float32
        # terms over the tokens, which packed and single rows round differently. The rest agrees to float64.
        assert rel_err(fisher[to_hf_name(n)], r) < (1e-6 if n.endswith("norm.weight") else 1e-10), n


def test_prompt_batches_split_global_batches_across_ranks():
    prompts = [EncodedPrompt([2] + [10 + i] * (i + 1), 5) for i in range(5)]
    single = list(prompt_batches(prompts, batch_size=3, pad_id=0))
    ranks = [list(prompt_batches(prompts, batch_size=3, pad_id=0, rank=r, world_size=2)) for r in range(2)]
    assert [b["num_samples"] for b in single] == [3, 2]
    assert [[b["num_samples"] for b in r] for r in ranks] == [[2, 1], [1, 1]]
    few = [list(prompt_batches(prompts[:1], batch_size=1, pad_id=0, rank=r, world_size=2)) for r in range(2)]
    assert few[1][0]["num_samples"] == 0 and (few[1][0]["labels"] == IGNORE).all()  # a dummy keeps FSDP in step


def test_read_mmlu_layouts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.task_files import read_mmlu
    from trainer.prompts import DEFAULT_MMLU_TEMPLATE, check_template

    check_template(DEFAULT_MMLU_TEMPLATE)
    records = [{"question": "Q1?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2},
               {"question": "Q2?", "subject": "virology", "choices": ["e", "f", "g", "h"], "answer": 0}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "test-00000-of-00001.parquet")
    (tmp_path / "hendrycks").mkdir()
    (tmp_path / "hendrycks" / "college_physics_test.csv").write_text('"What, then?",w,x,y,z,D\n')
    items = read_mmlu(tmp_path)
    assert items == [MCItem("What, then?", ("w", "x", "y", "z"), 3, "college_physics"),
                     MCItem("Q1?", ("a", "b", "c", "d"), 2, "anatomy"), MCItem("Q2?", ("e", "f", "g", "h"), 0,
                                                                             "virology")]
    (tmp_path / "bad.jsonl").write_text('{"question": "Q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: answer 5 is out of range for 2 choices"):
        read_mmlu(tmp_path / "bad.jsonl")


def test_read_shared_mmlu_sample(shared_data):
    from trainer.task_files import read_mmlu

    items = read_mmlu(shared_data / "benchmarks" / "mmlu" / "dev")
    assert len(items) == 285 and len({i.subject for i in items}) == 57
    assert all(len(i.choices) == 4 and 0 <= i.answer < 4 for i in items)
    assert items[0].subject == "abstract_algebra" and items[0].question.startswith("Find all c in Z_3")
