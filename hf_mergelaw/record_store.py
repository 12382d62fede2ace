"""A sweep's records on disk: append-only JSON lines that survive being killed at any moment.

Each record is one ``write`` of one complete line on a file opened for appending, flushed to disk
before the next model starts, so an interrupted run loses at most the model in flight. A line cut
short by a crash mid-write is removed the next time the store is opened; reading follows the
shared JSON-lines policy of :func:`hf_mergelaw.files.read_jsonl`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import read_jsonl


class RecordStore:
    """Records of a sweep, readable while being appended to::

    store = RecordStore("results.jsonl")
    store.append({"method": "ties", "k": 2, "ce": 1.93})
    [record["ce"] for record in store]  # [1.93]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _end_with_complete_line(self.path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            yield from (record for _, record in read_jsonl(self.path))

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _end_with_complete_line(path: Path) -> None:
    """Drop a last line a crash cut short, so the next record starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)
