"""Fused LSTM gate kernels in Triton: one launch per timestep forward, one backward.

Forward:  pre-activations [B, 4H] + c_{t−1} -> activated gates (saved for backward), c_t, h_t.
Backward: ∂L/∂h_t, ∂L/∂c_t + saved gates, c_t, c_{t−1} -> ∂L/∂pre-activations, ∂L/∂c_{t−1}.
The recurrent GEMMs around them stay in cuBLAS (`layer.py`). Math in the dtype of the cell-state
buffer (fp32, or fp64 for fp64 inputs), cast on store.

Cell variants (`variants.py`: peepholes, CIFG, Greff's ablations, layer norm, zoneout) run in
their own kernels through ``variant_gates_forward_into`` and ``variant_gates_backward_into``; the
variant's flag word is one ``tl.constexpr`` FLAGS, tested as ``F_… & FLAGS`` (the encoding the
persistent kernels share, defined here), so each combination compiles only the code it uses; with
no bit that concerns the step they call the vanilla kernels, so the vanilla cell runs exactly the
code it ran before variants existed. Layer
norm needs statistics over whole rows: its programs each own one row and loop over H in blocks.

B: batch  n: rows that advance this step  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import variants
from .variants import LN_EPS, flag_names

# The cell variants' bits (variants.py) as compile-time constants: a kernel takes the flag word as
# one tl.constexpr FLAGS and tests `F_… & FLAGS`, so FLAGS = 0 compiles to the vanilla cell's code.
# The one encoding of both Triton files: triton_persistent.py imports these.
F_PEEPHOLES = tl.constexpr(variants.PEEPHOLES)
F_CIFG = tl.constexpr(variants.CIFG)
F_NO_INPUT_GATE = tl.constexpr(variants.NO_INPUT_GATE)
F_NO_FORGET_GATE = tl.constexpr(variants.NO_FORGET_GATE)
F_NO_OUTPUT_GATE = tl.constexpr(variants.NO_OUTPUT_GATE)
F_NO_INPUT_ACTIVATION = tl.constexpr(variants.NO_INPUT_ACTIVATION)
F_NO_OUTPUT_ACTIVATION = tl.constexpr(variants.NO_OUTPUT_ACTIVATION)
F_LAYER_NORM = tl.constexpr(variants.LAYER_NORM)
F_ZONEOUT_C = tl.constexpr(variants.ZONEOUT_C)
F_ZONEOUT_H = tl.constexpr(variants.ZONEOUT_H)
F_RECURRENT_DROPOUT = tl.constexpr(variants.RECURRENT_DROPOUT)


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


# The variants' gate math, one copy for both Triton files (the per-step kernels here and the
# persistent ones): element-wise, so a block may have any shape ([BLOCK_H] per step, [U, BLOCK_B] or
# [BLOCK_B, U] persistent); peephole weights p_i, p_f, p_o broadcast to it and are unread without
# F_PEEPHOLES. `one` and `zero` are what a removed gate and its gradient hold (the persistent kernels
# add their abort poison to them).
@triton.jit
def _variant_gates_fwd(b_a_i, b_a_f, b_a_g, b_a_o, b_c_prev, b_p_i, b_p_f, b_p_o, b_one, FLAGS: tl.constexpr):
    # pre-activations a (gx + recurrent) and c_{t−1} -> i, f, g, o and c̃; the output gate's peephole sees c̃
    if F_PEEPHOLES & FLAGS:
        b_a_i += b_p_i * b_c_prev
        b_a_f += b_p_f * b_c_prev
    b_i = b_one if F_NO_INPUT_GATE & FLAGS else _sigmoid(b_a_i)
    if F_CIFG & FLAGS:
        b_f = 1 - b_i
    elif F_NO_FORGET_GATE & FLAGS:
        b_f = b_one
    else:
        b_f = _sigmoid(b_a_f)
    b_g = b_a_g if F_NO_INPUT_ACTIVATION & FLAGS else _tanh(b_a_g)
    b_c_new = b_f * b_c_prev + b_i * b_g
    if F_PEEPHOLES & FLAGS:
        b_a_o += b_p_o * b_c_new
    b_o = b_one if F_NO_OUTPUT_GATE & FLAGS else _sigmoid(b_a_o)
    return b_i, b_f, b_g, b_o, b_c_new


@triton.jit
def _variant_h_fwd(b_o, b_y, FLAGS: tl.constexpr):
    # h̃ = o ⊙ tanh(y), y = c̃ (or its layer norm); without output activation o ⊙ y
    return b_o * b_y if F_NO_OUTPUT_ACTIVATION & FLAGS else b_o * _tanh(b_y)


@triton.jit
def _variant_h_bwd(b_dh, b_o, b_y, FLAGS: tl.constexpr):
    # ∂L/∂h̃ -> ∂L/∂y and ∂L/∂o, the derivatives of _variant_h_fwd
    if F_NO_OUTPUT_ACTIVATION & FLAGS:
        b_dy = b_dh * b_o
        b_do = b_dh * b_y
    else:
        b_act = _tanh(b_y)
        b_dy = b_dh * b_o * (1 - b_act * b_act)
        b_do = b_dh * b_act
    return b_dy, b_do


@triton.jit
def _variant_gates_bwd(
    b_dc, b_do, b_i, b_f, b_g, b_o, b_c_prev, b_p_i, b_p_f, b_p_o, b_zero,
    FLAGS: tl.constexpr,
):  # fmt: skip
    # ∂L/∂c̃ (all but the output gate's peephole) and ∂L/∂o, the saved gates and c_{t−1} -> ∂L/∂a
    # (i, f, g, o) and the part of ∂L/∂c_{t−1} that passes through the cell (f, the peepholes)
    b_da_o = b_zero if F_NO_OUTPUT_GATE & FLAGS else b_do * b_o * (1 - b_o)
    if F_PEEPHOLES & FLAGS:
        b_dc += b_p_o * b_da_o
    b_di = b_dc * b_g
    b_df = b_dc * b_c_prev
    b_dg = b_dc * b_i
    b_dc_prev = b_dc * b_f
    if F_CIFG & FLAGS:  # f = 1 − i
        b_di -= b_df
    b_da_i = b_zero if F_NO_INPUT_GATE & FLAGS else b_di * b_i * (1 - b_i)
    b_da_f = b_zero if (F_NO_FORGET_GATE | F_CIFG) & FLAGS else b_df * b_f * (1 - b_f)
    b_da_g = b_dg if F_NO_INPUT_ACTIVATION & FLAGS else b_dg * (1 - b_g * b_g)
    if F_PEEPHOLES & FLAGS:
        b_dc_prev += b_p_i * b_da_i + b_p_f * b_da_f
    return b_da_i, b_da_f, b_da_g, b_da_o, b_dc_prev


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


@triton.jit
def _ln_bwd(b_g, b_x_hat, b_rstd, b_mean_g, b_mean_gx):
    # ∂L/∂x of x̂ = (x − mean)·rstd, given g = γ ⊙ ∂L/∂(γ ⊙ x̂ + β) and the row means of g and g ⊙ x̂
    return b_rstd * (b_g - b_mean_g - b_x_hat * b_mean_gx)


@triton.jit
def _row_mean_rstd(p_row, N, ACC: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    # mean and 1/sqrt(var + eps) of p_row[:N], biased variance, two passes (no cancellation)
    b_sum = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        o_n = start + tl.arange(0, BLOCK)
        b_sum += tl.load(p_row + o_n, mask=o_n < N, other=0).to(ACC)
    b_mean = tl.sum(b_sum, axis=0) / N
    b_sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        o_n = start + tl.arange(0, BLOCK)
        m_n = o_n < N
        b_d = tl.where(m_n, tl.load(p_row + o_n, mask=m_n, other=0).to(ACC) - b_mean, 0)
        b_sq += b_d * b_d
    return b_mean, 1 / tl.sqrt(tl.sum(b_sq, axis=0) / N + EPS)


@triton.jit
def _ln_hh_gate(p_rec_row, p_ln_hh, p_r_hat_row, o_g, m_h, b_mean_r, b_rstd_r, ACC: tl.constexpr):
    # one gate's block of γ_hh ⊙ LN(r); r̂ is saved for the backward
    b_r_hat = (tl.load(p_rec_row + o_g, mask=m_h, other=0).to(ACC) - b_mean_r) * b_rstd_r
    tl.store(p_r_hat_row + o_g, b_r_hat, mask=m_h)
    return tl.load(p_ln_hh + o_g, mask=m_h, other=0) * b_r_hat


@triton.jit
def _peepholes(p_peep, stride_peep, o_h, m_h, b_like, FLAGS: tl.constexpr):
    # one block of p_i, p_f, p_o (rows of weight_peephole [3, H]); without peepholes unread stand-ins
    b_p_i, b_p_f, b_p_o = b_like, b_like, b_like
    if F_PEEPHOLES & FLAGS:
        b_p_i = tl.load(p_peep + o_h, mask=m_h, other=0)
        b_p_f = tl.load(p_peep + stride_peep + o_h, mask=m_h, other=0)
        b_p_o = tl.load(p_peep + 2 * stride_peep + o_h, mask=m_h, other=0)
    return b_p_i, b_p_f, b_p_o


@triton.jit
def _variant_fwd_cell(
    o_h, m_h, H, b_mean_r, b_rstd_r,
    p_pre_row, p_rec_row, p_c_prev_row, p_peep, stride_peep, p_ln_hh, p_z_row,
    p_gates_row, p_c_row, p_c_new_row, p_ln_saved_row,
    FLAGS: tl.constexpr,
):  # fmt: skip
    # gates, c̃ (into p_c_new_row) and c_t of one block of H; returns c̃ and o for h_t
    acc_dtype = p_c_new_row.dtype.element_ty
    b_a_i = tl.load(p_pre_row + o_h, mask=m_h, other=0).to(acc_dtype)
    b_a_f = tl.load(p_pre_row + H + o_h, mask=m_h, other=0).to(acc_dtype)
    b_a_g = tl.load(p_pre_row + 2 * H + o_h, mask=m_h, other=0).to(acc_dtype)
    b_a_o = tl.load(p_pre_row + 3 * H + o_h, mask=m_h, other=0).to(acc_dtype)
    if F_LAYER_NORM & FLAGS:
        b_a_i += _ln_hh_gate(p_rec_row, p_ln_hh, p_ln_saved_row, o_h, m_h, b_mean_r, b_rstd_r, acc_dtype)
        b_a_f += _ln_hh_gate(p_rec_row, p_ln_hh, p_ln_saved_row, H + o_h, m_h, b_mean_r, b_rstd_r, acc_dtype)
        b_a_g += _ln_hh_gate(
            p_rec_row, p_ln_hh, p_ln_saved_row, 2 * H + o_h, m_h, b_mean_r, b_rstd_r, acc_dtype
        )
        b_a_o += _ln_hh_gate(
            p_rec_row, p_ln_hh, p_ln_saved_row, 3 * H + o_h, m_h, b_mean_r, b_rstd_r, acc_dtype
        )
    b_c_prev = tl.load(p_c_prev_row + o_h, mask=m_h, other=0)
    b_p_i, b_p_f, b_p_o = _peepholes(p_peep, stride_peep, o_h, m_h, b_c_prev, FLAGS)
    b_one = tl.zeros_like(b_c_prev) + 1
    b_i, b_f, b_g, b_o, b_c_new = _variant_gates_fwd(
        b_a_i, b_a_f, b_a_g, b_a_o, b_c_prev, b_p_i, b_p_f, b_p_o, b_one, FLAGS
    )

    tl.store(p_gates_row + o_h, b_i, mask=m_h)
    tl.store(p_gates_row + H + o_h, b_f, mask=m_h)
    tl.store(p_gates_row + 2 * H + o_h, b_g, mask=m_h)
    tl.store(p_gates_row + 3 * H + o_h, b_o, mask=m_h)
    tl.store(p_c_new_row + o_h, b_c_new, mask=m_h)
    if F_ZONEOUT_C & FLAGS:
        b_z_c = tl.load(p_z_row + o_h, mask=m_h, other=0) != 0
        tl.store(p_c_row + o_h, tl.where(b_z_c, b_c_prev, b_c_new), mask=m_h)
    return b_c_new, b_o


@triton.jit
def _variant_fwd_h(
    o_h, m_h, b_o, b_y, p_h_prev_row, p_z_row, stride_z_k, p_h_row,
    FLAGS: tl.constexpr,
):  # fmt: skip
    b_h = _variant_h_fwd(b_o, b_y, FLAGS)
    if F_ZONEOUT_H & FLAGS:
        b_z_h = tl.load(p_z_row + stride_z_k + o_h, mask=m_h, other=0) != 0
        b_h_prev = tl.load(p_h_prev_row + o_h, mask=m_h, other=0).to(b_h.dtype)
        b_h = tl.where(b_z_h, b_h_prev, b_h)
    tl.store(p_h_row + o_h, b_h.to(p_h_row.dtype.element_ty), mask=m_h)


@triton.jit
def lstm_variant_fwd_kernel(
    p_pre, p_rec, p_c_prev, p_h_prev, p_peep, p_ln_hh, p_ln_c, p_z,
    p_gates, p_c, p_h, p_c_new, p_ln_saved,
    H,
    stride_pre, stride_rec, stride_c_prev, stride_h_prev, stride_peep, stride_ln_c, stride_z, stride_z_k,
    stride_gates, stride_c, stride_h, stride_c_new, stride_ln_saved,
    EPS: tl.constexpr, BLOCK_H: tl.constexpr,
    FLAGS: tl.constexpr,
):  # fmt: skip
    # p_c_new: where c̃ goes (the c_t buffer itself without ZONEOUT_C); p_c is written only with it
    i_b = tl.program_id(0).to(tl.int64)
    acc_dtype = p_c_new.dtype.element_ty
    p_pre_row = p_pre + i_b * stride_pre
    p_rec_row = p_rec + i_b * stride_rec
    p_c_prev_row = p_c_prev + i_b * stride_c_prev
    p_h_prev_row = p_h_prev + i_b * stride_h_prev
    p_z_row = p_z + i_b * stride_z
    p_gates_row = p_gates + i_b * stride_gates
    p_c_row = p_c + i_b * stride_c
    p_h_row = p_h + i_b * stride_h
    p_c_new_row = p_c_new + i_b * stride_c_new
    p_ln_saved_row = p_ln_saved + i_b * stride_ln_saved

    if F_LAYER_NORM & FLAGS:  # grid (n,): the program owns its row, for the statistics over 4H and over H
        b_mean_r, b_rstd_r = _row_mean_rstd(p_rec_row, 4 * H, acc_dtype, EPS, BLOCK_H)
        for start in range(0, H, BLOCK_H):
            o_h = start + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            _variant_fwd_cell(
                o_h, m_h, H, b_mean_r, b_rstd_r,
                p_pre_row, p_rec_row, p_c_prev_row, p_peep, stride_peep, p_ln_hh, p_z_row,
                p_gates_row, p_c_row, p_c_new_row, p_ln_saved_row,
                FLAGS,
            )  # fmt: skip
        tl.debug_barrier()  # c̃ and o are read back below, by threads that may not have written them
        b_mean_c, b_rstd_c = _row_mean_rstd(p_c_new_row, H, acc_dtype, EPS, BLOCK_H)
        tl.store(p_ln_saved_row + 4 * H, b_rstd_r)
        tl.store(p_ln_saved_row + 4 * H + 1, b_mean_c)
        tl.store(p_ln_saved_row + 4 * H + 2, b_rstd_c)
        for start in range(0, H, BLOCK_H):
            o_h = start + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            b_y_hat = (tl.load(p_c_new_row + o_h, mask=m_h, other=0) - b_mean_c) * b_rstd_c
            b_y = tl.load(p_ln_c + o_h, mask=m_h, other=0) * b_y_hat
            b_y += tl.load(p_ln_c + stride_ln_c + o_h, mask=m_h, other=0)
            b_o = tl.load(p_gates_row + 3 * H + o_h, mask=m_h, other=0)
            _variant_fwd_h(
                o_h, m_h, b_o, b_y, p_h_prev_row, p_z_row, stride_z_k, p_h_row,
                FLAGS,
            )  # fmt: skip
    else:  # grid (n, cdiv(H, BLOCK_H))
        o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_c_new, b_o = _variant_fwd_cell(
            o_h, m_h, H, 0.0, 0.0,
            p_pre_row, p_rec_row, p_c_prev_row, p_peep, stride_peep, p_ln_hh, p_z_row,
            p_gates_row, p_c_row, p_c_new_row, p_ln_saved_row,
            FLAGS,
        )  # fmt: skip
        _variant_fwd_h(
            o_h, m_h, b_o, b_c_new, p_h_prev_row, p_z_row, stride_z_k, p_h_row,
            FLAGS,
        )  # fmt: skip


@triton.jit
def _variant_bwd_dy(
    o_h, m_h, H, b_mean_c, b_rstd_c,
    p_dh_row, p_gates_row, p_c_new_row, p_ln_c, stride_ln_c, p_z_row, stride_z_k,
    FLAGS: tl.constexpr,
):  # fmt: skip
    # the part before the cell's layer norm: ∂L/∂y (y = LN(c̃) or c̃), ŷ, ∂L/∂o, z^h ⊙ dh
    acc_dtype = p_gates_row.dtype.element_ty
    b_dh = tl.load(p_dh_row + o_h, mask=m_h, other=0).to(acc_dtype)
    if F_ZONEOUT_H & FLAGS:
        b_z_h = tl.load(p_z_row + stride_z_k + o_h, mask=m_h, other=0) != 0
        b_dh_prev = tl.where(b_z_h, b_dh, 0)
        b_dh = tl.where(b_z_h, 0, b_dh)
    else:
        b_dh_prev = tl.zeros_like(b_dh)
    b_o = tl.load(p_gates_row + 3 * H + o_h, mask=m_h, other=0)
    b_y_hat = tl.load(p_c_new_row + o_h, mask=m_h, other=0)
    if F_LAYER_NORM & FLAGS:
        b_y_hat = (b_y_hat - b_mean_c) * b_rstd_c
        b_y = tl.load(p_ln_c + o_h, mask=m_h, other=0) * b_y_hat
        b_y += tl.load(p_ln_c + stride_ln_c + o_h, mask=m_h, other=0)
    else:
        b_y = b_y_hat
    b_dy, b_do = _variant_h_bwd(b_dh, b_o, b_y, FLAGS)
    return b_dy, b_y_hat, b_do, b_o, b_dh_prev


@triton.jit
def _variant_bwd_cell(
    o_h, m_h, H, b_mean_c, b_rstd_c, b_mean_g, b_mean_gy,
    p_dh_row, p_dc_row, p_gates_row, p_c_prev_row, p_c_new_row, p_peep, stride_peep,
    p_ln_c, stride_ln_c, p_z_row, stride_z_k,
    FLAGS: tl.constexpr,
):  # fmt: skip
    # one block of H: ∂L/∂a (i, f, g, o), ∂L/∂c_{t−1} and z^h ⊙ dh; reads only, stores nothing
    b_dy, b_y_hat, b_do, b_o, b_dh_prev = _variant_bwd_dy(
        o_h, m_h, H, b_mean_c, b_rstd_c,
        p_dh_row, p_gates_row, p_c_new_row, p_ln_c, stride_ln_c, p_z_row, stride_z_k,
        FLAGS,
    )  # fmt: skip
    b_dc = tl.load(p_dc_row + o_h, mask=m_h, other=0).to(b_dy.dtype)
    if F_ZONEOUT_C & FLAGS:
        b_z_c = tl.load(p_z_row + o_h, mask=m_h, other=0) != 0
        b_dc_skip = tl.where(b_z_c, b_dc, 0)  # the part of ∂L/∂c_{t−1} that zoneout passes by the cell
        b_dc = tl.where(b_z_c, 0, b_dc)
    else:
        b_dc_skip = tl.zeros_like(b_dc)
    if F_LAYER_NORM & FLAGS:
        b_g_c = b_dy * tl.load(p_ln_c + o_h, mask=m_h, other=0)
        b_dc += _ln_bwd(b_g_c, b_y_hat, b_rstd_c, b_mean_g, b_mean_gy)
    else:
        b_dc += b_dy
    b_i = tl.load(p_gates_row + o_h, mask=m_h, other=0)
    b_f = tl.load(p_gates_row + H + o_h, mask=m_h, other=0)
    b_g = tl.load(p_gates_row + 2 * H + o_h, mask=m_h, other=0)
    b_c_prev = tl.load(p_c_prev_row + o_h, mask=m_h, other=0)
    b_p_i, b_p_f, b_p_o = _peepholes(p_peep, stride_peep, o_h, m_h, b_c_prev, FLAGS)
    b_da_i, b_da_f, b_da_g, b_da_o, b_dc_cell = _variant_gates_bwd(
        b_dc, b_do, b_i, b_f, b_g, b_o, b_c_prev, b_p_i, b_p_f, b_p_o, tl.zeros_like(b_dc), FLAGS
    )
    return b_da_i, b_da_f, b_da_g, b_da_o, b_dc_skip + b_dc_cell, b_dh_prev


@triton.jit
def _ln_hh_bwd_sums(b_da, o_g, m_h, p_ln_hh, p_r_hat_row):
    # one gate's block of g = γ_hh ⊙ ∂L/∂a and g ⊙ r̂, masked lanes 0
    b_g = tl.where(m_h, b_da * tl.load(p_ln_hh + o_g, mask=m_h, other=0), 0)
    return b_g, b_g * tl.load(p_r_hat_row + o_g, mask=m_h, other=0)


@triton.jit
def _store_gate_grad(
    b_da, o_g, m_h, p_dpre_row, p_drec_row, p_ln_hh, p_r_hat_row, b_rstd_r, b_mean_g, b_mean_gr,
    FLAGS: tl.constexpr,
):  # fmt: skip
    tl.store(p_dpre_row + o_g, b_da.to(p_dpre_row.dtype.element_ty), mask=m_h)
    if F_LAYER_NORM & FLAGS:
        b_g = b_da * tl.load(p_ln_hh + o_g, mask=m_h, other=0)
        b_r_hat = tl.load(p_r_hat_row + o_g, mask=m_h, other=0)
        b_drec = _ln_bwd(b_g, b_r_hat, b_rstd_r, b_mean_g, b_mean_gr)
        tl.store(p_drec_row + o_g, b_drec.to(p_drec_row.dtype.element_ty), mask=m_h)


@triton.jit
def lstm_variant_bwd_kernel(
    p_dh, p_dc, p_gates, p_c_prev, p_c_new, p_ln_saved, p_peep, p_ln_hh, p_ln_c, p_z,
    p_dpre, p_drec, p_dc_prev, p_dh_prev, p_d_ln_c,
    H,
    stride_dh, stride_dc, stride_gates, stride_c_prev, stride_c_new, stride_ln_saved, stride_peep,
    stride_ln_c, stride_z, stride_z_k, stride_dpre, stride_drec, stride_dc_prev, stride_dh_prev,
    stride_d_ln_c, stride_d_ln_c_k,
    BLOCK_H: tl.constexpr,
    FLAGS: tl.constexpr,
):  # fmt: skip
    # dc_prev may alias dc and dh_prev dh: each element is read before it is written, in one block
    i_b = tl.program_id(0).to(tl.int64)
    acc_dtype = p_gates.dtype.element_ty
    p_dh_row = p_dh + i_b * stride_dh
    p_dc_row = p_dc + i_b * stride_dc
    p_gates_row = p_gates + i_b * stride_gates
    p_c_prev_row = p_c_prev + i_b * stride_c_prev
    p_c_new_row = p_c_new + i_b * stride_c_new
    p_ln_saved_row = p_ln_saved + i_b * stride_ln_saved
    p_z_row = p_z + i_b * stride_z
    p_dpre_row = p_dpre + i_b * stride_dpre
    p_drec_row = p_drec + i_b * stride_drec
    p_dc_prev_row = p_dc_prev + i_b * stride_dc_prev
    p_dh_prev_row = p_dh_prev + i_b * stride_dh_prev
    p_d_ln_c_row = p_d_ln_c + i_b * stride_d_ln_c

    if F_LAYER_NORM & FLAGS:  # grid (n,); three passes over the row: sums for LN(c̃), sums for LN(r), stores
        b_rstd_r = tl.load(p_ln_saved_row + 4 * H)
        b_mean_c = tl.load(p_ln_saved_row + 4 * H + 1)
        b_rstd_c = tl.load(p_ln_saved_row + 4 * H + 2)
        b_sum_g = tl.zeros([BLOCK_H], dtype=acc_dtype)
        b_sum_gy = tl.zeros([BLOCK_H], dtype=acc_dtype)
        for start in range(0, H, BLOCK_H):
            o_h = start + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            b_dy, b_y_hat, _, _, _ = _variant_bwd_dy(
                o_h, m_h, H, b_mean_c, b_rstd_c,
                p_dh_row, p_gates_row, p_c_new_row, p_ln_c, stride_ln_c, p_z_row, stride_z_k,
                FLAGS,
            )  # fmt: skip
            tl.store(p_d_ln_c_row + o_h, b_dy * b_y_hat, mask=m_h)
            tl.store(p_d_ln_c_row + stride_d_ln_c_k + o_h, b_dy, mask=m_h)
            b_g_c = tl.where(m_h, b_dy * tl.load(p_ln_c + o_h, mask=m_h, other=0), 0)
            b_sum_g += b_g_c
            b_sum_gy += b_g_c * b_y_hat
        b_mean_g_c = tl.sum(b_sum_g, axis=0) / H
        b_mean_gy_c = tl.sum(b_sum_gy, axis=0) / H

        b_sum_g = tl.zeros([BLOCK_H], dtype=acc_dtype)
        b_sum_gr = tl.zeros([BLOCK_H], dtype=acc_dtype)
        for start in range(0, H, BLOCK_H):
            o_h = start + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            b_da_i, b_da_f, b_da_g, b_da_o, b_dc_prev, b_dh_prev = _variant_bwd_cell(
                o_h, m_h, H, b_mean_c, b_rstd_c, b_mean_g_c, b_mean_gy_c,
                p_dh_row, p_dc_row, p_gates_row, p_c_prev_row, p_c_new_row, p_peep, stride_peep,
                p_ln_c, stride_ln_c, p_z_row, stride_z_k,
                FLAGS,
            )  # fmt: skip
            b_g, b_gr = _ln_hh_bwd_sums(b_da_i, o_h, m_h, p_ln_hh, p_ln_saved_row)
            b_sum_g += b_g
            b_sum_gr += b_gr
            b_g, b_gr = _ln_hh_bwd_sums(b_da_f, H + o_h, m_h, p_ln_hh, p_ln_saved_row)
            b_sum_g += b_g
            b_sum_gr += b_gr
            b_g, b_gr = _ln_hh_bwd_sums(b_da_g, 2 * H + o_h, m_h, p_ln_hh, p_ln_saved_row)
            b_sum_g += b_g
            b_sum_gr += b_gr
            b_g, b_gr = _ln_hh_bwd_sums(b_da_o, 3 * H + o_h, m_h, p_ln_hh, p_ln_saved_row)
            b_sum_g += b_g
            b_sum_gr += b_gr
        b_mean_g_r = tl.sum(b_sum_g, axis=0) / (4 * H)
        b_mean_gr_r = tl.sum(b_sum_gr, axis=0) / (4 * H)

        for start in range(0, H, BLOCK_H):  # recomputed, not read back: d_pre may be bf16
            o_h = start + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            b_da_i, b_da_f, b_da_g, b_da_o, b_dc_prev, b_dh_prev = _variant_bwd_cell(
                o_h, m_h, H, b_mean_c, b_rstd_c, b_mean_g_c, b_mean_gy_c,
                p_dh_row, p_dc_row, p_gates_row, p_c_prev_row, p_c_new_row, p_peep, stride_peep,
                p_ln_c, stride_ln_c, p_z_row, stride_z_k,
                FLAGS,
            )  # fmt: skip
            _store_gate_grad(
                b_da_i, o_h, m_h, p_dpre_row, p_drec_row, p_ln_hh, p_ln_saved_row,
                b_rstd_r, b_mean_g_r, b_mean_gr_r, FLAGS,
            )  # fmt: skip
            _store_gate_grad(
                b_da_f, H + o_h, m_h, p_dpre_row, p_drec_row, p_ln_hh, p_ln_saved_row,
                b_rstd_r, b_mean_g_r, b_mean_gr_r, FLAGS,
            )  # fmt: skip
            _store_gate_grad(
                b_da_g, 2 * H + o_h, m_h, p_dpre_row, p_drec_row, p_ln_hh, p_ln_saved_row,
                b_rstd_r, b_mean_g_r, b_mean_gr_r, FLAGS,
            )  # fmt: skip
            _store_gate_grad(
                b_da_o, 3 * H + o_h, m_h, p_dpre_row, p_drec_row, p_ln_hh, p_ln_saved_row,
                b_rstd_r, b_mean_g_r, b_mean_gr_r, FLAGS,
            )  # fmt: skip
            tl.store(p_dc_prev_row + o_h, b_dc_prev, mask=m_h)
            if F_ZONEOUT_H & FLAGS:
                tl.store(p_dh_prev_row + o_h, b_dh_prev, mask=m_h)
    else:  # grid (n, cdiv(H, BLOCK_H))
        o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_da_i, b_da_f, b_da_g, b_da_o, b_dc_prev, b_dh_prev = _variant_bwd_cell(
            o_h, m_h, H, 0.0, 0.0, 0.0, 0.0,
            p_dh_row, p_dc_row, p_gates_row, p_c_prev_row, p_c_new_row, p_peep, stride_peep,
            p_ln_c, stride_ln_c, p_z_row, stride_z_k,
            FLAGS,
        )  # fmt: skip
        dpre_ty = p_dpre.dtype.element_ty
        tl.store(p_dpre_row + o_h, b_da_i.to(dpre_ty), mask=m_h)
        tl.store(p_dpre_row + H + o_h, b_da_f.to(dpre_ty), mask=m_h)
        tl.store(p_dpre_row + 2 * H + o_h, b_da_g.to(dpre_ty), mask=m_h)
        tl.store(p_dpre_row + 3 * H + o_h, b_da_o.to(dpre_ty), mask=m_h)
        tl.store(p_dc_prev_row + o_h, b_dc_prev, mask=m_h)
        if F_ZONEOUT_H & FLAGS:
            tl.store(p_dh_prev_row + o_h, b_dh_prev, mask=m_h)


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


_STEP_BITS = variants.STRUCTURE_BITS | variants.ZONEOUT_C | variants.ZONEOUT_H
_KNOWN_BITS = _STEP_BITS | variants.RECURRENT_DROPOUT
_ACC_DTYPES = (torch.float32, torch.float64)


@functools.cache  # once per flags: the launchers run once per step
def _kernel_flags(flags: int) -> int:
    """The step kernels' FLAGS: ``flags`` checked, without RECURRENT_DROPOUT (it acts before the step)."""
    if not isinstance(flags, int) or flags < 0 or flags & ~_KNOWN_BITS:
        raise ValueError(f"flags must be a combination of the bits in variants.py, got {flags!r}")
    if flags & variants.CIFG and flags & (variants.NO_INPUT_GATE | variants.NO_FORGET_GATE):
        raise ValueError(f"cifg couples f = 1 − i and needs both gates, got flags: {_describe(flags)}")
    return flags & _STEP_BITS


