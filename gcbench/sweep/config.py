"""Experiments as TOML files, command-line overrides, and the grid of points they expand to.

```toml
name = "quick"
description = "..."
[workload]   # WorkloadConfig: name, query_length, passage_length, hard_negatives, tied, temperature
[model]      # ModelConfig: kind, hidden, layers, heads, ffn, vocab, dropout, pooling, features
[optimizer]  # name (adamw, adam, sgd), lr, weight_decay, foreach
[sweep]      # strategies, batch_sizes, chunk_sizes, device, precision, warmup, repeats, memory_budget,
             # seed, threads, timeout, equivalence, predict, nproc, backend
```

Every key is checked before any work starts: an unknown key or name, or an impossible value, is a
:class:`UsageError` naming the key (or the flag that set it).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gcbench.device import PRECISIONS
from gcbench.errors import UsageError
from gcbench.strategies import STRATEGIES
from gcbench.sweep.records import Point
from gcbench.training import OPTIMIZERS, OptimizerConfig, StepConfig
from gcbench.workloads import TEXT_TOWERS, WORKLOADS, ModelConfig, WorkloadConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class SweepConfig:
    strategies: tuple[str, ...] = ("full", "cache")
    batch_sizes: tuple[int, ...] = (8, 16, 32)
    chunk_sizes: tuple[tuple[int, ...], ...] = ((8,),)
    device: str = "auto"
    precision: str = "float32"
    warmup: int = 1
    repeats: int = 5
    memory_budget: int | None = None  # bytes
    seed: int = 0
    threads: int = 0  # torch intra-op threads per point; 0: torch's default
    timeout: float = 900.0  # seconds per point
    equivalence: bool = True
    predict: bool = False
    nproc: int = 1
    backend: str = "auto"


@dataclass(frozen=True)
class Experiment:
    name: str
    workload: WorkloadConfig
    optimizer: OptimizerConfig
    sweep: SweepConfig
    description: str = ""
    source: str = ""

    def points(self) -> list[Point]:
        """The grid by growing batch (so a series that ran out of memory skips ahead); within a batch, the
        strategies that compete at the same chunk setting one after the other, so that a slow drift of the
        machine's speed over a long sweep does not fall between them."""
        chunked = [name for name in self.sweep.strategies if STRATEGIES[name].uses_chunks]
        whole = [name for name in self.sweep.strategies if name not in chunked]
        grid = []
        for batch in self.sweep.batch_sizes:
            grid.extend(Point(strategy, batch, None) for strategy in whole)
            for chunks in self.sweep.chunk_sizes if chunked else ():
                grid.extend(Point(strategy, batch, chunks) for strategy in chunked)
        return grid

    def step_config(self, point: Point) -> StepConfig:
        return StepConfig(self.workload, point.strategy, point.batch_size, point.chunk_sizes, self.sweep.precision,
                          self.optimizer, self.sweep.seed)

    @property
    def fingerprint(self) -> str:
        """What a point's numbers depend on, apart from the grid: extending the grid resumes, changing this
        starts a different experiment."""
        measured = {k: v for k, v in asdict(self.sweep).items()
                    if k not in ("strategies", "batch_sizes", "chunk_sizes", "timeout", "predict")}
        payload = {"workload": asdict(self.workload), "optimizer": asdict(self.optimizer), "sweep": measured}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        workload = dict(data["workload"])
        workload["model"] = ModelConfig(**workload["model"])
        sweep = dict(data["sweep"])
        for key in ("strategies", "batch_sizes"):
            sweep[key] = tuple(sweep[key])
        sweep["chunk_sizes"] = tuple(tuple(c) for c in sweep["chunk_sizes"])
        return cls(data["name"], WorkloadConfig(**workload), OptimizerConfig(**data["optimizer"]),
                   SweepConfig(**sweep), data.get("description", ""), data.get("source", ""))


# Parsing ---------------------------------------------------------------------------------------

