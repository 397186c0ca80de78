"""The demo: the whole pipeline on CPU in minutes, on the project's own synthetic texts (`gemma-ewc demo`,
trainer/commands/demo.py).

    rows = demo(Path("runs/demo"), DemoSettings())   # [{model, lambda, ppl_a, ppl_b}]: the base, then each λ

1. Texts A and B (default: two synthetic languages, trainer/synthetic.py), each split into train and held-out.
2. A SentencePiece tokenizer trained on both; `gemma-ewc tokenize` turns each training text into a token store.
3. A small Gemma2 is pretrained on A (`gemma-ewc train base.toml`) and exported: the "base" model.
4. Its Fisher is estimated on A (`gemma-ewc fisher --format text`, normalised to mean 1).
5. `gemma-ewc sweep continue.toml --grid ewc.lambda=...`: the base continues on B once per λ (λ = 0 is plain
   continued pretraining), each run is exported and evaluated on held-out A and B with the base model, and
   `gemma-ewc report` writes the tables, the Pareto plot (A against B) and the perplexity-vs-λ plot.

Every stage is the real command a user would run (printed as it starts), and the two configs stay in the output
folder, so the demo doubles as a worked example. The expected picture, as in the reference study: λ = 0 learns B
and forgets A; growing λ trades the one for the other, until a large λ holds the model at the base.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sentencepiece as spm
import torch

from trainer.data.readers import read_documents
from trainer.errors import UserError
from trainer.model import Gemma2, Gemma2Config
from trainer.synthetic import generate
from trainer.sweep import BASE, run_stage


@dataclass(frozen=True)
class DemoSettings:
    documents: int = 1600  # per language
    heldout_fraction: float = 0.1
    heldout_max_chars: int = 60_000  # per text: scoring long real texts would dominate the demo's time
    vocab_size: int = 512
    seq_len: int = 128
    batch_size: int = 16
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    continue_steps: int = 150
    continue_lr: float = 1e-3
    lambdas: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)  # the sweep's grid
    fisher_samples: int = 256


MARKER = "demo.json"  # written first: marks the folder as a demo's output (`demo --overwrite` may replace it)
QUICK = DemoSettings(documents=800, pretrain_steps=150, continue_steps=80, fisher_samples=64)


def _split(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    cut = max(1, int(len(documents) * (1 - fraction)))
    if cut >= len(documents):
        raise UserError(f"need at least 2 documents per text to hold some out, got {len(documents)}")
    return documents[:cut], documents[cut:]


def _at_most(documents: list[str], chars: int) -> list[str]:
    """The first documents, up to `chars` characters in all (at least one)."""
    kept, total = [], 0
    for doc in documents:
        if kept and total + len(doc) > chars:
            break
        kept.append(doc)
        total += len(doc)
    return kept


def estimate_seconds(settings: DemoSettings, runs: int) -> float:
    """The demo's time on this machine, from two timed training steps of its model (a rough guide: +-30%)."""
    s = settings
    model = Gemma2(Gemma2Config.preset("tiny", vocab_size=s.vocab_size), attention_backend="eager")
    model.init_weights()
    ids = torch.randint(0, s.vocab_size, (s.batch_size, s.seq_len))
    times = []
    for _ in range(3):  # the first one warms up
        start = time.perf_counter()
        model(ids, labels=ids).backward()
        times.append(time.perf_counter() - start)
    step = min(times[1:]) * 1.25  # the optimizer step, the loader and logging
    steps = s.pretrain_steps + runs * s.continue_steps
    # Fisher ~ a forward + backward per sample row; evaluation ~ a forward (a third of a step) per held-out token
    # for each model; about 3 s of start-up per stage.
    fisher = s.fisher_samples / s.batch_size * step
    scoring = (runs + 1) * 2 * s.heldout_max_chars / 4 / (s.batch_size * s.seq_len) * step / 3
    return steps * step + fisher + scoring + 3 * (6 + 3 * runs)


def _write_documents(path: Path, documents: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(d.strip() for d in documents) + "\n")
    return path


def _texts(text_a: str | None, text_b: str | None, settings: DemoSettings, out: Path) -> dict[str, dict[str, Path]]:
    texts = {}
    for key, given in (("a", text_a), ("b", text_b)):
        if given:
            if not Path(given).is_file():
                raise UserError(f"--text-{key} {given} not found")
            docs = [d for d in read_documents(given) if d.strip()]
        else:
            docs = generate(key, documents=settings.documents, seed=0)
        train, heldout = _split(docs, settings.heldout_fraction)
        heldout = _at_most(heldout, settings.heldout_max_chars)
        texts[key] = {"train": _write_documents(out / "texts" / f"{key}_train.txt", train),
                      "heldout": _write_documents(out / "texts" / f"{key}_heldout.txt", heldout)}
    return texts


