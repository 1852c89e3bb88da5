"""Files of a run folder: atomic text writes and JSON-lines records (metrics.jsonl, train_metrics.jsonl)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gonjax.errors import UsageError


@contextlib.contextmanager
def atomic_output(path: Path, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write into (a file, or with `folder` a new folder), renamed to `path`
    when the block completes and removed when it fails, so `path` appears complete or not at all."""
    path = Path(path)
    if folder:
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    else:
        temporary = path.with_name(f".{path.name}.partial{path.suffix}")  # keeps the suffix (PNG writers read it)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if folder:
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def check_path(path: Path, what: str) -> Path:
    """`path`, after asking the filesystem about it once: a name it refuses (too long, a component that is a
    file) is a UsageError naming `what` (e.g. "--workdir"), not an OSError from deep inside a run."""
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise UsageError(f"cannot use {what} {str(path)[:120]}{'...' if len(str(path)) > 120 else ''} "
                         f"({error.strerror or error}); choose another path") from None
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so a reader never sees half of it."""
    with atomic_output(path) as temporary:
        temporary.write_text(text)


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file ([] when it does not exist) and whether its last line was torn (a crash
    in the middle of a write, dropped here); any other line that is not a JSON record (an object with a numeric
    "step") is a UsageError."""
    path = Path(path)
    if not path.is_file():
        return [], False
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise UsageError(f"{path} line {number} is not JSON; repair or remove that line") from None
            return records, True
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            raise UsageError(f"{path} line {number} is not a record of a step (a JSON object with an integer "
                             "\"step\"); repair or remove that line")
        records.append(record)
    return records, False
