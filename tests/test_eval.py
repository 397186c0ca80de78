"""Evaluation: log-likelihood scoring, perplexity and bits per byte, the task formats on real items, generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.eval_fixtures import hand_loglikelihood, make_model_dir
from tests.helpers import hf_twin, random_model, small_config
from trainer.errors import UserError
from trainer.evaluate import tasks as T
from trainer.evaluate.generate import greedy_generate
from trainer.data.readers import read_documents
from trainer.evaluate.perplexity import perplexity_of_input, perplexity_of_texts, read_perplexity_input
from trainer.evaluate.runner import evaluate_multiple_choice, evaluate_task
from trainer.evaluate.scoring import (ScoringOptions, Span, Tokenizer, loglikelihood, pack_spans, rolling_windows,
                                      score_spans)
from trainer.hf import load_pretrained

BENCH = SHARED_DATA / "benchmarks"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, tokenizer, model dir): a random tiny Gemma2 (sliding window 32) with a tokenizer trained here."""
    model_dir = make_model_dir(tmp_path_factory.mktemp("eval"), seed=7)
    model = load_pretrained(model_dir, dtype=torch.float32, attention_backend="eager").eval()
    return model, Tokenizer(model_dir / "tokenizer.model"), model_dir


def documents(n: int, *, lang: str = "en", max_chars: int = 1000) -> list[str]:
    """The first n real documents of at most `max_chars` characters (a few hundred tokens)."""
    name = "en_ewt.txt" if lang == "en" else "lt_news.txt"
    return [d for d in read_documents(SHARED_DATA / "text" / name) if len(d) <= max_chars][:n]


# ------------------------------------------------------------------------------------------------------ perplexity

def test_perplexity_equals_exp_mean_nll_through_transformers(setup):
    model, tok, _ = setup
    texts = documents(2) + documents(1, lang="lt")
    res = perplexity_of_texts(model, tok, texts, max_length=1024, stride=512)
    hf = hf_twin(model)
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([model.config.bos_token_id] + tok.encode(text))
        assert len(ids) <= 1024, "each document must fit the window for this comparison"
        with torch.no_grad():
            logits = hf(ids[None, :-1]).logits[0].double()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
        count += len(ids) - 1
    assert res.tokens == count
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert res.bytes == num_bytes
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-5)


@pytest.mark.parametrize("length,max_length,stride", [(1, 8, 4), (7, 8, 3), (8, 8, 8), (9, 8, 8), (40, 8, 3),
                                                       (41, 16, 5), (100, 10, 1)])
def test_rolling_windows_score_each_token_once_with_enough_context(length, max_length, stride):
    tokens = list(range(100, 100 + length))
    windows = rolling_windows(tokens, bos_id=2, max_length=max_length, stride=stride)
    full = [2, *tokens]
    scored = []
    for k, (window, first) in enumerate(windows):
        assert len(window) <= max_length + 1 and first >= 1
        begin = next(i for i in range(len(full)) if full[i:i + len(window)] == window)
        for j in range(first, len(window)):
            scored.append(begin + j)
            if k > 0:
                assert j >= max_length - stride or j == len(window) - 1 and len(window) == max_length + 1
    assert scored == list(range(1, len(full)))
    if length + 1 <= max_length + 1:
        assert windows == [(full, 1)]


