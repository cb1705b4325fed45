"""The results format: one JSON record per sweep point, one line each in ``results.jsonl``.

A record carries the point, its status, what was measured, the capabilities of its strategy, the
schema version and the environment it was measured in, so a results file can be read (and reported)
without the experiment or the strategy code that made it. Records are typed both ways: reading one
with a field this version does not know, or a value of the wrong type, is refused with a message.
"""

from __future__ import annotations

import itertools
import json
from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic import Strict

from gcbench.errors import UsageError
from gcbench.strategies import StrategyTraits
from gcbench.typed import Bool, Float, Int, Str, dump, load, typed, typed_mutable

SCHEMA_VERSION = 2
RESULTS_FILE = "results.jsonl"
Status = Literal["ok", "oom", "error", "timeout", "skipped"]
# In the reason of an ``oom`` point whose measured peak passed the budget as a threshold (nothing refused the
# memory: always so on CPU); a point the allocator refused has the allocator's message instead.
OVER_BUDGET = "over the memory budget"
STATUSES: tuple[Status, ...] = ("ok", "oom", "error", "timeout", "skipped")
FAILED: tuple[Status, ...] = ("error", "timeout")  # what ``--retry-failed`` runs again; oom is a result


KeepSetting = Annotated[int, Strict(), Ge(0)] | Literal["all"]


@typed
class Point:
    """One cell of the grid: a strategy at a batch size, with its chunk sizes if it uses them, and how many
    first-pass graphs it keeps if it keeps any (None: the strategy's default); ``chunk_tokens``: chunks by token
    count instead (one budget, or one per input)."""

    strategy: Str
    batch_size: Int
    chunk_sizes: tuple[Int, ...] | None = None
    keep_graphs: KeepSetting | None = None
    chunk_tokens: tuple[Int, ...] | None = None

    @property
    def chunk_label(self) -> str:
        if self.chunk_tokens:
            return "/".join(map(str, self.chunk_tokens)) + " tokens"
        return "/".join(map(str, self.chunk_sizes)) if self.chunk_sizes else "-"

    @property
    def chunked(self) -> bool:
        return bool(self.chunk_sizes or self.chunk_tokens)

    @property
    def id(self) -> str:
        keep = f" keep={self.keep_graphs}" if self.keep_graphs is not None else ""
        return f"{self.strategy} batch={self.batch_size} chunks={self.chunk_label}{keep}"

    @property
    def series(self) -> str:
        """The line a point belongs to in a plot: strategy, and chunk sizes and kept graphs where they matter."""
        setting = [f"chunk {self.chunk_label}"] if self.chunked else []
        setting += [f"keep {self.keep_graphs}"] if self.keep_graphs is not None else []
        return f"{self.strategy} ({', '.join(setting)})" if setting else self.strategy


@typed
class StepsResult:
    """Memory over ``sweep.steps`` steps, each on a new batch (new lengths); bytes, one value per step."""

    allocated_peak_bytes: tuple[Int, ...]
    reserved_peak_bytes: tuple[Int, ...] = ()  # CUDA: the caching allocator's reserved peak
    fragmentation_bytes: tuple[Int, ...] = ()  # CUDA: reserved - allocated
    resident_bytes: tuple[Int, ...] = ()  # CPU: the process's resident set after the step
    tokens: tuple[Int, ...] = ()  # real (unpadded) tokens of the step's batch


@typed
class MemoryResult:
    """Bytes. ``peak`` = ``baseline`` (what the step starts from) + ``step_peak`` (the step's own)."""

    method: Str
    peak_bytes: Int | None  # absolute; for an out-of-memory point, the peak it reached
    baseline_bytes: Int | None = None
    step_peak_bytes: Int | None = None
    forward_backward_peak_bytes: Int | None = None
    optimizer_peak_bytes: Int | None = None
    reserved_bytes: Int | None = None
    breakdown: dict[str, Int] | None = None  # at the dispatch tracker's peak, absolute
    tracked_peak_bytes: Int | None = None
    loss_peak_bytes: Int | None = None  # the loss's own forward and backward, above the representations
    steps: StepsResult | None = None  # sweep.steps > 1: memory step by step over new batches


@typed
class TimeResult:
    """Step time over the rounds of a point (each round one process); one round in a round's own record.

    ``median_s`` is the median of the rounds' medians, ``low_s`` to ``high_s`` its 95% interval;
    ``q1_s`` and ``q3_s`` are the quartiles of every sample. Records made before rounds existed have
    neither interval nor ``noise``: a missing interval is not a narrow one.
    """

    median_s: Float
    q1_s: Float
    q3_s: Float
    samples_s: tuple[Float, ...]  # every timed step, round after round
    examples_per_s: Float
    samples_per_round: tuple[Int, ...] = ()  # how ``samples_s`` splits into rounds; empty: one round
    low_s: Float | None = None
    high_s: Float | None = None
    noise: tuple[Str, ...] = ()  # why the time is not to be trusted (see gcbench.measure.noise); empty: clean
    load_average_1m: Float | None = None  # the highest over the rounds
    cpu_samples_s: tuple[Float, ...] = ()  # the process's CPU time of each timed step (empty: not taken)
    cpu_median_s: Float | None = None

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    @property
    def rounds(self) -> list[tuple[float, ...]]:
        """The samples of each round."""
        return split_rounds(self.samples_s, self.samples_per_round)


