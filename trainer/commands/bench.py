"""`gemma-ewc bench {optimizer,train,data,model,loss} [...]`: side-by-side benchmarks, JSON + table.

Each benchmark is a module bench/<name>.py with `configure(parser)` and `run(args) -> int`, imported only when
chosen; its options are parsed here by a parser of the router's class (one-line errors, exit code 2).
"""

from __future__ import annotations

import argparse
import importlib

from trainer.fileio import check_output

BENCHMARKS = {
    "model": "forward + backward of a model preset on packed rows: tokens/s, MFU, memory, bf16 vs fp32 logits",
    "optimizer": "fused EWC-AdamW step vs torch AdamW, the reference study's loss penalty, foreach composition",
    "train": "training tokens/s, MFU and memory: our trainer vs transformers with loss-based EWC",
    "data": "tokenization and packing/loading throughput vs raw SentencePiece and memory copy",
    "loss": "LM-head loss forward + backward: Triton chunk kernel vs torch composition vs materialised logits",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="its options (see gemma-ewc bench NAME --help)")


def run(args: argparse.Namespace) -> int:
    benchmark = importlib.import_module(f"bench.{args.benchmark}")
    parser_class = type(args._parser) if hasattr(args, "_parser") else argparse.ArgumentParser
    sub = parser_class(prog=f"gemma-ewc bench {args.benchmark}", description=BENCHMARKS[args.benchmark])
    benchmark.configure(sub)
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    bench_args = sub.parse_args(args.bench_args)
    if getattr(bench_args, "out", None):  # refused before the benchmark runs, not after minutes of it
        check_output(bench_args.out, overwrite=bench_args.overwrite)
    return int(benchmark.run(bench_args) or 0)