def test_sliding_window_perplexity_equals_full_context_when_the_document_fits(setup):
    model, tok, _ = setup
    text = documents(1, lang="lt")[0]
    n = len(tok.encode(text))
    assert 100 < n < 1024
    fits = perplexity_of_texts(model, tok, [text], max_length=n, stride=7)
    roomy = perplexity_of_texts(model, tok, [text], max_length=1024, stride=512)
    assert fits.nll == pytest.approx(roomy.nll, rel=1e-6)
    short = perplexity_of_texts(model, tok, [text], max_length=n // 3, stride=n // 7)
    assert short.tokens == n and short.nll != pytest.approx(roomy.nll, rel=1e-6)


def test_sliding_windows_equal_a_hand_computation_over_the_same_windows(setup):
    model, tok, _ = setup
    text = documents(1, lang="lt", max_chars=400)[0]
    ids = tok.encode(text)
    L, stride = 32, 12
    assert len(ids) > 3 * L
    res = perplexity_of_texts(model, tok, [text], max_length=L, stride=stride)
    full = [model.config.bos_token_id, *ids]
    nll, end = 0.0, 0
    while end < len(full):  # the strided rule, written out
        new_end = min(len(full), (end + stride) if end else L + 1)
        begin = max(0, new_end - (L + 1))
        window = torch.tensor(full[begin:new_end])
        with torch.no_grad():
            lp = torch.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
        for j in range(max(end, begin + 1), new_end):
            nll -= float(lp[j - begin - 1, full[j]])
        end = new_end
    assert res.nll == pytest.approx(nll, rel=1e-6)


def test_packing_and_batching_do_not_change_scores(setup, seed):
    model, _, _ = setup
    g = torch.Generator().manual_seed(seed)
    spans = []
    for owner in range(9):
        n = int(torch.randint(2, 60, (1,), generator=g))
        ids = torch.randint(0, model.config.vocab_size, (n + 1,), generator=g).tolist()
        first = int(torch.randint(1, n + 1, (1,), generator=g))
        spans.append(Span(ids[:-1], list(range(first - 1, n)), ids[first:], [owner] * (n + 1 - first)))
    alone = score_spans(model, spans, 9, options=ScoringOptions(row_tokens=1, batch_rows=1))
    for opts in (ScoringOptions(row_tokens=128, batch_rows=3, head_chunk=7),
                 ScoringOptions(row_tokens=96, batch_rows=2, fixed_shape=True)):
        packed = score_spans(model, spans, 9, options=opts)
        assert packed.tokens == alone.tokens
        assert packed.greedy == alone.greedy
        assert packed.logprob == pytest.approx(alone.logprob, abs=1e-4)


def test_pack_spans_places_every_span_once_within_capacity(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 50, (200,), generator=g).tolist()
    rows = pack_spans(lengths, row_tokens=64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 64) * 1.25 + 1  # first-fit decreasing packs tightly


def test_loglikelihood_equals_a_hand_computation(setup):
    model, tok, _ = setup
    sp = tok.sp
    requests = [("Question: Which is bigger?\nAnswer:", " the sun"), ("Labas rytas, ", "Lietuva"),
                ("", "Vilnius is a city."), ("The following are", " A"), ("The following are", " B")]
    got = loglikelihood(model, tok, requests, max_length=1024, options=ScoringOptions(row_tokens=64, batch_rows=2))
    for (ctx, cont), res in zip(requests, got):
        want, greedy = hand_loglikelihood(model, sp, ctx, cont)
        assert res.logprob == pytest.approx(want, abs=1e-4)
        assert res.greedy == greedy and res.error is None


def test_a_request_longer_than_the_window_keeps_its_last_tokens(setup):
    model, tok, _ = setup
    ctx, cont = documents(1)[0], " and so on"
    res = loglikelihood(model, tok, [(ctx, cont)], max_length=40)[0]
    assert res.truncated
    ctx_ids = [model.config.bos_token_id] + tok.encode(ctx)
    cont_ids = tok.encode(ctx + cont)[len(ctx_ids) - 1:]
    ids = torch.tensor((ctx_ids + cont_ids)[-41:])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)
    want = sum(float(lp[len(ids) - 1 - len(cont_ids) + k, t]) for k, t in enumerate(cont_ids))
    assert res.logprob == pytest.approx(want, abs=1e-4)
    too_long = loglikelihood(model, tok, [("x", " " + "word " * 60)], max_length=40)[0]
    assert too_long.error and "does not fit" in too_long.error and math.isnan(too_long.logprob)


# ----------------------------------------------------------------------------------------- task formats, real items

def _check_requests(model, tok, task, want_requests):
    """The task's requests are `want_requests` and its log-likelihoods are the hand computation's."""
    got_requests = [r for d in task.docs for r in task.type.requests(d, T.fewshot_prefix(task, d))]
    assert got_requests == want_requests
    got = loglikelihood(model, tok, got_requests, max_length=1024,
                        options=ScoringOptions(row_tokens=256, batch_rows=2))
    hand = [hand_loglikelihood(model, tok.sp, c, x)[0] for c, x in want_requests]
    assert [r.logprob for r in got] == pytest.approx(hand, abs=1e-4)
    return hand


