"""The error types for problems in the user's config, files or data.

Every entry point (``fasttrain/run.py``, ``python -m fasttrain.eval``, ``python -m fasttrain.datagen``) ends
a run that raised one of these with one line on stderr and exit code 2, never a traceback
(``fasttrain/cli.py``). ``ConfigError`` (fasttrain.config) and ``DataError`` (fasttrain.data.errors) are
subclasses, so catching ``UserError`` catches all three.
"""


class UserError(Exception):
    """Something the user gave is wrong; the message names the file/row/key and what was expected."""


class PeerFailed(UserError):
    """Raised on every rank whose own work succeeded when another rank failed (fasttrain.distributed.agree).

    ``exit_code`` is 2 when the other rank's failure was a UserError (the same message, printed once by
    rank 0), 1 when it was an internal error (that rank printed its own traceback).
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
