"""`gemma-ewc fisher` and `gemma-ewc ewc ...` end to end on a tiny random model with a tokenizer trained here."""

from __future__ import annotations

import csv
import json
import pickle

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import random_model_dir, rel_err
from tests.test_fisher import train_prompt_tokenizer
from trainer.cli import main
from trainer.ewc import estimate_fisher, load_ewc, read_header
from trainer.ewc.batches import encode_mmlu, prompt_batches
from trainer.hf import load_pretrained, named_hf_parameters
from trainer.task_files import read_mmlu

QUESTIONS = [
    ("Which of these is water?", ["H2O", "CO2", "NaCl", "O2"], 0),
    ("What does a cell need for energy?", ["sand", "glucose", "glass", "iron"], 1),
    ("Which is the largest?", ["one", "ten", "a hundred", "a thousand"], 3),
    ("Which is a question?", ["the answer.", "the cell.", "is it?", "more water."], 2),
    ("What is the first letter?", ["A", "B", "C", "D"], 0),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher_cli")
    import sentencepiece as spm

    tokenizer = train_prompt_tokenizer(root / "tok.model")
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    random_model_dir(root / "model", tokenizer=tokenizer, seed=11, num_layers=2, vocab_size=vocab)
    (root / "short.txt").write_text("{question}\n{options}\nAnswer: {answer}\n")  # fewer tokens: faster tests
    (root / "mmlu").mkdir()
    with open(root / "mmlu" / "general_science_test.csv", "w", newline="") as fh:  # our CSV layout
        w = csv.writer(fh)
        w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        for q, c, a in QUESTIONS[:3]:
            w.writerow([q, *c, a])
    with open(root / "mmlu" / "extra.jsonl", "w") as fh:  # Hugging Face layout: question, subject, choices, answer
        for q, c, a in QUESTIONS[3:]:
            fh.write(json.dumps({"question": q, "subject": "misc", "choices": c, "answer": a}) + "\n")
    return root


def fisher_args(ws, out, *extra):
    return ["fisher", "--model", str(ws / "model"), "--data", str(ws / "mmlu"), "--format", "mmlu", "--out",
            str(out), "--batch-size", "2", "--device", "cpu", "--quiet", "--anchor-dtype", "float32", *extra]


def test_fisher_command_writes_the_estimate_of_its_data(workspace, tmp_path, capsys):
    out = tmp_path / "ewc.safetensors"
    assert main(fisher_args(workspace, out, "--seed", "3")) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_pretrained(workspace / "model")
    state = load_ewc(out, model, strict=True)  # the anchor is the model the Fisher was computed for
    meta = state.metadata
    assert (meta["estimator"], meta["samples"], meta["batches"], meta["batch_size"]) == ("empirical", "5", "3", "2")
    assert meta["scored_tokens"] == "5" and meta["fisher_normalize"] == "none" and len(meta["data_sha256"]) == 64
    assert "{question}" in meta["prompt_template"] and meta["data"].startswith("mmlu:")
    # The same estimate through the Python API, with the CLI's item order (seeded shuffle).
    import numpy as np
    import sentencepiece as spm

    items = read_mmlu(workspace / "mmlu")
    items = [items[i] for i in np.random.default_rng(3).permutation(len(items))]
    sp = spm.SentencePieceProcessor(model_file=str(workspace / "tok.model"))
    expected = estimate_fisher(model, prompt_batches(encode_mmlu(items, sp, bos_id=2), batch_size=2, pad_id=0))
    params = dict(named_hf_parameters(model))
    for n, f in expected.items():
        assert rel_err(state[params[n]][0], f) < 1e-5, n
    normalized = tmp_path / "n.safetensors"
    assert main(fisher_args(workspace, normalized, "--seed", "3", "--normalize", "mean", "--max-samples", "4",
                            "--estimator", "sampled", "--fisher-dtype", "bfloat16", "--prompt-template",
                            str(workspace / "short.txt"))) == 0
    header = read_header(normalized)
    assert header.fisher_dtype == torch.bfloat16 and header.metadata["samples"] == "4"
    assert float(header.metadata["fisher_divisor"]) > 0 and header.metadata["estimator"] == "sampled"
    flat = torch.cat([t.float().reshape(-1) for t in load_ewc(normalized).fisher.values()])
    assert flat.mean().item() == pytest.approx(1.0, rel=1e-2)  # bfloat16 storage rounds


def test_fisher_command_with_fixed_shapes_writes_the_same_estimate(workspace, tmp_path, capsys, monkeypatch):
    """On CUDA the command gives the batches fixed shapes (trainer.ewc.batches); forced here on the CPU: the same
    Fisher, more positions computed, and the closing line says how many were padding."""
    import re

    from trainer.commands import fisher as fisher_command

    short = ("--prompt-template", str(workspace / "short.txt"), "--seed", "4", "--batch-size", "3")
    tight, fixed = tmp_path / "tight.safetensors", tmp_path / "fixed.safetensors"
    assert main(fisher_args(workspace, tight, *short)) == 0
    monkeypatch.setattr(fisher_command, "fixed_batch_shapes", lambda device: True)
    assert main(fisher_args(workspace, fixed, *short)) == 0
    lines = capsys.readouterr().out.splitlines()
    tight_pad, fixed_pad = (float(re.search(r"\(([\d.]+)% padding, \d+ batch shape", line)[1]) for line in lines)
    assert fixed_pad > tight_pad > 0  # tight rows are padded to a multiple of 8, fixed ones to one of 128
    a, b = load_ewc(tight), load_ewc(fixed)
    assert a.metadata["scored_tokens"] == b.metadata["scored_tokens"] == "5"
    for n, f in a.fisher.items():
        assert rel_err(b.fisher[n], f) < 1e-5, n


def test_ewc_merge_and_import_legacy_commands(workspace, tmp_path, capsys):
    a, b, c = (tmp_path / f"{x}.safetensors" for x in "abc")
    short = ("--prompt-template", str(workspace / "short.txt"))
    assert main(fisher_args(workspace, a, "--seed", "1", *short)) == 0
    assert main(fisher_args(workspace, b, "--seed", "2", "--batch-size", "1", *short)) == 0
    assert main(["ewc", "merge", str(a), str(b), "--gamma", "0.5", "--out", str(c)]) == 0
    fa, fb, fc = (load_ewc(p).fisher for p in (a, b, c))
    for n in fa:
        torch.testing.assert_close(fc[n], 0.5 * fa[n] + fb[n])
    model = load_pretrained(workspace / "model").half()
    anchors = [(n, p) for n, p in model.named_parameters()]  # names without "model.": mapped on import
    fisher = {n: torch.full(p.shape, 100.0, dtype=torch.float16) for n, p in model.named_parameters()}
    with open(tmp_path / "EWC_params.pkl", "wb") as fh:
        pickle.dump((anchors, fisher), fh)
    capsys.readouterr()
    assert main(["ewc", "import-legacy", str(tmp_path / "EWC_params.pkl"), "--out", str(tmp_path / "l.st")]) == 0
    total = sum(p.numel() for p in model.parameters())
    assert f"capped infinities: {total:,} Fisher entries equal the cap 100" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_code_2(workspace, tmp_path, capsys):
    assert main(fisher_args(workspace, tmp_path / "x", "--max-samples", "0")) == 2
    assert main(["fisher", "--model", str(tmp_path / "nope"), "--data", "d", "--format", "mmlu", "--out", "o"]) == 2
    (tmp_path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    assert main(["ewc", "import-legacy", str(tmp_path / "evil.pkl"), "--out", str(tmp_path / "o.st")]) == 2
    (tmp_path / "t.txt").write_text("{question} {options} without the answer field")
    assert main(fisher_args(workspace, tmp_path / "x", "--prompt-template", str(tmp_path / "t.txt"))) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("gemma-ewc ") for line in errors)
    assert "refused to load" in errors[2] and "{answer}" in errors[3]
    assert not (tmp_path / "x").exists() and not (tmp_path / "o.st").exists()


def _cli_rank(rank, world, args):
    return main(args)


@pytest.mark.slow
def test_fisher_command_on_two_ranks_equals_one(workspace, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    short = ("--prompt-template", str(workspace / "short.txt"))
    assert main(fisher_args(workspace, one, *short)) == 0
    assert run_distributed(_cli_rank, world_size=2, args=(fisher_args(workspace, two, *short),)) == [0, 0]
    a, b = load_ewc(one), load_ewc(two)
    assert b.metadata["world_size"] == "2" and b.metadata["anchor_sha256"] == a.metadata["anchor_sha256"]
    for n, f in a.fisher.items():
        assert rel_err(b.fisher[n], f) < 1e-4, n


def test_text_rows_are_the_packers_rows(workspace, tmp_path):
    """The Fisher's text rows are training's (trainer.data): the contract it relies on, checked token by token."""
    import sentencepiece as spm

    from trainer.ewc.batches import text_rows

    sp = spm.SentencePieceProcessor(model_file=str(workspace / "tok.model"))
    docs = ["the water of the cell", "energy", "more about the question and the answer of all"]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n\n\n")
    rows, files = text_rows(tmp_path / "c.txt", tokenizer=workspace / "tok.model", seq_len=8, pad_id=0)
    assert files == [tmp_path / "c.txt"]
    stream = [t for d in docs for t in [2, *sp.encode(d), 1]]
    n = len(stream)
    ids, labels, pos = (rows[k].reshape(-1) for k in ("input_ids", "labels", "position_ids"))
    assert rows["input_ids"].shape == (-(-n // 8), 8) and ids[:n].tolist() == stream and (ids[n:] == 0).all()
    starts = [i for i, t in enumerate(stream) if t == 2]
    assert [i for i in range(n) if pos[i] == 0] == starts  # positions restart at each BOS, count on across rows
    for i in range(len(ids) - 1):
        expected = stream[i + 1] if i + 1 < n and i + 1 not in starts else -100
        assert labels[i] == expected, i
    assert labels[-1] == -100
    for max_rows in (1, 2):  # stops reading early, and the rows are the first rows of the whole corpus
        first, _ = text_rows(tmp_path / "c.txt", tokenizer=workspace / "tok.model", seq_len=8, pad_id=0,
                             max_rows=max_rows)
        assert all((first[k] == rows[k][:max_rows]).all() for k in rows)


def test_fisher_command_text_format(workspace, tmp_path):
    (tmp_path / "corpus.txt").write_text("the water of the cell\nand more\n\nenergy for all\n\nthe question\n")
    out = tmp_path / "t.safetensors"
    args = fisher_args(workspace, out, "--seq-len", "16")
    args[args.index("--data") + 1], args[args.index("--format") + 1] = str(tmp_path / "corpus.txt"), "text"
    assert main(args) == 0
    meta = read_header(out).metadata
    assert meta["data"].startswith("text:") and meta["seq_len"] == "16" and int(meta["samples"]) >= 2
    from trainer.ewc.batches import row_batches, text_rows

    rows, _ = text_rows(tmp_path / "corpus.txt", tokenizer=workspace / "tok.model", seq_len=16, pad_id=0)
    expected = estimate_fisher(load_pretrained(workspace / "model"), row_batches(rows, batch_size=2, pad_id=0))
    for n, f in load_ewc(out).fisher.items():
        assert rel_err(f, expected[n]) < 1e-5, n