def _accuracy(hand, docs, sizes, norm_texts=None):
    acc, acc_norm, start = [], [], 0
    for k, (doc, n) in enumerate(zip(docs, sizes)):
        lls = hand[start:start + n]
        acc.append(float(max(range(n), key=lambda i: (lls[i], -i)) == doc.gold))
        if norm_texts is not None:
            normed = [ll / len(c) for ll, c in zip(lls, norm_texts[k])]
            acc_norm.append(float(max(range(n), key=lambda i: (normed[i], -i)) == doc.gold))
        start += n
    return sum(acc) / len(acc), (sum(acc_norm) / len(acc_norm) if acc_norm else None)


def test_arc_reformatted_and_original_layouts(setup, tmp_path):
    model, tok, _ = setup
    rows = [json.loads(line) for line in (BENCH / "arc_easy" / "arc_easy_test.jsonl").open()][:3]
    task = T.load_task(str(BENCH / "arc_easy" / "arc_easy_test.jsonl"), limit=3)
    assert task.type.name == "arc"
    want = [(f"Question: {r['prompt']}\nAnswer:", " " + c) for r in rows for c in r["choices"]]
    hand = _check_requests(model, tok, task, want)
    result = evaluate_multiple_choice(model, tok, task, max_length=1024)
    acc, acc_norm = _accuracy(hand, task.docs, [len(r["choices"]) for r in rows], [r["choices"] for r in rows])
    assert result["n"] == 3 and result["scores"]["acc"] == pytest.approx(acc)
    assert result["scores"]["acc_norm"] == pytest.approx(acc_norm)
    # The original schema, answerKey given as a letter: the same items, the same requests.
    original = tmp_path / "arc_original.jsonl"
    original.write_text("".join(json.dumps({"id": r["id"], "question": r["prompt"], "choices": {
        "text": r["choices"], "label": list("ABCDE"[:len(r["choices"])])}, "answerKey": "ABCDE"[r["answer_idx"]]})
        + "\n" for r in rows))
    task2 = T.load_task(str(original))
    assert task2.type.name == "arc"
    assert [(d.query, d.choices, d.gold) for d in task2.docs] == [(d.query, d.choices, d.gold) for d in task.docs]


def test_mmlu_csv_one_shot_from_the_dev_split(setup):
    model, tok, _ = setup
    test_file = BENCH / "mmlu" / "test" / "abstract_algebra_test.csv"
    task = T.attach_fewshot(T.load_task(str(test_file), limit=2), num_fewshot=1)
    assert task.type.name == "mmlu" and task.num_fewshot == 1
    assert task.fewshot_files == [BENCH / "mmlu" / "dev" / "abstract_algebra_dev.csv"]
    import csv

    dev = list(csv.DictReader((BENCH / "mmlu" / "dev" / "abstract_algebra_dev.csv").open()))[0]
    test = list(csv.DictReader(test_file.open()))[:2]

    def fmt(r):
        return (f"{r['question'].strip()}\nA. {r['choice0']}\nB. {r['choice1']}\nC. {r['choice2']}\n"
                f"D. {r['choice3']}\nAnswer:")

    head = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    shot = fmt(dev) + " " + "ABCD"[int(dev["answer"])] + "\n\n"
    want = [(head + shot + fmt(r), " " + letter) for r in test for letter in "ABCD"]
    hand = _check_requests(model, tok, task, want)
    result = evaluate_multiple_choice(model, tok, task, max_length=1024)
    assert result["scores"]["acc"] == pytest.approx(_accuracy(hand, task.docs, [4, 4])[0])


def test_mmlu_header_less_csv_and_hugging_face_layout(setup, tmp_path):
    q = "What is 2 + 2?"
    (tmp_path / "arithmetic_test.csv").write_text(f'"{q}",3,4,5,6,B\n')
    (tmp_path / "hf.jsonl").write_text(json.dumps({"question": q, "subject": "arithmetic",
                                                   "choices": ["3", "4", "5", "6"], "answer": 1}) + "\n")
    a = T.load_task(str(tmp_path / "arithmetic_test.csv"))
    b = T.load_task(str(tmp_path / "hf.jsonl"))
    assert a.type.name == b.type.name == "mmlu"
    assert (a.docs[0].query, a.docs[0].gold, a.docs[0].subject) == (b.docs[0].query, 1, "arithmetic")
    assert T.fewshot_prefix(a, a.docs[0]) == T.fewshot_prefix(b, b.docs[0]) == \
        "The following are multiple choice questions (with answers) about arithmetic.\n\n"


