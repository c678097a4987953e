"""The LSTM gate math in plain PyTorch with its backward written out: the `reference` backend.

Same signatures as the Triton launchers in `triton_gates.py`: inputs are read, outputs are written
into buffers the caller owns, so the layer loop in `layer.py` drives either one.

B: batch  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import torch
from torch import Tensor


def gates_forward_into(pre: Tensor, c_prev: Tensor, gates: Tensor, c: Tensor, h: Tensor) -> None:
    """pre [B, 4H], c_prev [B, H] -> gates [B, 4H] (activated i, f, g, o), c [B, H], h [B, H].

    Math in the dtype of ``gates`` and ``c`` (fp32, or fp64 for fp64 inputs), cast on store to ``h``.
    """
    H = c.shape[-1]
    torch.sigmoid(pre.to(gates.dtype), out=gates)
    torch.tanh(pre[:, 2 * H : 3 * H].to(gates.dtype), out=gates[:, 2 * H : 3 * H])
    i, f, g, o = gates.split(H, dim=1)
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, g)  # c = f * c_prev + i * g
    h.copy_(o * torch.tanh(c))


def gates_backward_into(
    dh: Tensor,
    dout: Tensor | None,
    dc: Tensor,
    gates: Tensor,
    c: Tensor,
    c_prev: Tensor,
    dpre: Tensor,
    dc_prev: Tensor,
) -> None:
    """Gradients through one step's gate math.

    dh [B, H] (+ dout [B, H] when given) is ∂L/∂h_t, dc [B, H] is ∂L/∂c_t from step t+1;
    writes dpre [B, 4H] = ∂L/∂(i, f, g, o pre-activations) and dc_prev [B, H] = ∂L/∂c_{t−1}.
    ``dc_prev`` may be ``dc`` itself: every read happens before the write.
    """
    H = c.shape[-1]
    i, f, g, o = gates.split(H, dim=1)
    dh = dh.to(c.dtype) if dout is None else dh.to(c.dtype) + dout
    tanh_c = torch.tanh(c)
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)  # h = o·tanh(c)
    d_i = dc_total * g * i * (1 - i)  # σ' = σ(1 − σ)
    d_f = dc_total * c_prev * f * (1 - f)
    d_g = dc_total * i * (1 - g * g)  # tanh' = 1 − tanh²
    d_o = dh * tanh_c * o * (1 - o)
    if dpre.dtype == c.dtype:
        torch.cat([d_i, d_f, d_g, d_o], dim=1, out=dpre)
    else:  # low-precision inputs: math in fp32, cast on store
        dpre.copy_(torch.cat([d_i, d_f, d_g, d_o], dim=1))
    torch.mul(dc_total, f, out=dc_prev)
