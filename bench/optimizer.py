"""`gemma-ewc bench optimizer`: the fused EWC-AdamW step against the alternatives, side by side in one run.

For parameter sets shaped like a transformer (26 layers of attention and GeGLU MLP weights and four norms each,
an embedding: 288 tensors), of 1M, 8M and 64M elements by default, it times one optimizer step of:

    (a) adamw_fused     torch.optim.AdamW(fused=True), no EWC: the floor to approach
    (b) loss_penalty    the reference study's way: (lambda/2) sum F (p - anchor)^2 as a Python loop inside the loss,
                        backward (adds into .grad), then torch.optim.AdamW (its default implementation)
    (c) foreach         the best plain-torch composition: torch._foreach_* ops add lambda F (p - anchor) to the
                        grads, then fused AdamW
    (d) ewc_adamw       EWCAdamW with EWC (backend auto: "cpp" on CPU, "triton" on CUDA), penalty and norm included
    (dd) ewc_adamw_decoupled  the same in ewc_mode "decoupled" (Adam on g, then the proximal pull towards the
                        anchor): the same bytes as (d), a division and a select more per element
    (d0) ewc_adamw_off  EWCAdamW with lambda = 0: plain AdamW through our kernel

with F and anchor in float32 and in bfloat16. Variants are timed in interleaved rounds (a, b, c, d, a, b, ...) so
a noisy neighbour on the machine affects all of them alike. On CUDA "ms" is the step's GPU time (CUDA events, the
GPU kept busy while the host issues the step, as during training) and "wall_ms" the synchronised host time beside
it. The table gives median milliseconds, the ratio to (a),
and the effective bandwidth: the bytes the task needs (28 B per element for AdamW, plus two reads of the F/anchor
element size with EWC: 36 B float32, 32 B bfloat16; the same count for b, c, d, dd, which do the same work) per
second, also as a fraction of the machine's measured copy bandwidth (bench.common.copy_bandwidth). The ratio
floors set by bytes alone are 1.29x (float32) and 1.14x (bfloat16). On CPU "x_vs_a_min" is the ratio of the fastest
rounds, a steadier figure on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import REPO_ROOT, copy_bandwidth, device_name, format_table, synchronize, write_results
from kernels.ewc_adamw import BACKENDS
from trainer.dtypes import DTYPES, dtype_name
from trainer.errors import UserError
from trainer.fileio import atomic_path
from trainer.optim import EWCAdamW

LAYERS = 26  # Gemma2-2B's depth: 26 * 11 + 2 = 288 tensors
VARIANTS = {
    "a": "adamw_fused",
    "b": "loss_penalty",
    "c": "foreach",
    "d": "ewc_adamw",
    "dd": "ewc_adamw_decoupled",
    "d0": "ewc_adamw_off",
}
EWC_LAMBDA = 0.5
TARGETS_CPU = {"float32": 1.3, "bfloat16": 1.2}  # max ratio of (d) and (dd) to (a)
TARGET_VS_LOSS_PENALTY = 10.0  # (d) at least this much faster than (b)
# The GPU targets (>= 85% of copy bandwidth, >= 1.5x faster than (c)) are judged on sets too large for the L2 cache
# (50 MB on an H200) and for launch latencies to matter; smaller sets are reported, not judged.
GPU_TARGET_MIN_ELEMENTS = 32 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if text[-1:] in "KMG" else text)
    except ValueError:
        raise UserError(f"bad size {text!r}: use a number of elements such as 1M, 8M, 64M or 500000") from None
    if value <= 0:
        raise UserError(f"size must be positive, got {text!r}")
    return int(value * scale)


def transformer_shapes(total: int, *, layers: int = LAYERS) -> list[tuple[int, ...]]:
    """Shapes of a decoder-only transformer with about `total` parameters in `layers` blocks.

    Per block: q and o (h, h), k and v (h/2, h) (grouped KV heads), gate and up (4h, h), down (h, 4h), and four
    RMSNorm weights (h); plus an embedding (16h, h) and a final norm. That is (15 layers + 16) h^2 elements.
    """
    h = max(8, round(math.sqrt(total / (15 * layers + 16)) / 4) * 4)
    block = [(h, h), (h // 2, h), (h // 2, h), (h, h), (4 * h, h), (4 * h, h), (h, 4 * h), (h,), (h,), (h,), (h,)]
    return [(16 * h, h)] + block * layers + [(h,)]


def needed_bytes(numel: int, ewc_dtype: torch.dtype | None) -> int:
    extra = 0 if ewc_dtype is None else 2 * torch.tensor([], dtype=ewc_dtype).element_size()
    return numel * (28 + extra)


class ParamSet:
    """Parameters with gradients plus F and anchor, shared by all variants (each variant has its own moments)."""

    def __init__(self, shapes, *, device, ewc_dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-3
        self.fisher = [torch.rand(s, generator=gen).to(device=device, dtype=ewc_dtype) for s in shapes]
        self.anchor = [(p.detach() + 1e-2).to(ewc_dtype) for p in self.params]
        self.numel = sum(p.numel() for p in self.params)


def make_variants(ps: ParamSet, names, *, backend: str = "auto"):
    """name -> a zero-argument callable doing one optimizer step of that variant."""
    params, grads = ps.params, [p.grad for p in ps.params]
    fns = {}
    if "a" in names:
        opt_a = torch.optim.AdamW(params, lr=1e-5, fused=True)
        fns["a"] = opt_a.step
    if "b" in names:
        opt_b = torch.optim.AdamW(params, lr=1e-5)

        def loss_penalty():
            penalty = 0.0
            for p, f, a in zip(params, ps.fisher, ps.anchor):
                penalty = penalty + (EWC_LAMBDA / 2) * (f * (p - a) ** 2).sum()
            penalty.backward()
            opt_b.step()

        fns["b"] = loss_penalty
    if "c" in names:
        opt_c = torch.optim.AdamW(params, lr=1e-5, fused=True)

        @torch.no_grad()
        def foreach():
            d = torch._foreach_sub(params, ps.anchor)
            torch._foreach_mul_(d, ps.fisher)
            torch._foreach_add_(grads, d, alpha=EWC_LAMBDA)
            opt_c.step()

        fns["c"] = foreach
    if "d" in names:
        opt_d = EWCAdamW(params, lr=1e-5, ewc_lambda=EWC_LAMBDA, fisher=ps.fisher, anchor=ps.anchor, backend=backend)
        fns["d"] = opt_d.step
    if "dd" in names:
        opt_dd = EWCAdamW(params, lr=1e-5, ewc_lambda=EWC_LAMBDA, fisher=ps.fisher, anchor=ps.anchor, backend=backend,
                          ewc_mode="decoupled")
        fns["dd"] = opt_dd.step
    if "d0" in names:
        opt_d0 = EWCAdamW(params, lr=1e-5, ewc_lambda=0.0, backend=backend)
        fns["d0"] = opt_d0.step
    return fns


def _sleep_cycles_per_s(device) -> float:
    """Clock cycles per second of torch.cuda._sleep on this GPU (calibrated with CUDA events)."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles // 10)  # warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize(device)
    return cycles / (start.elapsed_time(end) / 1e3)