def test_mmlu_folder_is_one_task_with_subject_subtasks(setup, tmp_path):
    model, tok, _ = setup
    subjects = ["astronomy", "virology", "world_religions"]
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        for s in subjects:
            rows = (BENCH / "mmlu" / split / f"{s}_{split}.csv").read_text().splitlines()
            (tmp_path / "mmlu" / split / f"{s}_{split}.csv").write_text("\n".join(rows[:3]) + "\n")
    task = T.attach_fewshot(T.load_task(str(tmp_path / "mmlu" / "test")), num_fewshot=1)
    assert task.name == "mmlu" and len(task.docs) == 6 and len(task.files) == 3
    assert sorted(task.fewshot) == subjects and task.num_fewshot == 1
    for doc in task.docs:  # each subject's own description and dev example
        prefix = T.fewshot_prefix(task, doc)
        assert prefix.startswith(T.mmlu_description(doc.subject))
        assert task.fewshot[doc.subject][0].query in prefix
    result = evaluate_task(model, tok, task, max_length=1024, options=ScoringOptions(row_tokens=256, batch_rows=4))
    assert result["n"] == 6 and sorted(result["subtasks"]) == subjects
    subject_mean = sum(s["scores"]["acc"] for s in result["subtasks"].values()) / 3
    assert result["scores"]["acc"] == pytest.approx(subject_mean)  # two items each: micro = macro


def test_hellaswag_preprocessing_and_scores(setup):
    model, tok, _ = setup
    rows = [json.loads(line) for line in (BENCH / "hellaswag" / "hellaswag_val_first2000.jsonl").open()][:2]
    task = T.load_task(str(BENCH / "hellaswag" / "hellaswag_val_first2000.jsonl"), limit=2)
    assert task.type.name == "hellaswag"
    want = [(T.hellaswag_preprocess(r["ctx"]), " " + T.hellaswag_preprocess(e)) for r in rows for e in r["endings"]]
    hand = _check_requests(model, tok, task, want)
    result = evaluate_multiple_choice(model, tok, task, max_length=1024)
    endings = [[T.hellaswag_preprocess(e) for e in r["endings"]] for r in rows]
    acc, acc_norm = _accuracy(hand, task.docs, [4, 4], endings)
    assert (result["scores"]["acc"], result["scores"]["acc_norm"]) == pytest.approx((acc, acc_norm))
    assert T.hellaswag_preprocess("How to cook [title] Boil water. [step] Stir") == "How to cook. Boil water. Stir"


def test_hellaswag_original_fields():
    doc = T.TASK_TYPES["hellaswag"].parse("x", {"activity_label": "Baking", "ctx_a": "She mixes flour.",
                                                "ctx_b": "then she", "endings": ["a", "b", "c", "d"], "label": "2"},
                                         subject=None)
    assert doc.query == "Baking: She mixes flour. Then she" and doc.gold == 2


def test_winogrande_partial_scoring(setup):
    model, tok, _ = setup
    rows = [json.loads(line) for line in (BENCH / "winogrande" / "winogrande_1.1_dev.jsonl").open()][:3]
    task = T.load_task(str(BENCH / "winogrande" / "winogrande_1.1_dev.jsonl"), limit=3)
    assert task.type.name == "winogrande"
    want = []
    for r in rows:
        i = r["sentence"].index("_")
        rest = " " + r["sentence"][i + 1:].strip()
        want += [(r["sentence"][:i] + r["option1"], rest), (r["sentence"][:i] + r["option2"], rest)]
    hand = _check_requests(model, tok, task, want)
    result = evaluate_multiple_choice(model, tok, task, max_length=1024)
    assert result["scores"]["acc"] == pytest.approx(_accuracy(hand, task.docs, [2, 2, 2])[0])
    assert "acc_norm" not in result["scores"]


