"""Forward + backward of one Gemma2 preset on packed rows: tokens/s, MFU, peak memory, and bf16-vs-fp32 logits.

    gemma-ewc bench model --preset gemma2-2b --seq-len 4096 --device cuda --attention flex

Random weights (the shapes, not the values, set the cost). Rows are packed with random document lengths, so the
attention masks are those of real training. The loss is a plain cross entropy over materialised logits: this
measures the model, not the trainer's chunked loss (see `bench train` for the whole step).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import format_table, machine_info, time_fn, write_results
from trainer.attention import resolve_backend
from trainer.dtypes import compute_dtype
from trainer.flops import device_peak_flops, training_flops_per_token
from trainer.model import Gemma2, Gemma2Config
from trainer.parallelize import apply_activation_checkpointing

COMPUTE_DTYPES = ("bfloat16", "float32")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (gemma2-2b, gemma2-9b, gemma2-27b, tiny, small)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attention", default="auto", help="attention backend: auto, eager, flex, flash")
    p.add_argument("--mean-doc-len", type=int, default=1024, help="mean length of the packed documents")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every block")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block (as training does on CUDA)")
    p.add_argument("--out", default=None, help="write the results JSON here")


def packed_batch(batch_size: int, seq_len: int, vocab: int, mean_doc_len: int, *, device, seed: int = 0):
    """Random tokens in rows of random-length documents (geometric lengths, as web text roughly is)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    rows, lengths = [], []
    for _ in range(batch_size):
        pos, docs, left = [], [], seq_len
        while left:
            n = min(left, 1 + int(torch.empty(()).exponential_(1.0 / mean_doc_len, generator=g)))
            pos.append(torch.arange(n))
            docs.append(n)
            left -= n
        rows.append(torch.cat(pos))
        lengths.append(docs)
    return ids.to(device), torch.stack(rows).to(device), lengths


def logits_error_vs_float32(config: Gemma2Config, *, device, attention: str, dtype: torch.dtype) -> float:
    """Relative max error of `dtype` logits against float32 logits of the same weights, on one packed row."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Gemma2(config, attention_backend="eager")
    model = model.to_empty(device=device)
    model.init_weights()
    ids, pos, _ = packed_batch(1, 512, config.vocab_size, 128, device=device, seed=1)
    with torch.no_grad():
        reference = model(ids, position_ids=pos).float()
        model = model.to(dtype)
        model.attention_backend = attention
        low = model(ids, position_ids=pos).float()
    return ((low - reference).abs().max() / reference.abs().max()).item()


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    config = Gemma2Config.preset(args.preset)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Gemma2(config, attention_backend=args.attention)
    model = model.to(dtype).to_empty(device=device)
    model.init_weights()
    model.train()
    if args.checkpointing:
        apply_activation_checkpointing(model, "full")
    if args.compile:
        for layer in model.layers:
            layer.compile(dynamic=False)
    ids, pos, lengths = packed_batch(args.batch_size, args.seq_len, config.vocab_size, args.mean_doc_len,
                                     device=device)
    labels = torch.roll(ids, -1, dims=1)

    def step():
        logits = model(ids, position_ids=pos)
        loss = F.cross_entropy(logits.float().view(-1, config.vocab_size), labels.view(-1))
        loss.backward()
        for p in model.parameters():
            p.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_fn(step, device=device, warmup=2, repeat=args.steps)
    tokens = args.batch_size * args.seq_len
    flops = sum(training_flops_per_token(config, args.seq_len, doc_lengths=d) for d in lengths) / len(lengths)
    peak, peak_source = device_peak_flops(str(device), dtype)
    tokens_per_s = tokens / timing["median_s"]
    result = {
        "benchmark": "model", "device": str(device), "preset": args.preset, "dtype": str(dtype),
        "attention": resolve_backend(args.attention, device), "seq_len": args.seq_len, "batch_size": args.batch_size,
        "mean_doc_len": args.mean_doc_len, "checkpointing": args.checkpointing, "compiled": args.compile,
        "timing": timing,
        "tokens_per_s": tokens_per_s, "flops_per_token": flops, "mfu": tokens_per_s * flops / peak,
        "peak_flops": peak, "peak_flops_source": peak_source,
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    model = None  # free its memory before the float32 comparison below
    result["logits_rel_err_vs_float32"] = (logits_error_vs_float32(config, device=device, attention=args.attention,
                                                                   dtype=dtype) if dtype != torch.float32 else 0.0)
    result["machine"] = machine_info(device)
    print(format_table([result], ["preset", "device", "dtype", "attention", "seq_len", "tokens_per_s", "mfu",
                                  "max_memory_gb", "logits_rel_err_vs_float32"]))
    if args.out:
        write_results(args.out, result)
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, default=str))
    return 0
