"""The `gemma-ewc` command.

Every command is one module, trainer/commands/<name>.py, with `configure(parser)` (adds its arguments) and
`run(args) -> int` (calls the feature functions and prints what they did); its one-line help is its entry in
COMMANDS below. This file only routes: it imports the chosen command's module and no other, so `gemma-ewc --help`
and light commands start without importing torch. To add a command, write its module and add one line to COMMANDS.

User mistakes (`UserError`, a missing file, a wrong argument) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trainer import __version__
from trainer.errors import UserError

COMMAND_PACKAGE = "trainer.commands"

# name (also the module trainer/commands/<name>.py) -> one-line help
COMMANDS: dict[str, str] = {
    "demo": "the whole pipeline on an embedded default, on CPU in minutes",
    "tokenize": "tokenize corpora into a token store",
    "fisher": "estimate the diagonal Fisher of a model and write an EWC file",
    "ewc": "EWC file tools: merge (online EWC), import-legacy",
    "train": "train (one process, or under torchrun for many)",
    "eval": "perplexity, bits per byte and benchmark accuracy of a model",
    "report": "compare eval results of several runs: table and plots",
    "sweep": "the λ study: train, export and eval every combination of a grid, then one report",
    "export": "export a training checkpoint as a Hugging Face Gemma2 directory",
    "bench": "side-by-side benchmarks: optimizer, train, data",
    "profile": "torch.profiler trace and top-kernel table of a few training steps",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong argument as one line (plus the hint to use --help), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="gemma-ewc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"gemma-ewc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            command = importlib.import_module(f"{COMMAND_PACKAGE}.{name}")
            command.configure(p)
            # _parser: a command that parses further arguments itself (bench) reuses this parser's class.
            p.set_defaults(_run=command.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        message = str(exc) if isinstance(exc, UserError) else f"{exc.strerror or 'not found'}: {exc.filename}"
        sys.stderr.write(f"gemma-ewc {args.command}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"gemma-ewc {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
