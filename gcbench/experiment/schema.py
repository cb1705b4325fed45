"""The experiment schema: every key of an experiment file with its type, range, default, help and flag.

The sections are the typed configs themselves (:class:`~gcbench.workloads.WorkloadConfig`,
:class:`~gcbench.workloads.ModelConfig`, :class:`~gcbench.training.OptimizerConfig` and
:class:`SweepConfig` here); this module only reads what their fields declare. Validation, ``--set``,
the command-line flags with their help, and the key table in ``docs/experiments.md`` all come from
there, so a key added to a config is known everywhere at once.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import torch
from pydantic import AfterValidator, BeforeValidator
from pydantic.fields import FieldInfo

from gcbench.device import Precision
from gcbench.errors import UsageError
from gcbench.imports import is_import_path
from gcbench.results.records import KeepSetting
from gcbench.results.units import bytes_from, format_bytes
from gcbench.strategies import STRATEGIES, resolve_strategy
from gcbench.training import OptimizerConfig
from gcbench.typed import Bool, Float, Int, fields_of, key, typed
from gcbench.workloads import ImageConfig, ModelConfig, WorkloadConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _strategy(name: str) -> str:
    try:
        resolve_strategy(name)
    except UsageError as error:
        if is_import_path(name):  # a user's class: why it cannot be used
            raise ValueError(str(error)) from None
        raise ValueError(
            f"unknown value {name!r}; choose from {', '.join(STRATEGIES)}, or package.module:ClassName"
        ) from None
    return name


def _memory(value: Any) -> int | None:
    if value is None or value in ("", "none", 0):
        return None
    return bytes_from(value)


def _device(value: Any) -> Any:
    if isinstance(value, str) and value != "auto":
        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(f"{value!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    return value


def _chunk_setting(value: Any) -> Any:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


StrategyName = Annotated[str, AfterValidator(_strategy)]
ChunkSize = Annotated[Int, key("", ge=1)]
ChunkSetting = Annotated[tuple[ChunkSize, ...], BeforeValidator(_chunk_setting), key("", min_length=1)]
MemorySize = Annotated[Int | None, BeforeValidator(_memory)]


@typed
class SweepConfig:
    """How the grid is measured (``[sweep]`` in an experiment)."""

    strategies: tuple[StrategyName, ...] = key(
        "strategies to measure: built-in names, or your own as package.module:ClassName",
        flag="--strategies",
        metavar="full,cache",
        default=("full", "cache"),
        min_length=1,
    )
    batch_sizes: tuple[Annotated[Int, key("", ge=1)], ...] = key(
        "batch sizes (examples per step; global over all ranks), each >= 1",
        flag="--batch-sizes",
        metavar="8,16,32",
        default=(8, 16, 32),
        min_length=1,
    )
    chunk_sizes: tuple[ChunkSetting, ...] = key(
        "chunk settings for the strategies that use chunks: one size, or one per input (16/8), each >= 1",
        flag="--chunk-sizes",
        metavar="8,32|16/8",
        default=((8,),),
        shown_type="list of sizes, or of lists of one size per input",
        min_length=1,
    )
    chunk_tokens: tuple[ChunkSetting, ...] | None = key(
        "token-budget chunk settings for the strategies that chunk by tokens (cache), measured beside chunk_sizes: "
        "each chunk at most this many padded tokens, rows sorted by length (one budget, or one per input, 4096/8192)",
        flag="--chunk-tokens",
        metavar="2048,4096|1024/4096",
        default=None,
        shown_type="list of budgets, or of lists of one budget per input, or none",
        min_length=1,
    )
    keep_graphs: tuple[KeepSetting, ...] | None = key(
        "first-pass graphs kept by the strategies that keep graphs (cache): each a count or all; more is faster "
        "and holds more memory (none: the strategy's default, 1)",
        flag="--keep-graphs",
        metavar="0,1,4,all",
        default=None,
        shown_type="list of counts or all, or none",
        min_length=1,
    )
    device: Annotated[str, AfterValidator(_device)] = key(
        "auto (the accelerator if any, else cpu), cpu, cuda, cuda:1", flag="--device", default="auto"
    )
    precision: Precision = key(
        "float64/float32 parameters, or bf16/fp16 autocast (fp16 with a GradScaler), or pure-bf16: bfloat16 "
        "weights, gradients and optimizer state",
        flag="--precision",
        default="float32",
    )
    warmup: Int = key("untimed steps before measuring", flag="--warmup", default=1, ge=1)
    repeats: Int = key("timed steps per point and round, at least", flag="--repeats", default=5, ge=1)
    max_repeats: Int = key(
        "timed steps per point and round, at most (never fewer than repeats)", flag="--max-repeats", default=50, ge=1
    )
    max_time: Float = key(
        "seconds of timed steps per point and round after which timing stops (once repeats are done)",
        flag="--max-time",
        default=2.0,
        ge=0.0,
    )
    target_spread: Float = key(
        "interquartile range over median at which a round stops timing early (0: never early)",
        flag="--target-spread",
        default=0.05,
        ge=0.0,
    )
    steps: Int = key(
        "steps whose memory is measured one by one, each on a new batch (lengths drawn anew): the allocated peak "
        "per step, on CUDA the reserved memory and fragmentation, on CPU the resident set (1: the point's step only)",
        flag="--steps",
        default=1,
        ge=1,
    )
    timeline: Bool = key(
        "after the sweep, record one step of full and of the first caching setting at one batch, memory over the "
        "step's time with its phases (timeline.json; the report draws it; on CUDA also memory_viz snapshots)",
        default=False,
    )
    rounds: Int = key(
        "timing rounds per point, each in a fresh process, round 2 after round 1 of every point (memory and "
        "gradients: round 1 only)",
        flag="--rounds",
        default=3,
        ge=1,
    )
    malloc: Literal["steady", "default"] = key(
        "glibc's malloc in each point's process: steady (blocks from the heap, kept once freed: later steps fault "
        "in few new pages) or the platform's default",
        flag="--malloc",
        default="steady",
    )
    paired: Bool = key(
        "time each point in turns with the reference strategy (full) at its batch, in one process, for a paired "
        "ratio with an interval",
        default=True,
    )
    memory_budget: MemorySize = key(
        "peak above which a point is out of memory (11GiB; none: no budget)",
        flag="--memory-budget",
        metavar="11GiB",
        default=None,
        shown_type="memory size or none",
    )
    seed: Int = key("seed of weights and data", flag="--seed", default=0, ge=0)
    threads: Int = key(
        "torch threads per point or rank (0: one on CPU, torch's default on a GPU)", flag="--threads", default=0, ge=0
    )
    timeout: Float = key("seconds per point before it is ended as a timeout", flag="--timeout", default=900.0, ge=1.0)
    equivalence: Bool = key("check each point's gradients against the full batch", default=True)
    predict: Bool = key(
        "record a predicted peak beside each measured one; skip points predicted far over the budget",
        flag="--predict",
        default=False,
    )
    nproc: Int = key("ranks per point (DDP); batch sizes are global, split evenly", flag="--nproc", default=1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = key(
        "process-group backend with nproc > 1 (auto: nccl on CUDA, gloo)", flag="--backend", default="auto"
    )


SECTIONS: dict[str, type] = {
    "workload": WorkloadConfig,
    "model": ModelConfig,
    "image": ImageConfig,
    "optimizer": OptimizerConfig,
    "sweep": SweepConfig,
}
SUBSECTIONS = {("workload", "model"), ("workload", "image")}  # fields that are sections of their own in a file
TOP_LEVEL = {"name": "the experiment's name (default: the file's)", "description": "what it is for, in a sentence"}


@dataclass(frozen=True)
class Key:
    """One key of an experiment, as its config field declares it."""

    section: str
    name: str
    field: FieldInfo

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def help(self) -> str:
        return self.field.description or ""

    @property
    def flag(self) -> str | None:
        return self._extra("flag")

    @property
    def metavar(self) -> str | None:
        return self._extra("metavar")

    @property
    def is_list(self) -> bool:
        return get_origin(_bare(self.field.annotation)) is tuple

    @property
    def is_bool(self) -> bool:
        return _bare(self.field.annotation) is bool

    @property
    def is_table(self) -> bool:
        """A key whose value is a table of its own (``model.config``), set as a whole or value by value."""
        return get_origin(_bare(self.field.annotation)) is dict

    @property
    def default(self) -> Any:
        if self.field.default_factory is not None:
            return None
        return self.field.default

    def _extra(self, name: str) -> str | None:
        extra = self.field.json_schema_extra
        value = extra.get(name) if isinstance(extra, dict) else None
        return str(value) if value is not None else None


def keys() -> Iterator[Key]:
    """Every key, section by section, in declaration order."""
    for section, config in SECTIONS.items():
        for name, info in fields_of(config).items():
            if (section, name) not in SUBSECTIONS:
                yield Key(section, name, info)


def find_key(dotted: str) -> Key | None:
    """The key ``section.name``; for ``section.name.inner``, the table-valued key it sets a value of
    (``model.config.hidden_size``: ``model.config``)."""
    found = next((k for k in keys() if k.dotted == dotted), None)
    section, _, rest = dotted.partition(".")
    name, _, inner = rest.partition(".")
    if found is None and inner:
        table = find_key(f"{section}.{name}")
        return table if table is not None and table.is_table else None
    return found


def flag_keys() -> dict[str, Key]:
    """Keys that a command-line flag sets, by flag."""
    return {k.flag: k for k in keys() if k.flag}


# Values from text (flags and --set) ------------------------------------------------------------------


def value_from_text(entry: Key, text: str, label: str) -> Any:
    """A flag's text as the value its key takes: ``8,16`` a list, ``16/8`` one chunk setting per input."""
    if not entry.is_list:
        return _scalar(text)
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise UsageError(f"{label}: empty item in {text!r} (separate values by single commas)")
    if entry.name in ("chunk_sizes", "chunk_tokens"):
        return [_chunk_setting_text(item, label) for item in items]
    return [_scalar(item) for item in items]


