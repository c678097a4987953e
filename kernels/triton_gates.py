"""Fused LSTM gate kernels in Triton: one launch per timestep forward, one backward.

Forward:  pre-activations [B, 4H] + c_{t−1} -> activated gates (saved for backward), c_t, h_t.
Backward: ∂L/∂h_t, ∂L/∂c_t + saved gates, c_t, c_{t−1} -> ∂L/∂pre-activations, ∂L/∂c_{t−1}.
The recurrent GEMMs around them stay in cuBLAS (`layer.py`). Math in the dtype of the cell-state
buffer (fp32, or fp64 for fp64 inputs), cast on store.

B: batch  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _sigmoid(x):
    # exp of a non-positive number never overflows: exact 0/1 limits at |x| ≥ 50, no inf/inf.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1 / (1 + z), z / (1 + z))


@triton.jit
def _tanh(x):
    z = tl.exp(-2 * tl.abs(x))
    t = (1 - z) / (1 + z)
    return tl.where(x >= 0, t, -t)


@triton.jit
def lstm_gates_fwd_kernel(
    p_pre,
    p_c_prev,
    p_gates,
    p_c,
    p_h,
    H,
    stride_pre,
    stride_c_prev,
    stride_gates,
    stride_c,
    stride_h,
    BLOCK_H: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H
    acc_dtype = p_c.dtype.element_ty

    p_pre_row = p_pre + i_b * stride_pre + o_h
    p_gates_row = p_gates + i_b * stride_gates + o_h
    b_i = _sigmoid(tl.load(p_pre_row, mask=m_h, other=0).to(acc_dtype))
    b_f = _sigmoid(tl.load(p_pre_row + H, mask=m_h, other=0).to(acc_dtype))
    b_g = _tanh(tl.load(p_pre_row + 2 * H, mask=m_h, other=0).to(acc_dtype))
    b_o = _sigmoid(tl.load(p_pre_row + 3 * H, mask=m_h, other=0).to(acc_dtype))
    b_c_prev = tl.load(p_c_prev + i_b * stride_c_prev + o_h, mask=m_h, other=0).to(acc_dtype)

    b_c = b_f * b_c_prev + b_i * b_g
    b_h = b_o * _tanh(b_c)

    gates_ty = p_gates.dtype.element_ty
    tl.store(p_gates_row, b_i.to(gates_ty), mask=m_h)
    tl.store(p_gates_row + H, b_f.to(gates_ty), mask=m_h)
    tl.store(p_gates_row + 2 * H, b_g.to(gates_ty), mask=m_h)
    tl.store(p_gates_row + 3 * H, b_o.to(gates_ty), mask=m_h)
    tl.store(p_c + i_b * stride_c + o_h, b_c.to(p_c.dtype.element_ty), mask=m_h)
    tl.store(p_h + i_b * stride_h + o_h, b_h.to(p_h.dtype.element_ty), mask=m_h)


@triton.jit
def lstm_gates_bwd_kernel(
    p_dh,
    p_dc,
    p_gates,
    p_c,
    p_c_prev,
    p_dpre,
    p_dc_prev,
    H,
    stride_dh,
    stride_dc,
    stride_gates,
    stride_c,
    stride_c_prev,
    stride_dpre,
    stride_dc_prev,
    BLOCK_H: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H
    acc_dtype = p_c.dtype.element_ty

    p_gates_row = p_gates + i_b * stride_gates + o_h
    b_i = tl.load(p_gates_row, mask=m_h, other=0).to(acc_dtype)
    b_f = tl.load(p_gates_row + H, mask=m_h, other=0).to(acc_dtype)
    b_g = tl.load(p_gates_row + 2 * H, mask=m_h, other=0).to(acc_dtype)
    b_o = tl.load(p_gates_row + 3 * H, mask=m_h, other=0).to(acc_dtype)
    b_c = tl.load(p_c + i_b * stride_c + o_h, mask=m_h, other=0).to(acc_dtype)
    b_c_prev = tl.load(p_c_prev + i_b * stride_c_prev + o_h, mask=m_h, other=0).to(acc_dtype)
    b_dc = tl.load(p_dc + i_b * stride_dc + o_h, mask=m_h, other=0).to(acc_dtype)
    b_dh = tl.load(p_dh + i_b * stride_dh + o_h, mask=m_h, other=0).to(acc_dtype)

    b_tanh_c = _tanh(b_c)
    b_dc = b_dc + b_dh * b_o * (1 - b_tanh_c * b_tanh_c)
    b_di = b_dc * b_g * b_i * (1 - b_i)
    b_df = b_dc * b_c_prev * b_f * (1 - b_f)
    b_dg = b_dc * b_i * (1 - b_g * b_g)
    b_do = b_dh * b_tanh_c * b_o * (1 - b_o)

    dpre_ty = p_dpre.dtype.element_ty
    p_dpre_row = p_dpre + i_b * stride_dpre + o_h
    tl.store(p_dpre_row, b_di.to(dpre_ty), mask=m_h)
    tl.store(p_dpre_row + H, b_df.to(dpre_ty), mask=m_h)
    tl.store(p_dpre_row + 2 * H, b_dg.to(dpre_ty), mask=m_h)
    tl.store(p_dpre_row + 3 * H, b_do.to(dpre_ty), mask=m_h)
    tl.store(
        p_dc_prev + i_b * stride_dc_prev + o_h,
        (b_dc * b_f).to(p_dc_prev.dtype.element_ty),
        mask=m_h,
    )


def _block_h(H: int) -> int:
    return min(triton.next_power_of_2(H), 256)


def _rows(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(
                "Triton gate kernels take 2-D tensors with unit stride along the feature "
                f"dimension, got shape {tuple(t.shape)} with strides {t.stride()}"
            )


def gates_forward_into(pre: Tensor, c_prev: Tensor, gates: Tensor, c: Tensor, h: Tensor) -> None:
    """pre [B, 4H], c_prev [B, H] -> gates [B, 4H], c [B, H], h [B, H], written in place."""
    _rows(pre, c_prev, gates, c, h)
    B, H = c.shape
    if B == 0:
        return
    BLOCK_H = _block_h(H)
    grid = (B, triton.cdiv(H, BLOCK_H))
    lstm_gates_fwd_kernel[grid](
        pre, c_prev, gates, c, h, H,
        pre.stride(0), c_prev.stride(0), gates.stride(0), c.stride(0), h.stride(0),
        BLOCK_H=BLOCK_H,
    )  # fmt: skip


def gates_backward_into(
    dh: Tensor, dc: Tensor, gates: Tensor, c: Tensor, c_prev: Tensor, dpre: Tensor, dc_prev: Tensor
) -> None:
    """dh [B, H] = ∂L/∂h_t, dc [B, H] = ∂L/∂c_t from step t+1, saved gates [B, 4H], c_t and c_{t−1}
    -> dpre [B, 4H], dc_prev [B, H] (may alias dc: each element is read before it is written)."""
    _rows(dh, dc, gates, c, c_prev, dpre, dc_prev)
    B, H = c.shape
    if B == 0:
        return
    BLOCK_H = _block_h(H)
    grid = (B, triton.cdiv(H, BLOCK_H))
    lstm_gates_bwd_kernel[grid](
        dh, dc, gates, c, c_prev, dpre, dc_prev, H,
        dh.stride(0), dc.stride(0), gates.stride(0), c.stride(0),
        c_prev.stride(0), dpre.stride(0), dc_prev.stride(0),
        BLOCK_H=BLOCK_H,
    )  # fmt: skip
