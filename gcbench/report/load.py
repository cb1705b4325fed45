"""Results files in, labelled runs out: what a report shows or compares.

Reading never repairs a file (a report must not change its inputs), and anything that is not a
usable results file ends in a one-line :class:`UsageError` naming it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gcbench.errors import UsageError
from gcbench.results.records import RESULTS_FILE, Record
from gcbench.results.store import ResultsStore, current


@dataclass(frozen=True)
class Run:
    """One results file: its records, and the label that names it in legends and tables."""

    label: str
    source: Path  # the results file read
    records: tuple[Record, ...]

    @property
    def experiment(self) -> str:
        return " + ".join(dict.fromkeys(r.experiment for r in self.records))

    @property
    def device_name(self) -> str | None:
        """The device most points ran on (skipped points record none)."""
        names = Counter(r.env.device_name for r in self.records if r.env.device_name)
        return names.most_common(1)[0][0] if names else None

    @property
    def loss(self) -> str | None:
        """How the loss was computed, where the records say: whole, or in tiles of N (most points' way)."""
        tiles = Counter(r.loss_tile for r in self.records if r.loss_tile is not None)
        if not tiles:
            return None
        tile = tiles.most_common(1)[0][0]
        return f"loss tile {tile}" if tile else "whole loss"

    @property
    def origin(self) -> str:
        """The file's own name, or its folder's when it has the standard name (sweep folders)."""
        return self.source.parent.name if self.source.name == RESULTS_FILE else self.source.stem


def results_path(source: Path) -> Path:
    """A results file, or the ``results.jsonl`` of a sweep folder."""
    source = Path(source)
    if source.is_dir():
        path = source / RESULTS_FILE
        if not path.is_file():
            raise UsageError(f"{source}: no {RESULTS_FILE} in this folder (give a sweep folder or a results file)")
        return path
    if not source.exists():
        raise UsageError(f"{source}: no such results file or sweep folder")
    return source


def read_records(path: Path) -> tuple[Record, ...]:
    try:
        records = current(ResultsStore(path).load(repair=False))
    except OSError as error:
        raise UsageError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not records:
        raise UsageError(f"{path}: no results records in it (empty file)")
    return tuple(records)


def load_runs(sources: Sequence[Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Read every source; label each run by its experiment, adding how its loss was computed, the device
    name or the folder (or a number) only where runs would otherwise share a label. ``labels`` overrides
    that."""
    if not sources:
        raise UsageError("no results given: name a results.jsonl file or a sweep folder")
    if labels is not None and len(labels) != len(sources):
        raise UsageError(f"{len(labels)} labels for {len(sources)} results sources: give one label per source")
    runs = [Run("", path, read_records(path)) for path in map(results_path, sources)]
    chosen = list(labels) if labels is not None else _distinct_labels(runs)
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"labels must differ, got {', '.join(chosen)}")
    return [Run(label, run.source, run.records) for label, run in zip(chosen, runs)]


def _distinct_labels(runs: Sequence[Run]) -> list[str]:
    labels = [run.experiment for run in runs]
    details: tuple[Callable[[Run], str | None], ...] = (
        lambda run: run.loss,
        lambda run: run.device_name,
        lambda run: run.origin,
    )
    for label, count in Counter(labels).items():
        if count == 1:
            continue
        clashing = [i for i, other in enumerate(labels) if other == label]
        for detail in details:
            values = [detail(runs[i]) for i in clashing]
            if None not in values and len(set(values)) == len(values):
                for i, value in zip(clashing, values):
                    labels[i] = f"{label} ({value})"
                break
        else:
            for number, i in enumerate(clashing, 1):
                labels[i] = f"{label} #{number}"
    return labels
