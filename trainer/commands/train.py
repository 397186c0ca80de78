"""`gemma-ewc train CONFIG.toml [--out RUN_DIR] [--set key=value ...]`: one process, or under torchrun for many.

The run directory holds metrics.jsonl and the checkpoints; a run directory with checkpoints is resumed
(trainer.train). torchrun starts this command as `python -m trainer.cli train ...` on every rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.config import load_config
from trainer.distributed import process_group_scope
from trainer.train import check_run_dir, train


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run configuration (TOML); see configs/")
    p.add_argument("--out", default=None, help="run directory: metrics.jsonl and checkpoints (default runs/<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="train at most N steps in this invocation, then checkpoint and exit (job time limits)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    check_run_dir(config, run_dir, config_file=args.config)
    with process_group_scope():
        summary = train(config, run_dir, stop_after=args.stop_after)
    if summary.losses:
        print(f"trained steps {summary.first_step + 1}..{summary.last_step}, final loss {summary.losses[-1]:.4f}, "
              f"checkpoint {summary.checkpoint}")
    return 0