def override_value(entry: Key, text: str, label: str) -> Any:
    """``--set section.key=value``: a TOML value (``[8, 16]``, ``true``, ``"x"``), else the text as a flag's."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return value_from_text(entry, text, label)
    return value_from_text(entry, value, label) if entry.is_list and isinstance(value, str) else value


def _scalar(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _chunk_setting_text(text: str, label: str) -> list[int]:
    try:
        return [int(size) for size in text.split("/")]
    except ValueError:
        raise UsageError(f"{label}: {text!r} is not a chunk size (8) or sizes per input (16/8)") from None


# The key table of the documentation -----------------------------------------------------------------


def key_table() -> str:
    """Markdown: every key with its type, default, flag and meaning (``docs/experiments.md`` embeds it)."""
    rows = ["| key | type | default | flag | meaning |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| `{name}` | string | | | {meaning} |" for name, meaning in TOP_LEVEL.items()]
    for entry in keys():
        default = _show_default(entry)
        flag = f"`{entry.flag}`" if entry.flag else ""
        help_text = entry.help.replace("|", "\\|") + _range(entry.field)
        shown = entry._extra("shown_type") or _type_name(entry.field.annotation)
        rows.append(f"| `{entry.dotted}` | {shown} | {default} | {flag} | {help_text} |")
    return "\n".join(rows)


def _show_default(entry: Key) -> str:
    value = entry.default
    if value is None:
        return "none"
    if entry.name == "memory_budget":
        return format_bytes(value)
    if isinstance(value, tuple):
        return "`" + ",".join("/".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) + "`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _range(field: FieldInfo) -> str:
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{bounds[name]} {getattr(m, name)}" for m in field.metadata for name in bounds if hasattr(m, name)]
    return f" ({', '.join(parts)})" if parts else ""


def _bare(annotation: Any) -> Any:
    """The type under Annotated and Optional."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _bare(options[0])
    return annotation


