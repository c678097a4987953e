"""The backend table: every implementation of the layer op's recurrence, one row each, and the one
rule that picks among them (:func:`resolve_backend`).

A row is a name, the implementation (loaded on first use, so that Triton is imported only when it
is asked for) and ``unavailable_reason(device, batch, hidden, proj_size, dtype, flags)``: None when
the backend can run that layer, else one line saying why not. Every implementation keeps one
contract (`loop.py`): ``forward(gx, own_gx, h0, c0, w_hh, w_hr, batch_sizes, cell) -> LoopSaved``
and ``backward(d_hs, d_out_packed, d_cn, saved, w_hh, w_hr, batch_sizes, cell, keep_d_pre) ->
LoopGrads``. A new backend is one file with that contract plus one row here. A backend may also
offer ``forward_from_input(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, cell, save)``, the same
forward with the input projection inside its steps (the C++ CPU kernel): the layer then calls it
instead of computing gx [T, B, 4H] first; and ``backward_from_input(x, w_ih, <backward's
arguments>, want_x, want_w) -> (LoopGrads, ∂x, ∂[W_ih | W_hh], ∂b)``, the backward with ∂x and
∂W inside its steps.

Both directions of a bidirectional layer can be one call where a row says so
(``both_directions_reason``, asked like ``unavailable_reason``): its ``forward`` and ``backward`` then
take every tensor with a leading [2] (direction 1 over the time-flipped sequence, batch_sizes
[2, T]) and run both directions at once (the persistent kernels: one launch, grid (P, 2)). Every
other row runs one direction per call.

Requested (``LSTM(backend=...)``)  ->  what runs (``last_backend``, one of ``KERNEL_BACKENDS``)

    "reference"           ->  "reference": the time loop in PyTorch, anywhere
    "triton_step"         ->  "triton_step": a fused Triton gate kernel per step, a GEMM between
    "triton_persistent"   ->  "triton_persistent": one Triton kernel for all steps (no proj_size, no
                              layer norm)
    "triton"              ->  "triton_persistent" on CUDA where the shape qualifies, else "triton_step"
                              (always "triton_step" for LSTMCell: one step has nothing to persist)
    "auto" (default)      ->  as "triton" for CUDA tensors when Triton imports, else "reference"

An explicit request that cannot be honoured raises, saying why; nothing falls back quietly. On the
CPU the Triton kernels run only through Triton's interpreter (TRITON_INTERPRET=1, for tests), and
there "triton" means the per-step kernels: the persistent ones run there only when asked for.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from . import loop, variants
from .loop import REFERENCE, Cell, LoopGrads, LoopSaved, PerStepBackend, with_packed_output_grad

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton decides at import time whether kernels run compiled or through its CPU interpreter.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# what a request may name: the backends, and the two rules below that choose among them
REQUESTS = ("auto", "triton", "triton_step", "triton_persistent", "cpu", "reference")


@dataclass(frozen=True)
class Backend:
    """One row of the table."""

    name: str
    load: Callable[[], object]  # -> the implementation (forward, backward), imported on first use
    unavailable_reason: Callable[..., str | None]  # (device, batch, hidden, proj_size, dtype, flags)
    doc: str
    # why it cannot run both directions of a layer in one call (same arguments), or None if it can;
    # no function: one direction per call, always
    both_directions_reason: Callable[..., str | None] | None = None


# ---- the rows' implementations and reasons ----


def _always_available(device, batch, hidden, proj_size, dtype, flags) -> str | None:
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device``, or None if they can."""
    if not HAS_TRITON:
        return "the triton package is not importable (it is installed on Linux only)"
    if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET):
        return None
    return (
        f"the Triton kernels need CUDA tensors, got {device.type} tensors (on the CPU they run "
        "through Triton's interpreter only when TRITON_INTERPRET=1 is set before triton is imported)"
    )


def _triton_step_unavailable_reason(device, batch, hidden, proj_size, dtype, flags) -> str | None:
    return triton_unavailable_reason(device)


@functools.cache
def _triton_step() -> PerStepBackend:
    from . import triton_gates

    return PerStepBackend(triton_gates, coefficients=False, activates_in_place=False)


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant, never traces it
def persistent_unavailable_reason(
    batch: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    proj_size: int,
    flags: int = 0,
    directions: int = 1,
) -> str | None:
    """Why the persistent kernels cannot run this layer, or None (Triton known to be importable).
    On CUDA the first answer for a shape and variant compiles both kernels to check registers,
    spills and residency (then it is cached). ``directions=2``: both directions in one launch,
    each with half the SMs."""
    if proj_size > 0:
        return "they have no projection (proj_size > 0 runs on the per-step kernels)"
    from . import triton_persistent  # imports triton: only once it is known to be there

    # on CUDA the check compiles the kernels on real tensors: never on the fake (or recorded) ones
    # of a tracer that happens to be active, such as torch.export's
    with _disable_current_modes():
        reason = triton_persistent.persistent_unavailable_reason
        return reason(batch, hidden, dtype, device, flags, directions)


