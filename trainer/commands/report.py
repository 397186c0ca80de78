"""`gemma-ewc report RESULTS.json... --out report.md [--plots DIR]`: compare the eval results of several runs.

The Markdown tables and, with --plots, the accuracy and perplexity vs λ plots come from trainer.evaluate.report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.commands.options import add_overwrite
from trainer.evaluate.report import PLOT_FILES, write_report
from trainer.fileio import check_output


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="eval results of the runs to compare")
    p.add_argument("--out", required=True, metavar="FILE", help="write the Markdown report here")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also draw PNG plots (accuracy and perplexity vs lambda) here; needs matplotlib")
    p.add_argument("--base", default=None, metavar="LABEL|FILE",
                   help="the base run (default: the one run without a lambda)")
    add_overwrite(p)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, inputs=args.results, overwrite=args.overwrite)
    if args.plots:  # the plots go into DIR beside what it holds: each plot file is an output of its own
        check_output(args.plots, overwrite=True, directory=True, flag="--plots")
        for name in PLOT_FILES:
            check_output(Path(args.plots) / name, inputs=args.results, overwrite=args.overwrite, flag="--plots")
    written = write_report([Path(p) for p in args.results], out=Path(args.out),
                           plots=Path(args.plots) if args.plots else None, base=args.base)
    for path in written:
        print(f"wrote {path}")
    return 0
