"""The package's layers run one way: read every import statement and check it against the declared order.

A unit is a subpackage (``gcbench/sweep/``) or a top-level module (``gcbench/strategies.py``). A unit may
import only from itself and from units below it in :data:`LAYERS`; that order also rules out any import
cycle between units, which :func:`test_no_cycle_between_units` checks on its own, from the imports alone.
Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gcbench"
# Lowest first. The technique, then measurement, results, experiments, the commands' engines, the CLI.
LAYERS = [
    "errors",
    "imports",
    "version",
    "typed",
    "device",
    "_cuda_double",
    "processes",
    "cache",
    "losses",
    "workloads",
    "strategies",
    "training",
    "distributed",
    "peers",
    "integrations",
    "measure",
    "testing",
    "results",
    "experiment",
    "estimate",
    "verify",
    "trajectory",
    "sweep",
    "tune",
    "report",
    "cli",
]
TOP = {"__init__", "__main__"}  # the package root re-exports the public API: it may import anything


def unit_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_units(path: Path) -> set[str]:
    """The gcbench units that ``path`` imports, at any depth of the module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, *(node.module.split(".") if node.module else [])])]
            else:
                names = [node.module or ""]
            if names == ["gcbench"]:  # from gcbench import peers: the name is a unit
                names = [f"gcbench.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gcbench" and len(parts) > 1:
                found.add(parts[1])
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of(path)
        if unit in TOP:
            continue
        edges.setdefault(unit, set()).update(imported_units(path) - {unit})
    return edges


def test_every_unit_has_a_layer() -> None:
    assert set(graph()) <= set(LAYERS), f"units without a layer: {set(graph()) - set(LAYERS)}"


@pytest.mark.parametrize("unit", LAYERS)
def test_imports_go_down_only(unit: str) -> None:
    upward = {other for other in graph().get(unit, set()) if LAYERS.index(other) > LAYERS.index(unit)}
    assert not upward, f"{unit} imports from layers above it: {sorted(upward)}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of units (``[a, b, a]``), or None: depth first, a unit seen again while open closes a cycle."""
    state: dict[str, str] = {}

    def visit(unit: str, path: list[str]) -> list[str] | None:
        state[unit] = "open"
        for other in sorted(edges.get(unit, ())):
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other, [*path, other])):
                return cycle
        state[unit] = "done"
        return None

    for unit in sorted(edges):
        if unit not in state and (cycle := visit(unit, [unit])):
            return cycle
    return None


def test_no_cycle_between_units() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_the_checks_bite() -> None:
    """The reader finds a lazy import inside a function; the cycle finder finds a cycle three units long."""
    here = imported_units(PACKAGE / "cli.py")
    assert {"experiment", "errors", "results"} <= here and "sweep" in here  # sweep is imported inside a command
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


HEAVY = ("pydantic", "pandas", "matplotlib", "scipy", "rich", "click", "transformers", "sentence_transformers")


def modules_after(statement: str) -> set[str]:
    """Top-level module names (and gcbench's own modules) loaded by ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    names = set(out.stdout.split())
    return {n.split(".")[0] for n in names} | {n for n in names if n.startswith("gcbench.")}


def test_importing_gradcache_loads_the_technique_alone() -> None:
    loaded = modules_after("from gcbench import GradCache")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "gcbench.peers" not in loaded and "gcbench.strategies" not in loaded
    # the check bites: the lazy names do load the schema's pydantic and register the peers' strategies
    loaded = modules_after("import gcbench\nassert 'st-cached' in gcbench.STRATEGIES")
    assert {"pydantic", "gcbench.peers", "gcbench.strategies"} <= loaded
