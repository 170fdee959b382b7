"""The one exception type users see for problems with their data."""

from fasttrain.errors import UserError


class DataError(UserError, ValueError):
    """A data file or record cannot be used; the message names file, row and field.

    It subclasses ValueError so callers that already catch ValueError keep working, and UserError so
    every entry point prints the message as one line, without a traceback (fasttrain/cli.py).
    """
