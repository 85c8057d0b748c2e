"""The one exception type for mistakes a user can fix: bad names, bad files, bad numbers."""


class ModellegoError(Exception):
    """A user-facing error: its message is one readable line saying what is wrong and how to fix it.

    The CLI prints it without a traceback and exits with code 2.
    """
