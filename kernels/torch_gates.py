"""The LSTM gate math in plain PyTorch with its backward written out: the `reference` backend's steps.

The twin of `triton_gates.py` (the same forward contract, ``gates_forward_into``); the backward
differs on purpose: its step-independent part runs for all steps at once before the time loop.
Neither is the oracle: that is `naive.py`, the textbook equations differentiated by autograd.

Outputs are written into buffers the caller owns, as the Triton launchers in `triton_gates.py` do,
so the layer loop in `layer.py` drives either one. The backward is split in two: what does not
depend on the incoming gradients is computed for all steps at once before the time loop
(`backward_coefficients`), leaving four small ops per step inside it
(`gates_backward_from_coefficients_into`). On CPU, tanh is computed as 2σ(2x) − 1 (`tanh_into`).

B: batch  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import variants
from .variants import LN_EPS

_ONE = torch.ones(())  # 0-dim: takes the other operand's dtype


def tanh_into(x: Tensor, out: Tensor) -> Tensor:
    """out <- tanh(x). On CPU as 2σ(2x) − 1: PyTorch's CPU tanh costs about ten times its sigmoid
    per element (docs/benchmarks/cpu-amd-epyc-2026-11-26/README.md), the identity four cheap ops.
    Its absolute error stays within a few units in the last place of 1 (fp32: ≤ 2.4e-7)."""
    if not out.is_cpu:
        return torch.tanh(x, out=out)
    torch.add(x, x, out=out)  # tensor operands only: a Python scalar is wrapped anew on every call
    return out.sigmoid_().add_(out).sub_(_ONE)


def gates_forward_into(pre: Tensor, c_prev: Tensor, gates: Tensor, c: Tensor, h: Tensor) -> None:
    """pre [B, 4H], c_prev [B, H] -> gates [B, 4H] (activated i, f, g, o), c [B, H], h [B, H].

    ``pre`` may be ``gates`` itself (the same tensor object): the gates are then activated in place.
    Math in the dtype of ``gates`` and ``c`` (fp32, or fp64 for fp64 inputs), cast on store.
    """
    H = c.shape[-1]
    i, f, g, o = gates.chunk(4, dim=1)  # Tensor.split is a Python wrapper: slower per step
    if pre is not gates:
        pre = pre if pre.dtype == gates.dtype else pre.to(gates.dtype)
        torch.sigmoid(pre, out=gates)
        tanh_into(pre[:, 2 * H : 3 * H], out=g)
    else:  # in place, one sigmoid for all four gates: g's pre-activation doubled, tanh(x) = 2σ(2x) − 1
        torch.add(g, g, out=g)
        gates.sigmoid_()
        g.add_(g).sub_(_ONE)
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, g)  # c = f ⊙ c_prev + i ⊙ g
    torch.mul(o, tanh_into(c, out=torch.empty_like(c)), out=h)  # h = o ⊙ tanh(c)


def backward_coefficients(
    gates: Tensor, c: Tensor, c_prev: Tensor, coef: Tensor | None = None, carry: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Local derivatives of one or many steps: gates [..., 4H], c and c_prev [..., H] ->

    coef [..., 4H]: ∂L/∂(i, f, g pre-activations) per unit of ∂L/∂c_t, and ∂L/∂(o pre-activation)
        per unit of ∂L/∂h_t (σ' = σ(1 − σ), tanh' = 1 − tanh²);
    carry [..., H]: ∂c_t-gradient per unit of ∂L/∂h_t, o ⊙ (1 − tanh²(c_t)).

    Written into ``coef`` and ``carry`` when given. Every product goes straight to its place: over
    all steps at once these are the largest element-wise ops of the backward, and temporaries plus
    a concatenation would cost as much again.
    """
    i, f, g, o = gates.chunk(4, dim=-1)
    coef = torch.empty_like(gates) if coef is None else coef
    carry = torch.empty_like(c) if carry is None else carry
    coef_i, coef_f, coef_g, coef_o = coef.chunk(4, dim=-1)
    torch.addcmul(i, i, i, value=-1, out=coef_i).mul_(g)  # g ⊙ σ'(i) = g ⊙ (i − i²)
    torch.addcmul(f, f, f, value=-1, out=coef_f).mul_(c_prev)  # c_prev ⊙ σ'(f)
    torch.mul(g, g, out=coef_g).mul_(i)
    torch.sub(i, coef_g, out=coef_g)  # i ⊙ tanh'(g) = i − i ⊙ g²
    tanh_c = tanh_into(c, out=carry)
    torch.addcmul(o, o, o, value=-1, out=coef_o).mul_(tanh_c)  # tanh(c) ⊙ σ'(o)
    tanh_c.mul_(tanh_c).mul_(o)
    return coef, torch.sub(o, tanh_c, out=carry)  # o − o ⊙ tanh²(c)


