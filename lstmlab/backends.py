"""Which implementation runs an LSTM layer: decided here, and only here.

Requested (``LSTM(backend=...)``)  ->  what runs (``last_backend``, one of ``KERNEL_BACKENDS``)

    "reference"           ->  "reference": the time loop in PyTorch, anywhere
    "triton_step"         ->  "triton_step": a fused Triton gate kernel per step, a GEMM between
    "triton_persistent"   ->  "triton_persistent": one Triton kernel for all steps (no proj_size)
    "triton"              ->  "triton_persistent" on CUDA where the shape qualifies, else "triton_step"
                              (always "triton_step" for LSTMCell: one step has nothing to persist)
    "auto" (default)      ->  as "triton" for CUDA tensors when Triton imports, else "reference"

An explicit request that cannot be honoured raises, saying why; nothing falls back quietly. On the
CPU the Triton kernels run only through Triton's interpreter (TRITON_INTERPRET=1, for tests), and
there "triton" means the per-step kernels: the persistent ones run there only when asked for.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes

from lstmlab.kernels import HAS_TRITON, TRITON_INTERPRET, variants

BACKENDS = ("auto", "triton", "triton_step", "triton_persistent", "reference")


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


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant, never traces it
def persistent_unavailable_reason(
    batch: int, hidden: int, dtype: torch.dtype, device: torch.device, proj_size: int, flags: int = 0
) -> str | None:
    """Why the persistent kernels cannot run this layer (``flags``: its cell variant's kernel bits,
    `kernels/variants.py`), or None. On CUDA the first answer for a shape and variant compiles both
    kernels to check registers, spills and residency (then it is cached)."""
    if proj_size > 0:
        return "they have no projection (proj_size > 0 runs on the per-step kernels)"
    from lstmlab.kernels import triton_persistent  # imports triton: only once it is known to be there

    # on CUDA the check compiles the kernels on real tensors: never on the fake (or recorded) ones
    # of a tracer that happens to be active, such as torch.export's
    with _disable_current_modes():
        return triton_persistent.persistent_unavailable_reason(batch, hidden, dtype, device, flags)


def _variant_note(flags: int) -> str:
    return f" ({', '.join(variants.flag_names(flags))})" if flags else ""


def resolve_backend(
    requested: str,
    device: torch.device | str,
    batch: int = 1,
    hidden: int = 1,
    dtype: torch.dtype = torch.float32,
    proj_size: int = 0,
    single_step: bool = False,
    flags: int = 0,
) -> str:
    """The implementation (one of ``KERNEL_BACKENDS``) for a requested backend and a layer: its
    tensors' device, batch, hidden size, compute dtype and proj_size (``single_step``: a cell;
    ``flags``: the cell variant's kernel bits, 0 for the vanilla cell).
    Raises if an explicit request cannot run, naming the reason."""
    check_backend_name(requested)
    device = torch.device(device)
    if requested == "reference":
        return "reference"
    reason = triton_unavailable_reason(device)
    if requested == "auto":
        if device.type != "cuda" or reason is not None:
            return "reference"
        requested = "triton"
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} was requested but {reason}. Use backend='reference'.")
    if requested == "triton_step" or (requested == "triton" and (device.type != "cuda" or single_step)):
        return "triton_step"
    # The persistent kernels' answer depends on the batch only through their batch-chunk size,
    # which changes above 16 rows, so a representative of each class is asked (a constant-result
    # function cannot take a symbolic size). Under tracing the batch is never compared at all: a
    # guard on a symbolic batch would narrow torch.export's range, or fail outright for an
    # unbacked one (packed input), and Dynamo does not show it as a torch.SymInt. So there the
    # persistent kernels are chosen only if they serve both classes.
    traced = torch.compiler.is_compiling() or isinstance(batch, torch.SymInt)
    classes = (16, 32) if traced else (batch,)
    reasons = (persistent_unavailable_reason(b, hidden, dtype, device, proj_size, flags) for b in classes)
    persistent_reason = next((r for r in reasons if r is not None), None)
    if persistent_reason is None:
        return "triton_persistent"
    if requested == "triton":
        return "triton_step"
    raise RuntimeError(
        f"backend='triton_persistent' was requested but the persistent kernels cannot run B={batch}, "
        f"H={hidden}, {dtype}{_variant_note(flags)} on {device}: {persistent_reason}. "
        "Use backend='triton_step' or 'triton'."
    )
