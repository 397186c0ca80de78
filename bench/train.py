"""`gemma-ewc bench train`: whole training steps, our trainer vs transformers with the reference study's EWC.

    gemma-ewc bench train --preset gemma2-2b --seq-len 4096 --device cuda     # H200: bf16, flex attention
    gemma-ewc bench train --preset tiny --seq-len 256                          # CPU

Four configurations on the same batch of packed rows, side by side in one run:
  gemma-ewc      FSDP2 (one rank), bf16 compute on CUDA (float32 on CPU) with float32 master weights, packed
                 attention (flex/eager), chunked LM-head loss, fused EWCAdamW (EWC inside the optimizer step).
  transformers   Gemma2ForCausalLM (eager attention, as Gemma2 requires for its soft-cap), float32 weights under
                 bf16 autocast on CUDA (HF Trainer's bf16 mode), materialised logits, torch's fused AdamW; EWC
                 as the reference study did it: (λ/2)·Σ F(θ − θ*)² added to the loss by a Python loop over the
                 parameters (F in float16 as there, θ* float32), then backward and clipping of the total.
each with EWC off and on (λ = --lambda, random F ≥ 0, θ* = the initial weights). transformers sees the same tokens
without the document boundaries (its eager attention has no packed masks), so its attention does at least as much
work; MFU counts each side's own attention FLOPs. Reported: median step time (CPU: over alternating EWC off/on rounds),
tokens/s, MFU, peak memory (CUDA, per configuration), and the ratios ours / transformers and EWC on / off.
Our rows also give the optimizer's phases (norms_ms: the clip's norm pass, update_ms: the fused step; CUDA events, no
sync) and the result `ewc_extra_step_ms` against `ewc_extra_optimizer_ms`: how much of EWC's cost is the optimizer's
extra bytes and how much lies elsewhere (memory pressure, the forward/backward). Ours runs as `gemma-ewc train` would: decoder blocks compiled by default on CUDA (--compile; "both" adds an
uncompiled "gemma-ewc eager" pair of rows) and activation checkpointing chosen from memory (--activation-checkpointing
auto, trainer/memory.py; the choice is reported).
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from bench.common import PhaseTimer, format_table, machine_info, time_fn, write_results
from bench.model import COMPUTE_DTYPES, packed_batch
from kernels.linear_cross_entropy import IGNORE_INDEX, chunk_grad_dtype, fused_chunk_kernel
from trainer.config import ParallelConfig, TrainConfig
from trainer.distributed import init_distributed, process_group_scope
from trainer.dtypes import compute_dtype
from trainer.flops import batch_flops_per_token, device_peak_flops, training_flops_per_token
from trainer.hf import config_to_hf
from trainer.memory import ActivationPlan, choose_mode, plan_activation_checkpointing
from trainer.model import Gemma2Config
from trainer.optim import EWCAdamW
from trainer.parallelize import AC_MODES, build_mesh, build_sharded_model, op_needs_compile
from trainer.train import param_groups, train_step


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (both trainers; the optimizer's cost is shared by them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None, help="compute dtype (default bf16 on CUDA)")
    p.add_argument("--attention", default="auto", help="our attention backend (auto: flex on CUDA, eager on CPU)")
    p.add_argument("--mean-doc-len", type=int, default=1024)
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="EWC strength for the EWC-on runs")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-transformers", action="store_true", help="only our trainer")
    p.add_argument("--compile", choices=("auto", "on", "off", "both"), default="auto",
                   help="compile our decoder blocks (auto: on CUDA; both: compiled and eager rows side by side)")
    p.add_argument("--activation-checkpointing", choices=("auto", *AC_MODES), default="auto",
                   help="ours (auto: chosen from the device's memory, as the trainer does)")
    p.add_argument("--out", default=None, help="results JSON")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _activation_plan(args, config: Gemma2Config, *, device, dtype) -> ActivationPlan:
    """The trainer's choice for this batch with EWC on (float32 F, bfloat16 θ*, as _our_step makes them)."""
    train_config = TrainConfig()
    train_config.data.seq_len, train_config.data.batch_size = args.seq_len, args.batch_size
    train_config.model.attention = args.attention
    train_config.parallel.param_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    train_config.parallel.activation_checkpointing = args.activation_checkpointing
    train_config.ewc.file, train_config.ewc.fisher_dtype, train_config.ewc.anchor_dtype = "-", "float32", "bfloat16"
    return plan_activation_checkpointing(train_config, config, device=device, shard_size=1)


def _our_model(config: Gemma2Config, *, device, dtype, attention: str, compile: bool, checkpointing: str):
    parallel = ParallelConfig(param_dtype="bfloat16" if dtype == torch.bfloat16 else "float32", compile=compile,
                              activation_checkpointing=checkpointing)
    return build_sharded_model(config, parallel, mesh=build_mesh(parallel, device_type=device.type), device=device,
                               seed=0, attention_backend=attention)


