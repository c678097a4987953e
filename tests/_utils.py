"""Small helpers shared by the test files (importable because pytest puts tests/ on sys.path)."""

import math

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|: one number per tensor, 0 for two zero tensors."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def device_for(backend: str) -> str:
    """Where a backend's tests run: the Triton kernels on the GPU when there is one, else on the CPU
    through Triton's interpreter (conftest turns it on only without a GPU); the reference on the CPU."""
    return "cuda" if backend.startswith("triton") and torch.cuda.is_available() else "cpu"


def lstm_inputs(T: int, B: int, h: int, seed: int) -> tuple:
    """(the generator, for later draws; gx [T, B, 4h], h0, c0 [B, h], w_hh [4h, h] uniform in
    ±1/√h) in fp32, drawn in that order from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    gx, h0, c0 = (
        torch.randn(T, B, 4 * h, generator=g),
        torch.randn(B, h, generator=g),
        torch.randn(B, h, generator=g),
    )
    w_hh = (torch.rand(4 * h, h, generator=g) * 2 - 1) / math.sqrt(h)
    return g, gx, h0, c0, w_hh
