"""The time loop of one LSTM layer and direction, shared by every backend that runs it step by step.

A backend of the layer op (`backends.py` lists them) runs the whole sequence behind one contract,
`forward(gx, ...) -> LoopSaved` and `backward(...) -> LoopGrads`. The per-step backends
(`reference`: PyTorch, `triton_step`: one fused Triton launch per step) share the loops in this
file and differ only in their gate math (`torch_gates.py`, `triton_gates.py`), which a
:class:`PerStepBackend` holds. Per step: one GEMM h_{t−1}·W_hhᵀ (after the recurrent dropout mask)
added to the precomputed input projection, then one gate step; with a projection one more GEMM.

The cell is any variant of `variants.py`: :class:`Cell` carries its flags and tensors. The vanilla
cell (flags = 0) runs the gate functions it ran before variants existed, bit for bit.

B: batch  T: time  H: hidden size  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
Packed sequences: at step k only the first ``batch_sizes[k]`` rows advance; the rest carry their
state unchanged. A decreasing list is a forward pass over packed data, an increasing one the
reverse direction over the time-flipped padded sequence.
"""

from __future__ import annotations

import math
import threading
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from . import gemm, torch_gates, variants


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


class Cell(NamedTuple):
    """The cell a layer runs: its kernel flags (`variants.py`; the mask bits set when masks are
    given) and the tensors they ask for, each None unless its flag is set. Parameters in acc."""

    flags: int = 0
    peephole: Tensor | None = None  # [3, H] p_i, p_f, p_o
    ln_hh: Tensor | None = None  # [4H] γ_hh
    ln_c: Tensor | None = None  # [2, H] γ_c, β_c
    zoneout: Tensor | None = None  # [T, B, 2, H] uint8, 1 = keep the previous value
    dropout: Tensor | None = None  # [B, P] recurrent dropout mask, 0 or 1/(1 − p)

    @property
    def layer_norm(self) -> bool:
        return bool(self.flags & variants.LAYER_NORM)

    @property
    def zoneout_c(self) -> bool:
        return bool(self.flags & variants.ZONEOUT_C)

    @property
    def zoneout_h(self) -> bool:
        return bool(self.flags & variants.ZONEOUT_H)


class LoopSaved(NamedTuple):
    """What a backend's forward returns: hs [T + 1, B, P] (hs[k] = h before step k), cs [T + 1, B, H]
    acc (c after zoneout), gates [T, B, 4H] acc (activated), h_raw [T, B, H] (o·tanh(c) before the
    projection) or None, c_new [T, B, H] acc (c̃ under zoneout on c) or None, ln_saved
    [T, B, 4H + 3] acc (layer norm: r̂, its rstd, ĉ's mean and rstd) or None."""

    hs: Tensor
    cs: Tensor
    gates: Tensor
    h_raw: Tensor | None
    c_new: Tensor | None
    ln_saved: Tensor | None


class LoopGrads(NamedTuple):
    """What a backend's backward returns: d_pre [T, B, 4H] = ∂L/∂gx, d_rec [T, B, 4H] = ∂L/∂r (the
    recurrent product; d_pre itself without layer norm), d_h0 [B, P] and d_c0 [B, H] in acc, d_hp
    [T, B, P] = ∂L/∂h_t after the projection (None without one), d_ln_c_rows [T, B, 2, H] acc
    (layer norm; else None). Rows that did not advance are zero."""

    d_pre: Tensor
    d_rec: Tensor
    d_h0: Tensor
    d_c0: Tensor
    d_hp: Tensor | None
    d_ln_c_rows: Tensor | None


def step_sizes(batch_sizes: Tensor | None, T: int, B: int) -> tuple[int, ...]:
    """Rows that advance at each step, as Python ints (the loops slice with them)."""
    if batch_sizes is None:
        return (B,) * T
    sizes = tuple(batch_sizes.tolist())
    if len(sizes) != T or any(not 0 <= n <= B for n in sizes):
        raise ValueError(f"batch_sizes must hold {T} sizes in [0, {B}], got {list(sizes)}")
    return sizes