def _persistent_unavailable_reason(
    device, batch, hidden, proj_size, dtype, flags, directions: int = 1
) -> str | None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    # The kernels' answer depends on the batch only through their batch-chunk size, which changes
    # above 16 rows, so a representative of each class is asked (a constant-result function cannot
    # take a symbolic size). Under tracing the batch is never compared at all: a guard on a
    # symbolic batch would narrow torch.export's range, or fail outright for an unbacked one
    # (packed input), and Dynamo does not show it as a torch.SymInt. So there the persistent
    # kernels are chosen only if they serve both classes.
    traced = torch.compiler.is_compiling() or isinstance(batch, torch.SymInt)
    for b in (16, 32) if traced else (batch,):
        reason = persistent_unavailable_reason(b, hidden, dtype, device, proj_size, flags, directions)
        if reason is not None:
            return reason
    return None


def _persistent_both_directions_reason(device, batch, hidden, proj_size, dtype, flags) -> str | None:
    return _persistent_unavailable_reason(device, batch, hidden, proj_size, dtype, flags, directions=2)


class _Persistent:
    """triton_persistent.py's kernels behind the loop contract; every tensor may have a leading [2]
    (both directions in one launch, the vanilla cell)."""

    @staticmethod
    def forward(gx, own_gx, h0, c0, w_hh, w_hr, batch_sizes, cell: Cell, save: bool = True) -> LoopSaved:
        from . import triton_persistent

        T, B, G = gx.shape[-3:]
        c_new = loop.empty(T, B, G // 4, dtype=torch.float64 if gx.dtype == torch.float64 else torch.float32,
                      device=gx.device) if cell.zoneout_c else None  # fmt: skip
        hs, cs, gates = triton_persistent.persistent_forward(
            gx.contiguous(), h0, c0, w_hh, batch_sizes,
            flags=cell.flags, peephole=cell.peephole, zoneout=cell.zoneout, dropout=cell.dropout, c_new=c_new,
            save=save,
        )  # fmt: skip
        return LoopSaved(hs, cs, gates, None, c_new, None)

    @staticmethod
    def backward(d_hs, d_out_packed, d_cn, saved: LoopSaved, w_hh, w_hr, batch_sizes, cell: Cell,
                 keep_d_pre: bool) -> LoopGrads:  # fmt: skip
        from . import triton_persistent

        d_hs = with_packed_output_grad(d_hs, d_out_packed, batch_sizes)
        d_pre, d_h, d_c = triton_persistent.persistent_backward(
            d_hs.contiguous(), d_cn.to(saved.cs.dtype), saved.gates, saved.cs, w_hh, batch_sizes,
            flags=cell.flags, peephole=cell.peephole, zoneout=cell.zoneout, dropout=cell.dropout,
            c_new=saved.c_new,
        )  # fmt: skip
        return LoopGrads(d_pre, d_pre, d_h, d_c, None, None)


@torch.compiler.assume_constant_result  # the first answer builds the library: never traced
def cpu_kernel_reason(
    hidden: int, dtype: torch.dtype, device: torch.device, flags: int, proj_size: int
) -> str | None:
    """Why the fused CPU kernel cannot run this layer, or None (its first answer builds the library,
    cpu_kernel.py; the batch never matters)."""
    return _cpu_kernel_reason(hidden, dtype, flags, proj_size)


@functools.lru_cache(maxsize=256)  # asked on every layer call; the answer never changes in a process
def _cpu_kernel_reason(hidden: int, dtype: torch.dtype, flags: int, proj_size: int) -> str | None:
    from . import cpu_kernel

    with _disable_current_modes():
        return cpu_kernel.unavailable_reason(1, hidden, dtype, "cpu", flags, proj_size)


def _cpu_unavailable_reason(device, batch, hidden, proj_size, dtype, flags) -> str | None:
    if device.type != "cpu":  # answered here: asking the kernel module would build the library
        return f"the fused CPU kernel runs on CPU tensors, not {device.type}"
    return cpu_kernel_reason(hidden, dtype, device, flags, proj_size)


