"""A sweep's records on disk: append-only JSON lines that survive being killed at any moment.

Each record is one ``write`` of one complete line on a file opened for appending, flushed to disk
before the next model starts, so an interrupted run loses at most the model in flight. Reading
follows the shared JSON-lines policy of :func:`hf_mergelaw.files.read_jsonl` and never modifies
the file. Before the first append the store checks that the file is a sweep's own (every line a
record with :data:`~hf_mergelaw.record_schema.REQUIRED_FIELDS`) and only then removes a last line
that a crash cut short: a file that is anything else is refused untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RecordsFileError
from .files import read_jsonl
from .record_schema import REQUIRED_FIELDS


class RecordStore:
    """Records of a sweep, readable while being appended to::

    store = RecordStore("results.jsonl")
    store.append({"method": "ties", "params": {}, "k": 1, "subset": ["a"], "ce": 1.93})
    [record["ce"] for record in store]  # [1.93]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._checked = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            yield from (record for _, record in read_jsonl(self.path))

    def check(self) -> None:
        """Refuse (untouched) a file whose lines are not all sweep records."""
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise RecordsFileError(f"{self.path} is a folder; name a .jsonl file as the output.")
        for number, record in read_jsonl(self.path):
            missing = [name for name in REQUIRED_FIELDS if name not in record]
            if missing:
                raise RecordsFileError(
                    f"{self.path}:{number} is not a sweep record (no {', '.join(missing)}); the "
                    "file was not written by a sweep and is left as it is. Write the sweep to a "
                    "new output file."
                )

    def append(self, record: dict[str, Any]) -> None:
        if not self._checked:
            self.check()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _end_with_complete_line(self.path)
            self._checked = True
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the file for one sweep: a second sweep on it fails at once instead of repeating
        every job. Creates the file (and its folder), so an unwritable output fails here."""
        self.check()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self.path.open("ab") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RecordsFileError(
                    f"another sweep is writing {self.path}; wait for it to finish, or write this "
                    "sweep to another output file."
                ) from None
            try:
                yield
            finally:
                if created and self.path.stat().st_size == 0:
                    self.path.unlink()  # nothing measured: leave no empty file behind
                fcntl.flock(handle, fcntl.LOCK_UN)


def _end_with_complete_line(path: Path) -> None:
    """Drop a last line a crash cut short, so the next record starts on a line of its own; a
    complete last record that only lacks its newline gets one."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    tail = data[data.rfind(b"\n") + 1 :]
    try:
        json.loads(tail)
    except ValueError:
        with path.open("r+b") as handle:
            handle.truncate(len(data) - len(tail))
        return
    with path.open("ab") as handle:
        handle.write(b"\n")