def test_truthfulqa_mc1_and_mc2(setup, tmp_path):
    model, tok, _ = setup
    items = json.loads((BENCH / "truthfulqa" / "mc_task_v0.json").read_text())[:1]
    small = tmp_path / "tqa.json"
    small.write_text(json.dumps(items))
    task = T.load_task(str(small))
    assert task.type.name == "truthfulqa"
    want = []
    for it in items:
        ctx = T.TRUTHFULQA_PROMPT + "\n\nQ: " + it["question"] + "\nA:"
        want += [(ctx, " " + c) for c in list(it["mc1_targets"]) + list(it["mc2_targets"])]
    assert want[0][0].startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    hand = _check_requests(model, tok, task, want)
    result = evaluate_multiple_choice(model, tok, task, max_length=1024)
    mc1, mc2, start = [], [], 0
    for it in items:
        n1, labels = len(it["mc1_targets"]), list(it["mc2_targets"].values())
        lls1, lls2 = hand[start:start + n1], hand[start + n1:start + n1 + len(labels)]
        start += n1 + len(labels)
        mc1.append(float(max(range(n1), key=lambda i: (lls1[i], -i)) == list(it["mc1_targets"].values()).index(1)))
        p = [math.exp(x) for x in lls2]
        mc2.append(sum(pi for pi, y in zip(p, labels) if y) / sum(p))
    assert result["scores"]["mc1"] == pytest.approx(sum(mc1))
    assert result["scores"]["mc2"] == pytest.approx(sum(mc2), rel=1e-6)
    # The Hugging Face layout {choices, labels} parses to the same document.
    hf_row = {"question": items[0]["question"],
              **{key: {"choices": list(items[0][key]), "labels": list(items[0][key].values())}
                 for key in ("mc1_targets", "mc2_targets")}}
    a = T.TASK_TYPES["truthfulqa"].parse("a", hf_row, subject=None)
    assert (a.query, a.choices, a.gold, a.extra) == (task.docs[0].query, task.docs[0].choices, task.docs[0].gold,
                                                     task.docs[0].extra)


def test_belebele_lithuanian_item(setup, tmp_path):
    model, tok, _ = setup
    row = {"flores_passage": "Vilnius yra Lietuvos sostinė. Jame gyvena apie 600 tūkstančių žmonių.",
           "question": "Kokia yra Lietuvos sostinė? ", "mc_answer1": "Kaunas", "mc_answer2": "Vilnius",
           "mc_answer3": "Klaipėda", "mc_answer4": "Šiauliai", "correct_answer_num": "2"}
    path = tmp_path / "lit_Latn.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n")
    task = T.load_task(str(path))
    assert task.type.name == "belebele" and task.docs[0].gold == 1
    ctx = (f"P: {row['flores_passage']}\nQ: Kokia yra Lietuvos sostinė?\nA: Kaunas\nB: Vilnius\nC: Klaipėda\n"
           f"D: Šiauliai\nAnswer:")
    _check_requests(model, tok, task, [(ctx, f" {x}") for x in "ABCD"])


# ---------------------------------------------------------------------------------------------------- generation

def _greedy_by_full_recomputation(model, prompt, steps, eos):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            t = int(model(torch.tensor(ids)[None])[0, -1].argmax())
            if t == eos:
                break
            out.append(t)
            ids.append(t)
    return out


