"""The layer op under torch.func transforms, forward-mode AD and double backward.

The registered op pair (`layer.py`) has a fused, hand-written backward: right for reverse mode,
but a transform that needs anything else gets from it either an error or, worse, a silent zero
(torch.func.jvp through an opaque op with no forward-mode formula returned zero tangents). So
whenever a transform or a forward-mode dual level is active, the layer runs this path instead: the
same function written in differentiable PyTorch ops, one step at a time from `naive.py`'s cell
(the oracle's equations), which every transform differentiates correctly, vmap included. Slower,
and recorded as ``last_backend == "composite"`` by the modules.

Where only reverse-mode transforms and vmap are active (torch.func.grad, vjp, jacrev, and
per-sample gradients, vmap(grad(...))), the vanilla cell runs :class:`VanillaLayer` instead: an
autograd.Function with the explicit backward of the fused op in functional ops, which vmap
batches by itself. Its weight gradients are one product over all steps after the reverse loop, so
per-sample gradients cost one batched product, not one accumulation per step.

Double backward (``create_graph=True``) is decided only after the forward has run on the op: its
registered backward then recomputes the layer here and differentiates that, keeping the graph.

B: batch  T: time  P: proj_size or H  H: hidden size
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from . import naive
from .variants import CellVariant

COMPOSITE = "composite"  # the name of this path in last_backend


def transform_active(tensors) -> bool:
    """Whether a torch.func transform (jvp, vmap, grad, jacrev, ...) is running, or a forward-mode
    dual level is open and one of ``tensors`` carries a tangent."""
    if torch.compiler.is_compiling():
        return False  # Dynamo traces the op; transforms of compiled code are not supported here
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if forward_ad._current_level < 0:
        return False
    return any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def reverse_mode_only() -> bool:
    """Whether every active torch.func transform is grad/vjp or vmap (no jvp: the explicit
    backward of :class:`VanillaLayer` serves them)."""
    return all(
        i.key() in (TransformType.Grad, TransformType.Vmap) for i in retrieve_all_functorch_interpreters()
    )


class VanillaLayer(torch.autograd.Function):
    """The vanilla cell over a sequence, in functional ops with its explicit backward (few ops per
    step: under vmap each op has a cost of its own).

    gx [T, B, 4H], h0 [B, P], c0 [B, H], w_hh [4H, P], w_hr [P, H] or None, advanced [T, B, 1]
    bool or None (packed rows) -> out [T, B, P] (zero where a row did not advance), h_n [B, P],
    c_n [B, H], and for the backward hs [T, B, P] (h after each step), cs [T + 1, B, H], gates
    [T, B, 4H], h_raw = o ⊙ tanh(c̃) and tanh(c̃) [T, B, H]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gx, h0, c0, w_hh, w_hr, advanced):
        H = c0.shape[-1]
        # tanh(x) = 2σ(2x) − 1: one sigmoid activates all four gates
        scale = torch.ones(4 * H, dtype=gx.dtype, device=gx.device)
        scale[2 * H : 3 * H] = 2
        shift = scale - 1  # [4H]: 1 on g, else 0
        h, c = h0, c0
        outs, hs, cs, gates, h_raws, tanh_cs = [], [], [c0], [], [], []
        for k in range(gx.shape[0]):
            act = torch.addmm(gx[k], h, w_hh.T).mul_(scale).sigmoid_().mul_(scale).sub_(shift)  # [B, 4H]
            i, f, g, o = act.chunk(4, dim=-1)
            c_new = torch.addcmul(f * c, i, g)
            tanh_c = c_new.tanh()
            h_raw = o * tanh_c  # [B, H]
            h_new = h_raw if w_hr is None else h_raw @ w_hr.T  # [B, P]
            if advanced is not None:
                c_new, h_new = torch.where(advanced[k], c_new, c), torch.where(advanced[k], h_new, h)
                outs.append(torch.where(advanced[k], h_new, 0))
            else:
                outs.append(h_new)
            h, c = h_new, c_new
            hs.append(h)
            cs.append(c)
            gates.append(act)
            h_raws.append(h_raw)
            tanh_cs.append(tanh_c)
        saved = (
            torch.stack(hs),
            torch.stack(cs),
            torch.stack(gates),
            torch.stack(h_raws),
            torch.stack(tanh_cs),
        )
        return torch.stack(outs), h, c, *saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        _gx, h0, _c0, w_hh, w_hr, advanced = inputs
        _, _, _, hs, cs, gates, h_raws, tanh_cs = output
        ctx.mark_non_differentiable(hs, cs, gates, h_raws, tanh_cs)
        ctx.save_for_backward(h0, w_hh, w_hr, advanced, hs, cs, gates, h_raws, tanh_cs)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, *_saved_grads):
        h0, w_hh, w_hr, advanced, hs, cs, gates, h_raws, tanh_cs = ctx.saved_tensors
        T = gates.shape[0]
        # every step's local derivatives at once, before the loop: the loop is then linear in (∂h, ∂c)
        i, f, g, o = gates.chunk(4, dim=-1)  # [T, B, H] each
        carry = o * (1 - tanh_cs * tanh_cs)  # ∂c̃ per unit of ∂(o ⊙ tanh c̃)
        coef_o = tanh_cs * o * (1 - o)
        coef_ifg = torch.stack(
            [g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g)], dim=-2
        )  # [T, B, 3, H]
        if advanced is not None:
            d_out = torch.where(advanced, d_out, 0)  # rows that did not advance output constants
        dh, dc = d_hn, d_cn
        d_pres, d_hs = [None] * T, [None] * T
        for k in reversed(range(T)):
            m = None if advanced is None else advanced[k]  # [B, 1]
            dh = dh + d_out[k]  # ∂L/∂h_k
            d_hs[k] = dh if m is None else torch.where(m, dh, 0)
            d_raw = dh if w_hr is None else dh @ w_hr  # [B, H]
            dc_total = torch.addcmul(dc, d_raw, carry[k])
            d_pre = torch.cat([(dc_total.unsqueeze(-2) * coef_ifg[k]).flatten(-2), d_raw * coef_o[k]], dim=-1)
            dc_prev = dc_total * f[k]
            dh_prev = d_pre @ w_hh  # [B, P]
            if m is not None:  # rows that did not advance pass their gradients straight through
                d_pre = torch.where(m, d_pre, 0)
                dc_prev, dh_prev = torch.where(m, dc_prev, dc), torch.where(m, dh_prev, dh)
            d_pres[k], dh, dc = d_pre, dh_prev, dc_prev
        d_pre = torch.stack(d_pres)  # [T, B, 4H]
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])  # [T, B, P]
        d_w_hh = d_pre.flatten(0, 1).T @ h_prev.flatten(0, 1)  # [4H, P]: one product over all steps
        d_w_hr = None
        if w_hr is not None:
            d_w_hr = torch.stack(d_hs).flatten(0, 1).T @ h_raws.flatten(0, 1)  # [P, H]
        return d_pre, dh, dc, d_w_hh, d_w_hr, None


