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


@pytest.fixture
def gen_dir(tmp_path, monkeypatch):
    """Generated kernel sources go to a fresh folder (``TILEBACKEND_DEBUG_DIR``)."""
    monkeypatch.setenv("TILEBACKEND_DEBUG_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def clean_failures():
    """Forget kernels that failed before and after the test (failure-injection tests)."""
    from tilebackend.codegen import _common

    _common.reset_failures()
    yield
    _common.reset_failures()
