"""`gemma-ewc bench {optimizer,train,data}`: routes to bench/<name>.py, imported only when chosen.

Each benchmark module provides `configure(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "model": "forward + backward of a model preset on packed rows: tokens/s, MFU, memory, bf16 vs fp32 logits",
    "optimizer": "fused EWC-AdamW step vs torch AdamW, the reference study's loss penalty, foreach composition",
    "train": "training tokens/s, MFU and memory: our trainer vs transformers with loss-based EWC",
    "data": "tokenization and packing/loading throughput vs raw SentencePiece and memory copy",
}


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="its options (see gemma-ewc bench NAME --help)")


def run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"bench.{args.benchmark}")
    parser_class = type(args._parser) if hasattr(args, "_parser") else argparse.ArgumentParser
    sub = parser_class(prog=f"gemma-ewc bench {args.benchmark}", description=BENCHMARKS[args.benchmark])
    module.configure(sub)
    return int(module.run(sub.parse_args(args.bench_args)) or 0)
