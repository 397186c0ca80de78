"""The one exception type for user mistakes: the CLI prints it as a single line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user (a wrong argument, a malformed file): the message says what and how to fix it."""
