"""An experiment: a workload, an optimizer and the grid of points a sweep measures, from a TOML file.

```toml
name = "quick"
description = "..."
[workload]   # WorkloadConfig
[model]      # ModelConfig (the text tower)
[image]      # ImageConfig (clip's and siglip's image tower)
[optimizer]  # OptimizerConfig
[sweep]      # SweepConfig
```

Every key is listed, with its type, default and flag, in ``docs/experiments.md`` (made from
:mod:`gcbench.experiment.schema`). Everything is checked before any work starts: an unknown key or
name, or an impossible value, is a :class:`~gcbench.errors.UsageError` naming the key and the file or
flag that set it. Experiments shipped with gcbench live in this package (``gcbench/experiment/shipped``)
and are found by name. A user's code named by import path (a workload factory, a strategy class) is
imported from the experiment file's folder and the current directory; a relative ``name_or_path`` in the
file is relative to the file's folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gcbench.errors import UsageError, unknown_key
from gcbench.experiment.schema import SECTIONS, SUBSECTIONS, TOP_LEVEL, SweepConfig
from gcbench.imports import is_import_path, search
from gcbench.measure.step import StepProtocol
from gcbench.measure.timing import RepeatPolicy
from gcbench.results.records import Point
from gcbench.strategies import StrategyUse, resolve_strategy
from gcbench.training import OptimizerConfig, StepConfig
from gcbench.typed import Str, dump, fields_of, load, typed
from gcbench.workloads import (
    FEATURE_KIND,
    IMAGE_TEXT,
    IMAGE_TOWERS,
    TEXT_TOWERS,
    ImageConfig,
    WorkloadConfig,
    check_user_workload,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
# The grid (and how many rounds of it), not the numbers: extending either resumes.
FINGERPRINT_EXCLUDES = (
    "strategies",
    "batch_sizes",
    "chunk_sizes",
    "chunk_tokens",
    "keep_graphs",
    "timeout",
    "predict",
    "rounds",
    "timeline",
)


@typed
class Experiment:
    name: Str
    workload: WorkloadConfig
    optimizer: OptimizerConfig
    sweep: SweepConfig
    description: Str = ""
    source: Str = ""

    def points(self) -> list[Point]:
        """The grid by growing batch (so a series that ran out of memory skips ahead); within a batch, the
        reference first (the others are timed in turns with it once it ran ok), then the strategies that
        compete at the same chunk setting one after the other, so that a slow drift of the machine's
        speed over a long sweep does not fall between them."""
        chunked = [name for name in self.sweep.strategies if resolve_strategy(name).uses_chunks]
        whole = sorted(
            (name for name in self.sweep.strategies if name not in chunked),
            key=lambda name: not resolve_strategy(name).reference,
        )
        keeps = self.sweep.keep_graphs or (None,)
        grid: list[Point] = []
        for batch in self.sweep.batch_sizes:
            grid.extend(Point(strategy, batch, None) for strategy in whole)
            for chunks in self.sweep.chunk_sizes if chunked else ():
                for strategy in chunked:
                    settings = keeps if resolve_strategy(strategy).keeps_graphs else (None,)
                    grid.extend(Point(strategy, batch, chunks, keep) for keep in settings)
            for tokens in self.sweep.chunk_tokens or ():
                for strategy in (name for name in chunked if resolve_strategy(name).token_chunks):
                    settings = keeps if resolve_strategy(strategy).keeps_graphs else (None,)
                    grid.extend(Point(strategy, batch, None, keep, tokens) for keep in settings)
        return grid

    def step_config(self, point: Point) -> StepConfig:
        return StepConfig(
            self.workload,
            point.strategy,
            point.batch_size,
            point.chunk_sizes,
            self.sweep.precision,
            self.optimizer,
            self.sweep.seed,
            point.keep_graphs,
            point.chunk_tokens,
        )

    def reference_point(self, point: Point) -> Point | None:
        """The point ``point`` is timed in turns with: the sweep's reference strategy at the same batch
        (None for the reference itself, without ``sweep.paired``, or without a reference in the sweep)."""
        if not self.sweep.paired or resolve_strategy(point.strategy).reference:
            return None
        references = [name for name in self.sweep.strategies if resolve_strategy(name).reference]
        return Point(references[0], point.batch_size) if references else None

    def repeat_policy(self) -> RepeatPolicy:
        """How long each round of a point is timed (``sweep.repeats`` at least, ``max_repeats`` at most)."""
        sweep = self.sweep
        return RepeatPolicy(sweep.repeats, max(sweep.repeats, sweep.max_repeats), sweep.max_time, sweep.target_spread)

    def step_protocol(self) -> StepProtocol:
        """How every step of this experiment is measured (sweep points, their ranks, tune): its warm-up,
        repeat policy and memory budget."""
        return StepProtocol(self.sweep.warmup, self.repeat_policy(), self.sweep.memory_budget, steps=self.sweep.steps)

    def strategy_use(self) -> StrategyUse:
        return StrategyUse(self.workload, self.sweep.chunk_sizes, self.sweep.nproc, self.sweep.equivalence)

    @property
    def fingerprint(self) -> str:
        """What a point's numbers depend on, apart from the grid: extending the grid resumes, changing this
        starts a different experiment."""
        measured = {k: v for k, v in asdict(self.sweep).items() if k not in FINGERPRINT_EXCLUDES}
        payload = {"workload": asdict(self.workload), "optimizer": asdict(self.optimizer), "sweep": measured}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dump(self)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        experiment: Experiment = load(cls, data, "experiment")
        return experiment


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def find_experiment(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of an experiment shipped with gcbench."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UsageError(f"EXPERIMENT: no such file {name_or_path!r}")
        return path
    candidate = SHIPPED_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    raise UsageError(f"EXPERIMENT: no experiment named {name_or_path!r}; shipped: {', '.join(shipped())}")


def load_experiment(name_or_path: str, overrides: Mapping[str, tuple[Any, str]] | None = None) -> Experiment:
    """Read, override and check an experiment. ``overrides``: ``section.key`` -> (value, flag that set it)."""
    path = find_experiment(name_or_path)
    search([path.parent, Path.cwd()])  # the user's code it names, by import path, is found there first
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not valid TOML ({error})") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read it ({error.strerror or error})") from None
    return build_experiment(raw, str(path), overrides or {})


def section_keys(section: str) -> list[str]:
    return [name for name in fields_of(SECTIONS[section]) if (section, name) not in SUBSECTIONS]


def build_experiment(raw: Mapping[str, Any], source: str, overrides: Mapping[str, tuple[Any, str]]) -> Experiment:
    entries: dict[str, dict[str, tuple[Any, str]]] = {section: {} for section in SECTIONS}
    top: dict[str, Any] = {}
    for name, value in raw.items():
        if name in TOP_LEVEL:
            if not isinstance(value, str):
                raise UsageError(f"{source}: {name}: expected a string, got {value!r}")
            top[name] = value
        elif name in SECTIONS:
            if not isinstance(value, dict):
                raise UsageError(f"{source}: [{name}] must be a table")
            known = section_keys(name)
            for sub, sub_value in value.items():
                if sub not in known:
                    raise unknown_key(source, f"{name}.{sub}", (f"{name}.{k}" for k in known), quoted=False)
                entries[name][sub] = (_from_file(sub, sub_value, source), f"{source}: {name}.{sub}")
        else:
            raise unknown_key(source, name, [*TOP_LEVEL, *SECTIONS])
    for dotted, (value, label) in overrides.items():
        section, _, name = dotted.partition(".")
        name, _, inner = name.partition(".")  # model.config.hidden_size: one value of a table-valued key
        if section not in SECTIONS or name not in section_keys(section):
            raise unknown_key(label, dotted, (f"{s}.{k}" for s in SECTIONS for k in section_keys(s)))
        if (section, name) == ("workload", "name") and is_import_path(str(value)):
            # --workload pkg.module:function means what the file's workload.factory does: the flag wins
            entries["workload"].pop("factory", None)
        if inner:
            table = entries[section].get(name, (None, ""))[0]
            value = {**(table if isinstance(table, dict) else {}), inner: value}
        entries[section][name] = (value, label)
    built: dict[str, Any] = {}
    for section in ("model", "image", "workload", "optimizer", "sweep"):
        values = {name: value for name, (value, _) in entries[section].items()}
        if section == "workload":
            values["model"], values["image"] = built["model"], built["image"]
        labels = {name: label for name, (_, label) in entries[section].items()}

        def where(location: tuple[str | int, ...], section: str = section, labels: dict[str, str] = labels) -> str:
            if not location:
                return source
            named = labels.get(str(location[0]), f"{source}: {section}.{location[0]}")
            return ".".join([named, *map(str, location[1:])])  # a key of a table-valued key: model.lora.r

        built[section] = load(SECTIONS[section], values, where)
    experiment = Experiment(
        top.get("name", Path(source).stem),
        built["workload"],
        built["optimizer"],
        built["sweep"],
        top.get("description", ""),
        source,
    )
    check_fit(experiment)
    return experiment


def _from_file(key: str, value: Any, source: str) -> Any:
    """A value as the file means it: a relative ``name_or_path`` is relative to the file's folder."""
    if key == "name_or_path" and isinstance(value, str) and not Path(value).is_absolute():
        return str(Path(source).parent / value)
    return value


