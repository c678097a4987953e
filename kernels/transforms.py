"""The layer op under torch.func transforms, forward-mode AD and double backward.

The registered op pair (`layer.py`) has a fused, hand-written backward: right for reverse mode,
but a transform that needs anything else gets from it either an error or, worse, a silent zero
(torch.func.jvp through an opaque op with no forward-mode formula returned zero tangents). So
whenever a transform or a forward-mode dual level is active, the layer runs this path instead: the
same function written in differentiable PyTorch ops, one step at a time from `naive.py`'s cell
(the oracle's equations), which every transform differentiates correctly, vmap included. Slower,
and recorded as ``last_backend == "composite"`` by the modules.

Double backward (``create_graph=True``) is decided only after the forward has run on the op: its
registered backward then recomputes the layer here and differentiates that, keeping the graph.

B: batch  T: time  P: proj_size or H  H: hidden size
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

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


def _composite(a) -> tuple[Tensor, Tensor, Tensor]:
    """The layer op's (hs [T + 1, B, P], out_packed [T, B, P] or [0], c_n [B, H]) for its inputs
    ``a`` (`layer.LayerInputs`), in differentiable ops."""
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
    """out [T, B, P], h_n [B, P], c_n [B, H], as the op's public functions return them."""
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
