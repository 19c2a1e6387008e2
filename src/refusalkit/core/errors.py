"""Errors that reach the user as one line and exit status 2."""


class UserError(Exception):
    """Bad input or an impossible setting: the CLI prints ``error: <message>`` and exits 2.

    The message must say what to do about it.
    """
