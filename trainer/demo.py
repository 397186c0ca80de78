"""The demo: the whole pipeline on CPU in minutes, on the project's own synthetic texts (`gemma-ewc demo`,
trainer/commands/demo.py).

    rows = demo(Path("runs/demo"), DemoSettings(), lam=100.0)   # [{model, lambda, ppl_a, ppl_b}] per model

1. Texts A and B (default: two synthetic languages, trainer/synthetic.py), each split into train and held-out.
2. A SentencePiece tokenizer trained on both; `gemma-ewc tokenize` turns each training text into a token store.
3. A small Gemma2 is pretrained on A (`gemma-ewc train`) and exported: the "base" model.
4. Its Fisher is estimated on A (`gemma-ewc fisher --format text`, normalised to mean 1).
5. The base continues on B twice: with λ = 0 (plain continued pretraining) and with λ > 0 (EWC).
6. All three are evaluated on held-out A and B (`gemma-ewc eval --ppl`); `gemma-ewc report` writes the table and
   the perplexity-vs-λ plot.

Every stage is the real command a user would run (printed as it starts), so the demo's outputs double as a
worked example. The expected picture, as in the reference study: λ = 0 learns B and forgets A; λ > 0 forgets much
less of A while still learning B.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from trainer import cli
from trainer.config import load_config
from trainer.data.readers import read_documents
from trainer.distributed import process_group_scope
from trainer.errors import UserError
from trainer.synthetic import generate
from trainer.train import train


@dataclass(frozen=True)
class DemoSettings:
    documents: int = 1600  # per language
    heldout_fraction: float = 0.1
    vocab_size: int = 512
    seq_len: int = 128
    batch_size: int = 16
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    continue_steps: int = 150
    continue_lr: float = 1e-3
    ewc_lambda: float = 100.0
    fisher_samples: int = 256


MARKER = "demo.json"  # written first: marks the folder as a demo's output (`demo --overwrite` may replace it)
QUICK = DemoSettings(documents=800, pretrain_steps=150, continue_steps=80, fisher_samples=64)


def _split(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    cut = max(1, int(len(documents) * (1 - fraction)))
    if cut >= len(documents):
        raise UserError(f"need at least 2 documents per text to hold some out, got {len(documents)}")
    return documents[:cut], documents[cut:]


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


def _cli(*argv: str) -> None:
    print(f"\n$ gemma-ewc {shlex.join(argv)}", flush=True)
    code = cli.main(list(argv))
    if code:
        raise UserError(f"the demo stage `gemma-ewc {argv[0]}` failed (exit {code})")


def _train(out: Path, name: str, overrides: list[str]) -> None:
    print(f"\n$ gemma-ewc train --out {out / 'runs' / name} " + " ".join(f"--set {o}" for o in overrides),
          flush=True)
    config = load_config(None, overrides)
    with process_group_scope():
        train(config, out / "runs" / name)


def demo(out: Path, settings: DemoSettings, *, lam: float, text_a: str | None = None,
         text_b: str | None = None) -> list[dict]:
    """Run every stage into `out`; returns the summary rows (base, λ = 0, λ > 0)."""
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    (out / MARKER).write_text(json.dumps({"settings": dataclasses.asdict(s), "lambda": lam, "text_a": text_a,
                                          "text_b": text_b}, indent=2) + "\n")
    texts = _texts(text_a, text_b, s, out)
    tokenizer = _train_tokenizer(texts, s, out)
    for key in ("a", "b"):
        _cli("tokenize", str(texts[key]["train"]), "--tokenizer", str(tokenizer), "--out", str(out / "data" / key),
             "--workers", "1", "--overwrite")
    common = ["model.preset=tiny", f"model.vocab_size={s.vocab_size}", "model.attention=eager",
              f"data.tokenizer='{tokenizer}'", f"data.seq_len={s.seq_len}", f"data.batch_size={s.batch_size}",
              "optim.warmup=0.05", "optim.weight_decay=0.0", "optim.min_lr_ratio=0.1", "checkpoint.keep=1",
              "logging.every=10", "parallel.device=cpu"]
    _train(out, "base", common + [f"data.stores=['{out / 'data' / 'a'}']", f"optim.max_steps={s.pretrain_steps}",
                                  f"optim.lr={s.pretrain_lr}"])
    _cli("export", str(out / "runs" / "base"), "--out", str(out / "models" / "base"), "--dtype", "float32",
         "--tokenizer", str(tokenizer))
    ewc_file = out / "ewc.safetensors"
    _cli("fisher", "--model", str(out / "models" / "base"), "--data", str(texts["a"]["train"]), "--format", "text",
         "--out", str(ewc_file), "--seq-len", str(s.seq_len), "--batch-size", "8", "--max-samples",
         str(s.fisher_samples), "--normalize", "mean", "--fisher-dtype", "float32", "--anchor-dtype", "float32",
         "--device", "cpu", "--quiet")
    runs = {"lambda0": 0.0, "ewc": lam}
    for name, value in runs.items():
        overrides = common + [f"model.pretrained='{out / 'models' / 'base'}'",
                              f"data.stores=['{out / 'data' / 'b'}']", f"optim.max_steps={s.continue_steps}",
                              f"optim.lr={s.continue_lr}"]
        if value > 0:
            overrides += [f"ewc.file='{ewc_file}'", f"ewc.lambda={value}", "ewc.anchor_dtype=float32"]
        _train(out, name, overrides)
        _cli("export", str(out / "runs" / name), "--out", str(out / "models" / name), "--dtype", "float32",
             "--tokenizer", str(tokenizer))
    results = []
    for name, value in [("base", None), *runs.items()]:
        result = out / "results" / f"{name}.json"
        extra = ["--lambda", repr(value)] if value is not None else []
        _cli("eval", "--model", str(out / "models" / name), "--ppl", f"A={texts['a']['heldout']}",
             f"B={texts['b']['heldout']}", "--out", str(result), "--label", name, "--device", "cpu", *extra)
        results.append(result)
    # The plots go beside the demo's other outputs, into its own (non-empty) folder.
    _cli("report", *map(str, results), "--out", str(out / "report.md"), "--plots", str(out), "--base", "base",
         "--overwrite")
    table = summary_table(results)
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


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
