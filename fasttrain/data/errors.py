"""The one exception type users see for problems with their data."""


class DataError(ValueError):
    """A data file or record cannot be used; the message names file, row and field.

    It subclasses ValueError so callers that already catch ValueError keep working, while the
    trainer's entry point can catch exactly this type and print the message without a traceback.
    """