def _train_tokenizer(texts, settings: DemoSettings, out: Path) -> Path:
    prefix = out / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=[str(texts[k]["train"]) for k in ("a", "b")], model_prefix=str(prefix),
        vocab_size=settings.vocab_size, model_type="unigram", character_coverage=1.0, byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, input_sentence_size=200_000, shuffle_input_sentence=True,
        num_threads=2, minloglevel=2)
    return prefix.with_suffix(".model")


def _toml_config(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def demo(out: Path, settings: DemoSettings, *, lambdas: Sequence[float] | None = None, text_a: str | None = None,
         text_b: str | None = None) -> list[dict]:
    """Run every stage into `out`; returns the summary rows (the base, then one per λ, in λ order)."""
    s = settings
    lambdas = sorted({0.0, *(s.lambdas if lambdas is None else lambdas)})
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"settings": dataclasses.asdict(s), "lambdas": lambdas, "text_a": text_a,
                                          "text_b": text_b}, indent=2) + "\n")
    estimate = estimate_seconds(s, len(lambdas))
    print(f"# demo: {len(lambdas)} continued runs (λ = {', '.join(f'{x:g}' for x in lambdas)}); estimated "
          f"{estimate / 60:.1f} minutes on this machine", flush=True)
    texts = _texts(text_a, text_b, s, out)
    tokenizer = _train_tokenizer(texts, s, out)
    for key in ("a", "b"):
        run_stage(["tokenize", str(texts[key]["train"]), "--tokenizer", str(tokenizer), "--out",
                   str(out / "data" / key), "--workers", "1", "--overwrite"])
    common = {
        "data": {"tokenizer": str(tokenizer), "seq_len": s.seq_len, "batch_size": s.batch_size},
        "optim": {"warmup": 0.05, "weight_decay": 0.0, "min_lr_ratio": 0.1},
        "parallel": {"device": "cpu"}, "checkpoint": {"keep": 1}, "logging": {"every": 10},
    }
    base = _toml_config(out / "base.toml", {
        "model": {"preset": "tiny", "vocab_size": s.vocab_size, "attention": "eager"},
        "data": {**common["data"], "stores": [str(out / "data" / "a")]},
        "optim": {**common["optim"], "max_steps": s.pretrain_steps, "lr": s.pretrain_lr},
        **{k: v for k, v in common.items() if k not in ("data", "optim")}})
    run_stage(["train", str(base), "--out", str(out / "runs" / "base")])
    run_stage(["export", str(out / "runs" / "base"), "--out", str(out / "models" / "base"), "--dtype", "float32",
               "--tokenizer", str(tokenizer)])
    ewc_file = out / "ewc.safetensors"
    run_stage(["fisher", "--model", str(out / "models" / "base"), "--data", str(texts["a"]["train"]), "--format",
               "text", "--out", str(ewc_file), "--seq-len", str(s.seq_len), "--batch-size", "8", "--max-samples",
               str(s.fisher_samples), "--normalize", "mean", "--fisher-dtype", "float32", "--anchor-dtype",
               "float32", "--device", "cpu", "--quiet"])
    continued = _toml_config(out / "continue.toml", {
        "model": {"pretrained": str(out / "models" / "base"), "attention": "eager"},
        "data": {**common["data"], "stores": [str(out / "data" / "b")]},
        "optim": {**common["optim"], "max_steps": s.continue_steps, "lr": s.continue_lr},
        "ewc": {"file": str(ewc_file), "anchor_dtype": "float32"},
        **{k: v for k, v in common.items() if k not in ("data", "optim")}})
    grid = ",".join(f"{lam:g}" for lam in lambdas)
    run_stage(["sweep", str(continued), "--out", str(out / "sweep"), "--grid", f"ewc.lambda={grid}",
               "--old", "A", "--new", "B", "--eval", "--ppl", f"A={texts['a']['heldout']}",
               f"B={texts['b']['heldout']}", "--device", "cpu"])
    results = sorted((out / "sweep" / "results").glob("*.json"))
    rows = summary_table([p for p in results if p.stem == BASE] + [p for p in results if p.stem != BASE])
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def summary_table(result_files: list[Path]) -> list[dict]:
    """Perplexity on held-out A and B per model, from the eval results files."""
    rows = []
    for path in result_files:
        data = json.loads(Path(path).read_text())
        ppl = data["perplexity"]
        rows.append({"model": data.get("label"), "lambda": data.get("lambda"), "ppl_a": ppl["A"]["perplexity"],
                     "ppl_b": ppl["B"]["perplexity"]})
    return rows


def format_summary(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| model | λ | perplexity on held-out A (old) | perplexity on held-out B (new) |", "|---|---|---|---|"]
    for r in rows:
        lam = "—" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"| {r['model']} | {lam} | {r['ppl_a']:.2f} ({r['ppl_a'] / base['ppl_a']:.2f}x base) | "
                     f"{r['ppl_b']:.2f} ({r['ppl_b'] / base['ppl_b']:.2f}x base) |")
    return "\n".join(lines)
