"""The textbook LSTM, differentiated by autograd: the oracle every other implementation is tested against.

Every cell variant of `variants.py` is written here as its equations read, one step at a time.

B: batch  T: time  I: input size  H: hidden size  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .variants import LN_EPS, CellVariant

VANILLA = CellVariant()


def layer_norm_naive(v: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """γ ⊙ (v − mean(v)) / sqrt(var(v) + ε) + β over the last dimension, biased variance."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = weight * (v - mean) / torch.sqrt(var + LN_EPS)
    return out if bias is None else out + bias


def lstm_step_naive(
    gx: Tensor,
    r: Tensor,
    h: Tensor,
    c: Tensor,
    w_hr: Tensor | None = None,
    *,
    variant: CellVariant = VANILLA,
    peephole: Tensor | None = None,
    ln_hh: Tensor | None = None,
    ln_c: tuple[Tensor, Tensor] | None = None,
    zoneout: Tensor | None = None,
) -> dict[str, Tensor]:
    """One LSTM step from the recurrent product r_t = d_t·W_hhᵀ on (what the fused step kernels
    compute, whose gradient with respect to r_t the tests need): gx [B, 4H], r [B, 4H], h [B, P],
    c [B, H], the variant's tensors as :func:`lstm_cell_naive`. Returns {"h" [B, P], "c" [B, H],
    "gates" [B, 4H] (i, f, g, o as used), "c_new" [B, H] (c̃ before zoneout), "h_raw" [B, H]
    (o ⊙ tanh(y) before zoneout and projection), and with layer norm "ln_saved" [B, 4H + 3]
    (r̂, rstd_r, mean_c, rstd_c)}."""
    saved = {}
    if variant.layer_norm:
        mean_r = r.mean(-1, keepdim=True)
        rstd_r = 1 / torch.sqrt(((r - mean_r) ** 2).mean(-1, keepdim=True) + LN_EPS)
        r_hat = (r - mean_r) * rstd_r
        r = ln_hh * r_hat
    a_i, a_f, a_g, a_o = (gx + r).chunk(4, dim=-1)
    if variant.peepholes:
        a_i = a_i + peephole[0] * c
        a_f = a_f + peephole[1] * c
    one = torch.ones_like(c)
    i = torch.sigmoid(a_i) if variant.input_gate else one
    f = torch.sigmoid(a_f) if variant.forget_gate else one
    if variant.cifg:
        f = 1 - i
    g = torch.tanh(a_g) if variant.input_activation else a_g
    c_new = f * c + i * g  # [B, H]
    if variant.peepholes:
        a_o = a_o + peephole[2] * c_new
    o = torch.sigmoid(a_o) if variant.output_gate else one
    y = c_new
    if variant.layer_norm:
        mean_c = c_new.mean(-1, keepdim=True)
        rstd_c = 1 / torch.sqrt(((c_new - mean_c) ** 2).mean(-1, keepdim=True) + LN_EPS)
        y = ln_c[0] * (c_new - mean_c) * rstd_c + ln_c[1]
        saved["ln_saved"] = torch.cat([r_hat, rstd_r, mean_c, rstd_c], dim=-1)
    h_raw = o * (torch.tanh(y) if variant.output_activation else y)  # [B, H]
    h_new, c_next = h_raw, c_new
    if zoneout is not None:
        z_c, z_h = zoneout.to(c.dtype).unbind(1)
        c_next = z_c * c + (1 - z_c) * c_new
        if w_hr is None:  # with a projection h_{t−1} [B, P] and h̃ [B, H] differ: only z^c applies
            h_new = z_h * h + (1 - z_h) * h_raw
    if w_hr is not None:
        h_new = h_new @ w_hr.T  # [B, P]
    gates = torch.cat([i, f, g, o], dim=-1)
    return {"h": h_new, "c": c_next, "gates": gates, "c_new": c_new, "h_raw": h_raw} | saved


