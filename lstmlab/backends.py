"""Which implementation runs an LSTM: decided here, and only here.

`auto` is Triton for CUDA tensors when Triton is importable, else the PyTorch reference. An explicit
request that cannot be honoured raises; nothing falls back quietly.
"""

from __future__ import annotations

import torch

from lstmlab.kernels import HAS_TRITON, TRITON_INTERPRET

BACKENDS = ("auto", "triton", "reference")


def check_backend_name(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device``, or None if they can."""
    if not HAS_TRITON:
        return "the triton package is not importable (it is installed on Linux only)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and TRITON_INTERPRET:
        return None
    return (
        f"the Triton kernels need CUDA tensors, got {device.type} tensors (on the CPU they run "
        "through Triton's interpreter only when TRITON_INTERPRET=1 is set before triton is imported)"
    )


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Returns ``"triton"`` or ``"reference"`` for a requested backend and the tensors' device."""
    check_backend_name(requested)
    device = torch.device(device)
    if requested == "reference":
        return "reference"
    reason = triton_unavailable_reason(device)
    if requested == "auto":
        return "triton" if device.type == "cuda" and reason is None else "reference"
    if reason is not None:
        raise RuntimeError(f"backend='triton' was requested but {reason}. Use backend='reference'.")
    return "triton"