class _CpuKernel:
    """cpu_kernel.py's C++ time loop behind the loop contract."""

    @staticmethod
    def forward(gx, own_gx, h0, c0, w_hh, w_hr, batch_sizes, cell: Cell, save: bool = True) -> LoopSaved:
        return _CpuKernel.forward_from_input(gx, None, None, h0, c0, w_hh, w_hr, batch_sizes, cell, save)

    @staticmethod
    def forward_from_input(
        x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, cell: Cell, save: bool = True
    ) -> LoopSaved:
        """The input projection inside each step's product ([x_t | h_{t−1}]·[W_ih | W_hh]ᵀ + b): no
        [T, B, 4H] gx is written or read. With w_ih None, x is gx."""
        from . import cpu_kernel

        hs, cs, gates, h_raw, c_new = cpu_kernel.sequence_forward(
            x, h0, c0, w_hh, w_hr, batch_sizes,  # x: the kernel reads any step and batch strides
            flags=cell.flags, peephole=cell.peephole, zoneout=cell.zoneout, dropout=cell.dropout, save=save,
            w_ih=w_ih, bias=bias,
        )  # fmt: skip
        return LoopSaved(
            hs, cs, gates, None if w_hr is None else h_raw, c_new if cell.zoneout_c else None, None
        )

    @staticmethod
    def backward(d_hs, d_out_packed, d_cn, saved: LoopSaved, w_hh, w_hr, batch_sizes, cell: Cell,
                 keep_d_pre: bool) -> LoopGrads:  # fmt: skip
        grads, _, _, _ = _CpuKernel.backward_from_input(
            None, None, d_hs, d_out_packed, d_cn, saved, w_hh, w_hr, batch_sizes, cell, keep_d_pre
        )
        return grads

    @staticmethod
    def backward_from_input(
        x, w_ih, d_hs, d_out_packed, d_cn, saved: LoopSaved, w_hh, w_hr, batch_sizes, cell: Cell,
        keep_d_pre: bool, want_x: bool = False, want_w: bool = False,
    ) -> tuple[LoopGrads, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
        """The backward with ∂x (want_x) and ∂W (want_w) inside its steps: ∂pre_k·[W_ih | W_hh] gives
        ∂x_k with ∂h, and ∂W += ∂pre_kᵀ·[x_k | h_{k−1} ⊙ m] -> (grads, ∂x [T, B, I] or None,
        ∂[W_ih | W_hh] [4H, I + P] or None, ∂b = Σ ∂pre [4H] or None). x and w_ih None: the plain
        backward."""
        from . import cpu_kernel

        empty = saved.hs.new_empty(0)
        d_hs = with_packed_output_grad(d_hs, d_out_packed, batch_sizes).contiguous()
        d_pre, d_h0, d_c0, d_hp, d_x, d_w, d_b = cpu_kernel.sequence_backward(
            d_hs, d_cn, saved.gates, saved.cs,
            empty if saved.h_raw is None else saved.h_raw, empty if saved.c_new is None else saved.c_new,
            w_hh, w_hr, batch_sizes,
            flags=cell.flags, peephole=cell.peephole, zoneout=cell.zoneout, dropout=cell.dropout,
            w_ih=w_ih if want_x else None, x=x if want_w else None, hs=saved.hs if want_w else None,
        )  # fmt: skip
        grads = LoopGrads(d_pre, d_pre, d_h0, d_c0, None if w_hr is None else d_hp, None)
        return grads, d_x if want_x else None, d_w if want_w else None, d_b if want_w else None


class _PerStep:
    """A :class:`PerStepBackend` behind the loop contract: the caller's ∂L/∂gx is its own buffer
    when kept (the op returns it), else scratch (used up in the weight GEMMs)."""

    def __init__(self, impl: Callable[[], PerStepBackend]) -> None:
        self.impl = impl

    def forward(self, *args, **kwargs) -> LoopSaved:
        return self.impl().forward(*args, **kwargs)

    def backward(
        self, d_hs, d_out_packed, d_cn, saved, w_hh, w_hr, batch_sizes, cell, keep_d_pre
    ) -> LoopGrads:
        T, B, G = saved.gates.shape
        allocate = loop.empty if keep_d_pre else functools.partial(loop.scratch, "d_pre")
        d_pre = allocate(T, B, G, dtype=saved.hs.dtype, device=saved.hs.device)
        return self.impl().backward(d_hs, d_out_packed, d_cn, saved, w_hh, w_hr, batch_sizes, cell, d_pre)


# ---- the table ----

TABLE: dict[str, Backend] = {
    row.name: row
    for row in (
        Backend("reference", lambda: _PerStep(lambda: REFERENCE), _always_available,
                "the time loop in PyTorch, anywhere"),
        Backend("triton_step", lambda: _PerStep(_triton_step), _triton_step_unavailable_reason,
                "a fused Triton gate kernel per step, a GEMM between"),
        Backend("triton_persistent", lambda: _Persistent, _persistent_unavailable_reason,
                "one Triton kernel for all steps (no proj_size, no layer norm)",
                both_directions_reason=_persistent_both_directions_reason),
        Backend("cpu", lambda: _CpuKernel, _cpu_unavailable_reason,
                "the fused C++ time loop on the CPU (cpu_kernel.py; no layer norm, no bf16)"),
    )
}  # fmt: skip
KERNEL_BACKENDS = tuple(TABLE)


@functools.cache
def get(name: str):
    """The implementation of a backend row (forward, backward), loaded once."""
    if name not in TABLE:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {name!r}")
    return TABLE[name].load()


def per_step(name: str) -> PerStepBackend:
    """The per-step gate math of a per-step backend (for the single-step functions)."""
    if name == "reference":
        return REFERENCE
    if name == "triton_step":
        if not HAS_TRITON:
            raise RuntimeError(f"backend={name!r} needs the triton package, which is not importable")
        return _triton_step()
    raise ValueError(f"the per-step gate functions run 'reference' or 'triton_step', not {name!r}")


def unavailable_reason(
    name: str, device: torch.device, batch: int, hidden: int, proj_size: int, dtype: torch.dtype, flags: int
) -> str | None:
    """Why backend ``name`` cannot run this layer, or None."""
    return TABLE[name].unavailable_reason(torch.device(device), batch, hidden, proj_size, dtype, flags)


def both_directions_reason(
    name: str, device: torch.device, batch: int, hidden: int, proj_size: int, dtype: torch.dtype, flags: int
) -> str | None:
    """Why backend ``name`` cannot run both directions of this bidirectional layer in one call, or
    None if it can (then the module makes one call of the layer op for the pair)."""
    reason = TABLE[name].both_directions_reason
    if reason is None:
        return f"backend {name!r} runs one direction per call"
    return reason(torch.device(device), batch, hidden, proj_size, dtype, flags)


def _variant_note(flags: int) -> str:
    return f" ({', '.join(variants.flag_names(flags))})" if flags else ""


def check_available(
    name: str,
    device: torch.device,
    batch: int,
    hidden: int,
    proj_size: int,
    dtype: torch.dtype,
    flags: int,
    requested: str | None = None,
) -> None:
    """Raises RuntimeError naming the reason if backend ``name`` (asked for as ``requested``)
    cannot run this layer."""
    reason = unavailable_reason(name, device, batch, hidden, proj_size, dtype, flags)
    if reason is not None:
        use = "'triton_step' or 'triton'" if name == "triton_persistent" else "'reference'"
        raise RuntimeError(
            f"backend={requested or name!r} was requested but {reason} (B={batch}, H={hidden}, "
            f"proj_size={proj_size}, {dtype}{_variant_note(flags)} on {device}). Use backend={use}."
        )


@functools.cache  # one warning per distinct reason, per process
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_backend_name(backend: object) -> str:
    if backend not in REQUESTS:
        raise ValueError(f"backend must be one of {REQUESTS}, got {backend!r}")
    return backend  # type: ignore[return-value]


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
    ``flags``: the cell variant's kernel bits, 0 for the vanilla cell). The only place that decides.
    Raises if an explicit request cannot run, naming the reason."""
    check_backend_name(requested)
    device = torch.device(device)
    shape = (device, batch, hidden, proj_size, dtype, flags)
    if requested in KERNEL_BACKENDS:
        check_available(requested, *shape)
        return requested
    if requested == "auto":
        if device.type == "cpu":
            if unavailable_reason("cpu", *shape) is None:
                return "cpu"
            # a cell the kernel lacks (layer norm, bf16) is the rule; a kernel that cannot be built
            # at all (no compiler) is worth saying, once
            broken = cpu_kernel_reason(1, torch.float32, device, 0, 0)
            if broken is not None and not torch.compiler.is_compiling():
                _warn_once(f"backend='auto' runs the 'reference' backend on the CPU: {broken}")
            return "reference"
        if device.type != "cuda" or unavailable_reason("triton_step", *shape) is not None:
            return "reference"
        requested = "triton"
    check_available("triton_step", *shape, requested=requested)  # "triton": the per-step kernels at least
    if device.type != "cuda" or single_step:
        return "triton_step"
    return "triton_persistent" if unavailable_reason("triton_persistent", *shape) is None else "triton_step"