def advanced(batch_sizes: Tensor, B: int, device: torch.device) -> Tensor:
    """[T, B] bool: whether row b advances at step k (b < batch_sizes[k]), one op on ``device``
    (batch_sizes [2, T], both directions of a layer: [2, T, B])."""
    return torch.arange(B, device=device) < batch_sizes.to(device).unsqueeze(-1)


def with_packed_output_grad(d_hs: Tensor, d_out_packed: Tensor, batch_sizes: Tensor | None) -> Tensor:
    """d_hs [T + 1, B, P] with the packed output's gradient added where rows advanced (for
    backends that read one gradient per hs[k]); d_hs itself without packed input. Both directions
    of a layer: every tensor with a leading [2] (batch_sizes [2, T])."""
    if batch_sizes is None:
        return d_hs
    d_hs = d_hs.clone()
    moved = advanced(batch_sizes, d_hs.shape[-2], d_hs.device).unsqueeze(-1)  # [T, B, 1]
    d_hs[..., 1:, :, :] += torch.where(moved, d_out_packed, 0)
    return d_hs


def loop_start_gradients(
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


class _ForwardSteps:
    """One call's forward gate step of a cell variant (the loop calls the vanilla step directly)."""

    def __init__(self, gate_math: ModuleType, cell: Cell, c_new: Tensor | None, ln_saved: Tensor | None):
        self.gate_math, self.cell, self.c_new, self.ln_saved = gate_math, cell, c_new, ln_saved

    def __call__(self, k, n, pre, rec, c_prev, h_prev, gates, c, h) -> None:
        cell = self.cell
        self.gate_math.variant_gates_forward_into(
            cell.flags, pre, rec, c_prev, h_prev if cell.zoneout_h else None,
            cell.peephole, cell.ln_hh, cell.ln_c,
            None if cell.zoneout is None else cell.zoneout[k, :n],
            gates, c, h,
            None if self.c_new is None else self.c_new[k, :n],
            None if self.ln_saved is None else self.ln_saved[k, :n],
            check=k == 0,  # one step checks the arguments: the others have the same kinds
        )  # fmt: skip


class _BackwardSteps:
    """One call's backward gate step: d_pre[k] (and d_rec[k]) <- ∂L/∂pre-activations, dc <- ∂L/∂c_{k−1}
    in place. With ``coefficients`` (the reference backend) a cell without layer norm or zoneout
    precomputes every step's local derivatives in a few large ops before the loop: the step is then
    linear in (∂h, ∂c), four ops."""

    def __init__(
        self, gate_math, coefficients, cell, gates, cs, c_tilde, ln_saved, d_pre, d_rec, d_ln_c_rows
    ):
        T, B, G = gates.shape
        H = G // 4
        self.gate_math, self.cell = gate_math, cell
        self.gates, self.cs, self.c_tilde, self.ln_saved = gates, cs, c_tilde, ln_saved
        self.d_pre, self.d_rec, self.d_ln_c_rows = d_pre, d_rec, d_ln_c_rows
        self.d_h_carry = None  # z^h ⊙ ∂L/∂h_t, what zoneout on h passes straight to h_{t−1}
        if cell.zoneout_h:
            self.d_h_carry = scratch("d_h_carry", B, H, dtype=cs.dtype, device=cs.device)
        self.per_step = None
        if coefficients and not cell.flags & (variants.LAYER_NORM | variants.ZONEOUT_C | variants.ZONEOUT_H):
            if cell.flags == 0:
                coef = scratch("coef", T, B, G, dtype=gates.dtype, device=gates.device)
                carry = scratch("carry", T, B, H, dtype=gates.dtype, device=gates.device)
                torch_gates.backward_coefficients(gates, cs[1:], cs[:-1], coef, carry)
                keep = gates.view(T, B, 4, H)[:, :, 1]  # ∂c_t/∂c_{t−1}: the forget gate
            else:
                coef, carry, keep = torch_gates.variant_backward_coefficients(
                    cell.flags, gates, c_tilde, cs[:-1], cell.peephole
                )
            coef, d_pre_4 = coef.view(T, B, 4, H), d_pre.view(T, B, 4, H)
            # per-step views made once: slicing inside the time loop costs more than the math at small B
            self.per_step = list(
                zip(
                    coef[:, :, :3].unbind(0),  # [B, 3, H] i, f, g per unit of ∂L/∂c_t
                    coef[:, :, 3].unbind(0),  # [B, H] o per unit of ∂L/∂h_t
                    carry.unbind(0),  # [B, H]
                    keep.unbind(0),  # [B, H]
                    d_pre_4[:, :, :3].unbind(0),  # [B, 3, H] out: ∂L/∂(i, f, g pre-activations)
                    d_pre_4[:, :, 3].unbind(0),  # [B, H] out: ∂L/∂(o pre-activation)
                    strict=True,
                )
            )

    def __call__(self, k: int, n: int, dh: Tensor, dc: Tensor) -> None:
        if self.per_step is not None:
            step = self.per_step[k]
            if n < dc.shape[0] or n < step[1].shape[0]:
                step = tuple(t[:n] for t in step)
            torch_gates.gates_backward_from_coefficients_into(dh, dc, *step, dc)
        elif self.cell.flags == 0:
            gates, c, c_prev = self.gates[k, :n], self.cs[k + 1, :n], self.cs[k, :n]
            self.gate_math.gates_backward_into(dh, dc, gates, c, c_prev, self.d_pre[k, :n], dc)
        else:
            cell = self.cell
            self.gate_math.variant_gates_backward_into(
                cell.flags, dh.to(dc.dtype), dc, self.gates[k, :n], self.cs[k, :n], self.c_tilde[k, :n],
                None if self.ln_saved is None else self.ln_saved[k, :n],
                cell.peephole, cell.ln_hh, cell.ln_c,
                None if cell.zoneout is None else cell.zoneout[k, :n],
                self.d_pre[k, :n],
                self.d_rec[k, :n] if cell.layer_norm else None,
                dc,
                None if self.d_h_carry is None else self.d_h_carry[:n],
                None if self.d_ln_c_rows is None else self.d_ln_c_rows[k, :n],
                check=k == self.gates.shape[0] - 1,  # one step checks the arguments
            )  # fmt: skip


class PerStepBackend:
    """A backend that runs the layer step by step: the shared loops with ``gate_math``'s step
    functions (``gates_forward_into``, ``gates_backward_into`` or, with ``coefficients``, the
    precomputed-coefficient backward; ``variant_gates_forward_into`` / ``_backward_into``).
    ``activates_in_place``: the vanilla step may activate its pre-activations in their gates slot
    (one sigmoid for all four gates on the CPU)."""

    def __init__(self, gate_math: ModuleType, *, coefficients: bool, activates_in_place: bool) -> None:
        self.gate_math = gate_math
        self.coefficients = coefficients
        self.activates_in_place = activates_in_place

    def forward(
        self,
        gx: Tensor,
        own_gx: bool,
        h0: Tensor,
        c0: Tensor,
        w_hh: Tensor,
        w_hr: Tensor | None,
        batch_sizes: Tensor | None,
        cell: Cell,
        save: bool = True,
    ) -> LoopSaved:
        """The forward time loop (``own_gx``: gx is the layer's own buffer, which it may overwrite)."""
        T, B, G = gx.shape
        H, P = G // 4, w_hh.shape[1]
        sizes = step_sizes(batch_sizes, T, B)
        dtype, acc, dev = gx.dtype, accumulation_dtype(gx.dtype), gx.device
        dropout = cell.dropout

        hs = empty(T + 1, B, P, dtype=dtype, device=dev)  # hs[k] = h before step k, hs[0] = h0
        cs = empty(T + 1, B, H, dtype=acc, device=dev)  # cs[k] = c before step k
        # Activated in place, each step's pre-activations are written into its gates slot; our own
        # input projection then is the gates buffer.
        in_place = self.activates_in_place and cell.flags == 0 and dtype == acc
        gates = gx if in_place and own_gx else empty(T, B, G, dtype=acc, device=dev)  # [T, B, 4H]
        h_raw = None if w_hr is None else empty(T, B, H, dtype=dtype, device=dev)  # o·tanh(c)
        c_new = empty(T, B, H, dtype=acc, device=dev) if cell.zoneout_c else None  # c̃
        ln_saved = empty(T, B, G + 3, dtype=acc, device=dev) if cell.layer_norm else None
        pre = None if in_place else empty(B, G, dtype=dtype, device=dev)  # a_t, or (layer norm) r_t
        dropped = None if dropout is None else empty(B, P, dtype=dtype, device=dev)  # h_{t−1} ⊙ m
        hs[0] = h0
        cs[0] = c0
        step = _ForwardSteps(self.gate_math, cell, c_new, ln_saved)
        vanilla_step = self.gate_math.gates_forward_into if cell.flags == 0 else None
        layer_norm = cell.layer_norm
        recurrent = gemm.StepWeight(w_hh, B, T)  # h_{k−1}·W_hhᵀ
        projection = None if w_hr is None else gemm.StepWeight(w_hr, B, T)  # o·tanh(c)·W_hrᵀ
        # per-step views made once: slicing inside the time loop costs more than the math at small B
        gx_k, hs_k, cs_k, gates_k = gx.unbind(0), hs.unbind(0), cs.unbind(0), gates.unbind(0)

        for k, n in enumerate(sizes):
            if n == B:
                gx_step, h_prev, c_prev, step_gates, c = gx_k[k], hs_k[k], cs_k[k], gates_k[k], cs_k[k + 1]
                step_pre = step_gates if in_place else pre
                h = hs_k[k + 1] if w_hr is None else h_raw[k]
            else:
                gx_step, h_prev, c_prev = gx[k, :n], hs[k, :n], cs[k, :n]
                step_gates, c = gates[k, :n], cs[k + 1, :n]
                step_pre = step_gates if in_place else pre[:n]
                h = hs[k + 1, :n] if w_hr is None else h_raw[k, :n]
            d = h_prev if dropout is None else torch.mul(h_prev, dropout[:n], out=dropped[:n])
            rec = None  # r_t apart from gx_t: only layer norm needs it
            if layer_norm:  # the step normalises r_t itself and adds gx_t
                rec = recurrent.mm(d, out=step_pre)
                step_pre = gx_step
            else:
                recurrent.addmm(gx_step, d, out=step_pre)  # [n, 4H]
            if vanilla_step is not None:
                vanilla_step(step_pre, c_prev, step_gates, c, h)
            else:
                step(k, n, step_pre, rec, c_prev, h_prev, step_gates, c, h)
            if w_hr is not None:
                projection.mm(h, out=hs[k + 1, :n])  # [n, P]
            if n < B:  # rows that do not advance carry their state; the rest is never read
                hs[k + 1, n:] = hs[k, n:]
                cs[k + 1, n:] = cs[k, n:]
                for saved in (gates, h_raw, c_new, ln_saved):
                    if saved is not None:
                        saved[k, n:] = 0  # written so that every output of the op is defined
        return LoopSaved(hs, cs, gates, h_raw, c_new, ln_saved)

    def backward(
        self,
        d_hs: Tensor,
        d_out_packed: Tensor,
        d_cn: Tensor,
        saved: LoopSaved,
        w_hh: Tensor,
        w_hr: Tensor | None,
        batch_sizes: Tensor | None,
        cell: Cell,
        d_pre: Tensor,
    ) -> LoopGrads:
        """The reverse time loop: writes d_pre [T, B, 4H] (allocated by the caller: it may be kept
        as the gradient of gx, or be scratch) and returns the rest of :class:`LoopGrads`."""
        hs, cs, gates = saved.hs, saved.cs, saved.gates
        T, B, G = gates.shape
        H, P = G // 4, hs.shape[-1]
        sizes = step_sizes(batch_sizes, T, B)
        dtype, acc, dev = d_pre.dtype, cs.dtype, d_pre.device
        dropout = cell.dropout
        d_rec = empty(T, B, G, dtype=dtype, device=dev) if cell.layer_norm else d_pre  # ∂L/∂r before LN
        d_ln_c_rows = empty(T, B, 2, H, dtype=acc, device=dev) if cell.layer_norm else None
        d_hp = None if w_hr is None else empty(T, B, P, dtype=dtype, device=dev)  # ∂L/∂h_t
        c_tilde = saved.c_new if cell.zoneout_c else cs[1:]  # c̃ of every step [T, B, H]
        step = _BackwardSteps(
            self.gate_math,
            self.coefficients,
            cell,
            gates,
            cs,
            c_tilde,
            saved.ln_saved,
            d_pre,
            d_rec,
            d_ln_c_rows,
        )
        d_out, d_h, d_c = loop_start_gradients(d_hs, d_out_packed, d_cn, acc)
        d_out_k, d_rec_k = d_out.unbind(0), d_rec.unbind(0)
        # without masks on h, ∂L/∂h_{k−1} = ∂L/∂r_k·W_hh + the output gradient of step k − 1 is one
        # GEMM, straight into the fp32 state when the GEMM runs in fp32
        plain = dropout is None and not cell.zoneout_h
        gemm_into_state = acc == dtype
        recurrent = gemm.StepWeight(w_hh.t(), B, T)  # ∂L/∂r_k·W_hh
        projection = None if w_hr is None else gemm.StepWeight(w_hr.t(), B, T)  # ∂L/∂h_t·W_hr

        d_h[: sizes[-1]] += d_out_k[T - 1][: sizes[-1]]
        for k in reversed(range(T)):
            n = sizes[k]
            d_h_rows, d_c_rows = (d_h, d_c) if n == B else (d_h[:n], d_c[:n])
            if w_hr is None:
                step(k, n, d_h_rows, d_c_rows)
            else:
                d_hp[k, :n] = d_h_rows
                step(k, n, projection.mm(d_hp[k, :n]), d_c_rows)
            d_rec_step = d_rec_k[k] if n == B else d_rec_k[k][:n]
            if n < B:  # rows that did not advance contribute nothing to the sums after the loop
                for grad in (d_pre, d_rec, d_hp, d_ln_c_rows):
                    if grad is not None:
                        grad[k, n:] = 0
            n_prev = sizes[k - 1] if k > 0 else 0
            if plain:
                out = d_h_rows if gemm_into_state else None
                if n_prev == n:
                    rows = recurrent.addmm(d_out_k[k - 1][:n], d_rec_step, out=out)
                else:
                    rows = recurrent.mm(d_rec_step, out=out)  # [n, P]
                if not gemm_into_state:
                    d_h_rows.copy_(rows)
                if n_prev != n and n_prev > 0:
                    d_h[:n_prev] += d_out_k[k - 1][:n_prev]
                continue
            # ∂L/∂h_{k−1} = (∂L/∂r_k·W_hh) ⊙ m + z^h ⊙ ∂L/∂h_k + the output gradient of step k − 1
            rows = recurrent.mm(d_rec_step).to(acc)  # [n, P]
            if dropout is not None:
                rows = rows * dropout[:n]
            if cell.zoneout_h:
                rows = rows + step.d_h_carry[:n]
            d_h[:n] = rows
            if n_prev > 0:
                d_h[:n_prev] += d_out_k[k - 1][:n_prev]
        return LoopGrads(d_pre, d_rec, d_h, d_c, d_hp, d_ln_c_rows)


REFERENCE = PerStepBackend(torch_gates, coefficients=True, activates_in_place=True)
