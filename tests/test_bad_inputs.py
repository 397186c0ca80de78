"""The bad-input suite: for every command, bad inputs run through the real command line in this process.

Each case must end with exit code 2 and exactly one line on stderr that names the path at fault, no traceback,
and leave every file of the workspace byte-identical (nothing written, nothing deleted, no input touched).
Then property-based damage (random truncations and byte flips) of an EWC file, a token store and a checkpoint:
reading them gives a clear UserError or a valid result, never another exception.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import random_documents, random_model_dir, train_tiny_tokenizer, write_token_store
from trainer.cli import main
from trainer.errors import UserError

VOCAB = 300
WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in old green trees".split()


def _cli(*argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        return int(exc.code)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with one of everything the commands read: corpus, tokenizer, token store, model, EWC file,
    training run, eval results, a legacy pickle."""
    root = tmp_path_factory.mktemp("bad_inputs")
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12 + i % 9)) for i in range(120)]
    (root / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tokenizer = train_tiny_tokenizer(root / "tok.model", lines, vocab_size=VOCAB, hard_vocab_limit=False)
    assert _cli("tokenize", root / "corpus.jsonl", "--tokenizer", tokenizer, "--out", root / "store",
                "--workers", "1") == 0
    random_model_dir(root / "model", tokenizer=tokenizer, seed=3, num_layers=2, vocab_size=VOCAB)
    assert _cli("fisher", "--model", root / "model", "--data", root / "corpus.txt", "--format", "text", "--out",
                root / "ewc.safetensors", "--seq-len", "32", "--max-samples", "4", "--device", "cpu",
                "--quiet") == 0
    store = write_token_store(root / "train_store", random_documents(60, vocab_size=VOCAB, mean_length=20),
                              vocab_size=VOCAB)
    (root / "run.toml").write_text(
        f'[model]\npreset = "tiny"\nvocab_size = {VOCAB}\nattention = "eager"\n'
        f'[data]\nstores = ["{store}"]\nseq_len = 16\nbatch_size = 2\n'
        f'[optim]\nmax_steps = 2\n[parallel]\ndevice = "cpu"\n[logging]\nprogress = false\n')
    assert _cli("train", root / "run.toml", "--out", root / "run") == 0
    assert _cli("eval", "--model", root / "model", "--ppl", f"c={root / 'corpus.txt'}", "--device", "cpu",
                "--out", root / "results.json", "--limit", "4") == 0
    with open(root / "EWC_params.pkl", "wb") as fh:
        pickle.dump(([("model.norm.weight", torch.zeros(4).half())], {"model.norm.weight": torch.ones(4).half()}),
                    fh)
    (root / "precious").mkdir()
    (root / "precious" / "notes.txt").write_text("keep me")
    results = json.loads((root / "results.json").read_text())
    results["perplexity"]["c"]["perplexity"] = "low"
    (root / "broken_results.json").write_text(json.dumps(results))
    (root / "truncated.safetensors").write_bytes((root / "ewc.safetensors").read_bytes()[:300])
    return root


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# (case id, argv with {ws} for the workspace, the text stderr must name)
CASES = [
    ("tokenize: missing input", ["tokenize", "{ws}/nope.jsonl", "--tokenizer", "{ws}/tok.model", "--out",
                                 "{ws}/s2"], "{ws}/nope.jsonl"),
    ("tokenize: missing tokenizer", ["tokenize", "{ws}/corpus.jsonl", "--tokenizer", "{ws}/nope.model", "--out",
                                     "{ws}/s2"], "{ws}/nope.model"),
    ("tokenize: out over its input", ["tokenize", "{ws}/corpus.jsonl", "--tokenizer", "{ws}/tok.model", "--out",
                                      "{ws}/corpus.jsonl", "--overwrite"], "{ws}/corpus.jsonl"),
    ("tokenize: out holds its input", ["tokenize", "{ws}/corpus.jsonl", "--tokenizer", "{ws}/tok.model", "--out",
                                       "{ws}", "--overwrite"], "{ws}"),
    ("tokenize: out a non-empty folder", ["tokenize", "{ws}/corpus.jsonl", "--tokenizer", "{ws}/tok.model",
                                          "--out", "{ws}/precious"], "{ws}/precious"),
    ("tokenize: out a folder that is no store", ["tokenize", "{ws}/corpus.jsonl", "--tokenizer", "{ws}/tok.model",
                                                 "--out", "{ws}/precious", "--overwrite"], "{ws}/precious"),
    ("fisher: missing model", ["fisher", "--model", "{ws}/nomodel", "--data", "{ws}/corpus.txt", "--format", "text",
                               "--out", "{ws}/f.safetensors"], "{ws}/nomodel"),
    ("fisher: out exists", ["fisher", "--model", "{ws}/model", "--data", "{ws}/corpus.txt", "--format", "text",
                            "--out", "{ws}/ewc.safetensors"], "{ws}/ewc.safetensors"),
    ("fisher: out a folder", ["fisher", "--model", "{ws}/model", "--data", "{ws}/corpus.txt", "--format", "text",
                              "--out", "{ws}/precious"], "{ws}/precious"),
    ("fisher: out over its data", ["fisher", "--model", "{ws}/model", "--data", "{ws}/corpus.txt", "--format",
                                   "text", "--out", "{ws}/corpus.txt", "--overwrite"], "{ws}/corpus.txt"),
    ("ewc merge: truncated file", ["ewc", "merge", "{ws}/truncated.safetensors", "{ws}/ewc.safetensors",
                                   "--gamma", "1", "--out", "{ws}/m.safetensors"], "{ws}/truncated.safetensors"),
    ("ewc merge: out over an input", ["ewc", "merge", "{ws}/ewc.safetensors", "{ws}/ewc.safetensors", "--gamma",
                                      "1", "--out", "{ws}/ewc.safetensors", "--overwrite"], "{ws}/ewc.safetensors"),
    ("ewc merge: out a folder", ["ewc", "merge", "{ws}/ewc.safetensors", "{ws}/ewc.safetensors", "--gamma", "1",
                                 "--out", "{ws}/precious"], "{ws}/precious"),
    ("import-legacy: out over the pickle", ["ewc", "import-legacy", "{ws}/EWC_params.pkl", "--out",
                                            "{ws}/EWC_params.pkl", "--overwrite"], "{ws}/EWC_params.pkl"),
    ("import-legacy: out a folder", ["ewc", "import-legacy", "{ws}/EWC_params.pkl", "--out", "{ws}/precious"],
     "{ws}/precious"),
    ("import-legacy: missing pickle", ["ewc", "import-legacy", "{ws}/nope.pkl", "--out", "{ws}/l.safetensors"],
     "{ws}/nope.pkl"),
    ("train: missing config", ["train", "{ws}/nope.toml", "--out", "{ws}/r2"], "{ws}/nope.toml"),
    ("train: out over a token store", ["train", "{ws}/run.toml", "--out", "{ws}/train_store"],
     "{ws}/train_store"),
    ("train: out a folder of other files", ["train", "{ws}/run.toml", "--out", "{ws}/precious"], "{ws}/precious"),
    ("train: NaN learning rate", ["train", "{ws}/run.toml", "--out", "{ws}/r2", "--set", "optim.lr=nan"],
     "optim.lr"),
    ("train: fractional warm-up steps", ["train", "{ws}/run.toml", "--out", "{ws}/r2", "--set",
                                         "optim.warmup=2.5"], "optim.warmup"),
    ("export: missing checkpoint", ["export", "{ws}/norun", "--out", "{ws}/x"], "{ws}/norun"),
    ("export: out over the run", ["export", "{ws}/run", "--out", "{ws}/run", "--overwrite"], "{ws}/run"),
    ("export: out holds the run", ["export", "{ws}/run", "--out", "{ws}", "--overwrite"], "{ws}"),
    ("export: out a non-empty folder", ["export", "{ws}/run", "--out", "{ws}/precious"], "{ws}/precious"),
    ("export: out a folder that is no model", ["export", "{ws}/run", "--out", "{ws}/precious", "--overwrite"],
     "{ws}/precious"),
    ("export: out over the tokenizer", ["export", "{ws}/run", "--out", "{ws}/tok.model", "--tokenizer",
                                        "{ws}/tok.model", "--overwrite"], "{ws}/tok.model"),
    ("eval: missing model", ["eval", "--model", "{ws}/nomodel", "--ppl", "{ws}/corpus.txt"], "{ws}/nomodel"),
    ("eval: missing corpus", ["eval", "--model", "{ws}/model", "--ppl", "{ws}/nope.txt", "--device", "cpu"],
     "{ws}/nope.txt"),
    ("eval: out a folder", ["eval", "--model", "{ws}/model", "--ppl", "{ws}/corpus.txt", "--out", "{ws}/precious"],
     "{ws}/precious"),
    ("eval: out over its corpus", ["eval", "--model", "{ws}/model", "--ppl", "c={ws}/corpus.txt", "--out",
                                   "{ws}/corpus.txt", "--overwrite"], "{ws}/corpus.txt"),
    ("eval: out exists", ["eval", "--model", "{ws}/model", "--ppl", "{ws}/corpus.txt", "--out",
                          "{ws}/results.json"], "{ws}/results.json"),
    ("report: missing results", ["report", "{ws}/nope.json", "--out", "{ws}/r.md"], "{ws}/nope.json"),
    ("report: a broken field", ["report", "{ws}/broken_results.json", "--out", "{ws}/r.md"],
     "{ws}/broken_results.json: field perplexity.c.perplexity"),
    ("report: out over its input", ["report", "{ws}/results.json", "--out", "{ws}/results.json", "--overwrite"],
     "{ws}/results.json"),
    ("report: plots into a file", ["report", "{ws}/results.json", "--out", "{ws}/r.md", "--plots",
                                   "{ws}/corpus.txt", "--overwrite"], "{ws}/corpus.txt"),
    ("demo: out a non-empty folder", ["demo", "--out", "{ws}/precious"], "{ws}/precious"),
    ("demo: out a folder that is no demo", ["demo", "--out", "{ws}/precious", "--overwrite"], "{ws}/precious"),
    ("profile: missing config", ["profile", "{ws}/nope.toml", "--out", "{ws}/p"], "{ws}/nope.toml"),
]


@pytest.mark.parametrize("argv, names", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(ws, capsys, argv, names):
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    names = names.replace("{ws}", str(ws))
    before = _snapshot(ws)
    capsys.readouterr()
    code = _cli(*argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gemma-ewc") and "error" in lines[0] and names in lines[0], lines[0]
    assert _snapshot(ws) == before  # nothing written, nothing deleted, every input byte-identical


# ------------------------------------------------------------------------------------ damage, property-based

DAMAGE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _damaged(source: Path, target: Path, data: st.DataObject) -> None:
    raw = bytearray(source.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1), label="at")] ^= data.draw(st.integers(1, 255), label="mask")
    target.write_bytes(bytes(raw))


@DAMAGE
@given(data=st.data())
def test_a_damaged_ewc_file_is_a_clear_error_or_reads_valid(ws, tmp_path, data):
    from trainer.ewc import load_ewc

    target = tmp_path / "damaged.safetensors"
    _damaged(ws / "ewc.safetensors", target, data)
    try:
        state = load_ewc(target)
    except UserError as exc:
        assert str(target) in str(exc)
        return
    for name, fisher in state.fisher.items():  # what loads is what the file promises: finite, F >= 0
        assert torch.isfinite(fisher).all() and (fisher >= 0).all() and torch.isfinite(state.anchor[name]).all()


@DAMAGE
@given(data=st.data())
def test_a_damaged_token_store_is_a_clear_error_before_its_tokens_are_used(ws, tmp_path, data):
    from trainer.data.store import TokenStore

    store = tmp_path / "store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(ws / "store", store)
    victim = data.draw(st.sampled_from(sorted(p.name for p in store.iterdir())), label="file")
    _damaged(ws / "store" / victim, store / victim, data)
    changed = (store / victim).read_bytes() != (ws / "store" / victim).read_bytes()
    try:
        TokenStore(store).verify()
    except UserError as exc:
        assert str(store) in str(exc)
        return
    # Only a change that leaves every hash, size and offset as it was may pass: the manifest's formatting.
    assert not changed or victim == "manifest.json"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_checkpoint_is_skipped_or_loads(ws, tmp_path, data):
    from trainer.checkpoint import complete_checkpoints

    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ws / "run", run)
    step = complete_checkpoints(run / "checkpoints")[0]
    victim = data.draw(st.sampled_from(sorted(p.name for p in step.iterdir() if p.is_file())), label="file")
    _damaged(step / victim, step / victim, data)
    # Resuming the damaged run: either the checkpoint still loads (a harmless change) and training goes on, or it
    # is skipped with a warning and, as it is the only one, the run stops with one clear line.
    config = ws / "run.toml"
    code = _cli("train", config, "--out", run, "--set", "optim.max_steps=3")
    assert code in (0, 2)
