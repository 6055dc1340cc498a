import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The integration tests' models are tiny: their GEMMs gain nothing from threads, and lose
    much to a busy CI machine's other load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
