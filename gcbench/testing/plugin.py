"""The pytest plugin (entry point ``pytest11``: ``gcbench``): the ``gradcache_exact`` fixture.

Installed with gcbench, pytest loads it in every project; ``-p no:gcbench`` switches it off.

    def test_my_cached_loss(gradcache_exact):
        gradcache_exact(encoders, loss_fn, batches, chunk_size=2)        # gcbench's GradCache
        gradcache_exact.step(my_step, encoders, loss_fn, batches, chunk_size=2)   # your own step
"""

from __future__ import annotations

from typing import Any

import pytest

from gcbench.testing.exactness import ExactnessReport, assert_gradcache_exact, assert_step_exact

SEED_OPTION = "gcbench_seed"


class GradCacheExact:
    """The fixture's value: :func:`assert_gradcache_exact` when called, :func:`assert_step_exact` as ``.step``,
    both seeded from the ``gcbench_seed`` ini option unless ``seed=`` is given."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, encoders: Any, loss_fn: Any, batches: Any, **options: Any) -> ExactnessReport:
        __tracebackhide__ = True
        return assert_gradcache_exact(encoders, loss_fn, batches, **{"seed": self.seed, **options})

    def step(self, step: Any, encoders: Any, loss_fn: Any, batches: Any, **options: Any) -> ExactnessReport:
        __tracebackhide__ = True
        return assert_step_exact(step, encoders, loss_fn, batches, **{"seed": self.seed, **options})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(SEED_OPTION, "seed of the gradcache_exact fixture's runs (default 0)", default="0")


@pytest.fixture
def gradcache_exact(request: pytest.FixtureRequest) -> GradCacheExact:
    """Asserts a cached step's gradients equal the full batch's (gcbench.testing)."""
    raw = request.config.getini(SEED_OPTION)
    try:
        seed = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{SEED_OPTION}: an integer, got {raw!r}") from None
    return GradCacheExact(seed)
