"""Argument choices that several commands share, each derived from its one definition.

Dtype names come from trainer.dtypes.DTYPES and attention backends from trainer.attention.BACKENDS, so a new dtype
or backend reaches every command at once.
"""

from __future__ import annotations

import argparse

from trainer.attention import BACKENDS
from trainer.dtypes import DTYPES

# float64 serves tests and reference computations; it is not offered on the command line.
MODEL_DTYPES = tuple(name for name in DTYPES if name != "float64")
# The precisions of EWC files, of the Fisher's computation and of exported weights.
STATE_DTYPES = tuple(name for name in MODEL_DTYPES if name != "float16")
# "auto": flash or flex on CUDA, eager on CPU (trainer.attention.resolve_backend).
ATTENTION_CHOICES = ("auto", *BACKENDS)


OVERWRITE_HELP = "replace an existing non-empty --out (never one of this command's inputs)"


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """The --overwrite flag of every command that writes (trainer.fileio.check_output enforces the rule)."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def default_first(names: tuple[str, ...], default: str) -> tuple[str, ...]:
    """`names` with `default` moved to the front: --help lists a command's choices default first."""
    assert default in names, (default, names)
    return (default, *(name for name in names if name != default))
