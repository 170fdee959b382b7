"""The error type for problems in the user's config, files or data (besides ConfigError, DataError)."""


class UserError(Exception):
    """Printed by run.py as one clear line (exit code 2), never as a traceback."""
