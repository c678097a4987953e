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
