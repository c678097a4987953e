"""One LSTM layer (one direction) over a whole sequence as one registered operator each way.

`lstmlab::lstm_layer_fwd` and `lstmlab::lstm_layer_bwd` are ``torch.library.custom_op``s with fake
(shape-only) implementations, and the backward is registered as the forward's autograd formula: so
torch.compile, torch.export and CUDA-graph capture see two opaque operators and never trace into
the Python time loop they run (tracing it returned wrong numbers). The public functions at the end
of this file call them.

The time loop is shared by both backends; only the per-step gate math differs (`torch_gates.py`
in PyTorch, `triton_gates.py` fused). Per step: one GEMM h_{t−1}·W_hhᵀ added to the precomputed
input projection, then one gate launch. The input projection of all steps is one GEMM before the
loop; after it, ∂L/∂x is one GEMM and ∂L/∂W_ih, ∂L/∂W_hh one more, together. Every product goes
through `gemm.py`, which picks the engine (oneDNN for fp32 on CPU).

B: batch  T: time  H: hidden size  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
Packed sequences: at step k only the first ``batch_sizes[k]`` rows advance; the rest carry their
state unchanged. A decreasing list is a forward pass over packed data, an increasing one the
reverse direction over the time-flipped padded sequence.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from . import gemm, torch_gates

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
if HAS_TRITON:  # outside the try: an error in our kernels must not read as "no Triton"
    from . import triton_gates, triton_persistent

# Triton decides at import time whether kernels run compiled or through its CPU interpreter.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# the layer's implementations: the PyTorch steps, the Triton gate kernel once per step, or one
# persistent Triton kernel for all steps (kernels/triton_persistent.py); lstmlab.backends picks one
KERNEL_BACKENDS = ("reference", "triton_step", "triton_persistent")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate math and the cell state run in fp32 (fp64 for fp64 inputs), whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocator for every buffer the layer writes; tests swap it for a NaN-filled one."""
    return torch.empty(*shape, dtype=dtype, device=device)


class _Workspace(threading.local):  # one per thread: concurrent calls never share a buffer
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_workspace = _Workspace()
WORKSPACE_MAX_BYTES = 256 << 20  # larger temporaries are allocated afresh and not kept


