"""`gemma-ewc profile CONFIG.toml [--steps N]`: torch.profiler trace and top-kernel table of a few training steps.

    gemma-ewc profile configs/tiny.toml --steps 3 --out runs/profile

The profiling is bench.profile.profile_training (real training steps in a scratch run directory, nothing
checkpointed); this command prints its table and where the trace is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.profile import profile_training
from trainer.commands.options import add_overwrite
from trainer.fileio import check_output


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run configuration (TOML)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before profiling (compilation, caches)")
    p.add_argument("--out", default="runs/profile", help="directory for trace.json, kernels.md, kernels.json")
    p.add_argument("--top", type=int, default=20, help="rows of the kernel table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_overwrite(p)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, inputs=[args.config], overwrite=args.overwrite, directory=True, owned_marker="trace.json",
                 owned_kind="a profile")
    table = profile_training(args.config, overrides=args.overrides, out=args.out, steps=args.steps,
                             warmup=args.warmup, top=args.top)
    out = Path(args.out)
    print(table)
    print(f"\ntrace: {out / 'trace.json'}  table: {out / 'kernels.md'}")
    return 0
