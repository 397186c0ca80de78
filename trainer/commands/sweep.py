"""`gemma-ewc sweep CONFIG --out DIR --grid KEY=V1,V2,... [--grid ...] --eval ARGS...`: the λ study in one command.

    gemma-ewc sweep configs/lt.toml --out sweeps/lt --grid ewc.lambda=0,100,1e4 \\
        --grid "data.weights=[1,0],[0.95,0.05]" --eval --ppl en=en_heldout.txt lt=lt_heldout.txt
    gemma-ewc sweep configs/lt.toml --out sweeps/lt --grid ... --print    # the per-run lines, for a job array
    gemma-ewc sweep --collect sweeps/lt                                    # the report, once the jobs are done

Every combination of the grid values is one run (train from the config's starting model, export, eval), then one
report over all of them and the starting model (trainer.sweep). Run the same command again to resume.
"""

from __future__ import annotations

import argparse
import sys

from trainer.commands.options import add_overwrite
from trainer.errors import UserError
from trainer.sweep import collect, fingerprint, plan_sweep, prepare_dir, run_sweep, write_commands


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="run configuration (TOML) shared by every run")
    p.add_argument("--out", default=None, metavar="DIR", help="the sweep directory")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="config values to sweep (TOML literals; lists in brackets: data.weights=[1,0],[0.9,0.1]); "
                        "repeat for a grid of every combination")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config value for every run (repeatable)")
    p.add_argument("--old", default=None, metavar="NAME", help="the report's old-knowledge metric (see report)")
    p.add_argument("--new", default=None, metavar="NAME", help="the report's new-language metric (see report)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="write the per-run command lines (DIR/commands.txt) and print them instead of running")
    p.add_argument("--launcher", default="gemma-ewc",
                   help="what starts each run's training in --print lines, e.g. 'torchrun --standalone "
                        "--nproc-per-node 8 -m trainer.cli' (default: gemma-ewc)")
    p.add_argument("--collect", default=None, metavar="DIR", help="only make the report of the sweep in DIR")
    add_overwrite(p)
    p.add_argument("--eval", dest="eval_args", nargs=argparse.REMAINDER, default=[],
                   help="the rest of the line: `gemma-ewc eval` arguments for every run (--ppl, --tasks, ...)")


def run(args: argparse.Namespace) -> int:
    if args.collect:
        if args.config or args.grid or args.eval_args:
            raise UserError("--collect DIR takes no config, --grid or --eval: it reports the sweep in DIR")
        collect(args.collect)
        return 0
    if not args.config or not args.out:
        raise UserError("give the config and --out DIR (or --collect DIR for the report of a finished sweep)")
    report_args = [*(["--old", args.old] if args.old else []), *(["--new", args.new] if args.new else [])]
    plan = plan_sweep(args.config, out=args.out, grid=args.grid, eval_args=args.eval_args,
                      overrides=args.overrides, report_args=report_args)
    prepare_dir(plan, overwrite=args.overwrite)
    lines = write_commands(plan, launcher=args.launcher)
    print(f"# sweep {fingerprint(plan)}: {len(plan.runs)} run(s) into {plan.out}", file=sys.stderr)
    if args.print_only:
        print("\n".join(lines))
        return 0
    results = run_sweep(plan)
    print(f"\nsweep done: {len(results)} results, report {plan.out / 'report.md'}")
    return 0
