"""`gemma-ewc export CHECKPOINT --out DIR`: a training checkpoint as a Hugging Face Gemma2 directory
(trainer.export), loadable by transformers and by `gemma-ewc eval`.
"""

from __future__ import annotations

import argparse

from trainer.commands.options import STATE_DTYPES, default_first
from trainer.dtypes import DTYPES
from trainer.export import export_checkpoint, resolve_checkpoint


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a step directory, or a run directory (its newest complete checkpoint)")
    p.add_argument("--out", required=True, help="the Hugging Face Gemma2 directory to write")
    p.add_argument("--dtype", choices=default_first(STATE_DTYPES, "bfloat16"), default="bfloat16",
                   help="weight dtype (default bfloat16)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to include (default: the run's data.tokenizer)")


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer)
    print(f"exported {resolve_checkpoint(args.checkpoint)} -> {out}")
    return 0
