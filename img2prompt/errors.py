"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input, arguments or environment: the message says what and where, no traceback is shown."""


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened at a word boundary (never mid-word) with '…'."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return (cut if len(cut) >= limit // 2 else text[:limit]) + "…"
