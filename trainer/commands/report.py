"""`gemma-ewc report RESULTS.json... --out report.md [--plots DIR] [--base LABEL] [--old NAME --new NAME]`.

Compares the eval results of several runs: the Markdown tables (scores, change vs base, the Pareto frontier of old
knowledge against the new language) and, with --plots, accuracy_vs_lambda.png, perplexity_vs_lambda.png (λ on a log
axis, 0 at its left edge), pareto.png and, for runs whose training metrics.jsonl holds EWC drift telemetry,
drift_per_block.png, all from trainer.evaluate.report. --old/--new name a perplexity set or a
task as it appears in the results; with neither, two perplexity sets are old then new in the first file's order.
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
                   help="also draw PNG plots (accuracy and perplexity vs lambda, the Pareto plot, the drift "
                        "per block of runs whose metrics.jsonl is found) here; needs matplotlib")
    p.add_argument("--base", default=None, metavar="LABEL|FILE",
                   help="the base run (default: the one run without a lambda)")
    p.add_argument("--old", default=None, metavar="NAME",
                   help="the old-knowledge metric of the Pareto plot: a perplexity set or a task in the results "
                        "(default: the first of exactly two perplexity sets)")
    p.add_argument("--new", default=None, metavar="NAME",
                   help="the new-language metric of the Pareto plot: a perplexity set or a task in the results "
                        "(default: the second of exactly two perplexity sets)")
    add_overwrite(p)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, inputs=args.results, overwrite=args.overwrite)
    if args.plots:  # the plots go into DIR beside what it holds: each plot file is an output of its own
        check_output(args.plots, overwrite=True, directory=True, flag="--plots")
        for name in PLOT_FILES:
            check_output(Path(args.plots) / name, inputs=args.results, overwrite=args.overwrite, flag="--plots")
    written = write_report([Path(p) for p in args.results], out=Path(args.out),
                           plots=Path(args.plots) if args.plots else None, base=args.base, old=args.old,
                           new=args.new)
    for path in written:
        print(f"wrote {path}")
    return 0
