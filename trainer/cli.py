"""The `gemma-ewc` command.

Each subcommand lives in the module that owns its feature; this file only routes. A command module provides
`configure_<name>(parser)` (adds its arguments) and `run_<name>(args) -> int`, and is imported only when its
command is chosen, so `gemma-ewc --help` and light commands start without importing torch's heavy parts.

User mistakes (`UserError`, a missing file, a wrong argument) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trainer.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("trainer.demo", "the whole pipeline on an embedded default, on CPU in minutes"),
    "tokenize": ("trainer.data.tokenize", "tokenize corpora into a token store"),
    "fisher": ("trainer.ewc", "estimate the diagonal Fisher of a model and write an EWC file"),
    "ewc": ("trainer.ewc", "EWC file tools: merge (online EWC), import-legacy"),
    "train": ("trainer.train", "train (one process, or under torchrun for many)"),
    "eval": ("trainer.evaluate", "perplexity, bits per byte and benchmark accuracy of a model"),
    "report": ("trainer.evaluate", "compare eval results of several runs: table and plots"),
    "export": ("trainer.train", "export a training checkpoint as a Hugging Face Gemma2 directory"),
    "bench": ("bench.cli", "side-by-side benchmarks: optimizer, train, data"),
    "profile": ("bench.profile", "torch.profiler trace and top-kernel table of a few training steps"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong argument as one line (plus the hint to use --help), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _not_built(name: str):
    def run(args: argparse.Namespace) -> int:
        raise UserError(f"'{name}' is not built yet in this version (see the status table in README.md)")

    return run


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="gemma-ewc", description=__doc__.split("\n\n")[0])
    from trainer import __version__

    parser.add_argument("--version", action="version", version=f"gemma-ewc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                p.set_defaults(_run=_not_built(name))
                continue
            getattr(module, f"configure_{name}")(p)
            p.set_defaults(_run=getattr(module, f"run_{name}"), _parser=p)
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