def _type_name(annotation: Any) -> str:
    bare = _bare(annotation)
    optional = bare is not annotation and type(None) in get_args(_strip(annotation))
    origin = get_origin(bare)
    if origin is Literal:
        name = " \\| ".join(f"`{v}`" for v in get_args(bare))
    elif origin is tuple:
        name = f"list of {_type_name(get_args(bare)[0])}"
    elif bare in (int, float, bool, str):
        name = {int: "integer", float: "number", bool: "boolean", str: "string"}[bare]
    else:
        name = "string"
    return f"{name} or none" if optional else name


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


__all__ = [
    "SECTIONS",
    "TOP_LEVEL",
    "Key",
    "SweepConfig",
    "find_key",
    "flag_keys",
    "key_table",
    "keys",
    "override_value",
    "value_from_text",
]


KEYS_BEGIN, KEYS_END = "<!-- keys:begin -->", "<!-- keys:end -->"


def with_key_table(text: str) -> str:
    """``text`` (a Markdown page) with the key table between its ``keys:begin`` and ``keys:end`` markers."""
    before, _, rest = text.partition(KEYS_BEGIN)
    _, _, after = rest.partition(KEYS_END)
    return f"{before}{KEYS_BEGIN}\n{key_table()}\n{KEYS_END}{after}"
