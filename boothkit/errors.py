"""Errors a user can cause. The CLI prints them as one line and exits non-zero, without a traceback."""


class BoothkitError(Exception):
    """A problem with the user's input (paths, images, flags, models) that has a one-line explanation."""


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """An exception (or a library's message) as one line for an error message: its first non-empty line
    (else the exception's type), white space collapsed, cut at `limit` characters."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else (type(error).__name__ if isinstance(error, BaseException) else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."
