"""`gemma-ewc demo [--out runs/demo] [--text-a FILE --text-b FILE]`: the whole pipeline on CPU in minutes.

The stages (tokenizer, pretraining, Fisher, continued training with and without EWC, evaluation, report) are in
trainer.demo; this command picks the settings and prints the summary table.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time

from trainer.commands.options import add_overwrite
from trainer.demo import MARKER, QUICK, DemoSettings, demo, format_summary
from trainer.fileio import check_output


def _lambda_list(text: str) -> list[float]:
    """--lambdas "0,1,10" -> [0.0, 1.0, 10.0]: finite numbers >= 0 (argparse reports a bad one as usual)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {text!r}") from None
    if not all(math.isfinite(x) and x >= 0 for x in values):
        raise argparse.ArgumentTypeError(f"finite numbers >= 0 expected, got {text!r}")
    return values


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--text-a", default=None, help="text A (what the model knows first; default: synthetic language)")
    p.add_argument("--text-b", default=None, help="text B (what it learns next; default: another synthetic language)")
    p.add_argument("--lambdas", type=_lambda_list, default=None, metavar="L1,L2,...",
                   help="the λ grid of the sweep (λ = 0 is always in it; default: 0,1,10,100)")
    p.add_argument("--quick", action="store_true", help="a shorter run (about a third of the time)")
    add_overwrite(p)


def run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else DemoSettings()
    out = check_output(args.out, inputs=[args.text_a, args.text_b], overwrite=args.overwrite, directory=True,
                       owned_marker=MARKER, owned_kind="a demo's output")
    if out.is_dir() and any(out.iterdir()):  # --overwrite: start afresh, or the runs would resume the old ones
        shutil.rmtree(out)
    start = time.perf_counter()
    rows = demo(out, settings, lambdas=args.lambdas, text_a=args.text_a, text_b=args.text_b)
    print("\n" + format_summary(rows))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; outputs in {args.out}: sweep/report.md, "
          f"sweep/pareto.png, sweep/perplexity_vs_lambda.png, summary.json, base.toml and continue.toml",
          file=sys.stderr)
    return 0
