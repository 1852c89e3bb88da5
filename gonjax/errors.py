"""Errors a user can fix. The CLIs print their message as one line and exit non-zero, without a traceback."""


class GonjaxError(Exception):
    """Base class: the message says what was wrong and what to do."""


class UsageError(GonjaxError):
    """A flag, config value or workdir that cannot be used."""


class DataError(GonjaxError):
    """A dataset that cannot be found, downloaded or read."""


class DivergedError(GonjaxError):
    """Training produced a non-finite loss."""
