"""Errors a user can cause. The CLI prints them as one line and exits non-zero, without a traceback."""


class BoothkitError(Exception):
    """A problem with the user's input (paths, images, flags, models) that has a one-line explanation."""
