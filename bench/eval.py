"""Evaluation throughput: choices/s and tokens/s of our packed scoring vs two anchors, on real benchmark items.

    python -m bench.eval --preset small --items 64 [--device cuda] [--out bench/results/eval-cpu2.json]

Workloads (from ../shared/data): ARC-Easy (0-shot, multi-token continuations), MMLU (0-shot, single-letter
answers: one shared-context sequence per item), and perplexity of English documents. Methods, all on the same
random-weight model of the preset, saved as a Hugging Face directory with a SentencePiece tokenizer trained here:

- ours:        `trainer.evaluate.scoring.loglikelihood` (packed rows, shared contexts for single-token answers,
               LM head on scored positions only, float32 log-softmax)
- unpacked:    the same model, one (context + continuation) per forward, full logits (packing's gain alone)
- hf-padded:   transformers' Gemma2ForCausalLM, batches of `--batch` right-padded requests, full logits and
               log-softmax (the lm-eval HFLM way)

All three must agree on every log-likelihood (checked, max abs difference reported). Results: a table and JSON
(machine, versions, git revision, config).

    python -m bench.eval --preset small --compare-training --seq-len 128 [--threads 1]

`--compare-training` instead measures, on the same model and machine, training's tokens/s (forward + backward of
`model(ids, labels=...)` on rows of `--seq-len` tokens: the trainer's model and chunked loss, without the optimizer
step, so the stricter bar) next to `eval --ppl`'s scoring tokens/s (`perplexity_of_tokens`, the command's code path
and default stride) on long documents (`--doc-tokens` each, the shared English text), at two contexts: the trained
seq_len (eval's default now) and the model's max_position_embeddings (its default before). The ratio column is
scoring tokens/s / training tokens/s: at least 1 means forward-only scoring keeps up with training.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

from bench.common import REPO_ROOT, device_name, format_table, machine_info, synchronize, time_fn, write_results
from trainer.data.readers import read_documents
from trainer.dtypes import compute_dtype, dtype_name
from trainer.evaluate import tasks as T
from trainer.evaluate.perplexity import perplexity_of_texts, perplexity_of_tokens
from trainer.evaluate.scoring import ScoringOptions, Tokenizer, encode_requests, loglikelihood
from trainer.hf import load_pretrained, save_pretrained
from trainer.model import Gemma2, Gemma2Config

SHARED = REPO_ROOT.parent / "shared" / "data"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model preset (tiny, small, gemma2-2b, ...)")
    p.add_argument("--items", type=int, default=64, help="items per task")
    p.add_argument("--documents", type=int, default=32, help="documents for the perplexity workload")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--row-tokens", type=int, default=None, help="default: 4096 on CUDA, 128 on CPU")
    p.add_argument("--batch-rows", type=int, default=8, help="packed rows per forward pass")
    p.add_argument("--batch", type=int, default=8, help="requests per padded batch for the hf-padded anchor")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers anchor")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is steadier on a shared machine)")
    p.add_argument("--compare-training", action="store_true",
                   help="only compare training tokens/s with eval --ppl scoring tokens/s (see the module doc)")
    p.add_argument("--seq-len", type=int, default=128, help="training row length for --compare-training")
    p.add_argument("--doc-tokens", type=int, default=2048, help="tokens per long document for --compare-training")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/eval-<device>.json, "
                                                "eval-train-vs-score-<device>-<preset>.json with --compare-training)")


def build_model_dir(preset: str, root: Path) -> Path:
    config = Gemma2Config.preset(preset)
    text = "".join((SHARED / "text" / name).read_text()[:80_000] for name in ("en_ewt.txt", "lt_news.txt"))
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buffer, vocab_size=min(1024, config.vocab_size),
        model_type="bpe", bos_id=2, eos_id=1, unk_id=3, pad_id=0, byte_fallback=True, add_dummy_prefix=False,
        character_coverage=0.995, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    (root / "tokenizer.model").write_bytes(buffer.getvalue())
    model = Gemma2(config, attention_backend="eager")
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    return save_pretrained(model, root / "model", dtype=torch.float32, tokenizer=root / "tokenizer.model")


def workload(name: str, items: int) -> list[tuple[str, str]]:
    if name == "arc":
        task = T.load_task(str(SHARED / "benchmarks" / "arc_easy" / "arc_easy_test.jsonl"), limit=items)
    else:
        task = T.load_task(str(SHARED / "benchmarks" / "mmlu" / "test"), limit=max(1, items // 57 + 1))
        task.docs = task.docs[:items]
    return [r for d in task.docs for r in task.type.requests(d, T.fewshot_prefix(task, d))]


@torch.inference_mode()
def unpacked(model, tokenizer, requests, *, max_length):
    out = []
    for req in encode_requests(tokenizer, requests, bos_id=model.config.bos_token_id, max_length=max_length):
        ids = torch.tensor(req.context + req.continuation, device=model.embed_tokens.weight.device)
        logprobs = torch.log_softmax(model(ids[None, :-1])[0].float(), dim=-1)
        first = len(req.context) - 1
        tgt = ids[len(req.context):]
        out.append(float(logprobs[first:first + len(tgt)].gather(1, tgt[:, None]).sum()))
    return out


@torch.inference_mode()
def hf_padded(hf, model, tokenizer, requests, *, max_length, batch):
    encoded = encode_requests(tokenizer, requests, bos_id=model.config.bos_token_id, max_length=max_length)
    device = next(hf.parameters()).device
    out = [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context + encoded[i].continuation))
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        seqs = [(encoded[i].context + encoded[i].continuation)[:-1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logprobs = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, i in enumerate(idx):
            ctx, cont = encoded[i].context, encoded[i].continuation
            positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=device)
            out[i] = float(logprobs[row, positions, torch.tensor(cont, device=device)].sum())
    return out


def timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - t0


def long_documents(tokenizer: Tokenizer, *, doc_tokens: int, count: int) -> tuple[list[list[int]], int]:
    """`count` documents of `doc_tokens` tokens cut from the shared English text, and their UTF-8 byte count."""
    tokens = tokenizer.encode((SHARED / "text" / "en_ewt.txt").read_text())
    if len(tokens) < doc_tokens * count:
        tokens = tokens * (doc_tokens * count // len(tokens) + 1)
    docs = [tokens[i * doc_tokens:(i + 1) * doc_tokens] for i in range(count)]
    return docs, sum(len(tokenizer.decode(d).encode("utf-8")) for d in docs)


def training_vs_scoring(model_dir: Path, tokenizer: Tokenizer, *, device: torch.device, dtype: torch.dtype,
                        seq_len: int, batch_rows: int, row_tokens: int, doc_tokens: int, documents: int) -> list[dict]:
    """Training tokens/s (forward + backward at rows of `seq_len`) beside eval --ppl scoring tokens/s at the trained
    seq_len and at max_position_embeddings, same model, same machine; "vs training" = scoring / training."""
    docs, num_bytes = long_documents(tokenizer, doc_tokens=doc_tokens, count=documents)
    model = load_pretrained(model_dir, dtype=dtype, device=device, attention_backend="eager")
    stream = torch.tensor([t for d in docs for t in d], device=device)
    rows = stream[:(len(stream) - 1) // seq_len * seq_len + 1]
    ids = rows[:-1].view(-1, seq_len)[:batch_rows]
    labels = rows[1:].view(-1, seq_len)[:batch_rows]
    model.train()

    def train_step():
        model(ids, labels=labels).backward()

    timing = time_fn(train_step, device=device, warmup=1, repeat=3)
    model.zero_grad(set_to_none=True)
    train_tps = ids.numel() / timing["median_s"]
    out = [{"workload": f"training, rows of {seq_len}", "method": "forward+backward", "tokens/s": train_tps,
            "seconds": timing["median_s"], "vs training": 1.0}]
    model.eval()
    options = ScoringOptions(row_tokens=row_tokens, batch_rows=batch_rows)
    for context, source in ((seq_len, "trained seq_len: eval's default"),
                            (model.config.max_position_embeddings, "max_position_embeddings: the old default")):
        def score():
            return perplexity_of_tokens(model, docs, num_bytes=num_bytes, max_length=context, stride=context // 2,
                                        options=options, pad_id=tokenizer.pad_id)

        perplexity_of_tokens(model, docs[:1], num_bytes=1, max_length=context, stride=context // 2,
                             options=options, pad_id=tokenizer.pad_id)  # warm-up
        res, seconds = timed(score, device)
        out.append({"workload": f"eval --ppl, {documents} docs x {doc_tokens} tokens, context {context} ({source})",
                    "method": "ours", "tokens/s": res.tokens / seconds, "seconds": seconds,
                    "vs training": res.tokens / seconds / train_tps})
    return out


def compare_training(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    row_tokens = args.row_tokens or (4096 if device.type == "cuda" else 128)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.preset, Path(tmp))
        rows = training_vs_scoring(model_dir, Tokenizer(model_dir / "tokenizer.model"), device=device, dtype=dtype,
                                   seq_len=args.seq_len, batch_rows=args.batch_rows, row_tokens=row_tokens,
                                   doc_tokens=args.doc_tokens, documents=args.documents)
    print(f"preset {args.preset}, {device}, {dtype_name(dtype)}, torch threads {torch.get_num_threads()}; "
          f"vs training = scoring tokens/s / training tokens/s")
    print(format_table(rows, ["workload", "method", "tokens/s", "seconds", "vs training"]))
    out = Path(args.out) if args.out else (REPO_ROOT / "bench" / "results" /
                                           f"eval-train-vs-score-{device_name(device)}-{args.preset}.json")
    write_results(out, {"benchmark": "eval-train-vs-score", "device": str(device), "machine": machine_info(device),
                        "config": dict(vars(args)), "options": {"row_tokens": row_tokens,
                                                                "batch_rows": args.batch_rows}, "rows": rows})
    print(f"results: {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if not SHARED.is_dir():
        print(f"bench eval needs the shared data folder at {SHARED}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    if args.compare_training:
        return compare_training(args, device, dtype)
    cuda = device.type == "cuda"
    options = ScoringOptions(row_tokens=args.row_tokens or (4096 if cuda else 128),
                             batch_rows=args.batch_rows, fixed_shape=cuda)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.preset, Path(tmp))
        tokenizer = Tokenizer(model_dir / "tokenizer.model")
        model = load_pretrained(model_dir, dtype=dtype, device=device).eval()
        hf = None
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(device)
            hf.eval()
        for name in ("arc", "mmlu"):
            requests = workload(name, args.items)
            encoded = encode_requests(tokenizer, requests, bos_id=2, max_length=args.max_length)
            tokens = sum(len(e.context) + len(e.continuation) - 1 for e in encoded)
            scored = sum(len(e.continuation) for e in encoded)
            loglikelihood(model, tokenizer, requests[:8], max_length=args.max_length, options=options)  # warm-up
            ours, t_ours = timed(lambda: loglikelihood(model, tokenizer, requests, max_length=args.max_length,
                                                       options=options), device)
            ours = [r.logprob for r in ours]
            methods = [("ours", ours, t_ours)]
            ref, t_ref = timed(lambda: unpacked(model, tokenizer, requests, max_length=args.max_length), device)
            methods.append(("unpacked", ref, t_ref))
            if hf is not None:
                hfv, t_hf = timed(lambda: hf_padded(hf, model, tokenizer, requests, max_length=args.max_length,
                                                    batch=args.batch), device)
                methods.append(("hf-padded", hfv, t_hf))
            for method, values, seconds in methods:
                rows.append({"workload": f"{name} ({len(requests)} choices)", "method": method,
                             "choices/s": len(requests) / seconds, "tokens/s": tokens / seconds,
                             "scored tokens/s": scored / seconds, "seconds": seconds,
                             "speedup": methods[-1][2] / seconds,
                             "max |Δll| vs ours": max(abs(a - b) for a, b in zip(values, ours))})
        texts = list(read_documents(SHARED / "text" / "en_ewt.txt"))[:args.documents]
        perplexity_of_texts(model, tokenizer, texts[:2], max_length=args.max_length, stride=args.max_length // 2,
                            options=options)
        res, seconds = timed(lambda: perplexity_of_texts(model, tokenizer, texts, max_length=args.max_length,
                                                         stride=args.max_length // 2, options=options), device)
        rows.append({"workload": f"perplexity ({res.documents} docs)", "method": "ours",
                     "tokens/s": res.tokens / seconds, "scored tokens/s": res.tokens / seconds, "seconds": seconds})
    columns = ["workload", "method", "choices/s", "tokens/s", "scored tokens/s", "seconds", "speedup",
               "max |Δll| vs ours"]
    print(f"preset {args.preset}, {device}, {dtype_name(dtype)}, torch threads "
          f"{torch.get_num_threads()}; speedup = time of the last anchor / time of the method")
    print(format_table(rows, columns))
    out = Path(args.out) if args.out else REPO_ROOT / "bench" / "results" / f"eval-{device_name(device)}.json"
    write_results(out, {"benchmark": "eval", "device": str(device), "machine": machine_info(device),
                        "config": {k: v for k, v in vars(args).items()},
                        "options": {"row_tokens": options.row_tokens, "batch_rows": options.batch_rows},
                        "rows": rows})
    print(f"results: {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0])
    configure(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
