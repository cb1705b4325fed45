"""Results: the typed record of a measured point, the append-only results file, byte units, table rows."""

from gcbench.results.records import (
    FAILED,
    RESULTS_FILE,
    SCHEMA_VERSION,
    STATUSES,
    DistributedResult,
    Environment,
    EquivalenceResult,
    MemoryResult,
    PairedResult,
    Point,
    Prediction,
    Record,
    Status,
    TimeResult,
)
from gcbench.results.store import ResultsStore, current
from gcbench.results.timing import merge_rounds, paired_result, time_result
from gcbench.results.units import byte_unit, format_bytes, parse_bytes

__all__ = [
    "FAILED",
    "RESULTS_FILE",
    "SCHEMA_VERSION",
    "STATUSES",
    "DistributedResult",
    "Environment",
    "EquivalenceResult",
    "MemoryResult",
    "PairedResult",
    "Point",
    "Prediction",
    "Record",
    "ResultsStore",
    "Status",
    "TimeResult",
    "byte_unit",
    "current",
    "format_bytes",
    "merge_rounds",
    "paired_result",
    "parse_bytes",
    "time_result",
]