def _describe(flags: int) -> str:
    return ", ".join(flag_names(flags)) or "none (vanilla)"


def _check_given(flags: int, **tensors: tuple[Tensor | None, int]) -> None:
    """Each optional tensor is given iff one of the flag bits that use it is set."""
    for name, (tensor, bits) in tensors.items():
        if flags & bits and tensor is None:
            raise ValueError(f"{name} is required with {' or '.join(flag_names(flags & bits))}, got None")
        if not flags & bits and tensor is not None:
            raise ValueError(
                f"{name} was given, but only {' or '.join(flag_names(bits))} uses it and the flags "
                f"have no such bit (flags: {_describe(flags)})"
            )


def _expect(name: str, t: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, like: Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} of shape {shape}, got {t.dtype} of shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs unit stride along its last dimension, got strides {t.stride()}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, the step's other tensors on {like.device}")


def _acc_rows(name: str, t: Tensor) -> tuple[int, int]:
    if t.dim() != 2 or t.dtype not in _ACC_DTYPES:
        raise ValueError(f"{name} must be a 2-D fp32 or fp64 tensor [n, H], got {t.dtype} {tuple(t.shape)}")
    return t.shape


def _stride(t: Tensor | None, dim: int = 0) -> int:
    return 0 if t is None else t.stride(dim)


