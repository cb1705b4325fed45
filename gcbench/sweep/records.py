"""The results format: one JSON record per sweep point, one line each in ``results.jsonl``.

A record carries the point's parameters, its status, what was measured, the schema version and the
environment it was measured in, so a results file can be read without the experiment that made it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "timeout", "skipped")


@dataclass(frozen=True)
class Point:
    """One cell of the grid: a strategy at a batch size (and chunk sizes, if the strategy uses them)."""

    strategy: str
    batch_size: int
    chunk_sizes: tuple[int, ...] | None = None

    @property
    def chunk_label(self) -> str:
        return "/".join(map(str, self.chunk_sizes)) if self.chunk_sizes else "-"

    @property
    def id(self) -> str:
        return f"{self.strategy} batch={self.batch_size} chunks={self.chunk_label}"

    @property
    def series(self) -> str:
        """The line a point belongs to in a plot: strategy, and chunk sizes where they matter."""
        return self.strategy if not self.chunk_sizes else f"{self.strategy} (chunk {self.chunk_label})"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        chunks = data.get("chunk_sizes")
        return cls(data["strategy"], int(data["batch_size"]), tuple(chunks) if chunks else None)


@dataclass(frozen=True)
class MemoryResult:
    """Bytes. ``peak`` = ``baseline`` (what the step starts from) + ``step_peak`` (the step's own)."""

    method: str
    peak_bytes: int | None  # absolute; for an out-of-memory point, the peak it reached
    baseline_bytes: int | None = None
    step_peak_bytes: int | None = None
    forward_backward_peak_bytes: int | None = None
    optimizer_peak_bytes: int | None = None
    reserved_bytes: int | None = None
    breakdown: dict[str, int] | None = None  # at the dispatch tracker's peak, absolute
    tracked_peak_bytes: int | None = None


@dataclass(frozen=True)
class TimeResult:
    median_s: float
    q1_s: float
    q3_s: float
    samples_s: list[float]
    examples_per_s: float

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s


@dataclass(frozen=True)
class EquivalenceResult:
    reference: str
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    cosine: float | None = None
    loss_diff: float | None = None
    note: str | None = None  # why there are no numbers (n/a)


@dataclass
class Record:
    experiment: str
    fingerprint: str
    point: Point
    status: str
    reason: str | None = None
    memory: MemoryResult | None = None
    time: TimeResult | None = None
    equivalence: EquivalenceResult | None = None
    prediction: dict[str, Any] | None = None
    distributed: dict[str, Any] | None = None
    env: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""
    wall_s: float | None = None
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise ValueError(f"results schema version {schema!r}; this gcbench reads version {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["point"] = Point.from_dict(data["point"])
        for name, kind in (("memory", MemoryResult), ("time", TimeResult), ("equivalence", EquivalenceResult)):
            if values.get(name) is not None:
                allowed = {f.name for f in fields(kind)}
                values[name] = kind(**{k: v for k, v in values[name].items() if k in allowed})
        return cls(**values)
