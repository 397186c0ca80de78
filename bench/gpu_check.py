"""The GPU check: every GPU test and benchmark in one command, within 8 minutes, on a fresh machine.

    bash bench/gpu_check.sh              # on a CUDA machine: writes bench/results/<date>-<gpu>.{json,md}
    bash bench/gpu_check.sh --dry-run    # anywhere: the same parts on CPU with tiny sizes, into a temp folder

Runs from the checkout (no install step, no network). Each part runs in its own process with its own time limit;
a part that fails or times out is reported with the end of its log and the others still run. The summary table is
printed last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Part:
    name: str
    what: str
    command: list[str]  # "{out}" is replaced by the part's JSON path
    dry_command: list[str]
    timeout_s: int
    summary: list[str] = field(default_factory=list)  # JSON keys shown in the table
    ok_codes: tuple[int, ...] = (0,)
    headline: Callable[[dict], dict] | None = None  # derives the table's figures from the part's JSON
    min_s: int = 15  # skipped when less of the budget is left (a part cut short measures nothing)


def _optimizer_headline(data: dict) -> dict:
    """Our fused step (d) on the largest parameter set: vs fused AdamW (a), vs the foreach composition (c), and
    as a fraction of the measured copy bandwidth."""
    rows = [r for r in data.get("rows", []) if r.get("variant", "").startswith("(d)")]
    out = {}
    for dtype in sorted({r["ewc_dtype"] for r in rows}):
        mine = [r for r in rows if r["ewc_dtype"] == dtype]
        if not mine:
            continue
        r = max(mine, key=lambda r: r["elements"])
        tag = "f32" if dtype == "float32" else "bf16"
        out.update({f"{tag}_elements": r["elements"], f"{tag}_d_vs_a": r.get("x_vs_a"),
                    f"{tag}_d_of_copy_bw": r.get("of_copy_bw"), f"{tag}_d_speedup_vs_c": r.get("speedup_vs_c")})
    return out


def parts() -> list[Part]:
    cli = [PY, "-m", "trainer.cli"]
    # The headline first (the 2B training step), then the optimizer, the model alone and the tests: if the 8-minute
    # budget runs out, the last parts are the ones skipped.
    return [
        Part("train-2b", "gemma2-2b training steps: ours (compiled blocks) vs transformers + loss-based EWC, EWC on/off",
             cli + ["bench", "train", "--preset", "gemma2-2b", "--seq-len", "4096", "--device", "cuda",
                    "--attention", "flex", "--steps", "3", "--warmup", "2", "--compile", "on", "--grad-accum", "4",
                    "--out", "{out}"],
             cli + ["bench", "train", "--preset", "tiny", "--seq-len", "64", "--device", "cpu", "--steps", "1",
                    "--warmup", "1", "--grad-accum", "2", "--out", "{out}"],
             240, ["ours_ewc_tokens_per_s", "ours_ewc_mfu", "ours_ewc_max_memory_gb",
                   "ours_ewc_speedup_vs_transformers", "ours_ewc_ewc_overhead", "ewc_extra_step_ms",
                   "ewc_extra_optimizer_ms", "activation_checkpointing", "lm_head_chunk_kernel"]),
        Part("optimizer", "fused EWC-AdamW step vs torch fused AdamW and the foreach composition (GB/s)",
             cli + ["bench", "optimizer", "--device", "cuda", "--out", "{out}"],
             cli + ["bench", "optimizer", "--device", "cpu", "--sizes", "1M", "--ewc-dtypes", "float32",
                    "--variants", "a,c,d", "--repeat", "1", "--warmup", "1", "--min-time", "0", "--out", "{out}"],
             90, headline=_optimizer_headline),
        Part("model-2b", "gemma2-2b forward+backward, bf16, flex, compiled blocks, packed 4096-token rows",
             cli + ["bench", "model", "--preset", "gemma2-2b", "--seq-len", "4096", "--device", "cuda",
                    "--dtype", "bfloat16", "--attention", "flex", "--steps", "3", "--compile", "--out", "{out}"],
             cli + ["bench", "model", "--preset", "tiny", "--seq-len", "128", "--device", "cpu", "--steps", "1",
                    "--out", "{out}"],
             150, ["tokens_per_s", "mfu", "max_memory_gb", "logits_rel_err_vs_float32"]),
        Part("loss-2b", "gemma2-2b LM-head loss, 4096 rows: Triton chunk kernel vs torch composition vs materialised",
             cli + ["bench", "loss", "--preset", "gemma2-2b", "--rows", "4096", "--device", "cuda", "--out", "{out}"],
             cli + ["bench", "loss", "--preset", "tiny", "--rows", "64", "--device", "cpu", "--repeat", "1",
                    "--warmup", "1", "--out", "{out}"],
             60, ["fused_ms", "composition_ms", "fused_speedup_vs_composition", "fused_speedup_vs_materialised",
                  "fused_grad_weight_rel_diff", "kernel_of_copy_bw"]),
        Part("gpu-tests", "GPU-marked tests (compiled Triton, CUDA model checks)",
             # --tb=short and no captured DEBUG logs: a failure's assertion and its seed fit in the log tail.
             [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-p", "no:logging",
              "--tb=short", "-rfE", "--durations=15", "--junitxml={out}.xml"],
             [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-p", "no:logging",
              "--tb=short", "-rfE", "--junitxml={out}.xml"],
             200, ok_codes=(0, 5)),  # pytest's 5: no GPU test selected (all deselected on a dry run)
        # What compiling the blocks gains, side by side in one run (last: skipped first when time runs out); one
        # micro-batch per step, as the 2026-11-28 run measured (its eager rows are that run's configuration).
        Part("train-2b-eager", "gemma2-2b training step, ours: compiled vs eager blocks, EWC on/off",
             cli + ["bench", "train", "--preset", "gemma2-2b", "--seq-len", "4096", "--device", "cuda",
                    "--attention", "flex", "--steps", "3", "--warmup", "2", "--compile", "both",
                    "--skip-transformers", "--out", "{out}"],
             cli + ["bench", "train", "--preset", "tiny", "--seq-len", "64", "--device", "cpu", "--steps", "1",
                    "--warmup", "1", "--compile", "off", "--skip-transformers", "--out", "{out}"],
             200, ["ours_ewc_tokens_per_s", "ours_ewc_compile_speedup"], min_s=150),
    ]


def _summarize(part: Part, out: Path) -> dict:
    row: dict = {}
    xml = Path(f"{out}.xml")
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        row.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    if out.exists():
        data = json.loads(out.read_text())
        for key in part.summary:
            row[key] = data.get(key)
        if part.headline is not None:
            row.update(part.headline(data))
        row["data"] = data
    return row


def run_parts(*, dry_run: bool, work: Path, only: list[str] | None, budget_s: float) -> list[dict]:
    """Run the parts in order; each gets its own limit, cut to what is left of `budget_s` (results are always
    written: a part that no longer fits is reported as skipped)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONUNBUFFERED="1")
    deadline = time.perf_counter() + budget_s
    results = []
    for part in parts():
        if only and part.name not in only:
            continue
        out = work / f"{part.name}.json"
        command = [c.replace("{out}", str(out)) for c in (part.dry_command if dry_run else part.command)]
        limit = min(part.timeout_s, deadline - time.perf_counter())
        if limit < (15 if dry_run else part.min_s):
            results.append({"part": part.name, "what": part.what, "status": "skipped (8-minute budget spent)",
                            "seconds": 0.0, "log_tail": ""})
            continue
        print(f"== {part.name}: {part.what}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
            status = "ok" if proc.returncode in part.ok_codes else f"failed (exit {proc.returncode})"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"timed out after {limit:.0f}s"
            log = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        seconds = time.perf_counter() - start
        tail = "\n".join(log.strip().splitlines()[-25 if status == "ok" else -80:])
        print(tail + "\n", flush=True)
        row = {"part": part.name, "what": part.what, "status": status, "seconds": round(seconds, 1),
               "log_tail": tail if status != "ok" else ""}
        try:
            row.update(_summarize(part, out))
        except (OSError, ValueError) as exc:
            row["status"] += f"; unreadable output ({exc})"
        results.append(row)
    return results


def _markdown(results: list[dict], header: dict) -> str:
    lines = [f"# GPU check {header['date']} on {header['gpu']}", "",
             f"Command: `{header['command']}` at git {header['git']}; torch {header['torch']}, "
             f"triton {header['triton']}.", "", "| part | status | seconds | key figures |", "|---|---|---|---|"]
    for r in results:
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                            if k not in ("part", "what", "status", "seconds", "log_tail", "data") and v is not None)
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']} | {figures} |")
    failed = [r for r in results if r["status"] != "ok"]
    for r in failed:
        lines += ["", f"## {r['part']}: {r['status']}", "", "```", r["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, results into a temp folder")
    p.add_argument("--results-dir", default=None, help="default: bench/results (temp folder with --dry-run)")
    p.add_argument("--only", nargs="*", help="run only these parts")
    p.add_argument("--budget", type=float, default=470, help="seconds for all parts together (default 470)")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    from bench.common import device_name, git_revision, machine_info

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    results_dir = Path(args.results_dir or (tempfile.mkdtemp(prefix="gpu-check-") if args.dry_run
                                            else REPO / "bench" / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-parts-") as work:
        results = run_parts(dry_run=args.dry_run, work=Path(work), only=args.only, budget_s=args.budget)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    gpu = device_name(device) + ("-dryrun" if args.dry_run else "")
    header = {"date": date, "gpu": gpu, "git": git_revision(), "torch": torch.__version__,
              "triton": machine_info(device).get("triton"),
              "command": "bash bench/gpu_check.sh" + (" --dry-run" if args.dry_run else "")}
    payload = {**header, "machine": machine_info(device), "parts": results}
    stem = results_dir / f"{date}-{gpu}"
    Path(f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    markdown = _markdown(results, header)
    Path(f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"results: {stem}.json, {stem}.md")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
