"""ONNX export of `LSTM` and `LSTMCell`: what their forward runs while ``torch.onnx.export`` runs.

The modules call :func:`lstm_layers` / :func:`lstm_cell` only when :func:`is_exporting` (their
``# ONNX export hook``); eager, compiled and ``torch.export`` runs never reach the rest of this file.
Each layer becomes one ONNX ``LSTM`` node (both directions in it), so runtimes use their fused
kernels, and the file takes any batch and sequence length. Both exporters get the node through
torch.onnx's own extension points, with nothing for the user to pass:

- ``dynamo=True`` (torch.export, then translation): ``torch.onnx.ops.symbolic_multi_out`` puts the
  node itself in the exported program, and the exporter translates it as it is.
- ``dynamo=False`` (TorchScript tracing): an ``autograd.Function`` whose ``symbolic`` emits the node.

ONNX's ``LSTM`` is ours with the gates stacked i, o, f, c (ours: i, f, g, o), the two biases side by
side (``B`` = [Wb, Rb]), peepholes ``P`` in the order i, o, f, and the output gate's peephole on the
new cell C_t, as ours. CIFG is its ``input_forget``: f = 1 − i. It has no projection, no layer norm
and no gate removal: those cells export as one loop per layer whose body is the cell's equations
(``Scan`` from torch's scan operator with dynamo=True, ``Loop`` from a scripted loop with
dynamo=False). What no graph can hold exactly (training-mode masks, packed input) raises, naming it.

B: batch  T: time  I: input size  H: hidden size  P: proj_size or H  D: directions  L: layers
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # private: torch.onnx.export(dynamo=True) sets its flag for the whole run, whatever the capture
    from torch.onnx._internal.exporter import _flags as _dynamo_exporter_flags
except ImportError:  # a torch that moved it: is_in_onnx_export() alone, still right in the common case
    _dynamo_exporter_flags = None

from lstmlab.kernels.variants import LN_EPS as _LN_EPS

if TYPE_CHECKING:
    from lstmlab.modules import LSTM, LSTMCell

# the cell options ONNX's LSTM node expresses exactly (the last three as eval mode's identity)
_NODE_OPTIONS = ("peepholes", "cifg", "zoneout_c", "zoneout_h", "recurrent_dropout")


def is_exporting() -> bool:
    """Whether ``torch.onnx.export`` is running: the modules' hook condition.

    ``torch.onnx.is_in_onnx_export()`` alone misses one case. The dynamo exporter captures the model
    with ``torch.export`` non-strict first, where it is True, and if that fails, strict, where Dynamo
    folds it to a constant False. That capture would then record lstmlab's registered ops, and the
    user would read a conversion error about them instead of the first capture's error (ours, when
    we raise). The exporter's own flag is a plain global, which Dynamo reads as it is.
    """
    return torch.onnx.is_in_onnx_export() or getattr(_dynamo_exporter_flags, "_is_onnx_exporting", False)


def _to_onnx_gates(w: Tensor) -> Tensor:
    """[4H, ...] in torch's gate order (i, f, g, o) -> ONNX's (i, o, f, c). Slices, not a split:
    the exporters fold slices of weights into constants."""
    H = w.shape[0] // 4
    return torch.cat([w[:H], w[3 * H :], w[H : 3 * H]], dim=0)


def _node_unfit(module: LSTM | LSTMCell) -> dict[str, object]:
    """The module's options that ONNX's LSTM node cannot express ({} for the vanilla, peephole and
    CIFG cells): with any, each layer exports as a loop instead."""
    unfit = {k: v for k, v in module.variant.changed().items() if k not in _NODE_OPTIONS}
    if getattr(module, "proj_size", 0) > 0:
        unfit["proj_size"] = module.proj_size
    return unfit


def _options(options: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _check_exportable(module: LSTM | LSTMCell, packed: bool = False) -> None:
    """Raises for what has no exact ONNX graph, naming the option to change."""
    name = type(module).__name__
    if packed:
        raise RuntimeError(
            f"lstmlab.{name}: a PackedSequence input cannot be exported to ONNX; export the model "
            "with a padded tensor input [T, B, I] instead"
        )
    if module.training:
        v = module.variant
        stochastic = {
            "dropout": getattr(module, "dropout", 0.0) if getattr(module, "num_layers", 1) > 1 else 0.0,
            "zoneout_c": v.zoneout_c,
            "zoneout_h": v.zoneout_h,
            "recurrent_dropout": v.recurrent_dropout,
        }
        on = {k: p for k, p in stochastic.items() if p > 0}
        if on:
            raise RuntimeError(
                f"lstmlab.{name}({_options(on)}) draws random masks in training mode, which an "
                "export would freeze into the graph; call model.eval() before torch.onnx.export (in "
                "eval mode they are the identity and export)"
            )


class _LSTMNode(torch.autograd.Function):
    """ONNX's LSTM node for the TorchScript exporter, which records this Function and calls its
    ``symbolic``. Outputs: Y [T, D, B, H], Y_h [D, B, H], Y_c [D, B, H]."""

    @staticmethod
    def forward(ctx, x, w, r, b, h0, c0, p, hidden_size, direction, input_forget):
        # the tracer needs outputs of the right shapes only: the file computes them, not this (as
        # torch.onnx.ops.symbolic_multi_out does under dynamo=True)
        T, B, D = x.shape[0], x.shape[1], w.shape[0]
        return x.new_zeros(T, D, B, hidden_size), h0.new_zeros(h0.shape), c0.new_zeros(c0.shape)

    @staticmethod
    def symbolic(g, x, w, r, b, h0, c0, p, hidden_size, direction, input_forget):
        def missing():  # an optional input left out
            none = g.op("prim::Constant")
            none.setType(torch._C.OptionalType.ofTensor())
            return none

        inputs = [x, w, r, missing() if b is None else b, missing(), h0, c0]
        if p is not None:
            inputs.append(p)
        return g.op(
            "LSTM",
            *inputs,
            hidden_size_i=hidden_size,
            direction_s=direction,
            input_forget_i=int(input_forget),
            outputs=3,
        )


def _node_layer(
    module: LSTM | LSTMCell, x: Tensor, suffixes: list[str], h0: Tensor, c0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, all its directions, as one ONNX LSTM node in the graph the running exporter builds:
    x [T, B, I], h0 [D, B, H], c0 [D, B, H] -> Y [T, D, B, H], Y_h [D, B, H], Y_c [D, B, H]."""
    T, B, D, H = x.shape[0], x.shape[1], len(suffixes), module.hidden_size  # H: an int, not a traced size
    w, r, b, p = (None if t is None else t.to(x.dtype) for t in _node_weights(module, suffixes))
    direction = "bidirectional" if D == 2 else "forward"
    if torch.jit.is_tracing():  # dynamo=False: the TorchScript tracer records the Function
        return _LSTMNode.apply(x, w, r, b, h0, c0, p, H, direction, module.variant.cifg)
    inputs = [x, w, r, b, None, h0, c0, p]
    while inputs[-1] is None:  # ONNX leaves trailing optional inputs out
        inputs.pop()
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        inputs,
        {"hidden_size": H, "direction": direction, "input_forget": int(module.variant.cifg)},
        dtypes=[x.dtype] * 3,
        shapes=[[T, D, B, H], [D, B, H], [D, B, H]],
    )
    return y, y_h, y_c


