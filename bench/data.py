"""`gemma-ewc bench data`: tokenization and packing/loading throughput, each next to its anchor.

- Tokenization: `tokenize_to_store` with N worker processes (reading JSON Lines, parsing, encoding, writing the
  store, process start-up included) vs raw SentencePiece batch encoding of the same documents, already in memory,
  in one process, times N. Target: >= 80%.
- Packing + loading: `PackedLoader` batches (input_ids, labels, position_ids: 24 bytes per token) vs a plain
  memory copy of the same bytes: each batch's 3 x batch x seq_len int64 copied from a source far larger than the
  caches into fresh arrays, as a loader of pre-packed rows would. Target: >= 50%. The project's copy-bandwidth
  ceiling (bench.common.copy_bandwidth, both sides in DRAM) is reported beside it.

Without --text the corpus is generated (seeded pseudo-words, log-normal document lengths); without --tokenizer
a SentencePiece model (Gemma-like ids: pad 0, EOS 1, BOS 2, unk 3) is trained on it first. Nothing here needs
../shared.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import copy_bandwidth, device_name, format_table, machine_info, write_results
from trainer.data.loader import PackedLoader
from trainer.data.readers import ReadStats, read_documents
from trainer.data.store import TokenStore
from trainer.data.tokenize import _Encoder, default_workers, load_tokenizer, tokenize_to_store

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synthetic_corpus(path: Path, *, megabytes: float, seed: int = 0, mean_words: int = 400) -> int:
    """Write a JSON Lines corpus of pseudo-text (Zipf-distributed pseudo-words); returns the document count."""
    rng = np.random.default_rng(seed)
    syllables = np.array([c + v for c in "bcdfghjklmnprstvz" for v in ["a", "e", "i", "o", "u", "ai", "ou", "ie"]])
    n_words = 30_000
    parts = rng.integers(0, len(syllables), size=(n_words, 4))
    sizes = rng.integers(1, 5, size=n_words)
    words = np.array(["".join(syllables[p[:k]]) for p, k in zip(parts, sizes)])
    zipf = 1.0 / np.arange(1, n_words + 1)
    zipf /= zipf.sum()
    target = int(megabytes * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            n = max(1, int(rng.lognormal(np.log(mean_words) - 0.5, 1.0)))
            idx = rng.choice(n_words, size=n, p=zipf)
            text = " ".join(words[idx].tolist())
            # sentences: a full stop every ~15 words
            cut = np.sort(rng.choice(max(n, 2), size=max(1, n // 15), replace=False))
            toks = text.split(" ")
            for c in cut.tolist():
                if c < len(toks):
                    toks[c] += "."
            line = json.dumps({"text": " ".join(toks), "id": docs}, ensure_ascii=False)
            fh.write(line + "\n")
            written += len(line) + 1
            docs += 1
    return docs


def train_tokenizer(corpus: Path, out: Path, *, vocab_size: int, text_field: str = "text") -> Path:
    import sentencepiece as spm

    sample, size = [], 0
    for text in read_documents(corpus, text_field=text_field):
        sample.append(text)
        size += len(text)
        if size > 2_000_000:
            break
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   max_sentence_length=1 << 20, minloglevel=2, num_threads=2)
    out.write_bytes(buf.getvalue())
    return out


def bench_tokenize(files: list[Path], tokenizer: Path, workers: int, text_field: str, tmp: Path) -> dict:
    tok = load_tokenizer(tokenizer)
    stats = ReadStats()
    docs = [d for f in files for d in read_documents(f, text_field=text_field, stats=stats)]
    encoder = _Encoder(tok.model_proto)
    raw_s = []
    for _ in range(2):
        t0 = time.perf_counter()
        ids = encoder.sp.encode(docs, out_type="numpy" if encoder.numpy else int, num_threads=1)
        raw_s.append(time.perf_counter() - t0)
    tokens = sum(len(x) for x in ids)
    del ids
    raw_rate = tokens / min(raw_s)
    ours = {}
    for n in sorted({1, workers}):
        best = None
        for rep in range(2):
            report = tokenize_to_store(files, tokenizer=tok, out=tmp / f"store-{n}", workers=n,
                                       text_field=text_field, overwrite=True, progress=False)
            assert report.tokens == tokens, (report.tokens, tokens)
            best = report.seconds if best is None else min(best, report.seconds)
        ours[n] = tokens / best
    return {
        "documents": len(docs), "tokens": tokens, "text_bytes": sum(len(d.encode()) for d in docs),
        "raw_encode_tokens_per_s": raw_rate, "encode_output": "numpy" if encoder.numpy else "int lists",
        "ours_tokens_per_s": {str(n): r for n, r in ours.items()}, "workers": workers,
        "ratio_vs_raw_x_workers": ours[workers] / (raw_rate * workers),
        "ratio_1_worker_vs_raw": ours[1] / raw_rate,
    }


def _copy_anchor(n_batches: int, batch: int, seq_len: int, source: np.ndarray) -> float:
    n = batch * seq_len
    span = len(source) - 3 * n
    t0 = time.perf_counter()
    for i in range(n_batches):
        o = (i * 3 * n) % span
        for j in range(3):
            dst = np.empty((batch, seq_len), dtype=np.int64)
            np.copyto(dst.reshape(-1), source[o + j * n:o + (j + 1) * n])
    return n_batches * n / (time.perf_counter() - t0)


def _loader_rate(store: TokenStore, n_batches: int, batch: int, seq_len: int, workers: int, shuffle: str) -> float:
    loader = PackedLoader(store, seq_len=seq_len, batch_size=batch, seed=1, num_workers=workers, shuffle=shuffle)
    it = iter(loader)
    next(it)  # first epoch layout and worker start-up are not the steady state
    t0 = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
    assert b["input_ids"].shape == (batch, seq_len)
    return n_batches * batch * seq_len / (time.perf_counter() - t0)


def bench_loading(store_dir: Path, *, batch: int, seq_len: int, tokens: int, workers: int, repeats: int) -> dict:
    store = TokenStore(store_dir)
    n_batches = max(10, tokens // (batch * seq_len))
    source = np.ones(64 << 20, dtype=np.int64)  # 512 MiB: far past the last-level cache
    runs = []
    for _ in range(repeats):  # interleaved, so a busy machine slows both sides alike
        ours = _loader_rate(store, n_batches, batch, seq_len, 0, "documents")
        anchor = _copy_anchor(n_batches, batch, seq_len, source)
        runs.append((ours, anchor, ours / anchor))
    best = max(runs, key=lambda r: r[2])
    windows = _loader_rate(store, n_batches, batch, seq_len, 0, "windows")
    with_workers = _loader_rate(store, n_batches, batch, seq_len, workers, "documents") if workers > 1 else None
    dram = copy_bandwidth("cpu") / (2 * 3 * 8)  # bytes read + written per token of a batch
    return {
        "batch_size": batch, "seq_len": seq_len, "batches": n_batches, "store_tokens": store.num_tokens,
        "store_documents": store.num_documents,
        "loader_tokens_per_s": best[0], "copy_tokens_per_s": best[1], "ratio_vs_copy": best[2],
        "ratio_vs_copy_median": statistics.median(r[2] for r in runs),
        "runs": [{"loader": r[0], "copy": r[1]} for r in runs],
        "loader_windows_shuffle_tokens_per_s": windows,
        "loader_workers": workers, "loader_with_workers_tokens_per_s": with_workers,
        "dram_copy_tokens_per_s": dram, "ratio_vs_dram_copy": best[0] / dram,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes "
                        "(default: CPUs available, %(default)s)")
    parser.add_argument("--text", nargs="+", type=Path, default=None, metavar="FILE",
                        help="corpus files (default: a generated JSON Lines corpus)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--megabytes", type=float, default=48.0, help="size of the generated corpus")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="MODEL",
                        help="SentencePiece model (default: train one on the corpus)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the trained tokenizer")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--load-tokens", type=int, default=100_000_000, help="tokens to load per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/"
                        "data-<machine>.json)")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gemma-ewc-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        if args.text:
            files = list(args.text)
        else:
            files = [tmp / "corpus.jsonl"]
            synthetic_corpus(files[0], megabytes=args.megabytes)
        tokenizer = args.tokenizer or train_tokenizer(files[0], tmp / "tokenizer.model", vocab_size=args.vocab_size,
                                                      text_field=args.text_field)
        tok = bench_tokenize(files, tokenizer, args.workers, args.text_field, tmp)
        load = bench_loading(tmp / f"store-{args.workers}", batch=args.batch_size, seq_len=args.seq_len,
                             tokens=args.load_tokens, workers=args.workers, repeats=args.repeats)
    payload = {
        "benchmark": "data", "device": "cpu", "machine": machine_info("cpu"),
        "config": {"workers": args.workers, "text": [str(f) for f in args.text] if args.text else "generated",
                   "megabytes": args.megabytes, "tokenizer": str(args.tokenizer or "trained"),
                   "vocab_size": args.vocab_size, "seq_len": args.seq_len, "batch_size": args.batch_size},
        "tokenize": tok, "loading": load,
        "targets": {"tokenize_vs_raw_x_workers": 0.8, "loading_vs_copy": 0.5},
    }
    out = args.out or RESULTS_DIR / f"data-{device_name('cpu')}.json"
    write_results(out, payload)
    w = tok["workers"]
    rows = [
        {"measure": f"tokenize, {w} workers (tokens/s)", "ours": tok["ours_tokens_per_s"][str(w)],
         "anchor": tok["raw_encode_tokens_per_s"] * w, "anchor is": f"raw sp.encode x {w}",
         "ratio": tok["ratio_vs_raw_x_workers"], "target": 0.8},
        {"measure": "tokenize, 1 worker (tokens/s)", "ours": tok["ours_tokens_per_s"]["1"],
         "anchor": tok["raw_encode_tokens_per_s"], "anchor is": "raw sp.encode", "ratio": tok["ratio_1_worker_vs_raw"]},
        {"measure": f"pack+load {args.batch_size}x{args.seq_len} (tokens/s)", "ours": load["loader_tokens_per_s"],
         "anchor": load["copy_tokens_per_s"], "anchor is": "copy of the batch bytes", "ratio": load["ratio_vs_copy"],
         "target": 0.5},
        {"measure": "pack+load vs DRAM copy bandwidth", "ours": load["loader_tokens_per_s"],
         "anchor": load["dram_copy_tokens_per_s"], "anchor is": "copy_bandwidth / 48 B",
         "ratio": load["ratio_vs_dram_copy"]},
        {"measure": "pack+load, windows shuffle", "ours": load["loader_windows_shuffle_tokens_per_s"],
         "anchor": load["copy_tokens_per_s"], "anchor is": "copy of the batch bytes",
         "ratio": load["loader_windows_shuffle_tokens_per_s"] / load["copy_tokens_per_s"]},
    ]
    if load["loader_with_workers_tokens_per_s"]:
        rows.append({"measure": f"pack+load, {w} loader workers", "ours": load["loader_with_workers_tokens_per_s"],
                     "anchor": load["copy_tokens_per_s"], "anchor is": "copy of the batch bytes (1 core)",
                     "ratio": load["loader_with_workers_tokens_per_s"] / load["copy_tokens_per_s"]})
    print(format_table(rows, ["measure", "ours", "anchor", "anchor is", "ratio", "target"]))
    print(f"results: {out}")
    return 0
