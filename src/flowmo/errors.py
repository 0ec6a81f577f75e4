"""Errors that are the user's to fix: the CLI prints their one sentence, not a traceback."""


class UserError(ValueError):
    """Bad input (a missing file, an unknown name or key); the message says what to do."""