def _composite(a) -> tuple[Tensor, Tensor, Tensor]:
    """The layer op's (hs [T + 1, B, P], out_packed [T, B, P] or [0], c_n [B, H]) for its inputs
    ``a`` (`layer.LayerInputs`), in differentiable ops (both directions of a layer: each direction's
    own call, stacked)."""
    from .layer import both_directions, one_direction

    if both_directions(a):
        (hs0, out0, c0), (hs1, out1, c1) = (_composite(one_direction(a, d)) for d in (0, 1))
        out_packed = out0 if a.batch_sizes is None else torch.stack([out0, out1])
        return torch.stack([hs0, hs1]), out_packed, torch.stack([c0, c1])
    gx = a.x if a.w_ih is None else naive.input_projection_naive(a.x, a.w_ih, a.bias)  # [T, B, 4H]
    T, B = gx.shape[:2]
    sizes = [B] * T if a.batch_sizes is None else a.batch_sizes.tolist()
    variant = CellVariant.from_flags(a.flags)
    ln_c = None if a.ln_c is None else tuple(a.ln_c.unbind(0))
    h, c = a.h0, a.c0
    hs, outs = [h], []
    for k, n in enumerate(sizes):
        h_new, c_new = naive.lstm_cell_naive(
            gx[k, :n], h[:n], c[:n], a.w_hh, a.w_hr, variant=variant, peephole=a.peephole, ln_hh=a.ln_hh,
            ln_c=ln_c, zoneout=None if a.zoneout is None else a.zoneout[k, :n],
            dropout=None if a.dropout is None else a.dropout[:n],
        )  # fmt: skip
        outs.append(h_new if n == B else torch.cat([h_new, torch.zeros_like(h[n:])]))
        if n < B:  # rows that do not advance carry their state and output zeros
            h_new, c_new = torch.cat([h_new, h[n:]]), torch.cat([c_new, c[n:]])
        h, c = h_new, c_new
        hs.append(h)
    out_packed = gx.new_empty(0) if a.batch_sizes is None else torch.stack(outs)
    return torch.stack(hs), out_packed, c