def gates_backward_from_coefficients_into(
    dh: Tensor,
    dc: Tensor,
    coef_ifg: Tensor,
    coef_o: Tensor,
    carry: Tensor,
    f: Tensor,
    dpre_ifg: Tensor,
    dpre_o: Tensor,
    dc_prev: Tensor,
) -> None:
    """One step: dh [B, H] = ∂L/∂h_t, dc [B, H] = ∂L/∂c_t from step t+1, and this step's
    ``backward_coefficients`` (coef_ifg [B, 3, H], coef_o [B, H], carry [B, H]) and forget gate
    f [B, H] -> dpre_ifg [B, 3, H], dpre_o [B, H]: ∂L/∂(i, f, g), ∂L/∂o pre-activations, and
    dc_prev [B, H] = ∂L/∂c_{t−1} (may alias dc).
    """
    dc_total = torch.addcmul(dc, dh, carry)  # ∂L/∂c_t, both paths: into c_{t+1} and into h_t
    torch.mul(dc_total.unsqueeze(1), coef_ifg, out=dpre_ifg)
    torch.mul(dh, coef_o, out=dpre_o)
    torch.mul(dc_total, f, out=dc_prev)


# ---- cell variants (kernels/variants.py): the same contract as triton_gates' variant launchers ----
# Written for clarity rather than speed: the vanilla cell never comes here (its path is above).


def _layer_norm_stats(v: Tensor) -> tuple[Tensor, Tensor]:
    """mean and 1/sqrt(var + ε) over the last dimension (biased variance), each [n, 1]."""
    mean = v.mean(-1, keepdim=True)
    var = (v - mean).square().mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + LN_EPS)


