"""`gemma-ewc ewc merge A B --gamma G --out C` (online EWC) and `gemma-ewc ewc import-legacy EWC_params.pkl --out
EWC.safetensors` (the reference study's pickle): EWC file tools (trainer.ewc.file, trainer.ewc.legacy).
"""

from __future__ import annotations

import argparse
import json
import time

from trainer.commands.options import STATE_DTYPES, add_overwrite
from trainer.dtypes import DTYPES
from trainer.ewc.file import NORMALIZE_MODES, merge_ewc
from trainer.ewc.legacy import format_report, import_legacy
from trainer.fileio import check_output


def configure(p: argparse.ArgumentParser) -> None:
    # The sub-parsers inherit the router's parser class (one-line errors, exit code 2).
    sub = p.add_subparsers(dest="ewc_command", metavar="{merge,import-legacy}", required=True)
    m = sub.add_parser("merge", help="online EWC: F = gamma * F_A + F_B, anchor from B",
                       description="online EWC: F = gamma * F_A + F_B (raw Fishers), anchor from B")
    m.add_argument("a", help="EWC file of the earlier task(s)")
    m.add_argument("b", help="EWC file of the newest task (its anchor is kept)")
    m.add_argument("--gamma", type=float, required=True, help="decay of the earlier Fisher (0 <= gamma)")
    m.add_argument("--out", required=True)
    m.add_argument("--fisher-dtype", choices=STATE_DTYPES, default="float32")
    m.add_argument("--normalize", choices=NORMALIZE_MODES, default="none")
    add_overwrite(m)
    i = sub.add_parser("import-legacy", help="convert the reference study's EWC_params.pkl",
                       description="convert the reference study's pickle (anchors, fisher) to an EWC file; "
                                   "the pickle is read without running any code it may carry")
    i.add_argument("pickle", help="EWC_params.pkl")
    i.add_argument("--out", required=True)
    i.add_argument("--inf-cap", type=float, default=100.0, help="the value that replaced infinities (default 100)")
    i.add_argument("--fisher-dtype", choices=STATE_DTYPES, default="float32")
    i.add_argument("--anchor-dtype", choices=STATE_DTYPES, default="float32",
                   help="float32 keeps the pickle's float16 anchor exactly (default)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    add_overwrite(i)


def run(args: argparse.Namespace) -> int:
    if args.ewc_command == "merge":
        check_output(args.out, inputs=[args.a, args.b], overwrite=args.overwrite)
        t0 = time.perf_counter()
        meta = merge_ewc(args.a, args.b, args.out, gamma=args.gamma, fisher_dtype=DTYPES[args.fisher_dtype],
                         normalize=args.normalize)
        print(f"wrote {args.out}: F = {args.gamma:g} * F({args.a}) + F({args.b}), anchor from {args.b}; "
              f"{meta['parameters']} parameters, normalize {args.normalize} (divisor {float(meta['fisher_divisor']):.4g})"
              f" in {time.perf_counter() - t0:.1f} s")
        return 0
    check_output(args.out, inputs=[args.pickle], overwrite=args.overwrite)
    report = import_legacy(args.pickle, args.out, inf_cap=args.inf_cap, fisher_dtype=DTYPES[args.fisher_dtype],
                           anchor_dtype=DTYPES[args.anchor_dtype])
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
