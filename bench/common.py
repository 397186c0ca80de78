"""What every benchmark shares: timing with device sync, machine description, copy bandwidth, result files.

Benchmarks print a short table and write JSON holding the machine, library versions, git revision and config,
so a number in the README can always be traced to the run that produced it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 2, repeat: int = 5,
            min_time_s: float = 0.0) -> dict:
    """Median wall time of `fn` over `repeat` timed calls after `warmup` untimed ones, device-synchronised.

    With `min_time_s`, repeats continue until that much time has been spent (short ops need many samples).
    Returns {"median_s", "min_s", "mean_s", "repeats"}.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeat or (time.perf_counter() - start_all) < min_time_s:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10_000:
            break
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "mean_s": statistics.fmean(samples),
        "repeats": len(samples),
    }


class PhaseTimer:
    """Time of named phases inside a timed function: CUDA events on a GPU (recorded around the call, read after the
    measurement: no sync inside), host time elsewhere. `wrap(name, fn)` returns fn timed; `median_ms()` per name."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.spans: dict[str, list] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.spans.setdefault(name, []).append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.spans.setdefault(name, []).append(1e3 * (time.perf_counter() - t0))
            return out

        return timed

    def reset(self) -> None:
        self.spans.clear()

    def median_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()

        def ms(span) -> float:
            return span[0].elapsed_time(span[1]) if self.cuda else span

        return {name: statistics.median(ms(span) for span in spans) for name, spans in self.spans.items() if spans}


def git_revision() -> str | None:
    """The checkout's commit (with -dirty for uncommitted changes to tracked files); where the copy has no .git (the
    GPU machine gets a bare working tree), GEMMA_EWC_GIT names it."""
    if os.environ.get("GEMMA_EWC_GIT"):
        return os.environ["GEMMA_EWC_GIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git": git_revision(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def device_name(device: torch.device | str = "cpu") -> str:
    """Short machine tag for result file names: the GPU name, or 'cpu<N>'."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_properties(device).name
    else:
        name = f"cpu{os.cpu_count()}"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def copy_bandwidth(device: torch.device | str = "cpu", *, nbytes: int = 1 << 28) -> float:
    """Measured memory-copy bandwidth in bytes/s, counting bytes read plus bytes written (2 x nbytes per copy).

    The ceiling every memory-bound kernel is compared against. The buffer is sized well past the last-level cache.
    """
    device = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeat=7)
    return 2 * nbytes / t["median_s"]


def format_table(rows: Sequence[dict], columns: Sequence[str], *, floatfmt: str = ".3g") -> str:
    """A plain Markdown table (readable in a terminal and in the README)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(path: str | os.PathLike, payload: dict) -> Path:
    """Write a benchmark's JSON (machine info added under "machine" when absent), atomically: an interrupted write
    leaves any previous file whole."""
    from trainer.fileio import atomic_path

    path = Path(path)
    payload.setdefault("machine", machine_info(payload.get("device", "cpu")))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