def check_workload(workload: WorkloadConfig, seed: int = 0) -> int:
    """UsageError, before any work, for towers or a user's factory that cannot be used; the number of inputs."""
    if workload.image != ImageConfig() and (workload.user_factory is not None or workload.name not in IMAGE_TEXT):
        raise UsageError(f"image: workload {workload.user_factory or workload.name!r} has no image tower to configure")
    if workload.user_factory is not None:
        return check_user_workload(workload, seed)
    if workload.name in IMAGE_TEXT and workload.model.kind == FEATURE_KIND:
        raise UsageError(f"model.kind: {workload.name}'s text tower needs a text model, not mlp")
    tower = TEXT_TOWERS.get(workload.model.kind)
    if tower is not None:
        tower.check(workload)
    if workload.name in IMAGE_TEXT:
        IMAGE_TOWERS[workload.image.kind].check(workload)
    return 2


def check_fit(experiment: Experiment) -> None:
    """Cross-section checks: what each key allows alone but not together, and what each strategy refuses."""
    workload, sweep = experiment.workload, experiment.sweep
    inputs = check_workload(workload, sweep.seed)
    for setting in sweep.chunk_sizes:
        if len(setting) not in (1, inputs):
            raise UsageError(
                f"sweep.chunk_sizes: {'/'.join(map(str, setting))} gives {len(setting)} sizes for {inputs} inputs; "
                "give one size, or one per input"
            )
    check_chunk_tokens(experiment, inputs)
    use = experiment.strategy_use()
    for name in sweep.strategies:
        resolve_strategy(name).check_use(use)
    if sweep.keep_graphs is not None and not any(resolve_strategy(s).keeps_graphs for s in sweep.strategies):
        raise UsageError("sweep.keep_graphs: none of the strategies keeps first-pass graphs (cache does)")
    if sweep.nproc > 1:
        for batch in sweep.batch_sizes:
            if batch % sweep.nproc:
                raise UsageError(f"sweep.batch_sizes: {batch} does not split evenly over nproc={sweep.nproc} ranks")


def check_chunk_tokens(experiment: Experiment, inputs: int) -> None:
    """``sweep.chunk_tokens``: one budget or one per input, each holding the longest row its input can draw."""
    sweep, workload = experiment.sweep, experiment.workload
    if sweep.chunk_tokens is None:
        return
    if not any(resolve_strategy(s).token_chunks for s in sweep.strategies):
        raise UsageError("sweep.chunk_tokens: none of the strategies chunks by tokens (cache does)")
    longest = workload.longest_rows(inputs)
    for setting in sweep.chunk_tokens:
        if len(setting) not in (1, inputs):
            raise UsageError(
                f"sweep.chunk_tokens: {'/'.join(map(str, setting))} gives {len(setting)} budgets for {inputs} "
                "inputs; give one budget, or one per input"
            )
        for i, (budget, cap) in enumerate(zip(setting * inputs if len(setting) == 1 else setting, longest)):
            if cap is not None and budget < cap:
                raise UsageError(
                    f"sweep.chunk_tokens: a budget of {budget} tokens is smaller than the longest row of input {i} "
                    f"({cap} tokens); give at least {cap}"
                )
