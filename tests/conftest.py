"""Test setup shared by every file.

Without a GPU, Triton's kernels run through its CPU interpreter: TRITON_INTERPRET must be set
before anything imports triton, so it is set here, before the tests import lstmlab.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread: the tensors here are small, and on a shared 2-core machine OpenMP regions stall
# whenever another process holds a core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever the test before it set."""
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the layer allocates starts as NaN, scratch buffers too (the reference backend
    reuses them between calls): an element left unwritten shows up."""
    from lstmlab.kernels import HAS_TRITON, loop

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def nan_scratch(name, *shape, dtype, device):  # fresh, so a stale value cannot hide a gap
        return nan_empty(*shape, dtype=dtype, device=device)

    monkeypatch.setattr(loop, "empty", nan_empty)
    monkeypatch.setattr(loop, "scratch", nan_scratch)
    if HAS_TRITON:
        from lstmlab.kernels import triton_persistent

        monkeypatch.setattr(triton_persistent, "empty", nan_empty)
