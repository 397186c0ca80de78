"""`gemma-ewc export CHECKPOINT --out DIR`: a training checkpoint as a Hugging Face Gemma2 directory
(trainer.export), loadable by transformers and by `gemma-ewc eval`.
"""

from __future__ import annotations

import argparse

from trainer.commands.options import STATE_DTYPES, add_overwrite, default_first
from trainer.dtypes import DTYPES
from trainer.export import export_checkpoint, resolve_checkpoint, run_tokenizer
from trainer.fileio import check_output


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a step directory, or a run directory (its newest complete checkpoint)")
    p.add_argument("--out", required=True, help="the Hugging Face Gemma2 directory to write")
    p.add_argument("--dtype", choices=default_first(STATE_DTYPES, "bfloat16"), default="bfloat16",
                   help="weight dtype (default bfloat16)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to include (default: the run's data.tokenizer)")
    add_overwrite(p)


def run(args: argparse.Namespace) -> int:
    step_dir = resolve_checkpoint(args.checkpoint)
    check_output(args.out, inputs=[args.checkpoint, step_dir, args.tokenizer or run_tokenizer(step_dir)],
                 overwrite=args.overwrite, directory=True, owned_marker="config.json",
                 owned_kind="a model directory")
    out = export_checkpoint(step_dir, args.out, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer)
    print(f"exported {step_dir} -> {out}")
    return 0
