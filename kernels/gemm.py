"""The LSTM layer's matrix products, each on the engine that runs it fastest.

On CPU, ``torch.mm``/``addmm`` in fp32 call the BLAS PyTorch was built with (MKL in the PyPI wheels),
while ``torch.nn.LSTM``'s own CPU kernel runs on oneDNN. Where MKL takes a narrower code path than
the core offers (AMD Zen: AVX2 on cores that have AVX-512), oneDNN's JIT GEMM is about twice as
fast (the measurements behind every constant here: docs/benchmarks/cpu-amd-epyc-2026-11-26/README.md).

PyTorch reaches oneDNN's GEMM on dense tensors only through ``torch.ops.mkldnn._linear_pointwise``,
the op its own compiler (Inductor) emits for CPU linear layers. It is private, so it is used only
after a probe: the first fp32 CPU product checks that the op exists and agrees with ``torch.mm``;
if not, ``auto`` warns once and stays on the BLAS. The op computes a·bᵀ (+ bias) only; weight
gradients (aᵀ·b) pass it transposed views, which it copies, and still beat MKL's transposed GEMM.

The engine for fp32 CPU products is one process-wide setting, ``LSTMLAB_CPU_GEMM`` in the
environment or :func:`cpu_gemm_engine`:

- ``auto`` (default): oneDNN for products of at least ``ONEDNN_MIN_MACS`` multiply-adds and
  ``ONEDNN_MIN_ROWS`` rows when the probe passes, else the BLAS;
- ``blas``: always ``torch.mm`` and friends;
- ``onednn``: oneDNN for every fp32 CPU product, whatever its size (tests use it at tiny sizes);
  raises if the probe fails.

Everything else (CUDA, fp64, fp16, bf16) always runs on PyTorch's own matmul.

M, N, K: rows of the result, its columns, the reduced dimension.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

CPU_GEMM_ENGINES = ("auto", "blas", "onednn")
# Below 1M multiply-adds (B=16, H=128 per step) both engines took the same time, and for a few rows
# (B=1: a matrix-vector product) MKL was faster (docs/benchmarks/cpu-amd-epyc-2026-11-26/README.md).
ONEDNN_MIN_MACS = 1 << 20
ONEDNN_MIN_ROWS = 16
# Packing a weight into oneDNN's blocked layout costs about as much as 10–20 products save: worth it
# for a time loop of at least this many steps, not for an LSTMCell call.
PACK_MIN_STEPS = 32


def _check_engine(engine: object, what: str = "the CPU GEMM engine") -> str:
    if engine not in CPU_GEMM_ENGINES:
        raise ValueError(f"{what} must be one of {CPU_GEMM_ENGINES}, got {engine!r}")
    return engine  # type: ignore[return-value]


_engine = _check_engine(
    os.environ.get("LSTMLAB_CPU_GEMM", "auto"), "the environment variable LSTMLAB_CPU_GEMM"
)
_probe_result: str | None = None  # "" once the probe passed, else why it failed; None: not yet run


def get_cpu_gemm_engine() -> str:
    return _engine


def set_cpu_gemm_engine(engine: str) -> str:
    """Sets the engine for fp32 CPU products (see the module docstring); returns the previous one."""
    global _engine
    previous, _engine = _engine, _check_engine(engine)
    return previous


@contextmanager
def cpu_gemm_engine(engine: str) -> Iterator[None]:
    """``with cpu_gemm_engine("blas"): ...`` runs the block's fp32 CPU products on that engine."""
    previous = set_cpu_gemm_engine(engine)
    try:
        yield
    finally:
        set_cpu_gemm_engine(previous)


