import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles (STYLE.md §8): "ci" (default) is derandomised and small; "dev" searches longer
# (SMOE_HYPOTHESIS=dev pytest ...). A test's own @settings overrides the profile's fields it names.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,  # CI replays nothing a local dev run saved: the same examples everywhere
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("SMOE_HYPOTHESIS", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def custom_name():
    """A router name for a test to register; removed from the registry afterwards."""
    from smoe.routing import registry
    from tests.router_helpers import CUSTOM

    yield CUSTOM
    registry._REGISTRY.pop(CUSTOM, None)