def lstm_cell_naive(
    gx: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    *,
    variant: CellVariant = VANILLA,
    peephole: Tensor | None = None,
    ln_hh: Tensor | None = None,
    ln_c: tuple[Tensor, Tensor] | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step. ``gx`` = W_ih·x_t + b_ih + b_hh, already computed for this step.

    i_t = σ(W_i·[h_{t−1}, x_t] + b_i)   input gate: how much of the candidate to write
    f_t = σ(W_f·[h_{t−1}, x_t] + b_f)   forget gate: how much of the old cell state to keep
    g_t = tanh(W_g·[h_{t−1}, x_t] + b_g) candidate cell state, normalised to (−1, 1)
    o_t = σ(W_o·[h_{t−1}, x_t] + b_o)   output gate: how much of the cell state to expose
    c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t      long-term memory
    h_t = o_t ⊙ tanh(c_t)                short-term memory (then W_hr·h_t with a projection)

    A variant changes these as `variants.py` writes out. Its tensors: ``peephole`` [3, H]
    (p_i, p_f, p_o), ``ln_hh`` [4H] (γ_hh), ``ln_c`` (γ_c [H], β_c [H]), ``zoneout`` [B, 2, H] this
    step's masks for c and h (1: keep the previous value; with ``w_hr`` only c's), ``dropout`` [B, P]
    the recurrent dropout mask (0 or 1/(1 − p)). A mask left out is not applied.
    Returns h_t [B, P], c_t [B, H]; :func:`lstm_step_naive` is the same step from r_t on.
    """
    d = h if dropout is None else h * dropout
    r = d @ w_hh.T  # [B, 4H]
    step = lstm_step_naive(
        gx, r, h, c, w_hr, variant=variant, peephole=peephole, ln_hh=ln_hh, ln_c=ln_c, zoneout=zoneout
    )
    return step["h"], step["c"]


def lstm_layer_naive(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    batch_sizes: list[int] | None = None,
    *,
    variant: CellVariant = VANILLA,
    peephole: Tensor | None = None,
    ln_hh: Tensor | None = None,
    ln_c: tuple[Tensor, Tensor] | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer and direction over a sequence, same contract as :func:`lstmlab.kernels.lstm_layer`.

    gx [T, B, 4H], h0 [B, P], c0 [B, H]; at step k only the first ``batch_sizes[k]`` rows advance,
    the others keep their state and output zeros (packed sequences). A variant's tensors are those
    of :func:`lstm_cell_naive`, except ``zoneout`` [T, B, 2, H]: every step's masks.
    Returns out [T, B, P], h_n [B, P], c_n [B, H].
    """
    h, c = h0, c0
    outputs = []
    for k in range(gx.shape[0]):
        n = gx.shape[1] if batch_sizes is None else batch_sizes[k]
        h_new, c_new = lstm_cell_naive(
            gx[k, :n],
            h[:n],
            c[:n],
            w_hh,
            w_hr,
            variant=variant,
            peephole=peephole,
            ln_hh=ln_hh,
            ln_c=ln_c,
            zoneout=None if zoneout is None else zoneout[k, :n],
            dropout=None if dropout is None else dropout[:n],
        )
        h = torch.cat([h_new, h[n:]])
        c = torch.cat([c_new, c[n:]])
        outputs.append(torch.cat([h_new, torch.zeros_like(h[n:])]))
    return torch.stack(outputs), h, c


def input_projection_naive(
    x: Tensor, w_ih: Tensor, bias: Tensor | None, variant: CellVariant = VANILLA, ln_ih: Tensor | None = None
) -> Tensor:
    """gx [T, B, 4H] for a layer: x·W_ihᵀ + b, or γ_ih ⊙ LN(x·W_ihᵀ) + b with layer norm."""
    gx = x @ w_ih.T
    if variant.layer_norm:
        gx = layer_norm_naive(gx, ln_ih)
    return gx if bias is None else gx + bias


__all__ = [
    "input_projection_naive",
    "layer_norm_naive",
    "lstm_cell_naive",
    "lstm_layer_naive",
    "lstm_step_naive",
]
