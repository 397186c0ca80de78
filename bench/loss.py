"""The LM-head loss of one micro-batch, forward + backward: the Triton chunk kernel vs the torch composition it
replaces on CUDA, and the materialised-logits definition, side by side in one run.

    gemma-ewc bench loss --preset gemma2-2b --rows 4096 --device cuda

Each variant computes the summed soft-capped cross entropy of `rows` hidden states against the vocabulary and
its gradients with respect to the hidden states and the head's weight, as training does once per micro-batch:
"fused" (kernels/linear_cross_entropy.py with the chunk kernel), "composition" (the same chunks, the kernel
switched off: what CPU runs), "materialised" (kernels.linear_cross_entropy.linear_cross_entropy_ref under
autograd: float32 logits of [rows, V], the plain way). Reports the median time, the head's GEMM throughput, the
ratios, the chunk rows each chunked variant used, and how far the fused loss and gradients are from the
composition's; then the kernel alone on one chunk as a share of copy bandwidth (against a cast of the same
logits into the gradient's dtype). Where the kernel cannot run (CPU without the interpreter) its row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from bench.common import format_table, machine_info, time_fn, write_results
from kernels import linear_cross_entropy as lce
from trainer.dtypes import compute_dtype, dtype_name
from trainer.model import Gemma2Config

VARIANTS = ("fused", "composition", "materialised")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset: its vocabulary, hidden size and final soft-cap")
    p.add_argument("--rows", type=int, default=4096, help="tokens of the micro-batch (default 4096: one packed row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results JSON here")


def _inputs(config: Gemma2Config, rows: int, *, device, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, config.hidden_size, generator=g).to(device, dtype).requires_grad_()
    # a trained head's logits reach tens: weights of std 1 / sqrt(hidden) times hidden states of std ~3
    weight = (torch.randn(config.vocab_size, config.hidden_size, generator=g) * 3 / config.hidden_size ** 0.5)
    weight = weight.to(device, dtype).requires_grad_()
    labels = torch.randint(0, config.vocab_size, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.02] = lce.IGNORE_INDEX  # document starts in packed rows
    return hidden, weight, labels.to(device)


def _kernel_bandwidth(args, config: Gemma2Config, *, device, dtype, cap) -> dict:
    """The chunk kernel alone on one chunk of float32 logits, as a share of copy bandwidth: it reads the logits
    twice and writes the gradient (4 + 4 + G B per element); the anchor casts the logits into the gradient's
    dtype once (4 + G B), the least any pass that makes the gradient can move."""
    from kernels.softcap_cross_entropy_triton import softcap_cross_entropy

    grad_dtype = lce.chunk_grad_dtype(device, dtype)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(args.rows, config.vocab_size, generator=g) * 40).to(device)
    labels = torch.randint(0, config.vocab_size, (args.rows,), generator=g).to(device)
    grad = torch.empty(logits.shape, dtype=grad_dtype, device=device)
    kernel = time_fn(lambda: softcap_cross_entropy(logits, labels, cap, grad), device=device, warmup=args.warmup,
                     repeat=args.repeat)
    copy = time_fn(lambda: grad.copy_(logits), device=device, warmup=args.warmup, repeat=args.repeat)
    n, g_size = logits.numel(), grad.element_size()
    kernel_gb_s = n * (8 + g_size) / kernel["median_s"] / 1e9
    copy_gb_s = n * (4 + g_size) / copy["median_s"] / 1e9
    return {"kernel_ms": kernel["median_s"] * 1e3, "kernel_gb_s": kernel_gb_s, "copy_gb_s": copy_gb_s,
            "kernel_of_copy_bw": kernel_gb_s / copy_gb_s}


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    config = Gemma2Config.preset(args.preset)
    cap = config.final_softcap
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"bench loss: unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    hidden, weight, labels = _inputs(config, args.rows, device=device, dtype=dtype)
    grad_dtype = lce.chunk_grad_dtype(device, dtype)
    fused_available = lce.fused_chunk_kernel(device, vocab_size=config.vocab_size, softcap=cap,
                                             grad_dtype=grad_dtype)

    def step(fn):
        def once():
            hidden.grad = weight.grad = None
            loss = fn(hidden, weight, labels, cap)
            loss.backward()
            return loss
        return once

    def chunked(h, w, y, softcap):
        return lce.linear_cross_entropy(h, w, y, softcap=softcap)

    rows, outputs = [], {}
    gemm_flops = 3 * 2 * args.rows * config.vocab_size * config.hidden_size  # logits, dL/dh, dL/dW
    for variant in variants:
        row = {"variant": variant}
        if variant == "fused" and not fused_available:
            rows.append(row | {"status": "unavailable (needs CUDA with triton)"})
            continue
        fn = lce.linear_cross_entropy_ref if variant == "materialised" else chunked
        with lce.torch_composition() if variant == "composition" else contextlib.nullcontext():
            if variant != "materialised":
                row["chunk_rows"] = lce._auto_chunk_rows(
                    hidden.detach(), weight.detach(), cap, fused_grad_dtype=grad_dtype if variant == "fused" else None)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                timing = time_fn(step(fn), device=device, warmup=args.warmup, repeat=args.repeat)
            except torch.OutOfMemoryError as exc:
                rows.append(row | {"status": f"out of memory ({str(exc).splitlines()[0][:120]})"})
                continue
            loss = step(fn)()
        if variant != "materialised":  # the two chunked paths are compared below (float64 copies: 2 x [V, H])
            outputs[variant] = (loss.detach().double(), hidden.grad.double(), weight.grad.double())
        row.update(status="ok", ms=timing["median_s"] * 1e3, tokens_per_s=args.rows / timing["median_s"],
                   gemm_tflops=gemm_flops / timing["median_s"] / 1e12, timing=timing,
                   max_memory_gb=(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None))
        rows.append(row)
        hidden.grad = weight.grad = None

    result = {"benchmark": "loss", "device": str(device), "preset": args.preset, "dtype": dtype_name(dtype),
              "rows": args.rows, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
              "softcap": cap, "rows_by_variant": rows}
    by = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    for a, b in (("fused", "composition"), ("fused", "materialised"), ("composition", "materialised")):
        if a in by and b in by:
            result[f"{a}_speedup_vs_{b}"] = by[b]["ms"] / by[a]["ms"]
    for variant in VARIANTS:
        if variant in by:
            result[f"{variant}_ms"] = by[variant]["ms"]
    if "fused" in outputs and "composition" in outputs:
        (la, ha, wa), (lb, hb, wb) = outputs["fused"], outputs["composition"]
        result["fused_loss_rel_diff"] = (abs(la - lb) / abs(lb)).item()
        result["fused_grad_hidden_rel_diff"] = ((ha - hb).norm() / hb.norm()).item()
        result["fused_grad_weight_rel_diff"] = ((wa - wb).norm() / wb.norm()).item()
    if fused_available and "fused" in variants:
        result.update(_kernel_bandwidth(args, config, device=device, dtype=dtype, cap=cap))
    result["machine"] = machine_info(device)
    print(format_table(rows, ["variant", "status", "ms", "tokens_per_s", "gemm_tflops", "chunk_rows",
                              "max_memory_gb"]))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "rows_by_variant")}, default=str))
    if args.out:
        write_results(args.out, result)
    return 0
