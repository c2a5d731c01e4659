"""Shared test set-up: offline hub, quiet threads, the ``gpu`` marker.

The repository root, ``tests/`` and ``benchmarks/`` are importable through pytest's ``pythonpath``
(pyproject.toml), not through sys.path edits here.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with one reason, where PyTorch sees no CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads and lose a lot on a busy machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` in a test module.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
