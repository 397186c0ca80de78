"""`gemma-ewc sweep`: a grid of runs from one starting model, each trained, exported and evaluated, one report;
resumed after a kill; --print for a scheduler and --collect afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import train_tiny_tokenizer
from trainer.cli import main
from trainer.errors import UserError
from trainer.sweep import parse_grid, run_name, split_values

REPO = Path(__file__).resolve().parent.parent
OLD = "the cat sat on a mat and the dog ran to the park while birds sang".split()
NEW = "labas rytas ačiū žodis šuo katė namas upė miškas saulė vakaras".split()


def _lines(words, n, shift):
    return [" ".join(words[(i * shift + j) % len(words)] for j in range(8 + i % 7)) for i in range(n)]


def _cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny base model trained on language A, its Fisher on A, and a config that continues it on B."""
    root = tmp_path_factory.mktemp("sweep")
    for name, words, shift in (("a", OLD, 3), ("b", NEW, 5)):
        lines = _lines(words, 90, shift)
        (root / f"{name}.txt").write_text("\n\n".join(lines[:80]) + "\n")
        (root / f"{name}_heldout.txt").write_text("\n\n".join(lines[80:]) + "\n")
    tokenizer = train_tiny_tokenizer(root / "tok.model", _lines(OLD, 90, 3) + _lines(NEW, 90, 5), vocab_size=300,
                                     hard_vocab_limit=False)
    for name in ("a", "b"):
        _cli("tokenize", root / f"{name}.txt", "--tokenizer", tokenizer, "--out", root / f"store_{name}",
             "--workers", "1")
    common = (f'[model]\npreset = "tiny"\nvocab_size = 300\nattention = "eager"\n'
              f'[data]\ntokenizer = "{tokenizer}"\nseq_len = 32\nbatch_size = 4\n'
              f'[optim]\nlr = 3e-3\nwarmup = 0\n[parallel]\ndevice = "cpu"\n[logging]\nprogress = false\n')
    (root / "base.toml").write_text(common.replace("[optim]\n", "[optim]\nmax_steps = 12\n")
                                    .replace("[data]\n", f'[data]\nstores = ["{root / "store_a"}"]\n'))
    _cli("train", root / "base.toml", "--out", root / "base_run")
    _cli("export", root / "base_run", "--out", root / "base_model", "--dtype", "float32")
    _cli("fisher", "--model", root / "base_model", "--data", root / "a.txt", "--format", "text", "--out",
         root / "ewc.safetensors", "--seq-len", "32", "--max-samples", "8", "--normalize", "mean", "--device", "cpu",
         "--quiet", "--anchor-dtype", "float32")
    (root / "continue.toml").write_text(
        common.replace("[model]\n", f'[model]\npretrained = "{root / "base_model"}"\n')
        .replace('preset = "tiny"\nvocab_size = 300\n', "")
        .replace("[data]\n", f'[data]\nstores = ["{root / "store_b"}"]\n')
        .replace("[optim]\n", "[optim]\nmax_steps = 6\n")
        + f'[ewc]\nfile = "{root / "ewc.safetensors"}"\nanchor_dtype = "float32"\n[checkpoint]\nevery = 2\n')
    return root


def _sweep_args(study, out):
    return ["sweep", str(study / "continue.toml"), "--out", str(out), "--grid", "ewc.lambda=0,100",
            "--eval", "--ppl", f"A={study / 'a_heldout.txt'}", f"B={study / 'b_heldout.txt'}", "--device", "cpu"]


def test_grid_values_split_at_top_level_commas():
    assert split_values("0,1,1e3") == ["0", "1", "1e3"]
    assert split_values("[1,0],[0.95, 0.05]") == ["[1,0]", "[0.95, 0.05]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert parse_grid("data.weights=[1,0],[0.95,0.05]") == ("data.weights", ["[1,0]", "[0.95,0.05]"])
    assert run_name(3, [("ewc.lambda", "100"), ("data.weights", "[0.95, 0.05]")]) == \
        "003-lambda=100_weights=0.95-0.05"
    for bad in ("ewc.lambda", "ewc.lambda=", "ewc.lambda=1,,2", "ewc.lambda=1,1"):
        with pytest.raises(UserError, match="--grid"):
            parse_grid(bad)


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_reports(study, tmp_path, capsys):
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen([sys.executable, "-m", "trainer.cli", *_sweep_args(study, out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = out / "runs" / "001-lambda=100" / "checkpoints"
    deadline = time.monotonic() + 300
    while not second.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)  # the first run is finished, the second one is training
    process.communicate()
    first_results = out / "results" / "000-lambda=0.json"
    assert first_results.is_file() and not (out / "results" / "001-lambda=100.json").exists()
    stamp = first_results.stat().st_mtime_ns

    capsys.readouterr()
    assert main(_sweep_args(study, out)) == 0
    printed = capsys.readouterr().out
    assert "000-lambda=0: done" in printed and "$ gemma-ewc train" in printed
    assert first_results.stat().st_mtime_ns == stamp  # a finished run is skipped
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert sorted(results) == ["000-lambda=0", "001-lambda=100", "base"]
    assert results["001-lambda=100"]["lambda"] == 100.0 and results["000-lambda=0"]["lambda"] == 0.0
    assert all(set(r["perplexity"]) == {"A", "B"} for r in results.values())
    # every model, the base included, is scored at the context the runs trained at
    assert {r["settings"]["max_length"] for r in results.values()} == {32}
    for name in ("000-lambda=0", "001-lambda=100"):  # each run directory is what `train` alone makes
        run_dir = out / "runs" / name
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.jsonl"]
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 7))
    report = (out / "report.md").read_text()
    assert "000-lambda=0" in report and "001-lambda=100" in report and (out / "perplexity_vs_lambda.png").is_file()
    assert "## Pareto frontier" in report and (out / "pareto.png").is_file()
    # EWC holds A closer to the base than λ = 0 does (the direction of the effect, not its size).
    ppl = {k: v["perplexity"]["A"]["perplexity"] for k, v in results.items()}
    assert ppl["001-lambda=100"] < ppl["000-lambda=0"]


def test_print_collect_and_a_changed_grid(study, tmp_path, capsys):
    out = tmp_path / "sweep"
    capsys.readouterr()
    assert main(_sweep_args(study, out) [:6] + ["--print"] + _sweep_args(study, out)[6:]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("gemma-ewc eval --model") and "--label base" in lines[0]
    assert "--max-length 32" in lines[0]
    assert all(" && gemma-ewc export " in line and " && gemma-ewc eval " in line for line in lines[1:])
    assert (out / "commands.txt").read_text().splitlines() == lines
    assert not (out / "runs").exists()  # nothing ran
    assert main(["sweep", "--collect", str(out)]) == 2
    assert "no run has results yet" in capsys.readouterr().err
    changed = _sweep_args(study, out)
    changed[changed.index("ewc.lambda=0,100")] = "ewc.lambda=0,10"
    assert main(changed[:6] + ["--print"] + changed[6:]) == 2
    assert "planned with another config, grid or eval arguments" in capsys.readouterr().err
    bad = _sweep_args(study, tmp_path / "other")
    bad[bad.index("ewc.lambda=0,100")] = "optim.lr=0.1,-1"
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "optim.lr=-1" in err and "optim.lr must be a finite number >= 0" in err
    assert not (tmp_path / "other").exists()  # every run's config is checked before anything is written
