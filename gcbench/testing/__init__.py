"""Helpers for tests: is a cached step exact? (``gcbench.testing.plugin`` makes them a pytest fixture.)

A package so that other test helpers can live beside it as submodules; nothing here imports pytest.
"""

from gcbench.testing.exactness import (
    TOLERANCE,
    ExactnessReport,
    WorstParameter,
    assert_gradcache_exact,
    assert_step_exact,
)

__all__ = ["TOLERANCE", "ExactnessReport", "WorstParameter", "assert_gradcache_exact", "assert_step_exact"]