def _layer_norm_backward(dy: Tensor, weight: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """∂L/∂v of γ ⊙ x̂ (+ β), x̂ = (v − mean)·rstd, over the last dimension."""
    g = dy * weight
    return rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


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
    """One step of any cell variant (equations in `variants.py`), written into the given buffers.
    (``check``: part of the contract the Triton launchers share; the PyTorch ops check themselves.)

    pre [n, 4H]: gx_t + r_t (layer norm: gx_t alone, and rec [n, 4H] = the raw r_t); c_prev [n, H];
    h_prev [n, H] (zoneout on h only); peephole [3, H]; ln_hh [4H]; ln_c [2, H] (γ_c, β_c);
    zoneout [n, 2, H] masks (z^c, z^h). Out: gates [n, 4H] (i, f, g, o as used), c [n, H] = c_t,
    h [n, H] = h_t, c_new [n, H] = c̃ (zoneout on c only), ln_saved [n, 4H + 3] (layer norm only:
    r̂, rstd_r, mean_c, rstd_c).
    """
    acc, H = c.dtype, c.shape[-1]
    i, f, g, o = gates.chunk(4, dim=1)  # each activation goes straight to its slot [n, H]
    a = pre.to(acc)  # a new tensor only if pre is in a lower precision: pre itself is never written
    if flags & variants.LAYER_NORM:
        r = rec.to(acc)
        mean_r, rstd_r = _layer_norm_stats(r)
        r_hat = (r - mean_r) * rstd_r
        a = a + ln_hh * r_hat
    a_i, a_f, a_g, a_o = a.split(H, dim=-1)
    if flags & variants.PEEPHOLES:
        a_i = torch.addcmul(a_i, peephole[0], c_prev)
        a_f = torch.addcmul(a_f, peephole[1], c_prev)
    if flags & variants.NO_INPUT_GATE:
        i.fill_(1)
    else:
        torch.sigmoid(a_i, out=i)
    if flags & variants.CIFG:
        torch.sub(_ONE, i, out=f)
    elif flags & variants.NO_FORGET_GATE:
        f.fill_(1)
    else:
        torch.sigmoid(a_f, out=f)
    if flags & variants.NO_INPUT_ACTIVATION:
        g.copy_(a_g)
    else:
        tanh_into(a_g, out=g)
    cell = c_new if flags & variants.ZONEOUT_C else c  # c̃ [n, H], where it is kept
    torch.mul(f, c_prev, out=cell).addcmul_(i, g)
    if flags & variants.PEEPHOLES:
        a_o = torch.addcmul(a_o, peephole[2], cell)
    if flags & variants.NO_OUTPUT_GATE:
        o.fill_(1)
    else:
        torch.sigmoid(a_o, out=o)
    y = cell
    if flags & variants.LAYER_NORM:
        mean_c, rstd_c = _layer_norm_stats(cell)
        y = ln_c[0] * (cell - mean_c) * rstd_c + ln_c[1]
        torch.cat([r_hat, rstd_r, mean_c, rstd_c], dim=-1, out=ln_saved)
    out_act = y if flags & variants.NO_OUTPUT_ACTIVATION else tanh_into(y, out=torch.empty_like(y))
    if flags & variants.ZONEOUT_H:
        h.copy_(torch.where(zoneout[:, 1].bool(), h_prev.to(acc), o * out_act))
    else:
        torch.mul(o, out_act, out=h)
    if flags & variants.ZONEOUT_C:
        torch.where(zoneout[:, 0].bool(), c_prev, cell, out=c)


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
    """Backward of :func:`variant_gates_forward_into` (the chain rule through `variants.py`'s
    equations, in the order the kernels follow). dh, dc [n, H]: ∂L/∂h_t, ∂L/∂c_t; c_new = c̃. Out:
    d_pre [n, 4H] = ∂L/∂gx_t, d_rec [n, 4H] = ∂L/∂r_t before layer norm, dc_prev [n, H] (may be
    dc), dh_prev [n, H] = z^h ⊙ dh (zoneout on h; may be dh), d_ln_c [n, 2, H] = (dy ⊙ ŷ, dy)."""
    H = dc.shape[-1]
    i, f, g, o = gates.split(H, dim=-1)
    dh_tilde, dc_tilde, dc_carry = dh, dc, None
    if flags & variants.ZONEOUT_H:
        keep_h = zoneout[:, 1].bool()
        dh_tilde = torch.where(keep_h, 0, dh)
        torch.mul(dh, keep_h, out=dh_prev)
    if flags & variants.ZONEOUT_C:
        keep_c = zoneout[:, 0].bool()
        dc_tilde, dc_carry = torch.where(keep_c, 0, dc), torch.where(keep_c, dc, 0)
    if flags & variants.LAYER_NORM:
        mean_c, rstd_c = ln_saved[:, 4 * H + 1 : 4 * H + 2], ln_saved[:, 4 * H + 2 :]
        y_hat = (c_new - mean_c) * rstd_c
        y = ln_c[0] * y_hat + ln_c[1]
    else:
        y = c_new
    out_act = y if flags & variants.NO_OUTPUT_ACTIVATION else torch.tanh(y)
    d_o = dh_tilde * out_act
    dy = dh_tilde * o
    if not flags & variants.NO_OUTPUT_ACTIVATION:
        dy = dy * (1 - out_act * out_act)
    if flags & variants.LAYER_NORM:
        dc_tilde = dc_tilde + _layer_norm_backward(dy, ln_c[0], y_hat, rstd_c)
        torch.stack([dy * y_hat, dy], dim=1, out=d_ln_c)
    else:
        dc_tilde = dc_tilde + dy
    da_o = torch.zeros_like(o) if flags & variants.NO_OUTPUT_GATE else d_o * o * (1 - o)
    if flags & variants.PEEPHOLES:
        dc_tilde = dc_tilde + peephole[2] * da_o
    d_i, d_f, d_g = dc_tilde * g, dc_tilde * c_prev, dc_tilde * i
    d_c_prev = dc_tilde * f
    if flags & variants.CIFG:
        d_i = d_i - d_f  # f = 1 − i
    da_i = torch.zeros_like(i) if flags & variants.NO_INPUT_GATE else d_i * i * (1 - i)
    no_forget = flags & (variants.NO_FORGET_GATE | variants.CIFG)
    da_f = torch.zeros_like(f) if no_forget else d_f * f * (1 - f)
    da_g = d_g if flags & variants.NO_INPUT_ACTIVATION else d_g * (1 - g * g)
    if flags & variants.PEEPHOLES:
        d_c_prev = d_c_prev + peephole[0] * da_i + peephole[1] * da_f
    if dc_carry is not None:
        d_c_prev = d_c_prev + dc_carry
    da = torch.cat([da_i, da_f, da_g, da_o], dim=-1)  # [n, 4H]
    d_pre.copy_(da)
    if flags & variants.LAYER_NORM:
        r_hat, rstd_r = ln_saved[:, : 4 * H], ln_saved[:, 4 * H : 4 * H + 1]
        d_rec.copy_(_layer_norm_backward(da, ln_hh, r_hat, rstd_r))
    dc_prev.copy_(d_c_prev)


def variant_backward_coefficients(
    flags: int, gates: Tensor, c_tilde: Tensor, c_prev: Tensor, peephole: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`backward_coefficients` for a cell variant without layer norm or zoneout, whose step
    backward is then the vanilla one with other coefficients (so the reference backend runs it as
    :func:`gates_backward_from_coefficients_into`, four ops per step):

        dc̃ = dc + dh ⊙ carry,  ∂a_{i,f,g} = dc̃ ⊙ coef_{i,f,g},  ∂a_o = dh ⊙ coef_o,  dc_prev = dc̃ ⊙ keep

    gates [..., 4H] (as used), c_tilde, c_prev [..., H] -> coef [..., 4H], carry [..., H] (o ⊙ A'
    plus the output peephole's p_o ⊙ coef_o), keep [..., H] (f plus the input and forget
    peepholes' p_i ⊙ coef_i + p_f ⊙ coef_f). A = tanh(c̃), or c̃ without output activation."""
    i, f, g, o = gates.chunk(4, dim=-1)
    coef = torch.empty_like(gates)
    coef_i, coef_f, coef_g, coef_o = coef.chunk(4, dim=-1)
    no_act = flags & variants.NO_OUTPUT_ACTIVATION
    out_act = c_tilde if no_act else tanh_into(c_tilde, out=torch.empty_like(c_tilde))
    if flags & variants.NO_OUTPUT_GATE:
        coef_o.zero_()
    else:
        torch.addcmul(o, o, o, value=-1, out=coef_o).mul_(out_act)  # A ⊙ σ'(o)
    carry = o.clone() if no_act else torch.sub(o, out_act.square().mul_(o))  # o ⊙ (1 − A²)
    if flags & variants.NO_INPUT_GATE:
        coef_i.zero_()
    else:
        through_i = g - c_prev if flags & variants.CIFG else g  # f = 1 − i: i also moves f
        torch.addcmul(i, i, i, value=-1, out=coef_i).mul_(through_i)
    if flags & (variants.NO_FORGET_GATE | variants.CIFG):
        coef_f.zero_()
    else:
        torch.addcmul(f, f, f, value=-1, out=coef_f).mul_(c_prev)
    if flags & variants.NO_INPUT_ACTIVATION:
        coef_g.copy_(i)
    else:
        torch.sub(i, torch.mul(g, g, out=coef_g).mul_(i), out=coef_g)  # i ⊙ (1 − g²)
    keep = f
    if flags & variants.PEEPHOLES:
        carry.addcmul_(peephole[2], coef_o)
        keep = torch.addcmul(f, peephole[0], coef_i).addcmul_(peephole[1], coef_f)
    return coef, carry, keep
