"""A run's folder (README "What a run writes"): the lock that keeps it to one process, its config.json, and its
JSON-lines metric files, written atomically or appended.

`RunDir` refuses a folder that holds another run (a different config.json) or something that is not a run.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from gonjax import files
from gonjax.config import Config
from gonjax.errors import RunInUseError, UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def looks_like_a_run(path: Path) -> bool:
    """Whether a folder holds what a gonjax run writes besides config.json (checkpoints, metrics.jsonl)."""
    return (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()


class RunDir:
    """A run's folder: refuses to touch anything that is not this run, holds an exclusive lock on it while the
    run is open (a second process on the same folder gets a UsageError naming the holder; the operating system
    drops the lock of a process that dies), writes files atomically.

    In a run of several processes only process 0 holds the folder (`claim`) and writes; the others only check it
    and read (`primary=False`). `claim=False` checks now and leaves the claim for later."""

    LOCK = ".lock"

    def __init__(self, path: Path, config: Config, primary: bool = True, claim: bool = True):
        self.path = Path(path)
        self.config = config
        self.primary = primary
        self._lock = None
        self._check(config)
        if claim:
            self.claim()

    def claim(self) -> None:
        """Create the folder, lock it and write config.json (the primary process)."""
        if not self.primary:
            return
        config = self.config
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            self._check(config)  # again under the lock: another process may have claimed it meanwhile
            self.write_text("config.json", config.to_json() + "\n")
        except OSError as error:
            self.release()
            raise UsageError(f"cannot write to --workdir {self.path} ({error.strerror or error}); "
                             "choose a writable folder") from None
        except BaseException:
            self.release()
            raise

    def _check(self, config: Config) -> None:
        config_file = files.check_path(self.path, "--workdir") / "config.json"
        if config_file.exists():
            try:
                saved = Config.load(config_file)
            except (ValueError, TypeError) as error:
                raise UsageError(f"{config_file} is unreadable ({error}); choose another --workdir") from None
            diff = saved.differences(config)
            if diff:
                listed = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
                raise UsageError(f"--workdir {self.path} holds a different run ({listed}); "
                                 "choose another --workdir or rerun with its settings")
        elif self.path.exists() and (not self.path.is_dir()
                                     or any(not self._being_created(p.name) for p in self.path.iterdir())):
            if looks_like_a_run(self.path):
                raise UsageError(f"--workdir {self.path} holds a run's files but no config.json (deleted?); put "
                                 "it back (it records the run's settings) or choose another --workdir")
            raise UsageError(f"--workdir {self.path} exists and is not a gonjax run; choose another --workdir")

    def _being_created(self, name: str) -> bool:
        """Whether a file is what a run folder holds while another process creates it: the lock, or config.json
        being written (`files.write_atomic`'s hidden partial file)."""
        return name == self.LOCK or (name.startswith(".config.json.") and ".partial" in name)

    def _acquire_lock(self) -> None:
        if fcntl is None:  # no advisory locks on this platform (Windows): unguarded, as before
            return
        handle = open(self.path / self.LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunInUseError(self.path, holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        """Give up the folder's lock (also done by the operating system when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def write_text(self, name: str, text: str) -> None:
        if self.primary:
            files.write_atomic(self.path / name, text)

    def read_metrics(self, up_to_step: int, name: str = "metrics.jsonl") -> list[dict]:
        """Records of a JSON-lines file up to `up_to_step`; later ones (written after the last checkpoint of an
        interrupted run) are dropped from the file."""
        records, torn = files.read_jsonl(self.path / name)
        kept = [r for r in records if r["step"] <= up_to_step]
        if self.primary and (torn or len(kept) != len(records)):  # rows past the checkpoint, a torn line: rewrite
            self.write_text(name, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append_metrics(self, record: dict, name: str = "metrics.jsonl") -> None:
        if not self.primary:
            return
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")
