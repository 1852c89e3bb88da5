"""Errors a user can fix (the CLIs print their message as one line and exit non-zero, without a traceback), the
safe points where a requested stop (Ctrl-C, SIGTERM) is honoured, and the libraries' notices held back."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable


class GonjaxError(Exception):
    """Base class: the message says what was wrong and what to do."""


class UsageError(GonjaxError):
    """A flag, config value or workdir that cannot be used."""


class RunInUseError(UsageError):
    """A run folder another live process holds (its lock): not a fault of the run, it is being trained."""

    def __init__(self, path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"--workdir {path} is in use by {holder}; wait for it to finish (or stop it) and rerun, "
                         "or choose another --workdir")


class CheckpointMismatchError(UsageError):
    """A run folder's checkpoint was written for another parameter tree than the one these settings build."""


class DataError(GonjaxError):
    """A dataset that cannot be found, downloaded or read."""


class DivergedError(GonjaxError):
    """Training produced a non-finite loss."""


def stop_if_requested(should_stop: Callable[[], bool] | None) -> None:
    """A safe point: raise KeyboardInterrupt here when `should_stop()` says a stop was requested (the CLIs pass
    their Ctrl-C / SIGTERM flag). Long loops (training, evaluation, rendering) call this between device calls."""
    if should_stop is not None and should_stop():
        raise KeyboardInterrupt


@contextlib.contextmanager
def quiet_absl():
    """Hold back the warnings orbax and TFDS log through the "absl" logger (below ERROR) for the duration, then
    restore its level: a manager opened read-only (it will not save), a checkpoint without a metadata file, a
    dataset folder without its info while TFDS prepares it are nothing a user can act on, and the library is used
    where the CLIs' own silencing does not reach (a notebook). Errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)
