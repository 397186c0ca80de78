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
from dataclasses import dataclass, field
from pathlib import Path

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


def parts() -> list[Part]:
    cli = [PY, "-m", "trainer.cli"]
    return [
        Part("gpu-tests", "GPU-marked tests (compiled Triton, CUDA model checks)",
             [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
              "--junitxml={out}.xml"],
             [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", "--junitxml={out}.xml"],
             150, ok_codes=(0, 5)),  # pytest's 5: no GPU test selected (none exist yet, or all deselected)
        Part("model-2b", "gemma2-2b forward+backward, bf16, flex, packed 4096-token rows",
             cli + ["bench", "model", "--preset", "gemma2-2b", "--seq-len", "4096", "--device", "cuda",
                    "--dtype", "bfloat16", "--attention", "flex", "--steps", "5", "--out", "{out}"],
             cli + ["bench", "model", "--preset", "tiny", "--seq-len", "128", "--device", "cpu", "--steps", "1",
                    "--out", "{out}"],
             150, ["tokens_per_s", "mfu", "max_memory_gb", "logits_rel_err_vs_float32"]),
    ]


def _summarize(part: Part, out: Path) -> dict:
    row: dict = {}
    xml = Path(f"{out}.xml")
    if xml.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        row.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    if out.exists():
        data = json.loads(out.read_text())
        for key in part.summary:
            row[key] = data.get(key)
        row["data"] = data
    return row


def run_parts(*, dry_run: bool, work: Path, only: list[str] | None) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONUNBUFFERED="1")
    results = []
    for part in parts():
        if only and part.name not in only:
            continue
        out = work / f"{part.name}.json"
        command = [c.replace("{out}", str(out)) for c in (part.dry_command if dry_run else part.command)]
        print(f"== {part.name}: {part.what}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=part.timeout_s)
            status = "ok" if proc.returncode in part.ok_codes else f"failed (exit {proc.returncode})"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"timed out after {part.timeout_s}s"
            log = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        seconds = time.perf_counter() - start
        tail = "\n".join(log.strip().splitlines()[-25:])
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
        results = run_parts(dry_run=args.dry_run, work=Path(work), only=args.only)
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
