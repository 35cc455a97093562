"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input, arguments or environment: the message says what and where, no traceback is shown."""