def _our_step(model, batch: dict, *, device, ewc: bool, lam: float, timer: PhaseTimer, grad_accum: int):
    """The training step, with the optimizer's two phases timed: "norms" (clip_grad_norm_) and "update" (step)."""
    groups = param_groups(model, 0.01)
    optimizer = EWCAdamW(groups, lr=1e-5)
    optimizer.clip_grad_norm_ = timer.wrap("norms", optimizer.clip_grad_norm_)
    optimizer.step = timer.wrap("update", optimizer.step)
    if ewc:
        params = [p for g in groups for p in g["params"]]
        fisher = [torch.rand_like(p.to_local()) for p in params]
        anchor = [p.to_local().detach().to(torch.bfloat16).contiguous() for p in params]
        optimizer.set_ewc_state(fisher, anchor, lam)

    def step():
        train_step(model, optimizer, [batch] * grad_accum, device=device, world_size=1, clip=1.0, clip_mode="task")

    return step


def _hf_model(config: Gemma2Config, *, device):
    from transformers import Gemma2Config as HFConfig, Gemma2ForCausalLM

    raw = config_to_hf(config)
    for key in ("architectures", "model_type", "torch_dtype"):
        raw.pop(key)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 10 GB of host-side random numbers
        return Gemma2ForCausalLM(HFConfig(**raw, attn_implementation="eager")).train()