class _IdTokenizer:
    """Decodes ids to visible text, so generation can be tested without a trained tokenizer."""
    pad_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_kv_cache_generation_equals_step_by_step_recomputation(seed):
    config = small_config(sliding_window=6)
    model = random_model(config, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    prompts = [[2] + torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (11, 3, 7, 1)]
    gens = greedy_generate(model, _IdTokenizer(), prompts, max_new_tokens=12, max_length=64, batch_size=3)
    for prompt, gen in zip(prompts, gens):
        assert gen.tokens == _greedy_by_full_recomputation(model, prompt, 12, config.eos_token_id)


def test_generation_stops_at_a_stop_string_and_cuts_it(seed):
    tok = _IdTokenizer()
    prompt = [2, 17, 99, 5]
    # A random model may emit EOS at once; take the first seed whose free generation is long enough to cut.
    for model_seed in range(seed, seed + 50):
        model = random_model(small_config(), seed=model_seed, dtype=torch.float64)
        free = greedy_generate(model, tok, [prompt], max_new_tokens=10, max_length=64)[0]
        if len(free.tokens) >= 4:
            break
    assert len(free.tokens) >= 4, "no random model generated 4 tokens before EOS"
    stop = f"{free.tokens[2]} {free.tokens[3]}"
    stopped = greedy_generate(model, tok, [prompt], max_new_tokens=10, max_length=64, stop=[stop])[0]
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    assert len(stopped.tokens) <= len(free.tokens)
    assert stopped.tokens == free.tokens[:len(stopped.tokens)]


def test_gsm8k_prompt_few_shot_and_scores(setup, tmp_path):
    model, tok, _ = setup
    rows = [json.loads(line) for line in (BENCH / "gsm8k" / "gsm8k_test.jsonl").open()][:4]
    shots, tests = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    shots.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    tests.write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    task = T.attach_fewshot(T.load_task(str(tests)), fewshot=str(shots), num_fewshot=2)
    assert task.type.name == "gsm8k" and task.num_fewshot == 2
    prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:2])
    doc = task.docs[0]
    assert T.fewshot_prefix(task, doc) + doc.query == prefix + f"Question: {rows[2]['question']}\nAnswer:"
    result = evaluate_task(model, tok, task, max_length=1024, options=ScoringOptions(), max_new_tokens=6,
                           gen_batch_size=2)
    prompts = [[2] + tok.encode(prefix + f"Question: {r['question']}\nAnswer:") for r in rows[2:]]
    gens = greedy_generate(model, tok, prompts, max_new_tokens=6, max_length=1024, stop=T.GSM8K_STOP)
    want = [T.TASK_TYPES["gsm8k"].score_generation(d, g.text) for d, g in zip(task.docs, gens)]
    assert result["n"] == 2
    assert result["scores"]["exact_match_strict"] == pytest.approx(sum(w["exact_match_strict"] for w in want) / 2)
    assert [e["generation"] for e in result["examples"]] == [g.text for g in gens]


@pytest.mark.parametrize("text,strict,flexible", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
    ("The answer is 1,234.", "[invalid]", "1,234."),
    ("#### -7.5 and then 12", "-7.5", "12"),
    ("no number here", "[invalid]", "[invalid]"),
])
def test_gsm8k_answer_extraction(text, strict, flexible):
    assert T.gsm8k_extract(text, flexible=False) == strict
    assert T.gsm8k_extract(text, flexible=True) == flexible
    target = T.gsm8k_normalize("so the total is 1234\n#### 1,234")
    assert target == "1234" and T.gsm8k_normalize("$1,234.") == target


def test_gsm8k_extraction_agrees_with_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    texts = ["x = 3\n#### 3", "it is $1,200. Then 7", "#### 5.0.", "answer: -2", "nothing", "12 and 13.5 and $4"]
    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)").apply([[t] for t in texts], [None] * len(texts))
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1).apply(
        [[t] for t in texts], [None] * len(texts))
    assert [T.gsm8k_extract(t, flexible=False) for t in texts] == [s[0] for s in strict]
    assert [T.gsm8k_extract(t, flexible=True) for t in texts] == [f[0] for f in flexible]
    refs = ["so\n#### 3", "#### 1200", "#### 5.0", "#### -2", "#### 1", "#### 4"]
    for pred, ref in zip([f[0] for f in flexible], refs):
        want = exact_match_hf_evaluate([pred], [ref], regexes_to_ignore=list(T.GSM8K_IGNORE), ignore_case=True)
        assert float(T.gsm8k_normalize(pred) == T.gsm8k_normalize(ref)) == want["exact_match"]


# ----------------------------------------------------------------------------------------------------- bad input

def test_unreadable_task_files_are_clear_errors(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 is not valid JSON"):
        T.load_task(str(bad_json))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not UTF-8"):
        T.load_task(str(binary))
    with pytest.raises(UserError, match="not found"):
        T.load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="unknown task file type .txt"):
        (tmp_path / "x.txt").write_text("hello")
        T.load_task(str(tmp_path / "x.txt"))
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="cannot read .*broken.parquet"):
        T.load_task(str(parquet))


