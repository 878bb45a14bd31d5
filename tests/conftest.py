"""Tests run Triton kernels on CPU in Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorates, so it is set here,
before tilebackend's kernel modules are imported.  Set TILEBACKEND_TEST_DEVICE=cuda on a
GPU machine to run the same tests on the GPU instead (the interpreter is then left off).
"""

import atexit
import os
import shutil
import tempfile

DEVICE = os.environ.get("TILEBACKEND_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every run starts from empty caches, as on a fresh machine: tuning results, traced
# patterns, generated sources and the stored pre-autograd graphs (in Inductor's cache
# dir) from an earlier run or an older checkout would otherwise skip the code under test
# (a warm store once hid a rewrite that failed on every first compile).
# TILEBACKEND_TEST_SHARED_CACHES=1 keeps the user's caches (faster reruns).
if os.environ.get("TILEBACKEND_TEST_SHARED_CACHES", "0") in ("", "0"):
    _caches = tempfile.mkdtemp(prefix="tilebackend-tests-")
    os.environ["TILEBACKEND_CACHE_DIR"] = os.path.join(_caches, "tilebackend")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_caches, "inductor")
    atexit.register(shutil.rmtree, _caches, ignore_errors=True)

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
