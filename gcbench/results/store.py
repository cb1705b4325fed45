"""``results.jsonl``: append-only, one record a line, flushed and fsynced as each point ends.

A sweep killed at any moment leaves whole lines plus, at worst, one torn last line; loading drops
that line with a warning and truncates it away, so the next append starts on a clean line.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from gcbench.errors import UsageError
from gcbench.results.records import FAILED, Record
from gcbench.results.timing import merge_rounds


class ResultsStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, repair: bool = True) -> list[Record]:
        """Every whole record; a torn last line is dropped (and cut off the file when ``repair``)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        newline = data.rfind(b"\n")
        whole, tail = data[: newline + 1], data[newline + 1 :]
        records = [self._parse(line, number) for number, line in enumerate(whole.split(b"\n"), 1) if line.strip()]
        if tail.strip():  # every record is written with its newline in one write: no newline, torn write
            try:
                records.append(self._parse(tail, whole.count(b"\n") + 1))
                fix = b"\n"
            except UsageError:
                warnings.warn(f"{self.path}: dropped a torn last line (an interrupted write)", stacklevel=2)
                fix = None
            if repair:
                with open(self.path, "r+b") as f:
                    f.truncate(len(whole))
                    if fix:
                        f.seek(len(whole))
                        f.write(tail + fix)
        return records

    def _parse(self, line: bytes, number: int) -> Record:
        try:
            return Record.from_dict(json.loads(line))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UsageError(f"{self.path}:{number}: not a gcbench results record ({error})") from None

    def append(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (record.to_json() + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def reset(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")


def current(records: list[Record]) -> list[Record]:
    """What a reader takes from a results file: one record per point and sweep, its rounds merged.

    ``--retry-failed`` appends a point's new record and leaves the failed one in the file (the store is
    append-only): a failed (error, timeout) record of a point and round that has a later one is dropped.
    The timing rounds of a point are merged into its first round's record
    (:func:`~gcbench.results.timing.merge_rounds`). Other repeated records of a point (a results file
    concatenated from several sweeps) all stay, for the report to merge.
    """
    last = {(r.point.id, r.round): i for i, r in enumerate(records)}
    kept = [r for i, r in enumerate(records) if not (r.status in FAILED and last[r.point.id, r.round] > i)]
    return merge_rounds(kept)
