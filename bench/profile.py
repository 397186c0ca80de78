"""A torch.profiler trace of a few training steps and the top-kernel table (`gemma-ewc profile CONFIG.toml`,
trainer/commands/profile.py).

    gemma-ewc profile configs/tiny.toml --steps 3 --out runs/profile
    -> runs/profile/trace.json (open in https://ui.perfetto.dev or chrome://tracing), kernels.md, kernels.json

The steps are real training steps of the configured run (same model, data, EWC and optimizer), in a scratch run
directory: nothing is checkpointed. The table lists the operators/kernels by self time (device time on CUDA), and
for the fused EWC-AdamW step the achieved bandwidth: the bytes it must move (28 B per element for AdamW, + the
Fisher and anchor bytes with EWC; kernels/ewc_adamw.py) over its measured time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench.common import format_table, machine_info
from trainer.config import load_config
from trainer.distributed import local_tensor, process_group_scope
from trainer.train import train

EWC_STEP_MARK = "ewc_adamw_step"
CPU_SIDE_PREFIXES = ("aten::", "ProfilerStep", "FSDP::", "Optimizer.", "cuda", "autograd::", "c10d::",
                     EWC_STEP_MARK)


def optimizer_bytes_per_step(optimizer) -> int:
    """Bytes the fused step must move per optimizer step: read p g m v and write p m v, plus F and θ* with EWC."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            local = local_tensor(p)
            per = 7 * local.element_size()
            ewc = optimizer._ewc.get(p) if optimizer.ewc_lambda else None
            if ewc is not None:
                per += ewc[0].element_size() + ewc[1].element_size()
            total += per * local.numel()
    return total


def profile_training(config_path: str | Path, *, overrides: list[str], out: str | Path, steps: int, warmup: int,
                     top: int) -> str:
    """Profile `steps` training steps of the run `config_path` (after `warmup` unprofiled ones) in a scratch run
    directory; writes trace.json, kernels.md and kernels.json into `out` and returns the table (kernels.md)."""
    overrides = list(overrides) + ["checkpoint.every=0", "checkpoint.resume=false", "logging.progress=false"]
    config = load_config(config_path, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = config.parallel.device == "cuda" or (config.parallel.device == "auto" and torch.cuda.is_available())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    scratch = Path(tempfile.mkdtemp(prefix="profile-run-"))
    seen = {}

    def on_step(step: int, *, optimizer, **_) -> None:
        seen["bytes"] = optimizer_bytes_per_step(optimizer)
        prof.step()

    try:
        trace = out / "trace.json"
        with process_group_scope(), profile(
                activities=activities, record_shapes=False, acc_events=True,
                schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
                on_trace_ready=lambda p: p.export_chrome_trace(str(trace))) as prof:
            train(config, scratch, stop_after=warmup + steps, save_final=False, step_hook=on_step)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bytes_per_step = seen.get("bytes", 0)
    rows = []
    step_us = 0.0  # time of the fused optimizer step: its Triton launches on CUDA, its CPU span on CPU
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
        if cuda and event.key.startswith(CPU_SIDE_PREFIXES):
            # On a GPU the table lists kernels and copies only: the device time of an operator or an annotation
            # (the profiler step, FSDP's hooks, the optimizer's span) is that of kernels listed on their own.
            continue
        self_us = device_us if cuda else event.self_cpu_time_total
        if cuda and "ewc_adamw" in event.key and "norm" not in event.key:
            step_us += device_us
        if not cuda and event.key == EWC_STEP_MARK:  # on a GPU its Triton launches are timed above
            step_us += event.cpu_time_total
            self_us = event.cpu_time_total  # the C++ kernel runs inside this span without an operator of its own
        if self_us <= 0:
            continue
        rows.append({"name": event.key[:80], "calls": event.count, "self_ms": self_us / 1e3,
                     "ms_per_call": self_us / 1e3 / max(event.count, 1)})
    if step_us and bytes_per_step:
        rows.append({"name": "= fused EWC-AdamW step (all its launches)", "calls": steps,
                     "self_ms": step_us / 1e3, "ms_per_call": step_us / 1e3 / steps,
                     "GB_per_s": bytes_per_step * steps / (step_us / 1e6) / 1e9})
    rows.sort(key=lambda r: -r["self_ms"])
    total = sum(r["self_ms"] for r in rows)
    for r in rows:
        r["share"] = r["self_ms"] / total if total else 0.0
    shown = rows[:top]
    # The optimizer step is always shown, even when it is not among the top rows.
    shown += [r for r in rows[top:] if "GB_per_s" in r]
    table = format_table(shown, ["name", "calls", "self_ms", "ms_per_call", "share", "GB_per_s"])
    header = (f"# Profile of {steps} step(s) of {config_path} ({'CUDA' if cuda else 'CPU'} "
              f"{'device' if cuda else 'CPU'} self time)\n\nfused optimizer step moves "
              f"{bytes_per_step / 1e6:.1f} MB per step\n\n")
    (out / "kernels.md").write_text(header + table + "\n")
    (out / "kernels.json").write_text(json.dumps({"rows": rows, "bytes_per_optimizer_step": bytes_per_step,
                                                  "steps": steps, "machine": machine_info("cuda" if cuda
                                                                                              else "cpu")},
                                                 indent=2, default=str) + "\n")
    return header + table