def _check_forward_args(
    flags, pre, rec, c_prev, h_prev, peephole, ln_hh, ln_c, zoneout, gates, c, h, c_new, ln_saved
) -> None:
    """Every argument of :func:`variant_gates_forward_into` against the flags and each other."""
    zoneout_bits = variants.ZONEOUT_C | variants.ZONEOUT_H
    _check_given(
        flags,
        rec=(rec, variants.LAYER_NORM),
        h_prev=(h_prev, variants.ZONEOUT_H),
        peephole=(peephole, variants.PEEPHOLES),
        ln_hh=(ln_hh, variants.LAYER_NORM),
        ln_c=(ln_c, variants.LAYER_NORM),
        zoneout=(zoneout, zoneout_bits),
        c_new=(c_new, variants.ZONEOUT_C),
        ln_saved=(ln_saved, variants.LAYER_NORM),
    )
    n, H = _acc_rows("c_prev", c_prev)
    acc = c_prev.dtype
    if not pre.is_floating_point() or not h.is_floating_point():
        raise ValueError(f"pre and h must be floating point, got {pre.dtype} and {h.dtype}")
    for name, t, shape, dtype in (
        ("pre", pre, (n, 4 * H), pre.dtype),
        ("rec", rec, (n, 4 * H), pre.dtype),
        ("h_prev", h_prev, (n, H), h.dtype),
        ("peephole", peephole, (3, H), acc),
        ("ln_hh", ln_hh, (4 * H,), acc),
        ("ln_c", ln_c, (2, H), acc),
        ("zoneout", zoneout, (n, 2, H), torch.uint8),
        ("gates", gates, (n, 4 * H), acc),
        ("c", c, (n, H), acc),
        ("h", h, (n, H), h.dtype),
        ("c_new", c_new, (n, H), acc),
        ("ln_saved", ln_saved, (n, 4 * H + 3), acc),
    ):
        _expect(name, t, shape, dtype, like=c_prev)


