"""Files of a run folder: atomic text writes and JSON-lines records (metrics.jsonl, train_metrics.jsonl)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from gonjax.errors import UsageError


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so a reader never sees half of it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file ([] when it does not exist) and whether its last line was torn (a crash
    in the middle of a write, dropped here); any other line that is not JSON is a UsageError."""
    path = Path(path)
    if not path.is_file():
        return [], False
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UsageError(f"{path} line {number} is not JSON; repair or remove that line") from None
            return records, True
    return records, False
