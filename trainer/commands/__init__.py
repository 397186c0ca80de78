"""The `gemma-ewc` commands: one module per command, all built the same way.

A command module trainer/commands/<name>.py has a docstring (usage and what it writes) and two functions:

    def configure(parser: argparse.ArgumentParser) -> None:   # adds the command's arguments
    def run(args: argparse.Namespace) -> int:                  # the exit code

`run` checks the arguments, calls the feature functions (trainer.train, trainer.export, trainer.evaluate, ...)
and prints what they did; the work itself stays in the feature modules. User mistakes are raised as `UserError`,
which trainer.cli prints as one line with exit code 2. trainer/cli.py registers the command by name with its
one-line help and imports the module only when that command is chosen, so a command module imports what it needs
at its top. Choices shared by several commands (dtype names, attention backends) are in `options`.
"""