def time_interleaved(fns: dict, *, device, warmup: int, repeat: int, min_time_s: float) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds: name -> {"wall", "device"}.

    "wall": host time of a call, synchronised (on CUDA it includes the Python work before the first launch,
    while the GPU idles). On CUDA also "device": GPU time between CUDA events around the call, with the GPU kept
    busy (torch.cuda._sleep) while the host issues it: the step's own GPU time, as in training, where the host
    prepares the step while the GPU still runs the backward pass.
    """
    device = torch.device(device)
    wall_once = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):  # at least one: compiles kernels and measures the host time of a call
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            wall_once[name] = time.perf_counter() - t0
    cuda = device.type == "cuda"
    if cuda:
        rate = _sleep_cycles_per_s(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = {name: {"wall": [], "device": []} for name in fns}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < repeat or time.perf_counter() - t_start < min_time_s:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            samples[name]["wall"].append(time.perf_counter() - t0)
            if cuda:
                torch.cuda._sleep(int(2 * wall_once[name] * rate) + 100_000)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                samples[name]["device"].append(start.elapsed_time(end) / 1e3)
        rounds += 1
        if rounds >= 1000:
            break
    return {name: {**{k: statistics.median(v) for k, v in s.items() if v}, "wall_min": min(s["wall"])}
            for name, s in samples.items()}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu or cuda (default cpu)")
    parser.add_argument("--sizes", default="1M,8M,64M",
                        help="total parameter elements of each set, comma-separated (default 1M,8M,64M)")
    parser.add_argument("--ewc-dtypes", default="float32,bfloat16", help="F/anchor dtypes (default both)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"subset of {','.join(VARIANTS)} (default all)")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="EWCAdamW backend for (d) (default auto)")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (default 2)")
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="keep timing rounds until this many seconds per size have passed (default 0.5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default all)")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/optimizer-<machine>.json)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    torch.set_num_threads(max(1, args.threads))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "a" not in names:
        raise UserError(f"--variants: choose from {','.join(VARIANTS)} and include a (the anchor); got {args.variants}")
    ewc_dtypes = []
    for name in args.ewc_dtypes.split(","):
        dtype = DTYPES.get(name.strip())
        if dtype not in (torch.float32, torch.bfloat16):
            raise UserError(f"--ewc-dtypes: float32 or bfloat16, got {name!r}")
        ewc_dtypes.append(dtype)

    bandwidth = copy_bandwidth(device)
    print(f"device {device} ({device_name(device)}), torch threads {torch.get_num_threads()}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for total in sizes:
        shapes = transformer_shapes(total)
        for ewc_dtype in ewc_dtypes:
            ps = ParamSet(shapes, device=device, ewc_dtype=ewc_dtype)
            fns = make_variants(ps, names, backend=args.backend)
            times = time_interleaved(fns, device=device, warmup=args.warmup, repeat=args.repeat,
                                     min_time_s=args.min_time)
            ewc_dtype_name = dtype_name(ewc_dtype)
            # CPU: wall time; CUDA: the GPU time of the step (see time_interleaved), wall time alongside
            t = {name: v["device" if device.type == "cuda" else "wall"] for name, v in times.items()}
            for name in names:
                nbytes = needed_bytes(ps.numel, None if name in ("a", "d0") else ewc_dtype)
                rows.append({
                    "elements": ps.numel, "tensors": len(shapes), "ewc_dtype": ewc_dtype_name,
                    "variant": f"({name}) {VARIANTS[name]}", "ms": t[name] * 1e3,
                    "wall_ms": times[name]["wall"] * 1e3, "x_vs_a": t[name] / t["a"],
                    # the fastest round's ratio: what an undisturbed machine would show (noisy neighbours only slow)
                    "x_vs_a_min": times[name]["wall_min"] / times["a"]["wall_min"],
                    "GB/s": nbytes / t[name] / 1e9, "of_copy_bw": nbytes / t[name] / bandwidth,
                    "speedup_vs_b": t["b"] / t[name] if "b" in t else None,
                    "speedup_vs_c": t["c"] / t[name] if "c" in t else None,
                    # decoupled against coupled EWC: the cost of the mode itself (same bytes)
                    "x_vs_d": t[name] / t["d"] if name == "dd" and "d" in t else None,
                    "x_vs_d_min": (times[name]["wall_min"] / times["d"]["wall_min"]
                                   if name == "dd" and "d" in t else None),
                })
            del fns, ps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    columns = ["elements", "ewc_dtype", "variant", "ms", "x_vs_a", "GB/s", "of_copy_bw", "speedup_vs_b",
               "speedup_vs_c", "x_vs_d"] + (["wall_ms"] if device.type == "cuda" else ["x_vs_a_min", "x_vs_d_min"])
    print(format_table(rows, columns))
    backend = EWCAdamW([torch.nn.Parameter(torch.zeros(1, device=device))], backend=args.backend).backend
    checks = summarize_targets(rows, device, backend)
    for line in checks["lines"]:
        print(line)
    out = Path(args.out) if args.out else REPO_ROOT / "bench" / "results" / f"optimizer-{device_name(device)}.json"
    payload = {"benchmark": "optimizer", "device": str(device), "backend": backend, "config": vars(args) | {
        "sizes": sizes, "ewc_lambda": EWC_LAMBDA, "layers": LAYERS}, "copy_bandwidth_bytes_per_s": bandwidth,
        "rows": rows, "targets": checks}
    with atomic_path(out) as tmp:
        write_results(tmp, payload)
    print(f"wrote {out}")
    return 0


def summarize_targets(rows: list[dict], device: torch.device, backend: str) -> dict:
    """The issue's acceptance numbers for (d) and (dd), per size and F/anchor dtype, as pass/miss lines."""
    lines, ok = [], True
    for r in rows:
        if not r["variant"].startswith(("(d) ", "(dd) ")):
            continue
        tag = f"{r['elements'] / 2**20:.3g}M {r['ewc_dtype']}"
        name = r["variant"].split(" ", 1)[1]
        if r["x_vs_d"] is not None:
            lines.append(f"{tag}: {name} {r['x_vs_d']:.2f}x ewc_adamw (same bytes; reported, not judged)")
        if device.type == "cpu":
            limit = TARGETS_CPU[r["ewc_dtype"]]
            good = r["x_vs_a"] <= limit
            lines.append(f"{tag}: {name} ({backend}) {r['x_vs_a']:.2f}x adamw_fused (target <= {limit}) "
                         f"{'ok' if good else 'MISS'}")
            ok &= good
            if r["speedup_vs_b"] is not None:
                good = r["speedup_vs_b"] >= TARGET_VS_LOSS_PENALTY
                lines.append(f"{tag}: {r['speedup_vs_b']:.1f}x faster than loss_penalty (target >= "
                             f"{TARGET_VS_LOSS_PENALTY:.0f}) {'ok' if good else 'MISS'}")
                ok &= good
        elif r["elements"] >= GPU_TARGET_MIN_ELEMENTS:
            good = r["of_copy_bw"] >= 0.85
            lines.append(f"{tag}: {name} ({backend}) at {100 * r['of_copy_bw']:.0f}% of copy bandwidth "
                         f"(target >= 85%) {'ok' if good else 'MISS'}")
            ok &= good
            if r["speedup_vs_c"] is not None:
                good = r["speedup_vs_c"] >= 1.5
                lines.append(f"{tag}: {r['speedup_vs_c']:.2f}x faster than foreach (target >= 1.5) "
                             f"{'ok' if good else 'MISS'}")
                ok &= good
    return {"all_met": ok, "lines": lines}