@typed
class PairedResult:
    """The point's step time over the reference's (``full``) at the same batch, the two timed in turns
    in one process per round (A B, B A, ...), so that what drifts on the machine cancels turn by turn.

    ``ratio`` is the median of the rounds' median ratios, ``low`` to ``high`` its 95% interval.
    """

    reference: Str
    ratio: Float
    low: Float
    high: Float
    ratios: tuple[Float, ...]  # turn by turn, round after round
    ratios_per_round: tuple[Int, ...] = ()  # how ``ratios`` splits into rounds; empty: one round
    reference_median_s: Float | None = None
    noise: tuple[Str, ...] = ()
    # the same ratio by the process's CPU time, turn by turn (empty: not taken), its median and 95% interval
    cpu_ratios: tuple[Float, ...] = ()
    cpu_ratio: Float | None = None
    cpu_low: Float | None = None
    cpu_high: Float | None = None

    @property
    def cpu_rounds(self) -> list[tuple[float, ...]]:
        return split_rounds(self.cpu_ratios, self.ratios_per_round) if self.cpu_ratios else []

    @property
    def rounds(self) -> list[tuple[float, ...]]:
        """The ratios of each round."""
        return split_rounds(self.ratios, self.ratios_per_round)


def split_rounds(values: tuple[float, ...], sizes: tuple[int, ...]) -> list[tuple[float, ...]]:
    """``values`` cut into consecutive rounds of ``sizes`` (no sizes: one round)."""
    sizes = sizes or (len(values),)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [values[a:b] for a, b in itertools.pairwise(bounds)]


@typed
class EquivalenceResult:
    reference: Str
    max_abs_err: Float | None = None
    max_rel_err: Float | None = None
    cosine: Float | None = None
    loss_diff: Float | None = None
    note: Str | None = None  # why there are no numbers (n/a)


@typed
class Prediction:
    """A peak predicted without allocating (``gcbench estimate``, ``sweep --predict``), or why there is none."""

    target: Str | None = None
    peak_bytes: Int | None = None
    baseline_bytes: Int | None = None
    forward_backward_peak_bytes: Int | None = None
    optimizer_peak_bytes: Int | None = None
    breakdown: dict[str, Int] | None = None
    loss_peak_bytes: Int | None = None  # the loss's own forward and backward, above the representations
    seconds: Float | None = None
    world_size: Int = 1  # > 1: one rank's peak (DDP buckets and gathered representations included)
    error: Str | None = None

    @property
    def peak(self) -> int:
        """``peak_bytes`` of a prediction that succeeded; a ValueError for one that failed."""
        if self.peak_bytes is None:
            raise ValueError(f"no predicted peak: {self.error or 'the prediction failed'}")
        return self.peak_bytes

    @property
    def peak_breakdown(self) -> dict[str, int]:
        """``breakdown`` (bytes by category at the peak) of a prediction that succeeded; a ValueError otherwise."""
        if self.breakdown is None:
            raise ValueError(f"no predicted breakdown: {self.error or 'the prediction failed'}")
        return self.breakdown


@typed
class DistributedResult:
    """A point measured on several ranks: every rank's peak, and how the batch was shared."""

    world_size: Int
    backend: Str
    local_batch_size: Int | None = None
    negatives: Literal["global", "per rank"] | None = None
    peak_max_bytes: Int | None = None
    peak_mean_bytes: Float | None = None
    rank_peak_bytes: tuple[Int, ...] = ()
    rank_median_s: tuple[Float, ...] = ()
    threads_per_rank: Int | None = None


@typed
class Environment:
    """Where a record was measured: versions, device, CPU, load, git commit (None outside a checkout)."""

    gcbench: Str | None = None
    torch: Str | None = None
    python: Str | None = None
    device: Str | None = None
    device_name: Str | None = None
    device_memory_bytes: Int | None = None
    cpu: Str | None = None
    cpu_cores: Int | None = None
    torch_threads: Int | None = None
    hostname: Str | None = None
    load_average_1m: Float | None = None  # other work on the machine distorts times: judge them by it
    malloc: Str | None = None  # what the point's process set in glibc's malloc (sweep.malloc = "steady")
    time: Str | None = None
    cuda: Str | None = None
    driver: Str | None = None
    git_commit: Str | None = None
    packages: dict[str, Str] | None = None  # the optional extras' distributions, where installed
    tf32_matmul: Bool | None = None  # torch.backends.cuda.matmul.allow_tf32 when measured
    tf32_cudnn: Bool | None = None  # torch.backends.cudnn.allow_tf32
    float32_matmul_precision: Str | None = None  # torch.get_float32_matmul_precision(): highest, high, medium
    oversubscribed: Str | None = None  # set when the point's threads exceeded the cores free as it started


@typed_mutable
class Record:
    experiment: Str
    fingerprint: Str
    point: Point
    status: Status
    traits: StrategyTraits | None = None  # None: the strategy could not even be resolved
    reason: Str | None = None
    memory: MemoryResult | None = None
    time: TimeResult | None = None
    paired: PairedResult | None = None
    equivalence: EquivalenceResult | None = None
    prediction: Prediction | None = None
    distributed: DistributedResult | None = None
    loss_tile: Int | None = None  # the loss's tile size (workload.loss_tile; 0: the whole score matrix); None: not said
    env: Environment = Environment()
    finished_at: Str = ""
    wall_s: Float | None = None
    round: Int = 1  # > 1: a timing round only (time and paired); readers merge it into round 1's record
    schema: Int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dump(self), sort_keys=True, allow_nan=True)

    @classmethod
    def from_dict(cls, data: Any) -> Record:
        """A typed record; UsageError for another schema version, an unknown field or a wrong type."""
        if not isinstance(data, dict):
            raise UsageError(f"not a record (a JSON object), got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise UsageError(f"results schema version {schema!r}; this gcbench reads version {SCHEMA_VERSION}")
        return load(cls, data)