def _hf_step(model, batch: dict, *, device, dtype, ewc: bool, lam: float, grad_accum: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
    ids = batch["input_ids"].to(device)
    # transformers shifts labels itself: labels_hf[t + 1] = ours[t].
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1:] = batch["labels"][:, :-1].to(device)
    fisher = anchor = None
    if ewc:
        fisher = {n: torch.rand_like(p, dtype=torch.float16) for n, p in model.named_parameters()}
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step():
        for _ in range(grad_accum):  # HF Trainer's accumulation: the loss (and its EWC loop) per micro-batch
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=ids, labels=labels).loss
            if ewc:
                penalty = 0.0
                for name, p in model.named_parameters():  # the reference study's loop inside the loss
                    penalty = penalty + (fisher[name] * (p - anchor[name]) ** 2).sum()
                loss = loss + lam / 2 * penalty
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> int:
    with process_group_scope():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    env = init_distributed(args.device)
    device = env.device
    dtype = compute_dtype(args.dtype, device)
    config = Gemma2Config.preset(args.preset)
    ids, pos, _ = packed_batch(args.batch_size, args.seq_len, config.vocab_size, args.mean_doc_len, device="cpu")
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[torch.roll(pos, -1, dims=1) == 0] = IGNORE_INDEX  # never predict the next document's first token
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    peak, peak_source = device_peak_flops(str(device), dtype)
    tokens = args.batch_size * args.seq_len * args.grad_accum  # per optimizer step
    plan = _activation_plan(args, config, device=device, dtype=dtype)
    default_compile = device.type == "cuda"
    compiled = {"auto": [default_compile], "on": [True], "off": [False], "both": [True, False]}[args.compile]
    ours = {("gemma-ewc" if c or len(compiled) == 1 else "gemma-ewc eager"): c for c in compiled}
    impls = [*ours] + ([] if args.skip_transformers else ["transformers"])
    rows = []
    modes: dict[str, str] = {}  # our impl -> the checkpointing it ran with
    for impl in impls:
        _free(device)
        if impl in ours:
            mode = plan.mode
            if mode == "op" and op_needs_compile(ParallelConfig(compile=ours[impl]), device.type, args.attention):
                mode = choose_mode(plan, op_allowed=False)  # the eager rows: op would run FlexAttention unfused
            modes[impl] = mode
            model = _our_model(config, device=device, dtype=dtype, attention=args.attention, compile=ours[impl],
                               checkpointing=mode)
            flops = batch_flops_per_token(config, batch["position_ids"])
        else:
            model = _hf_model(config, device=device)
            flops = training_flops_per_token(config, args.seq_len)  # full causal rows: no document masks
        # EWC off and on share the model. On CPU they are timed in alternating rounds, so drifts of the machine
        # (clocks, neighbours) affect both alike; on a GPU (steady, but memory-bound for 2B+ models) one after the
        # other, so that only one optimizer's state exists at a time.
        steps, samples, errors, peak_gb = {}, {False: [], True: []}, {}, {}
        timers = {ewc: PhaseTimer(device) for ewc in (False, True)}

        def prepare(ewc: bool) -> None:
            try:
                if impl in ours:
                    steps[ewc] = _our_step(model, batch, device=device, ewc=ewc, lam=args.lam, timer=timers[ewc],
                                           grad_accum=args.grad_accum)
                else:
                    steps[ewc] = _hf_step(model, batch, device=device, dtype=dtype, ewc=ewc, lam=args.lam,
                                          grad_accum=args.grad_accum)
                for _ in range(args.warmup):
                    steps[ewc]()
                timers[ewc].reset()
            except torch.OutOfMemoryError as exc:
                errors[ewc] = f"out of memory: {str(exc).splitlines()[0]}"
                steps.pop(ewc, None)
                _free(device)

        def measure(ewc: bool) -> None:
            samples[ewc].append(time_fn(steps[ewc], device=device, warmup=0, repeat=1)["median_s"])

        if device.type == "cuda":
            for ewc in (False, True):
                _free(device)
                prepare(ewc)
                if ewc in steps:
                    for _ in range(args.steps):
                        measure(ewc)
                    peak_gb[ewc] = torch.cuda.max_memory_allocated(device) / 2**30
                    del steps[ewc]
                    for p in model.parameters():
                        p.grad = None
        else:
            for ewc in (False, True):
                prepare(ewc)
            for _ in range(args.steps):
                for ewc in list(steps):
                    measure(ewc)
        for ewc in (False, True):
            if ewc in errors:
                rows.append({"impl": impl, "ewc": ewc, "error": errors[ewc]})
                continue
            median = statistics.median(samples[ewc])
            phases = timers[ewc].median_ms()
            rows.append({"impl": impl, "ewc": ewc, "compiled": ours.get(impl), "checkpointing": modes.get(impl),
                         "step_ms": 1e3 * median, "norms_ms": phases.get("norms"), "update_ms": phases.get("update"), "tokens_per_s": tokens / median,
                         "mfu": tokens / median * flops / peak, "flops_per_token": flops,
                         "max_memory_gb": peak_gb.get(ewc), "step_s": samples[ewc]})
        steps.clear()
        for p in model.parameters():
            p.grad = None
        model = None
    by = {(r["impl"], r["ewc"]): r for r in rows}
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        hf = by.get(("transformers", r["ewc"]), {})
        off = by.get((r["impl"], False), {})
        r["speedup_vs_transformers"] = (r["tokens_per_s"] / hf["tokens_per_s"]) if "tokens_per_s" in hf else None
        r["ewc_overhead"] = (off["tokens_per_s"] / r["tokens_per_s"]) if "tokens_per_s" in off else None
    result = {"benchmark": "train", "device": str(device), "preset": args.preset, "dtype": str(dtype),
              "seq_len": args.seq_len, "batch_size": args.batch_size, "mean_doc_len": args.mean_doc_len,
              "grad_accum": args.grad_accum, "tokens_per_step": tokens, "lambda": args.lam,
              "activation_checkpointing": plan.describe(), "peak_flops": peak, "peak_flops_source": peak_source,
              # which LM-head path our steps ran: the Triton chunk kernel, or the torch composition
              "lm_head_chunk_kernel": fused_chunk_kernel(device, vocab_size=config.vocab_size,
                                                         softcap=config.final_softcap,
                                                         grad_dtype=chunk_grad_dtype(device, dtype)),
              "rows": rows,
              "machine": machine_info(device)}
    ours_on = by.get(("gemma-ewc", True), {})
    for key in ("tokens_per_s", "mfu", "max_memory_gb", "speedup_vs_transformers", "ewc_overhead"):
        result[f"ours_ewc_{key}"] = ours_on.get(key)
    # Where EWC's cost goes: the whole step's extra time against the optimizer's (norm pass + update) extra time.
    ours_off = by.get(("gemma-ewc", False), {})
    if "step_ms" in ours_on and "step_ms" in ours_off:
        result["ewc_extra_step_ms"] = ours_on["step_ms"] - ours_off["step_ms"]
        if ours_on.get("update_ms") is not None and ours_off.get("update_ms") is not None:
            result["ewc_extra_optimizer_ms"] = (ours_on["update_ms"] + ours_on["norms_ms"]
                                                - ours_off["update_ms"] - ours_off["norms_ms"])
    eager_on = by.get(("gemma-ewc eager", True), {})
    if "tokens_per_s" in eager_on and "tokens_per_s" in ours_on:
        result["ours_ewc_compile_speedup"] = ours_on["tokens_per_s"] / eager_on["tokens_per_s"]
    print(f"activation checkpointing: {plan.describe()}")
    print(format_table(rows, ["impl", "ewc", "compiled", "checkpointing", "step_ms", "norms_ms", "update_ms", "tokens_per_s", "mfu", "max_memory_gb",
                              "speedup_vs_transformers", "ewc_overhead", "error"]))
    if args.out:
        write_results(args.out, result)
    return 0