def variant_gates_forward_into(
    flags: int,
    pre: Tensor,
    rec: Tensor | None,
    c_prev: Tensor,
    h_prev: Tensor | None,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    gates: Tensor,
    c: Tensor,
    h: Tensor,
    c_new: Tensor | None,
    ln_saved: Tensor | None,
    *,
    check: bool = True,
) -> None:
    """One step of a cell variant (``variants.py``), outputs written in place.

    Args:
        flags: ``CellVariant.flags`` plus the ``ZONEOUT_C`` / ``ZONEOUT_H`` / ``RECURRENT_DROPOUT``
            bits the layer adds in training (recurrent dropout acts before the step: ignored here).

    Inputs (acc: the cell state's dtype, fp32 or fp64; a tensor no flag asks for must be None):
        pre [n, 4H]: a_t before peepholes, gx_t + r_t; with LAYER_NORM gx_t only.
        rec [n, 4H], same dtype as pre: LAYER_NORM only, the raw recurrent product r_t.
        c_prev [n, H] acc: c_{t−1}.
        h_prev [n, H], dtype of h: ZONEOUT_H only, h_{t−1}.
        peephole [3, H] acc: PEEPHOLES only, (p_i, p_f, p_o).
        ln_hh [4H] acc: LAYER_NORM only, γ_hh.
        ln_c [2, H] acc: LAYER_NORM only, (γ_c, β_c).
        zoneout [n, 2, H] uint8: ZONEOUT_C or ZONEOUT_H only, masks (z^c, z^h), 1 keeps the previous value.

    Outputs:
        gates [n, 4H] acc: i, f, g, o as used (1 for a removed gate, f = 1 − i under CIFG, g = a_g
            without input activation).
        c [n, H] acc: c_t (after zoneout).  h [n, H]: h_t (after zoneout).
        c_new [n, H] acc: ZONEOUT_C only, c̃ before zoneout (otherwise c̃ is c_t).
        ln_saved [n, 4H + 3] acc: LAYER_NORM only, r̂ = (r − mean_r)·rstd_r, rstd_r, mean_c, rstd_c.

    With no bit that concerns the step this is :func:`gates_forward_into`, today's kernel.

    Example::

        >>> flags = CellVariant(peepholes=True).flags
        >>> variant_gates_forward_into(flags, pre, None, c_prev, None, peephole, None, None, None,
        ...                            gates, c, h, None, None)
    """
    kernel_flags = _kernel_flags(flags)
    if check:  # the layer checks its first step only: the rest have the same shapes and dtypes
        _check_forward_args(
            flags, pre, rec, c_prev, h_prev, peephole, ln_hh, ln_c, zoneout, gates, c, h, c_new, ln_saved
        )
    n, H = c_prev.shape
    if not flags & _STEP_BITS:
        gates_forward_into(pre, c_prev, gates, c, h)
        return
    if n == 0:
        return
    c_tilde = c_new if c_new is not None else c  # where c̃ goes; c_t itself without zoneout on c
    BLOCK_H = _block_h(H)
    grid = (n,) if kernel_flags & variants.LAYER_NORM else (n, triton.cdiv(H, BLOCK_H))
    stand_in = c_prev  # for the pointers of tensors the flags leave out: never read or written
    lstm_variant_fwd_kernel[grid](
        pre, rec if rec is not None else stand_in, c_prev, h_prev if h_prev is not None else stand_in,
        peephole if peephole is not None else stand_in, ln_hh if ln_hh is not None else stand_in,
        ln_c if ln_c is not None else stand_in, zoneout if zoneout is not None else stand_in,
        gates, c, h, c_tilde, ln_saved if ln_saved is not None else stand_in,
        H,
        pre.stride(0), _stride(rec), c_prev.stride(0), _stride(h_prev), _stride(peephole),
        _stride(ln_c), _stride(zoneout), _stride(zoneout, 1),
        gates.stride(0), c.stride(0), h.stride(0), c_tilde.stride(0), _stride(ln_saved),
        EPS=LN_EPS, BLOCK_H=BLOCK_H, FLAGS=kernel_flags,
    )  # fmt: skip