def layer_forward_differentiable(a) -> tuple[Tensor, Tensor, Tensor]:
    """out [T, B, P], h_n [B, P], c_n [B, H], as the op's public functions return them (both
    directions of a layer: each with a leading [2])."""
    from .layer import both_directions, one_direction

    if both_directions(a):
        per_direction = (layer_forward_differentiable(one_direction(a, d)) for d in (0, 1))
        return tuple(torch.stack(pair) for pair in zip(*per_direction, strict=True))
    if a.flags == 0 and forward_ad._current_level < 0 and reverse_mode_only():
        gx = a.x if a.w_ih is None else naive.input_projection_naive(a.x, a.w_ih, a.bias)  # [T, B, 4H]
        advanced = None
        if a.batch_sizes is not None:
            advanced = (torch.arange(gx.shape[1]) < a.batch_sizes.unsqueeze(1)).unsqueeze(2).to(gx.device)
        out, h_n, c_n, *_ = VanillaLayer.apply(gx, a.h0, a.c0, a.w_hh, a.w_hr, advanced)
        return out, h_n, c_n
    hs, out_packed, c_n = _composite(a)
    return (hs[1:] if a.batch_sizes is None else out_packed), hs[-1], c_n


def layer_backward_differentiable(a, needs_input_grad, grad_outputs) -> list[Tensor | None]:
    """The op's input gradients (one per op input, None where none is needed), differentiable with
    respect to the inputs and the output gradients: the backward under ``create_graph=True``."""
    d_hs, d_out_packed, d_cn = grad_outputs
    fields = type(a)._fields
    wanted_inputs = [
        (i, getattr(a, name))
        for i, name in enumerate(fields)
        if needs_input_grad[i]
        and isinstance(getattr(a, name), Tensor)
        and getattr(a, name).is_floating_point()
    ]
    with torch.enable_grad():
        hs, out_packed, c_n = _composite(a)
    outputs, output_grads = [hs, c_n], [d_hs, d_cn.to(c_n.dtype)]
    if a.batch_sizes is not None:
        outputs.append(out_packed)
        output_grads.append(d_out_packed)
    grads = torch.autograd.grad(
        outputs, [t for _, t in wanted_inputs], output_grads, create_graph=True, allow_unused=True
    )
    result: list[Tensor | None] = [None] * len(fields)
    for (i, t), g in zip(wanted_inputs, grads, strict=True):
        result[i] = torch.zeros_like(t) if g is None else g
    return result
