"""The one exception type for user mistakes: the CLI prints its message and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (file, line, config key); the message names it and the fix."""