def _check_backward_args(
    flags, dh, dc, gates, c_prev, c_new, ln_saved, peephole, ln_hh, ln_c, zoneout,
    d_pre, d_rec, dc_prev, dh_prev, d_ln_c,
) -> None:  # fmt: skip
    """Every argument of :func:`variant_gates_backward_into` against the flags and each other."""
    _check_given(
        flags,
        ln_saved=(ln_saved, variants.LAYER_NORM),
        peephole=(peephole, variants.PEEPHOLES),
        ln_hh=(ln_hh, variants.LAYER_NORM),
        ln_c=(ln_c, variants.LAYER_NORM),
        zoneout=(zoneout, variants.ZONEOUT_C | variants.ZONEOUT_H),
        d_rec=(d_rec, variants.LAYER_NORM),
        dh_prev=(dh_prev, variants.ZONEOUT_H),
        d_ln_c=(d_ln_c, variants.LAYER_NORM),
    )
    n, H = _acc_rows("c_prev", c_prev)
    acc = c_prev.dtype
    if not d_pre.is_floating_point():
        raise ValueError(f"d_pre must be floating point, got {d_pre.dtype}")
    for name, t, shape, dtype in (
        ("dh", dh, (n, H), acc),
        ("dc", dc, (n, H), acc),
        ("gates", gates, (n, 4 * H), acc),
        ("c_new", c_new, (n, H), acc),
        ("ln_saved", ln_saved, (n, 4 * H + 3), acc),
        ("peephole", peephole, (3, H), acc),
        ("ln_hh", ln_hh, (4 * H,), acc),
        ("ln_c", ln_c, (2, H), acc),
        ("zoneout", zoneout, (n, 2, H), torch.uint8),
        ("d_pre", d_pre, (n, 4 * H), d_pre.dtype),
        ("d_rec", d_rec, (n, 4 * H), d_pre.dtype),
        ("dc_prev", dc_prev, (n, H), acc),
        ("dh_prev", dh_prev, (n, H), acc),
        ("d_ln_c", d_ln_c, (n, 2, H), acc),
    ):
        _expect(name, t, shape, dtype, like=c_prev)


