"""The textbook LSTM, differentiated by autograd: the oracle every other implementation is tested against.

B: batch  T: time  I: input size  H: hidden size  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import torch
from torch import Tensor


def lstm_cell_naive(
    gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, w_hr: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One LSTM step. ``gx`` = W_ih·x_t + b_ih + b_hh, already computed for this step.

    i_t = σ(W_i·[h_{t−1}, x_t] + b_i)   input gate: how much of the candidate to write
    f_t = σ(W_f·[h_{t−1}, x_t] + b_f)   forget gate: how much of the old cell state to keep
    g_t = tanh(W_g·[h_{t−1}, x_t] + b_g) candidate cell state, normalised to (−1, 1)
    o_t = σ(W_o·[h_{t−1}, x_t] + b_o)   output gate: how much of the cell state to expose
    c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t      long-term memory
    h_t = o_t ⊙ tanh(c_t)                short-term memory (then W_hr·h_t with a projection)
    """
    gates = gx + h @ w_hh.T  # [B, 4H]
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g  # [B, H]
    h = o * torch.tanh(c)  # [B, H]
    if w_hr is not None:
        h = h @ w_hr.T  # [B, P]
    return h, c


def lstm_layer_naive(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    batch_sizes: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer and direction over a sequence, same contract as :func:`lstmlab.kernels.lstm_layer`.

    gx [T, B, 4H], h0 [B, P], c0 [B, H]; at step k only the first ``batch_sizes[k]`` rows advance,
    the others keep their state and output zeros (packed sequences).
    Returns out [T, B, P], h_n [B, P], c_n [B, H].
    """
    h, c = h0, c0
    outputs = []
    for k in range(gx.shape[0]):
        n = gx.shape[1] if batch_sizes is None else batch_sizes[k]
        h_new, c_new = lstm_cell_naive(gx[k, :n], h[:n], c[:n], w_hh, w_hr)
        h = torch.cat([h_new, h[n:]])
        c = torch.cat([c_new, c[n:]])
        outputs.append(torch.cat([h_new, torch.zeros_like(h[n:])]))
    return torch.stack(outputs), h, c