def parse_bytes(text: str | int, label: str) -> int:
    """``11GiB``, ``512MiB``, ``24GB``, ``1048576`` -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
        if not match or match.group(2).upper() not in _UNITS:
            raise UsageError(f"{label}: {text!r} is not a memory size (e.g. 11GiB, 512MiB, 24GB)")
        value, unit = float(match.group(1)), match.group(2).upper()
    if value <= 0:
        raise UsageError(f"{label}: memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


BINARY_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def byte_unit(n: float) -> tuple[str, int]:
    """The largest binary unit that ``n`` bytes is at least one of."""
    return next(((unit, size) for unit, size in BINARY_UNITS if abs(n) >= size), BINARY_UNITS[-1])


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    unit, size = byte_unit(n)
    return f"{n / size:.2f} {unit}" if size > 1 else f"{int(n)} B"


def parse_chunk_sizes(text: str, label: str) -> list[list[int]]:
    """``"8,16"`` -> two settings; ``"16/8,32/16"`` -> per-encoder sizes (queries/passages)."""
    settings = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            settings.append([int(size) for size in part.split("/")])
        except ValueError:
            raise UsageError(f"{label}: {part!r} is not a chunk size (8) or sizes per input (16/8)") from None
    if not settings:
        raise UsageError(f"{label}: no chunk sizes in {text!r}")
    return settings


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with a TOML value (strings may be bare)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise UsageError(f"--set: expected section.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


# Validation ------------------------------------------------------------------------------------

def _int(minimum: int) -> Callable[[Any, str], int]:
    def check(value: Any, label: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{label}: expected an integer, got {value!r}")
        if value < minimum:
            raise UsageError(f"{label}: must be >= {minimum}, got {value}")
        return value
    return check


def _float(minimum: float, maximum: float | None = None, open_max: bool = False) -> Callable[[Any, str], float]:
    def check(value: Any, label: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{label}: expected a number, got {value!r}")
        too_big = maximum is not None and (value >= maximum if open_max else value > maximum)
        if value < minimum or too_big:
            bound = f"[{minimum}, {maximum}{')' if open_max else ']'}" if maximum is not None else f">= {minimum}"
            raise UsageError(f"{label}: must be {bound}, got {value}")
        return float(value)
    return check


def _bool(value: Any, label: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{label}: expected true or false, got {value!r}")
    return value


def _choice(choices: Callable[[], Any]) -> Callable[[Any, str], str]:
    def check(value: Any, label: str) -> str:
        options = list(choices())
        if value not in options:
            raise UsageError(f"{label}: unknown value {value!r}; choose from {', '.join(map(str, options))}")
        return value
    return check


def _text(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{label}: expected a string, got {value!r}")
    return value


def _optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, label: None if value is None else check(value, label)


def _list_of(check: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple[Any, ...]]:
    def checked(value: Any, label: str) -> tuple[Any, ...]:
        if isinstance(value, str):  # from a flag: "8,16,32" or "full,cache"
            value = [_scalar(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value:
            raise UsageError(f"{label}: expected a non-empty list, got {value!r}")
        return tuple(check(v, label) for v in value)
    return checked


def _scalar(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _chunk_setting(value: Any, label: str) -> tuple[int, ...]:
    sizes = value if isinstance(value, list) else [value]
    if not 1 <= len(sizes) <= 2:
        raise UsageError(f"{label}: a chunk setting is one size or one per input (2), got {value!r}")
    return tuple(_int(1)(size, label) for size in sizes)


def _chunk_sizes(value: Any, label: str) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, str):
        value = parse_chunk_sizes(value, label)
    if not isinstance(value, list) or not value:
        raise UsageError(f"{label}: expected a non-empty list of chunk sizes, got {value!r}")
    return tuple(_chunk_setting(v, label) for v in value)


def _memory(value: Any, label: str) -> int | None:
    if value in (None, "", "none", 0):
        return None
    return parse_bytes(value, label)


def _model_kinds() -> list[str]:
    return [*TEXT_TOWERS, "mlp"]


SCHEMA: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "workload": {
        "name": _choice(lambda: WORKLOADS), "query_length": _int(1), "passage_length": _int(1),
        "hard_negatives": _int(0), "tied": _bool, "temperature": _optional(_float(1e-6)),
    },
    "model": {
        "kind": _choice(_model_kinds), "hidden": _int(1), "layers": _int(1), "heads": _int(1), "ffn": _int(0),
        "vocab": _int(2000), "dropout": _float(0.0, 1.0, open_max=True), "pooling": _choice(lambda: ["cls", "mean"]),
        "features": _int(1), "attention": _choice(lambda: ["sdpa", "eager"]),
    },
    "optimizer": {
        "name": _choice(lambda: OPTIMIZERS), "lr": _float(0.0), "weight_decay": _float(0.0),
        "foreach": _optional(_bool),
    },
    "sweep": {
        "strategies": _list_of(_choice(lambda: STRATEGIES)), "batch_sizes": _list_of(_int(1)),
        "chunk_sizes": _chunk_sizes, "device": _text, "precision": _choice(lambda: PRECISIONS),
        "warmup": _int(1), "repeats": _int(1), "memory_budget": _memory, "seed": _int(0), "threads": _int(0),
        "timeout": _float(1.0), "equivalence": _bool, "predict": _bool, "nproc": _int(1),
        "backend": _choice(lambda: ["auto", "gloo", "nccl"]),
    },
}
TOP_LEVEL = {"name": _text, "description": _text}


def find_experiment(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a shipped experiment in ``experiments/``."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UsageError(f"EXPERIMENT: no such file {name_or_path!r}")
        return path
    shipped = EXPERIMENTS_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
    raise UsageError(f"EXPERIMENT: no experiment named {name_or_path!r}; shipped: {', '.join(names)}")


def load_experiment(name_or_path: str, overrides: Mapping[str, tuple[Any, str]] | None = None) -> Experiment:
    """Read, override and check an experiment. ``overrides``: ``section.key`` -> (value, flag that set it)."""
    path = find_experiment(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not valid TOML ({error})") from None
    return build_experiment(raw, str(path), overrides or {})


def build_experiment(raw: Mapping[str, Any], source: str, overrides: Mapping[str, tuple[Any, str]]) -> Experiment:
    values: dict[str, dict[str, tuple[Any, str]]] = {section: {} for section in SCHEMA}
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in TOP_LEVEL:
            top[key] = TOP_LEVEL[key](value, f"{source}: {key}")
        elif key in SCHEMA:
            if not isinstance(value, dict):
                raise UsageError(f"{source}: [{key}] must be a table")
            for sub, sub_value in value.items():
                if sub not in SCHEMA[key]:
                    raise UsageError(f"{source}: unknown key {key}.{sub}; known: {', '.join(SCHEMA[key])}")
                values[key][sub] = (sub_value, f"{source}: {key}.{sub}")
        else:
            raise UsageError(f"{source}: unknown key {key!r}; known: {', '.join([*TOP_LEVEL, *SCHEMA])}")
    for dotted, (value, label) in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SCHEMA or key not in SCHEMA[section]:
            raise UsageError(f"{label}: unknown key {dotted!r}")
        values[section][key] = (value, label)
    checked = {section: {key: SCHEMA[section][key](value, label) for key, (value, label) in entries.items()}
               for section, entries in values.items()}
    model = ModelConfig(**checked["model"])
    if model.hidden % model.heads:
        raise UsageError(f"{source}: model.hidden ({model.hidden}) must be a multiple of model.heads ({model.heads})")
    experiment = Experiment(
        name=top.get("name", Path(source).stem),
        workload=WorkloadConfig(**{**checked["workload"], "model": model}),
        optimizer=OptimizerConfig(**checked["optimizer"]),
        sweep=SweepConfig(**checked["sweep"]),
        description=top.get("description", ""),
        source=source,
    )
    _check_fit(experiment)
    return experiment


def _check_fit(experiment: Experiment) -> None:
    """Cross-field checks: things each key allows alone but not together."""
    sweep = experiment.sweep
    if experiment.workload.name == "clip" and experiment.workload.model.kind == "mlp":
        raise UsageError("model.kind: clip's text tower needs a text model, not mlp")
    tower = TEXT_TOWERS.get(experiment.workload.model.kind)
    if tower is not None:
        tower.check(experiment.workload)
    for name in sweep.strategies:
        STRATEGIES[name].check_experiment(experiment)
    if sweep.nproc > 1:
        for batch in sweep.batch_sizes:
            if batch % sweep.nproc:
                raise UsageError(f"sweep.batch_sizes: {batch} does not split evenly over nproc={sweep.nproc} ranks")

