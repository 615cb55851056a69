"""The usage journal: append-only JSON-lines files, written before each response leaves.

One ``write(2)`` per record on an ``O_APPEND`` file: once it returns, the record is in the kernel's page cache, so
it survives the platform being killed with SIGKILL (not a power cut: that is what the database's commit is for,
a fraction of a second later). The ledger moves records into the database in batches and deletes a journal file
only after the batch that holds it has committed; on start it replays whatever files are left. Replay is
idempotent (the ledger inserts by tenant and request id), so a crash between commit and delete double-counts
nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("paddlefn.billing")

PREFIX, SUFFIX = "usage-", ".jsonl"


class JournalError(OSError):
    """A record could not be written (disk full, read-only file system)."""


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        existing = self.files()
        self._seq = _seq_of(existing[-1]) + 1 if existing else 1
        self._fd = -1
        self.path = self._open()

    def files(self) -> list[Path]:
        """Journal files on disk, oldest first."""
        return sorted(self.folder.glob(f"{PREFIX}*{SUFFIX}"), key=_seq_of)

    def _open(self) -> Path:
        path = self.folder / f"{PREFIX}{self._seq:012d}{SUFFIX}"
        self._seq += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return path

    def append(self, row: dict[str, Any]) -> None:
        line = orjson.dumps(row) + b"\n"
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            raise JournalError(exc.errno, f"usage journal {self.path}: {exc.strerror}") from None
        if written != len(line):  # only on a full disk; the partial line is skipped on replay
            raise JournalError(28, f"usage journal {self.path}: short write (disk full?)")

    def rotate(self) -> Path:
        """Start a new file; the returned one gets no more records (its batch is being committed)."""
        old = self.path
        os.close(self._fd)
        self.path = self._open()
        return old

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read(path: Path) -> list[dict[str, Any]]:
    """The records of a journal file. A line cut short by a crash mid-write is skipped: its request had no
    response yet (the write comes before the response), so it was never answered and is not billable."""
    rows = []
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                log.warning("%s:%d: skipping a record cut short by a crash", path.name, number)
                continue
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                log.warning("%s:%d: skipping an unreadable record", path.name, number)
    return rows


def _seq_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX).removesuffix(SUFFIX))
