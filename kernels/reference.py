"""The LSTM gate math in plain PyTorch with its backward written out: the `reference` backend.

Outputs are written into buffers the caller owns, as the Triton launchers in `triton_gates.py` do,
so the layer loop in `layer.py` drives either one. The backward is split in two: what does not
depend on the incoming gradients is computed for all steps at once before the time loop
(`backward_coefficients`), leaving five small ops per step inside it (`gates_backward_into`).

B: batch  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import torch
from torch import Tensor


def gates_forward_into(pre: Tensor, c_prev: Tensor, gates: Tensor, c: Tensor, h: Tensor) -> None:
    """pre [B, 4H], c_prev [B, H] -> gates [B, 4H] (activated i, f, g, o), c [B, H], h [B, H].

    Math in the dtype of ``gates`` and ``c`` (fp32, or fp64 for fp64 inputs), cast on store.
    """
    H = c.shape[-1]
    torch.sigmoid(pre.to(gates.dtype), out=gates)
    torch.tanh(pre[:, 2 * H : 3 * H].to(gates.dtype), out=gates[:, 2 * H : 3 * H])
    i, f, g, o = gates.chunk(4, dim=1)  # Tensor.split is a Python wrapper: slower per step
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, g)  # c = f ⊙ c_prev + i ⊙ g
    torch.mul(o, torch.tanh(c), out=h)  # h = o ⊙ tanh(c)


def backward_coefficients(gates: Tensor, c: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    """Local derivatives of one or many steps: gates [..., 4H], c and c_prev [..., H] ->

    coef [..., 4H]: ∂L/∂(i, f, g pre-activations) per unit of ∂L/∂c_t, and ∂L/∂(o pre-activation)
        per unit of ∂L/∂h_t (σ' = σ(1 − σ), tanh' = 1 − tanh²);
    carry [..., H]: ∂c_t-gradient per unit of ∂L/∂h_t, o ⊙ (1 − tanh²(c_t)).
    """
    i, f, g, o = gates.chunk(4, dim=-1)
    tanh_c = torch.tanh(c)
    coef = torch.cat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], dim=-1)
    return coef, o * (1 - tanh_c * tanh_c)


def gates_backward_into(
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
