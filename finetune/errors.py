"""The errors an entry point reports to the user as one message, without a traceback."""

from __future__ import annotations


class StageError(Exception):
    """A problem with the user's input (data, model, files), worded for the user: printed without a traceback."""
