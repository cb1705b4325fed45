import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "gcbench", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gcbench"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests compare bitwise in places; keep torch's thread count fixed for them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` need a CUDA device: skipped, saying so, without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by experiments/gpu-check.sh where one is lent)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