def scratch(name: str, *shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer for temporaries that live within one call, kept for the next call on this thread.

    CPU only: fresh CPU memory is page-faulted in on its first write, which cost a quarter of the
    backward's element-wise work at B=16, H=256, T=100 where we measured it (see
    docs/benchmarks/cpu-amd-epyc-2026-11-26/README.md).
    (CUDA's caching allocator already reuses memory.) Tests swap it for a NaN-filled allocator.
    """
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return empty(*shape, dtype=dtype, device=device)
    buffer = _workspace.buffers.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _workspace.buffers[(name, dtype)] = empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def clear_workspace() -> None:
    """Frees the CPU scratch buffers this thread keeps between calls (see :func:`scratch`)."""
    _workspace.buffers.clear()


class ReferenceSteps:
    """Per-step gate math in PyTorch. For the backward it is built from the saved gates
    [T, B, 4H], cell states cs [T + 1, B, H] and the gradient buffer d_pre [T, B, 4H], and
    precomputes every step's local derivatives in a few large ops before the time loop."""

    forward_into = staticmethod(torch_gates.gates_forward_into)
    # the step's pre-activations may be written into its gates slot and activated there: on CPU one
    # sigmoid then covers all four gates, and the layer needs no separate gates buffer
    activates_in_place = True

    def __init__(self, gates: Tensor, cs: Tensor, d_pre: Tensor) -> None:
        T, B, G = gates.shape
        H = G // 4
        dtype, device = gates.dtype, gates.device
        coef = scratch("coef", T, B, G, dtype=dtype, device=device)
        carry = scratch("carry", T, B, H, dtype=dtype, device=device)
        torch_gates.backward_coefficients(gates, cs[1:], cs[:-1], coef, carry)
        coef, d_pre = coef.view(T, B, 4, H), d_pre.view(T, B, 4, H)
        # per-step views made once: slicing inside the time loop costs more than the math at small B
        self.per_step = list(
            zip(
                coef[:, :, :3].unbind(0),  # [B, 3, H] i, f, g per unit of ∂L/∂c_t
                coef[:, :, 3].unbind(0),  # [B, H] o per unit of ∂L/∂h_t
                carry.unbind(0),  # [B, H]
                gates.view(T, B, 4, H)[:, :, 1].unbind(0),  # [B, H] forget gate
                d_pre[:, :, :3].unbind(0),  # [B, 3, H] out: ∂L/∂(i, f, g pre-activations)
                d_pre[:, :, 3].unbind(0),  # [B, H] out: ∂L/∂(o pre-activation)
                strict=True,
            )
        )

    def backward_step(self, k: int, n: int, dh: Tensor, dc: Tensor) -> None:
        """Step k, first n rows: d_pre[k] <- ∂L/∂pre-activations, dc <- ∂L/∂c_{k−1} in place."""
        step = self.per_step[k]
        if n < dc.shape[0] or n < step[1].shape[0]:
            step = tuple(t[:n] for t in step)
        torch_gates.gates_backward_from_coefficients_into(dh, dc, *step, dc)


class TritonSteps:
    """Per-step gate math in fused Triton kernels: one launch per step each way."""

    activates_in_place = False

    def __init__(self, gates: Tensor, cs: Tensor, d_pre: Tensor) -> None:
        self.gates, self.cs, self.d_pre = gates, cs, d_pre

    @staticmethod
    def forward_into(pre: Tensor, c_prev: Tensor, gates: Tensor, c: Tensor, h: Tensor) -> None:
        triton_gates.gates_forward_into(pre, c_prev, gates, c, h)

    def backward_step(self, k: int, n: int, dh: Tensor, dc: Tensor) -> None:
        gates, c, c_prev = self.gates[k, :n], self.cs[k + 1, :n], self.cs[k, :n]
        triton_gates.gates_backward_into(dh, dc, gates, c, c_prev, self.d_pre[k, :n], dc)


def _check_backend(backend: str) -> None:
    """An unknown kernel backend, or a Triton one without Triton, fails here, before any work."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend != "reference" and not HAS_TRITON:
        raise RuntimeError(f"backend={backend!r} needs the triton package, which is not importable")


def _steps(backend: str) -> type[ReferenceSteps] | type[TritonSteps]:
    """The per-step gate math of a per-step backend (the persistent one has its own loops)."""
    _check_backend(backend)
    if backend == "triton_persistent":
        raise ValueError(
            "the per-step gate functions run 'reference' or 'triton_step', not 'triton_persistent'"
        )
    return ReferenceSteps if backend == "reference" else TritonSteps


# ---- the time loops: plain functions on real tensors, called by the registered ops below ----


def _sizes(batch_sizes: Tensor | None, T: int, B: int) -> tuple[int, ...]:
    """Rows that advance at each step, as Python ints (the loops slice with them)."""
    if batch_sizes is None:
        return (B,) * T
    sizes = tuple(batch_sizes.tolist())
    if len(sizes) != T or any(not 0 <= n <= B for n in sizes):
        raise ValueError(f"batch_sizes must hold {T} sizes in [0, {B}], got {list(sizes)}")
    return sizes


def _advanced(batch_sizes: Tensor, B: int, device: torch.device) -> Tensor:
    """[T, B] bool: whether row b advances at step k (b < batch_sizes[k]), one op on ``device``."""
    return torch.arange(B, device=device) < batch_sizes.to(device).unsqueeze(1)


def _layer_forward(
    x: Tensor,
    w_ih: Tensor | None,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward pass. x [T, B, I] with w_ih [4H, I] and bias [4H] or None; or, when w_ih is
    None, x is the input projection gx [T, B, 4H] itself.

    Returns hs [T + 1, B, P] (hs[k] = h before step k, so out = hs[1:], h_n = hs[T]), out_packed
    [T, B, P] (the output with rows that did not advance zeroed; [0] when not packed), c_n [B, H],
    and for the backward cs [T + 1, B, H], gates [T, B, 4H] (activated) and h_raw [T, B, H] (o·tanh(c)
    before the projection; [0] without one). No output aliases an input or another output.
    """
    gx = x
    if w_ih is not None:  # all steps' input projections in one GEMM
        gx = gemm.linear(x.reshape(-1, x.shape[-1]), w_ih, bias).view(*x.shape[:2], -1)  # [T, B, 4H]
    T, B, _ = gx.shape
    sizes = _sizes(batch_sizes, T, B)
    if backend == "triton_persistent":
        if w_hr is not None:
            raise ValueError("backend 'triton_persistent' has no projection (proj_size); use 'triton_step'")
        hs, cs, gates = triton_persistent.persistent_forward(gx.contiguous(), h0, c0, w_hh, batch_sizes)
        h_raw = gx.new_empty(0)
    else:
        own_projection = w_ih is not None  # gx is ours: the reference backend may activate in it
        hs, cs, gates, h_raw = _step_forward(gx, own_projection, h0, c0, w_hh, w_hr, sizes, backend)
    out_packed = gx.new_empty(0)  # a distinct tensor: no two outputs of an op may alias
    if batch_sizes is not None:  # rows that did not advance have no output at that step
        out_packed = torch.where(_advanced(batch_sizes, B, hs.device).unsqueeze(2), hs[1:], 0)
    c_n = cs[T].to(c0.dtype, copy=True)
    return hs, out_packed, c_n, cs, gates, h_raw


def _step_forward(
    gx: Tensor,
    own_projection: bool,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    sizes: tuple[int, ...],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The time loop of the per-step backends: one GEMM and one gate step per step.
    -> hs [T + 1, B, P], cs [T + 1, B, H], gates [T, B, 4H], h_raw [T, B, H] or [0]."""
    steps = _steps(backend)
    forward_into = steps.forward_into
    T, B, G = gx.shape
    H, P = G // 4, w_hh.shape[1]
    dtype, acc, dev = gx.dtype, accumulation_dtype(gx.dtype), gx.device

    hs = empty(T + 1, B, P, dtype=dtype, device=dev)  # hs[k] = h before step k, hs[0] = h0
    cs = empty(T + 1, B, H, dtype=acc, device=dev)  # cs[k] = c before step k
    # activated i, f, g, o [T, B, 4H], saved for backward. Activated in place, each step's
    # pre-activations are written into its slot; our own input projection then is the buffer.
    in_place = steps.activates_in_place and dtype == acc
    gates = gx if in_place and own_projection else empty(T, B, G, dtype=acc, device=dev)
    h_raw = empty(T, B, H, dtype=dtype, device=dev) if w_hr is not None else gx.new_empty(0)  # o·tanh(c)
    pre = None if in_place else empty(B, G, dtype=dtype, device=dev)  # this step's pre-activations
    hs[0] = h0
    cs[0] = c0
    recurrent = gemm.StepWeight(w_hh, B, T)  # h_{k−1}·W_hhᵀ
    projection = None if w_hr is None else gemm.StepWeight(w_hr, B, T)  # o·tanh(c)·W_hrᵀ
    # per-step views made once: slicing inside the time loop costs more than the math at small B
    gx_k, hs_k, cs_k, gates_k = gx.unbind(0), hs.unbind(0), cs.unbind(0), gates.unbind(0)
    h_raw_k = None if w_hr is None else h_raw.unbind(0)

    for k, n in enumerate(sizes):
        if n == B:
            h_prev, c_prev, step_gates, c = hs_k[k], cs_k[k], gates_k[k], cs_k[k + 1]
            step_pre = step_gates if in_place else pre
            h = hs_k[k + 1] if w_hr is None else h_raw_k[k]
            recurrent.addmm(gx_k[k], h_prev, out=step_pre)  # [B, 4H]
        else:
            h_prev, c_prev, step_gates, c = hs[k, :n], cs[k, :n], gates[k, :n], cs[k + 1, :n]
            step_pre = step_gates if in_place else pre[:n]
            h = hs[k + 1, :n] if w_hr is None else h_raw[k, :n]
            recurrent.addmm(gx[k, :n], h_prev, out=step_pre)  # [n, 4H]
        forward_into(step_pre, c_prev, step_gates, c, h)
        if w_hr is not None:
            projection.mm(h, out=hs[k + 1, :n])  # [n, P]
        if n < B:
            hs[k + 1, n:] = hs[k, n:]
            cs[k + 1, n:] = cs[k, n:]
            gates[k, n:] = 0  # never read; written so that every output of the op is defined
            if w_hr is not None:
                h_raw[k, n:] = 0  # rows that did not step contribute nothing to ∂W_hr
    return hs, cs, gates, h_raw


def _layer_backward(
    d_hs: Tensor,
    d_out_packed: Tensor,
    d_cn: Tensor,
    x: Tensor,
    w_ih: Tensor | None,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    h_raw: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    backend: str,
    needs: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """The backward pass. d_hs [T + 1, B, P] is the gradient of ``hs`` (of out = hs[1:] and
    h_n = hs[T]), d_out_packed [T, B, P] that of ``out_packed`` (packed input only), d_cn [B, H].
    ``needs`` says which of (x, w_ih, bias, w_hh, w_hr) want a gradient.

    Returns d_x (∂L/∂gx [T, B, 4H] when w_ih is None), d_w_ih, d_bias, d_h0, d_c0, d_w_hh, d_w_hr;
    None where not needed. After the recurrence, ∂L/∂x is one GEMM and the weight gradients one more.
    """
    T, B, G = gates.shape
    P = hs.shape[-1]
    dtype, dev = hs.dtype, hs.device
    d_hp = None
    if backend == "triton_persistent":
        d_hs = _with_packed_output_grad(d_hs, d_out_packed, batch_sizes)
        d_pre, d_h, d_c = triton_persistent.persistent_backward(
            d_hs.contiguous(), d_cn.to(cs.dtype), gates, cs, w_hh, batch_sizes
        )
    else:
        # ∂L/∂pre-activations [T, B, 4H]: the gradient of gx when the caller gave gx, else used up here
        allocate = empty if w_ih is None else partial(scratch, "d_pre")
        d_pre = allocate(T, B, G, dtype=dtype, device=dev)
        d_hp = None if w_hr is None else empty(T, B, P, dtype=dtype, device=dev)  # ∂L/∂h_t
        d_h, d_c = _step_backward(
            d_hs, d_out_packed, d_cn, gates, cs, w_hh, w_hr, _sizes(batch_sizes, T, B), backend, d_pre, d_hp
        )

    needs_x, needs_w_ih, needs_bias, needs_w_hh, needs_w_hr = needs
    d_pre_rows, h_prev_rows = d_pre.view(-1, G), hs[:-1].reshape(-1, P)  # [T·B, 4H], [T·B, P]
    d_x = d_w_ih = d_bias = d_w_hh = d_w_hr = None
    if w_ih is None:
        d_x = d_pre
    else:
        x_rows = x.reshape(-1, x.shape[-1])  # [T·B, I]
        I = x_rows.shape[1]
        if needs_x:
            d_x = gemm.mm(d_pre_rows, w_ih).view(T, B, I)  # [T, B, I]
        if needs_bias:
            d_bias = d_pre_rows.sum(0)  # [4H]
        if needs_w_ih and needs_w_hh:  # one product over both, reading d_pre once: [4H, I + P]
            x_h = scratch("x_h", T * B, I + P, dtype=dtype, device=dev)
            d_w = gemm.mm_tn(d_pre_rows, torch.cat([x_rows, h_prev_rows], dim=1, out=x_h))
            d_w_ih, d_w_hh = d_w[:, :I].contiguous(), d_w[:, I:].contiguous()  # no output aliases another
        elif needs_w_ih:
            d_w_ih = gemm.mm_tn(d_pre_rows, x_rows)  # [4H, I]
    if needs_w_hh and d_w_hh is None:
        d_w_hh = gemm.mm_tn(d_pre_rows, h_prev_rows)  # [4H, P]
    if w_hr is not None and needs_w_hr:
        d_w_hr = gemm.mm_tn(d_hp.view(-1, P), h_raw.view(-1, h_raw.shape[-1]))  # [P, H]
    return d_x, d_w_ih, d_bias, d_h.to(dtype), d_c, d_w_hh, d_w_hr


def _with_packed_output_grad(d_hs: Tensor, d_out_packed: Tensor, batch_sizes: Tensor | None) -> Tensor:
    """d_hs [T + 1, B, P] with the packed output's gradient added where rows advanced (the
    persistent kernels read one gradient per hs[k]); d_hs itself without packed input."""
    if batch_sizes is None:
        return d_hs
    advanced = _advanced(batch_sizes, d_hs.shape[1], d_hs.device).unsqueeze(2)  # [T, B, 1]
    d_hs = d_hs.clone()
    d_hs[1:] += torch.where(advanced, d_out_packed, 0)
    return d_hs


def _loop_start_gradients(
    d_hs: Tensor, d_out_packed: Tensor, d_cn: Tensor, acc: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """What the per-step reverse loops start from: the output gradient d_out [T, B, P], and ∂L/∂h
    [B, P], ∂L/∂c [B, H] in acc, before the last step."""
    if d_out_packed.numel() == 0:  # out = hs[1:] and h_n = hs[T]: d_hs[T] holds both
        d_out = d_hs[1:].contiguous()
        d_h = torch.zeros(d_hs.shape[1:], dtype=acc, device=d_hs.device)
    else:  # out is out_packed; hs is seen only as h_n = hs[T]
        d_out, d_h = d_out_packed.contiguous(), d_hs[-1].to(acc, copy=True)
    return d_out, d_h, d_cn.to(acc, copy=True)


def _step_backward(
    d_hs: Tensor,
    d_out_packed: Tensor,
    d_cn: Tensor,
    gates: Tensor,
    cs: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    sizes: tuple[int, ...],
    backend: str,
    d_pre: Tensor,
    d_hp: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The reverse time loop of the per-step backends: writes d_pre [T, B, 4H] (and d_hp [T, B, P],
    ∂L/∂h before the projection) and returns ∂L/∂h0 [B, P], ∂L/∂c0 [B, H] in fp32 (fp64)."""
    T, B, _ = gates.shape
    dtype, acc = d_pre.dtype, cs.dtype
    d_out, d_h, d_c = _loop_start_gradients(d_hs, d_out_packed, d_cn, acc)
    steps = _steps(backend)(gates, cs, d_pre)
    d_out_k, d_pre_k = d_out.unbind(0), d_pre.unbind(0)
    gemm_into_state = acc == dtype  # else: low-precision GEMM, fp32 state
    recurrent = gemm.StepWeight(w_hh.t(), B, T)  # d_pre_k·W_hh
    projection = None if w_hr is None else gemm.StepWeight(w_hr.t(), B, T)  # ∂L/∂h_t·W_hr

    d_h[: sizes[-1]] += d_out_k[T - 1][: sizes[-1]]
    for k in reversed(range(T)):
        n = sizes[k]
        d_h_rows, d_c_rows = (d_h, d_c) if n == B else (d_h[:n], d_c[:n])
        if w_hr is None:
            steps.backward_step(k, n, d_h_rows, d_c_rows)
        else:
            d_hp[k, :n] = d_h_rows
            steps.backward_step(k, n, projection.mm(d_hp[k, :n]), d_c_rows)
        d_pre_step = d_pre_k[k] if n == B else d_pre_k[k][:n]
        if n < B:
            d_pre[k, n:] = 0
            if w_hr is not None:
                d_hp[k, n:] = 0
        # ∂L/∂h_{k−1} = d_pre_k·W_hh + output gradient k−1: one GEMM when the same rows
        # advance at both steps
        n_prev = sizes[k - 1] if k > 0 else 0
        out = d_h_rows if gemm_into_state else None
        if n_prev == n:
            rows = recurrent.addmm(d_out_k[k - 1][:n], d_pre_step, out=out)
        else:
            rows = recurrent.mm(d_pre_step, out=out)  # [n, P]
        if not gemm_into_state:
            d_h_rows.copy_(rows)
        if n_prev != n and n_prev > 0:
            d_h[:n_prev] += d_out_k[k - 1][:n_prev]
    return d_h, d_c


# ---- the registered operators: what torch.compile, torch.export and CUDA graphs see ----
# The layer is one opaque op each way, with a fake (shape-only) implementation for tracing and its
# autograd registered, so compilers never trace into the Python time loop above.


@torch.library.custom_op("lstmlab::lstm_layer_fwd", mutates_args=())
def lstm_layer_fwd(
    x: Tensor,
    w_ih: Tensor | None,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`_layer_forward`: -> hs, out_packed, c_n, and cs, gates, h_raw for the backward."""
    return _layer_forward(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, backend)


@lstm_layer_fwd.register_fake
def _(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, backend):
    T, B = x.shape[0], x.shape[1]
    G = x.shape[2] if w_ih is None else w_ih.shape[0]
    H, P = G // 4, w_hh.shape[1]
    dtype, acc = x.dtype, accumulation_dtype(x.dtype)
    hs = x.new_empty(T + 1, B, P)
    out_packed = x.new_empty(0) if batch_sizes is None else x.new_empty(T, B, P)
    c_n = c0.new_empty(B, H)
    cs = x.new_empty(T + 1, B, H, dtype=acc)
    gates = x.new_empty(T, B, G, dtype=acc)
    h_raw = x.new_empty(0, dtype=dtype) if w_hr is None else x.new_empty(T, B, H, dtype=dtype)
    return hs, out_packed, c_n, cs, gates, h_raw


@torch.library.custom_op("lstmlab::lstm_layer_bwd", mutates_args=())
def lstm_layer_bwd(
    d_hs: Tensor,
    d_out_packed: Tensor,
    d_cn: Tensor,
    x: Tensor,
    w_ih: Tensor | None,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    h_raw: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`_layer_backward`; a gradient that is not needed comes back as an empty tensor."""
    grads = _layer_backward(
        d_hs, d_out_packed, d_cn, x, w_ih, hs, cs, gates, h_raw, w_hh, w_hr, batch_sizes, backend, needs
    )
    return tuple(hs.new_empty(0) if g is None else g for g in grads)  # distinct: outputs may not alias


@lstm_layer_bwd.register_fake
def _(d_hs, d_out_packed, d_cn, x, w_ih, hs, cs, gates, h_raw, w_hh, w_hr, batch_sizes, backend, needs):
    needs_x, needs_w_ih, needs_bias, needs_w_hh, needs_w_hr = needs
    G, B = gates.shape[2], gates.shape[1]
    gx_mode = w_ih is None
    return (
        x.new_empty(x.shape) if gx_mode or needs_x else hs.new_empty(0),
        w_ih.new_empty(w_ih.shape) if not gx_mode and needs_w_ih else hs.new_empty(0),
        hs.new_empty(G) if not gx_mode and needs_bias else hs.new_empty(0),
        hs.new_empty(B, hs.shape[2]),
        cs.new_empty(B, cs.shape[2]),
        w_hh.new_empty(w_hh.shape) if needs_w_hh else hs.new_empty(0),
        w_hr.new_empty(w_hr.shape) if w_hr is not None and needs_w_hr else hs.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, backend = inputs
    hs, _, _, cs, gates, h_raw = output
    ctx.mark_non_differentiable(cs, gates, h_raw)
    ctx.save_for_backward(x, w_ih, w_hh, w_hr, batch_sizes, hs, cs, gates, h_raw)
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.state_dtypes = (h0.dtype, c0.dtype)


def _backward(ctx, d_hs, d_out_packed, d_cn, _d_cs, _d_gates, _d_h_raw):
    x, w_ih, w_hh, w_hr, batch_sizes, hs, cs, gates, h_raw = ctx.saved_tensors
    needs_x, needs_w_ih, needs_bias, _, _, needs_w_hh, needs_w_hr = ctx.needs_input_grad[:7]
    needs = [needs_x, needs_w_ih, needs_bias and ctx.has_bias, needs_w_hh, needs_w_hr]
    grads = torch.ops.lstmlab.lstm_layer_bwd(
        d_hs, d_out_packed, d_cn, x, w_ih, hs, cs, gates, h_raw, w_hh, w_hr, batch_sizes, ctx.backend, needs
    )
    d_x, d_w_ih, d_bias, d_h0, d_c0, d_w_hh, d_w_hr = grads  # empty where not needed
    returned = (needs_x or w_ih is None, needs_w_ih, needs[2], needs_w_hh, needs_w_hr)
    d_x, d_w_ih, d_bias, d_w_hh, d_w_hr = (
        g if want else None for g, want in zip((d_x, d_w_ih, d_bias, d_w_hh, d_w_hr), returned, strict=True)
    )
    h_dtype, c_dtype = ctx.state_dtypes
    return d_x, d_w_ih, d_bias, d_h0.to(h_dtype), d_c0.to(c_dtype), d_w_hh, d_w_hr, None, None


lstm_layer_fwd.register_autograd(_backward, setup_context=_setup_context)


def _run_layer(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, backend) -> tuple[Tensor, Tensor, Tensor]:
    hs, out_packed, c_n, *_ = torch.ops.lstmlab.lstm_layer_fwd(
        x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, backend
    )
    out = hs[1:] if batch_sizes is None else out_packed  # [T, B, P]
    return out, hs[-1], c_n


def _check_layer_args(
    T: int,
    B: int,
    G: int,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Sequence[int] | Tensor | None,
    backend: str,
) -> Tensor | None:
    """Checks every shape before any work; returns ``batch_sizes`` as an int64 CPU tensor (or None),
    the form the op takes: its values are read only by the op itself, so tracing never reads data."""
    H = G // 4
    P = H if w_hr is None else w_hr.shape[0]
    expected = {"h0": (B, P), "c0": (B, H), "w_hh": (G, P)}
    if w_hr is not None:
        expected["w_hr"] = (P, H)
    got = {"h0": h0, "c0": c0, "w_hh": w_hh, "w_hr": w_hr}
    for name, shape in expected.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(got[name].shape)}")
    _check_backend(backend)
    if backend == "triton_persistent" and w_hr is not None:
        raise ValueError("backend 'triton_persistent' has no projection (w_hr); use 'triton_step'")
    return _batch_sizes_arg(batch_sizes, T, B)


def _batch_sizes_arg(batch_sizes: Sequence[int] | Tensor | None, T: int, B: int) -> Tensor | None:
    """``batch_sizes`` checked and as an int64 CPU tensor (or None), the form the ops take."""
    if batch_sizes is None:
        return None
    if isinstance(batch_sizes, Tensor):
        if batch_sizes.dim() != 1 or batch_sizes.shape[0] != T or batch_sizes.is_floating_point():
            raise ValueError(
                f"batch_sizes must be a 1-D integer tensor of {T} sizes, got {batch_sizes.dtype} "
                f"of shape {tuple(batch_sizes.shape)}"
            )
        return batch_sizes.to("cpu", torch.int64)  # values are checked by the op
    sizes = [int(n) for n in batch_sizes]
    if len(sizes) != T or any(not 0 <= n <= B for n in sizes):
        raise ValueError(f"batch_sizes must hold {T} sizes in [0, {B}], got {sizes}")
    return torch.tensor(sizes, dtype=torch.int64)


def lstm_layer(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    batch_sizes: Sequence[int] | Tensor | None = None,
    backend: str = "reference",
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Runs one LSTM layer in one direction over a sequence whose input projection is done.

    Args:
        gx: [T, B, 4H] input projection x_t·W_ihᵀ + b_ih + b_hh for every step, gates i, f, g, o.
        h0: [B, P] initial hidden state (P = proj_size, or H without projection).
        c0: [B, H] initial cell state.
        w_hh: [4H, P] recurrent weights.
        w_hr: [P, H] projection weights, or None.
        batch_sizes: rows that advance at each step (packed sequences): a list of T ints or an
            integer tensor [T] (as ``PackedSequence.batch_sizes``), or None for all B.
        backend: the implementation, one of ``KERNEL_BACKENDS``: ``"reference"`` (PyTorch),
            ``"triton_step"`` (a fused Triton gate kernel per step) or ``"triton_persistent"`` (one
            Triton kernel for all steps; no ``w_hr``). :func:`lstmlab.resolve_backend` picks one
            for ``"auto"``/``"triton"`` as the modules do.

    Returns:
        out [T, B, P] (h after every step; zero in rows that did not advance at that step),
        h_n [B, P], c_n [B, H].

    Example:
        >>> T, B, H = 5, 3, 8
        >>> gx, h0, c0 = torch.randn(T, B, 4 * H), torch.zeros(B, H), torch.zeros(B, H)
        >>> out, h_n, c_n = lstm_layer(gx, h0, c0, torch.randn(4 * H, H))
        >>> out.shape
        torch.Size([5, 3, 8])
    """
    if gx.dim() != 3 or gx.shape[-1] % 4:
        raise ValueError(f"gx must be [T, B, 4H], got shape {tuple(gx.shape)}")
    T, B, G = gx.shape
    batch_sizes = _check_layer_args(T, B, G, h0, c0, w_hh, w_hr, batch_sizes, backend)
    return _run_layer(gx, None, None, h0, c0, w_hh, w_hr, batch_sizes, backend)


def lstm_layer_from_input(
    x: Tensor,
    w_ih: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    batch_sizes: Sequence[int] | Tensor | None = None,
    backend: str = "reference",
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Runs one LSTM layer in one direction over the inputs x, input projection included.

    The same function as ``lstm_layer(F.linear(x, w_ih, bias), ...)``; doing the projection inside
    the layer lets its backward compute ∂L/∂W_ih and ∂L/∂W_hh in one product, reading ∂L/∂gates once.

    Args:
        x: [T, B, I] inputs.
        w_ih: [4H, I] input weights.
        bias: [4H] (b_ih + b_hh), or None.
        h0, c0, w_hh, w_hr, batch_sizes, backend: as in :func:`lstm_layer`.

    Returns:
        out [T, B, P], h_n [B, P], c_n [B, H], as :func:`lstm_layer`.

    Example:
        >>> T, B, I, H = 5, 3, 4, 8
        >>> x, h0, c0 = torch.randn(T, B, I), torch.zeros(B, H), torch.zeros(B, H)
        >>> w_ih, w_hh = torch.randn(4 * H, I), torch.randn(4 * H, H)
        >>> out, h_n, c_n = lstm_layer_from_input(x, w_ih, None, h0, c0, w_hh)
        >>> out.shape
        torch.Size([5, 3, 8])
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {tuple(x.shape)}")
    T, B, I = x.shape
    if w_ih.dim() != 2 or w_ih.shape[0] % 4 or w_ih.shape[1] != I:
        raise ValueError(f"w_ih must be [4H, {I}], got shape {tuple(w_ih.shape)}")
    G = w_ih.shape[0]
    if bias is not None and tuple(bias.shape) != (G,):
        raise ValueError(f"bias must have shape ({G},), got {tuple(bias.shape)}")
    batch_sizes = _check_layer_args(T, B, G, h0, c0, w_hh, w_hr, batch_sizes, backend)
    return _run_layer(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, backend)


def gates_forward(pre: Tensor, c_prev: Tensor, backend: str = "reference") -> tuple[Tensor, Tensor, Tensor]:
    """The fused step alone: pre [B, 4H], c_prev [B, H] -> gates [B, 4H], c [B, H], h [B, H].

    gates and c come back in fp32 (fp64 for fp64 inputs), h in the dtype of ``pre``.
    """
    forward_into = _steps(backend).forward_into
    B, G = pre.shape
    acc = accumulation_dtype(pre.dtype)
    gates = empty(B, G, dtype=acc, device=pre.device)
    c = empty(B, G // 4, dtype=acc, device=pre.device)
    h = empty(B, G // 4, dtype=pre.dtype, device=pre.device)
    forward_into(pre.contiguous(), c_prev.contiguous(), gates, c, h)
    return gates, c, h


def gates_backward(
    dh: Tensor, dc: Tensor, gates: Tensor, c: Tensor, c_prev: Tensor, backend: str = "reference"
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`gates_forward`: -> dpre [B, 4H] (dtype of ``dh``), dc_prev [B, H]."""
    B, G = gates.shape
    d_pre = empty(B, G, dtype=dh.dtype, device=dh.device)
    steps = _steps(backend)(gates.contiguous()[None], torch.stack([c_prev, c]), d_pre[None])
    d_c = dc.to(c.dtype, copy=True)  # the step writes dc_prev over it
    steps.backward_step(0, B, dh.to(c.dtype), d_c)
    return d_pre, d_c