def test_unknown_fields_list_what_each_task_type_expects(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"text": "hello", "label": 1}) + "\n")
    with pytest.raises(UserError) as exc:
        T.load_task(str(path))
    message = str(exc.value)
    assert "cannot tell the task type" in message and "label, text" in message
    for name in T.TASK_TYPES:
        assert f"{name}:" in message
    assert "flores_passage" in message and "mc1_targets" in message


def test_answer_index_out_of_range_is_a_reported_skip(setup, tmp_path):
    model, tok, _ = setup
    rows = [json.loads(line) for line in (BENCH / "arc_easy" / "arc_easy_test.jsonl").open()][:3]
    rows[1]["answer_idx"] = 7
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = T.load_task(str(path))
    result = evaluate_task(model, tok, task, max_length=1024, options=ScoringOptions())
    assert result["n"] == 2
    assert result["skipped"]["count"] == 1
    assert result["skipped"]["examples"] == [["arc.jsonl:2", f"answer_idx 7 is out of range for "
                                                             f"{len(rows[1]['choices'])} choices"]]
    rows = [dict(r, answer_idx=9) for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="no item could be scored .*3 skipped.*out of range"):
        evaluate_task(model, tok, T.load_task(str(path)), max_length=1024, options=ScoringOptions())


@pytest.mark.parametrize("row,reason", [
    ({"sentence": "A _ B", "option1": "x", "option2": "y", "answer": "3"}, "out of range"),
    ({"sentence": "no blank", "option1": "x", "option2": "y", "answer": "1"}, "0 blanks"),
    ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}, "not one of"),
    ({"ctx": "c", "endings": ["a", "b"], "label": 5}, "out of range"),
    ({"flores_passage": "p", "question": "q", "mc_answer1": "a", "mc_answer2": "b", "mc_answer3": "c",
      "mc_answer4": "d", "correct_answer_num": "0"}, "out of range"),
    ({"question": "q", "choice0": "a", "choice1": "b", "answer": "E"}, "out of range"),
    ({"question": "q", "mc1_targets": {"a": 0, "b": 0}, "mc2_targets": {"a": 1}}, "no true answer"),
    ({"question": "q", "answer": "no final line"}, "no final"),
])
def test_bad_items_are_skipped_with_their_reason(row, reason):
    kind = next(t for t in T.TASK_TYPES.values() if t.matches(row))
    with pytest.raises(T.ItemError, match=reason):
        kind.parse("x", row, subject=None)


def test_empty_perplexity_inputs_are_clear_errors(setup, tmp_path):
    model, tok, _ = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(UserError, match="holds no text"):
        read_perplexity_input(empty, tok)
    with pytest.raises(UserError, match="unknown corpus format"):
        (tmp_path / "x.csv").write_text("a,b\n")
        read_perplexity_input(tmp_path / "x.csv", tok)
    from trainer.data.tokenize import tokenize_to_store

    store = tmp_path / "store"
    tokenize_to_store([empty], tokenizer=tok.path, out=store)
    data = read_perplexity_input(store, tok)
    with pytest.raises(UserError, match="no document with any token"):
        perplexity_of_input(model, data, max_length=64, stride=32)


def test_token_store_and_corpus_files_give_the_same_perplexity(setup, tmp_path):
    model, tok, _ = setup
    texts = documents(2, max_chars=300) + documents(1, lang="lt", max_chars=300)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in texts))
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(texts) + "\n")
    from trainer.data.tokenize import tokenize_to_store

    tokenize_to_store([txt], tokenizer=tok.path, out=tmp_path / "store")
    results = []
    for data in (read_perplexity_input(jsonl, tok, text_field="body"), read_perplexity_input(txt, tok),
                 read_perplexity_input(tmp_path / "store", tok)):
        results.append(perplexity_of_input(model, data, max_length=64, stride=32))
        assert data.num_bytes == sum(len(t.encode()) for t in texts)
    direct = perplexity_of_texts(model, tok, texts, max_length=64, stride=32)
    for r in results:
        assert (r.tokens, r.bytes) == (direct.tokens, direct.bytes)
        assert r.nll == pytest.approx(direct.nll, rel=1e-9)
    tokenize_to_store([txt], tokenizer=SHARED_DATA / "tokenizers" / "botchan_en_unigram_1000.model",
                      out=tmp_path / "other_store")
    with pytest.raises(UserError, match="another tokenizer"):
        read_perplexity_input(tmp_path / "other_store", tok)