def variant_gates_backward_into(
    flags: int,
    dh: Tensor,
    dc: Tensor,
    gates: Tensor,
    c_prev: Tensor,
    c_new: Tensor,
    ln_saved: Tensor | None,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    d_pre: Tensor,
    d_rec: Tensor | None,
    dc_prev: Tensor,
    dh_prev: Tensor | None,
    d_ln_c: Tensor | None,
    *,
    check: bool = True,
) -> None:
    """The backward of :func:`variant_gates_forward_into`, outputs written in place.

    Inputs (acc as in the forward; a tensor no flag asks for must be None):
        dh [n, H] acc: ∂L/∂h_t, everything that reaches h_t.
        dc [n, H] acc: ∂L/∂c_t from step t+1.
        gates [n, 4H], c_prev [n, H]: as the forward saved them.
        c_new [n, H] acc: c̃ (the forward's c_new under ZONEOUT_C, else its c).
        ln_saved, peephole, ln_hh, ln_c, zoneout: as the forward's.

    Outputs:
        d_pre [n, 4H], dtype of the input: ∂L/∂a_t = ∂L/∂gx_t (da_i, da_f, da_g, da_o).
        d_rec [n, 4H], same dtype: LAYER_NORM only, ∂L/∂r_t (the raw product, before LN).
        dc_prev [n, H] acc: ∂L/∂c_{t−1} through this step; may be dc itself.
        dh_prev [n, H] acc: ZONEOUT_H only, z^h ⊙ dh (∂L/∂h_{t−1} through zoneout); may be dh itself.
        d_ln_c [n, 2, H] acc: LAYER_NORM only, per row (dy ⊙ ŷ, dy) with ŷ the normalised c̃ and
            dy = ∂L/∂y; summed over rows and steps they are ∂L/∂γ_c and ∂L/∂β_c.

    The layer forms the parameters' gradients from these, summed over rows and steps:
    ∂p_i = da_i ⊙ c_{t−1}, ∂p_f = da_f ⊙ c_{t−1}, ∂p_o = da_o ⊙ c̃, ∂γ_hh = d_pre ⊙ r̂.
    With no bit that concerns the step this is :func:`gates_backward_into`, today's kernel.
    """
    kernel_flags = _kernel_flags(flags)
    if check:  # the layer checks its first step only: the rest have the same shapes and dtypes
        _check_backward_args(
            flags, dh, dc, gates, c_prev, c_new, ln_saved, peephole, ln_hh, ln_c, zoneout,
            d_pre, d_rec, dc_prev, dh_prev, d_ln_c,
        )  # fmt: skip
    n, H = c_prev.shape
    if not flags & _STEP_BITS:
        gates_backward_into(dh, dc, gates, c_new, c_prev, d_pre, dc_prev)
        return
    if n == 0:
        return
    BLOCK_H = _block_h(H)
    grid = (n,) if kernel_flags & variants.LAYER_NORM else (n, triton.cdiv(H, BLOCK_H))
    stand_in = c_prev  # for the pointers of tensors the flags leave out: never read or written
    lstm_variant_bwd_kernel[grid](
        dh, dc, gates, c_prev, c_new, ln_saved if ln_saved is not None else stand_in,
        peephole if peephole is not None else stand_in, ln_hh if ln_hh is not None else stand_in,
        ln_c if ln_c is not None else stand_in, zoneout if zoneout is not None else stand_in,
        d_pre, d_rec if d_rec is not None else stand_in, dc_prev,
        dh_prev if dh_prev is not None else stand_in, d_ln_c if d_ln_c is not None else stand_in,
        H,
        dh.stride(0), dc.stride(0), gates.stride(0), c_prev.stride(0), c_new.stride(0),
        _stride(ln_saved), _stride(peephole), _stride(ln_c), _stride(zoneout), _stride(zoneout, 1),
        d_pre.stride(0), _stride(d_rec), dc_prev.stride(0), _stride(dh_prev),
        _stride(d_ln_c), _stride(d_ln_c, 1),
        BLOCK_H=BLOCK_H, FLAGS=kernel_flags,
    )  # fmt: skip
