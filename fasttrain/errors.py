"""The error types for problems in the user's config, files or data.

Every entry point (``fasttrain/run.py``, ``python -m fasttrain.eval``, ``python -m fasttrain.datagen``) ends
a run that raised one of these with one line on stderr and exit code 2, never a traceback
(``fasttrain/cli.py``, DESIGN §8.1). Every user-facing error type lives here; all are UserErrors.
"""


class UserError(Exception):
    """Something the user gave is wrong; the message names the file/row/key and what was expected."""


class ConfigError(UserError, ValueError):
    """A config file, key or value is wrong; the message names the key and the file."""


class DataError(UserError, ValueError):
    """A data file or record cannot be used; the message names file, row and field.

    Also a ValueError, so callers that already catch ValueError keep working.
    """


class TrainingStopped(UserError):
    """Too many consecutive non-finite steps: the run stops with a message (exit code 2)."""


class PeerFailed(UserError):
    """Raised on every rank whose own work succeeded when another rank failed (fasttrain.distributed.agree).

    ``exit_code`` is 2 when the other rank's failure was a UserError (the same message, printed once by
    rank 0), 1 when it was an internal error (that rank printed its own traceback).
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