def _node_weights(
    module: LSTM | LSTMCell, suffixes: list[str]
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The node's W [D, 4H, I], R [D, 4H, H], B [D, 8H] or None, P [D, 3H] or None from the
    parameters of one layer, one direction per suffix ("" for LSTMCell, "_l0", "_l0_reverse", ...)."""

    def stacked(name: str, reorder) -> Tensor:
        return torch.stack([reorder(getattr(module, f"{name}{s}")) for s in suffixes])

    w = stacked("weight_ih", _to_onnx_gates)
    r = stacked("weight_hh", _to_onnx_gates)
    b = None
    if module.bias:
        b = torch.cat([stacked("bias_ih", _to_onnx_gates), stacked("bias_hh", _to_onnx_gates)], dim=1)
    p = None
    if module.variant.peepholes:  # ours p_i, p_f, p_o -> ONNX's p_i, p_o, p_f
        p = stacked("weight_peephole", lambda q: q[[0, 2, 1]].reshape(-1))
    return w, r, b, p


def _cell_step(
    gx_t: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c_w: Tensor | None,
    ln_c_b: Tensor | None,
    cifg: bool,
    input_gate: bool,
    forget_gate: bool,
    output_gate: bool,
    input_activation: bool,
    output_activation: bool,
    hidden_size: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """One step of any cell variant (`kernels/variants.py`'s equations, eval mode), all directions
    at once: gx_t [D, B, 4H], h [D, B, P], c [D, B, H] -> h [D, B, P], c [D, B, H]; weights per
    direction: w_hh [D, 4H, P], w_hr [D, P, H], peephole [D, 3, H], ln_hh [D, 4H], ln_c_* [D, H].
    Written for TorchScript too: the TorchScript exporter runs it inside a scripted loop."""
    r = torch.bmm(h, w_hh.transpose(1, 2))  # [D, B, 4H]
    if ln_hh is not None:
        r = F.layer_norm(r, [4 * hidden_size], None, None, eps) * ln_hh.unsqueeze(1)
    a_i, a_f, a_g, a_o = (gx_t + r).chunk(4, dim=-1)
    if peephole is not None:
        a_i = a_i + peephole[:, 0].unsqueeze(1) * c
        a_f = a_f + peephole[:, 1].unsqueeze(1) * c
    # a removed gate is 1: its product is left out (no tensor of ones, whose size a trace would fix)
    i = torch.sigmoid(a_i)
    g = torch.tanh(a_g) if input_activation else a_g
    ig = i * g if input_gate else g
    if cifg:
        fc = (1 - i) * c
    elif forget_gate:
        fc = torch.sigmoid(a_f) * c
    else:
        fc = c
    c = fc + ig
    if peephole is not None:
        a_o = a_o + peephole[:, 2].unsqueeze(1) * c  # the output gate's peephole sees the new cell
    y = c
    if ln_c_w is not None and ln_c_b is not None:
        y = F.layer_norm(c, [hidden_size], None, None, eps) * ln_c_w.unsqueeze(1) + ln_c_b.unsqueeze(1)
    y = torch.tanh(y) if output_activation else y
    h = torch.sigmoid(a_o) * y if output_gate else y
    if w_hr is not None:
        h = torch.bmm(h, w_hr.transpose(1, 2))  # [D, B, P]
    return h, c


def _cell_loop(
    gx: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c_w: Tensor | None,
    ln_c_b: Tensor | None,
    cifg: bool,
    input_gate: bool,
    forget_gate: bool,
    output_gate: bool,
    input_activation: bool,
    output_activation: bool,
    hidden_size: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """gx [T, D, B, 4H] -> out [T, D, B, P], h [D, B, P], c [D, B, H]: the time loop that the
    TorchScript exporter turns into an ONNX Loop once scripted (traced, it would unroll to the
    export's T)."""
    outs: list[Tensor] = []
    for t in range(gx.shape[0]):
        h, c = _cell_step(
            gx[t], h, c, w_hh, w_hr, peephole, ln_hh, ln_c_w, ln_c_b,
            cifg, input_gate, forget_gate, output_gate, input_activation, output_activation, hidden_size, eps,
        )  # fmt: skip
        outs.append(h)
    return torch.stack(outs), h, c


@functools.cache
def _scripted_cell_loop():
    # scripted on first use: importing lstmlab compiles nothing
    return torch.jit.script(_cell_loop)


def _loop_layer(
    module: LSTM | LSTMCell, x: Tensor, suffixes: list[str], h0: Tensor, c0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, all its directions, as one loop over time, for the cells the LSTM node cannot
    express: x [T, B, I], h0 [D, B, P], c0 [D, B, H] -> out [T, D, B, P], h_n [D, B, P],
    c_n [D, B, H]. An ONNX ``Scan`` under dynamo=True (torch's scan operator), an ONNX ``Loop``
    under dynamo=False (a scripted loop). The reverse direction reads the time-flipped input."""
    dtype, H, v = x.dtype, module.hidden_size, module.variant

    def stacked(name: str) -> Tensor | None:  # [D, ...]: one slice per direction
        ts = [getattr(module, f"{name}{s}", None) for s in suffixes]
        return None if ts[0] is None else torch.stack(ts).to(dtype)

    gxs = []
    for d, s in enumerate(suffixes):
        w_ih = getattr(module, f"weight_ih{s}").to(dtype)
        bias = None if not module.bias else (getattr(module, f"bias_ih{s}") + getattr(module, f"bias_hh{s}"))
        bias = None if bias is None else bias.to(dtype)
        if v.layer_norm:  # γ_ih ⊙ LN(x·W_ihᵀ) + b
            ln_ih = getattr(module, f"weight_ln_ih{s}").to(dtype)
            gx = F.layer_norm(F.linear(x, w_ih), [4 * H], ln_ih, bias, _LN_EPS)
        else:
            gx = F.linear(x, w_ih, bias)  # [T, B, 4H]
        gxs.append(gx.flip(0) if d == 1 else gx)
    gx = torch.stack(gxs, dim=1)  # [T, D, B, 4H]
    weights = (
        stacked("weight_hh"), stacked("weight_hr"), stacked("weight_peephole"),
        stacked("weight_ln_hh"), stacked("weight_ln_c"), stacked("bias_ln_c"),
    )  # fmt: skip
    flags = (v.cifg, v.input_gate, v.forget_gate, v.output_gate, v.input_activation, v.output_activation)
    flags += (H, _LN_EPS)
    if torch.jit.is_tracing():  # dynamo=False
        out, h, c = _scripted_cell_loop()(gx, h0, c0, *weights, *flags)
    else:
        # detached: with inputs that require grad, scan traces its autograd form, whose saved sizes
        # break the export's tracing (and an ONNX file has no backward)
        gx, h0, c0 = gx.detach(), h0.detach(), c0.detach()
        weights = tuple(None if w is None else w.detach() for w in weights)

        def step(carry: tuple[Tensor, Tensor], gx_t: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
            h, c = _cell_step(gx_t, *carry, *weights, *flags)
            # scan's outputs may not alias one another: without gate and activations on the
            # output, h is c
            return (h, c.clone()), h.clone()

        from torch._higher_order_ops.scan import scan  # a prototype operator: imported only to export

        (h, c), out = scan(step, (h0, c0), gx)
    if len(suffixes) == 2:  # the reverse direction's outputs back in input order
        out = torch.stack([out[:, 0], out[:, 1].flip(0)], dim=1)
    return out, h, c


def lstm_layers(
    module: LSTM, x: Tensor, h0: Tensor, c0: Tensor, batch_sizes: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """`LSTM.forward` under ONNX export: per layer, one LSTM node, or one loop for the cells the node
    cannot express.

    x [T, B, I] in the compute dtype, h0 [L·D, B, P], c0 [L·D, B, H], batch_sizes of a packed
    input (raises) or None -> output [T, B, D·P], h_n [L·D, B, P], c_n [L·D, B, H].
    """
    _check_exportable(module, packed=batch_sizes is not None)
    layer_fn = _loop_layer if _node_unfit(module) else _node_layer
    D = 2 if module.bidirectional else 1
    layer_input, h_n, c_n = x, [], []
    for layer in range(module.num_layers):
        suffixes = [f"_{s}" for s in module._direction_suffixes(layer)]
        states = slice(layer * D, (layer + 1) * D)
        y, h, c = layer_fn(module, layer_input, suffixes, h0[states], c0[states])  # [T, D, B, P], [D, B, ·]
        layer_input = y.permute(0, 2, 1, 3).flatten(2)  # [T, B, D·P]
        h_n.append(h)
        c_n.append(c)
    return layer_input, torch.cat(h_n), torch.cat(c_n)


def lstm_cell(module: LSTMCell, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`LSTMCell.forward` under ONNX export: an LSTM node over one step, or one step of a loop for the
    cells the node cannot express.

    x [1, B, I], h0 [B, H], c0 [B, H] in the compute dtype -> out [1, B, H], h1 [B, H], c1 [B, H].
    """
    _check_exportable(module)
    layer_fn = _loop_layer if _node_unfit(module) else _node_layer
    y, h, c = layer_fn(module, x, [""], h0.unsqueeze(0), c0.unsqueeze(0))  # [1, 1, B, H], [1, B, H]
    return y[:, 0], h[0], c[0]


__all__ = ["is_exporting", "lstm_cell", "lstm_layers"]
