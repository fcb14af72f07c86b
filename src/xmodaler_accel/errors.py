"""The errors a recipe reports as one line (exit status 2) instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint): the message names the key, file or
    sample at fault and what to do, so `setup.launch` prints it alone and exits with status 2.
    Raise a subclass of it from your own recipe code for the same treatment."""
