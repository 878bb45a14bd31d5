"""Tests run Triton kernels on CPU in Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorates, so it is set here,
before tilebackend's kernel modules are imported.  Set TILEBACKEND_TEST_DEVICE=cuda on a
GPU machine to run the same tests on the GPU instead (the interpreter is then left off).
"""

import os

DEVICE = os.environ.get("TILEBACKEND_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tilebackend import settings  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def poison():
    """Kernel outputs are allocated full of NaN, so an unwritten element fails."""
    with settings.use(settings.Settings(poison_outputs=True)):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    gpu = pytest.mark.skip(reason="needs a GPU (set TILEBACKEND_TEST_DEVICE=cuda)")
    for item in items:
        if "gpu" in item.keywords and DEVICE != "cuda":
            item.add_marker(gpu)