def _onednn_linear(a: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """a [M, K], w [N, K] (or packed by :func:`_onednn_pack`) -> a·wᵀ + bias [M, N] in oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


def _onednn_pack(w: Tensor, rows: int) -> Tensor:
    """w [N, K] reordered into oneDNN's blocked layout for products with about ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def onednn_unavailable_reason() -> str | None:
    """Why oneDNN's GEMM cannot be used here, or None if it can. Probes once per process."""
    global _probe_result
    if _probe_result is None:
        _probe_result = _probe()
    return _probe_result or None


def _probe() -> str:
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    generator = torch.Generator().manual_seed(0)
    a, w, bias = (torch.randn(*shape, generator=generator) for shape in ((5, 7), (3, 7), (3,)))
    expected = torch.addmm(bias, a, w.t())
    try:
        products = {
            "_linear_pointwise": _onednn_linear(a, w, bias),
            "_linear_pointwise on a packed weight": _onednn_linear(a, _onednn_pack(w, 5), bias),
        }
    except (AttributeError, RuntimeError) as error:  # the op is missing or its signature changed
        return f"torch.ops.mkldnn._linear_pointwise failed: {type(error).__name__}: {error}"
    for name, product in products.items():
        if not torch.allclose(product, expected, rtol=1e-5, atol=1e-5):
            error = (product - expected).abs().max()
            return f"torch.ops.mkldnn.{name} disagrees with torch.addmm (max error {error:.2e})"
    return ""


def describe_cpu_gemm() -> str:
    """The engine fp32 CPU products use now, in words, for run summaries and benchmark headers."""
    if _engine != "auto":
        return _engine
    reason = onednn_unavailable_reason()
    if reason is None:
        return f"auto: oneDNN from {ONEDNN_MIN_MACS} multiply-adds and {ONEDNN_MIN_ROWS} rows, torch.mm below"
    return f"auto: torch.mm ({reason})"


def uses_onednn(like: Tensor, m: int, n: int, k: int) -> bool:
    """Whether an [M, K]·[K, N] product of tensors like ``like`` runs on oneDNN."""
    if like.device.type != "cpu" or like.dtype != torch.float32 or _engine == "blas":
        return False
    if _engine == "auto" and (m * n * k < ONEDNN_MIN_MACS or m < ONEDNN_MIN_ROWS):
        return False
    reason = onednn_unavailable_reason()
    if reason is None:
        return True
    if _engine == "onednn":
        raise RuntimeError(f"LSTMLAB_CPU_GEMM is 'onednn' but {reason}")
    if not _warned:
        _warn_fallback(reason)
    return False


_warned = False


def _warn_fallback(reason: str) -> None:
    global _warned
    _warned = True
    warnings.warn(f"lstmlab: fp32 CPU matrix products stay on torch.mm because {reason}", stacklevel=3)


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K], w [N, K] -> x·wᵀ + bias [M, N]. Not differentiable: for use inside the layer's ops."""
    if uses_onednn(x, x.shape[0], w.shape[0], x.shape[1]):
        return _onednn_linear(x, w, bias)
    return F.linear(x, w, bias)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K], b [K, N] -> a·b [M, N]."""
    if uses_onednn(a, a.shape[0], b.shape[1], a.shape[1]):
        return _onednn_linear(a, b.t().contiguous())
    return a @ b


def mm_tn(a: Tensor, b: Tensor) -> Tensor:
    """a [K, M], b [K, N] -> aᵀ·b [M, N]: weight gradients, summed over the K = T·B rows."""
    M, N = a.shape[1], b.shape[1]
    if uses_onednn(a, M, N, a.shape[0]):
        # oneDNN reads the transposed views itself, faster than a contiguous copy; it handles the
        # larger operand better as the weight: (bᵀ·a)ᵀ when M ≥ N (faster for ∂L/∂W_hh where we measured)
        if M >= N:
            return _onednn_linear(b.t(), a.t()).t().contiguous()
        return _onednn_linear(a.t(), b.t())
    return a.t() @ b


def linear_pair(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [2, M, K], w [2, N, K] -> x[d]·w[d]ᵀ + bias[d] [2, M, N]: both directions of a layer, one
    batched product on PyTorch's own matmul (the layer runs both at once only on the GPU kernels)."""
    if bias is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, w.transpose(1, 2))


class StepWeight:
    """The weight b [N, K] of the products a·bᵀ of a time loop of ``steps`` steps, a having at most
    ``rows`` rows. When they go to oneDNN, b is prepared once: packed into oneDNN's layout for
    loops of at least ``PACK_MIN_STEPS`` steps, else only made contiguous."""

    def __init__(self, b: Tensor, rows: int, steps: int) -> None:
        self.b = b
        N, K = b.shape
        self.b_onednn = None
        if uses_onednn(b, rows, N, K):
            self.b_onednn = _onednn_pack(b, rows) if steps >= PACK_MIN_STEPS else b.contiguous()

    def addmm(self, c: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
        """c + a·bᵀ [M, N] for a [M, K], c [M, N]; into ``out`` when given."""
        if self.b_onednn is None:
            return torch.addmm(c, a, self.b.t(), out=out)
        return torch.add(c, _onednn_linear(a, self.b_onednn), out=out)

    def mm(self, a: Tensor, out: Tensor | None = None) -> Tensor:
        """a·bᵀ [M, N], into ``out`` when given."""
        if self.b_onednn is None:
            return torch.mm(a, self.b.t(), out=out)
        product = _onednn_linear(a, self.b_onednn)
        return product if out is None else out.copy_(product)
