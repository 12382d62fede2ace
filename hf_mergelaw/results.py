"""Append-only JSON-lines results that survive being killed at any moment.

Each record is one `write` of one complete line on a file opened for appending, flushed to disk
before the next model starts; so an interrupted run loses at most the model in flight. A line cut
short by a crash mid-write is removed the next time the file is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ResultsFile:
    """Records of a sweep on disk, readable while being appended to.

    >>> results = ResultsFile("results.jsonl")
    >>> results.append({"method": "ties", "k": 2, "ce": 1.93})
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open() as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield _parse(line, self.path, number)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)


def _parse(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{number} is not a JSON record ({error}); it was not written by a sweep. "
            "Remove that line or write the sweep to a new output file."
        ) from error
