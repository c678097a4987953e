"""One LSTM layer (one direction) over a whole sequence as one registered operator each way, for
every cell: the vanilla cell is the variant with no flags.

`lstmlab::lstm_layer_fwd` and `lstmlab::lstm_layer_bwd` are ``torch.library.custom_op``s with fake
(shape-only) implementations, and the backward is registered as the forward's autograd formula: so
torch.compile, torch.export and CUDA-graph capture see two opaque operators and never trace into
the Python time loop they run (tracing it returned wrong numbers). The public functions at the end
of this file call them.

Inside, the op runs the input projection of all steps as one GEMM (unless it is given gx), hands the
recurrence to the backend named by its caller (`backends.py`: one row each, one contract), and after
the reverse loop computes ∂x as one GEMM and ∂W_ih, ∂W_hh as one more, together; the peephole and
layer-norm parameter gradients are sums over rows and steps of what the loop saved. Every product
goes through `gemm.py`, which picks the engine (oneDNN for fp32 on CPU). Layer norm's input side,
γ_ih ⊙ LN(x·W_ihᵀ) + b, is differentiated by autograd outside the op, which then takes gx.

Under torch.func transforms and forward-mode AD, and for a double backward, the op is not used:
`transforms.py` runs the same function in differentiable PyTorch ops (`naive.py`'s equations).

Both directions of a bidirectional layer can be one call of the same op pair, on a backend whose
row says it runs them at once (`backends.both_directions_reason`; the persistent kernels, one
launch): the per-direction tensors then carry a leading [2] (:func:`lstm_layer_both_directions`).

B: batch  T: time  I: input size  H: hidden size  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, gemm, loop, variants
from .loop import Cell, LoopSaved, accumulation_dtype, advanced

KERNEL_BACKENDS = backends.KERNEL_BACKENDS


class LayerInputs(NamedTuple):
    """The forward op's arguments, in its schema's order (fake, autograd and backward read them
    by name). x is [T, B, I] with w_ih [4H, I], or, when w_ih is None, the input projection gx
    [T, B, 4H] itself; bias [4H] (b_ih + b_hh) or None; h0 [B, P], c0 [B, H], w_hh [4H, P], w_hr
    [P, H] or None; batch_sizes [T] int64 on the CPU or None; the cell's flags and tensors as
    :class:`lstmlab.kernels.loop.Cell`; ``save``: whether a backward may follow (if not, nothing
    for it is kept: the outputs after c_n are [0], and a backend may skip storing its gates).

    Both directions of a layer (``w_hh.dim() == 3``, the vanilla cell only): x [T, B, I] read by
    both, direction 1 over the time-flipped sequence (and batch sizes); w_ih [2, 4H, I], bias
    [2, 4H] or None, h0 [2, B, H], c0 [2, B, H], w_hh [2, 4H, H]; every output per direction then
    has a leading [2], direction 1's in its own (reversed) time order."""

    x: Tensor
    w_ih: Tensor | None
    bias: Tensor | None
    h0: Tensor
    c0: Tensor
    w_hh: Tensor
    w_hr: Tensor | None
    batch_sizes: Tensor | None
    backend: str
    flags: int
    peephole: Tensor | None
    ln_hh: Tensor | None
    ln_c: Tensor | None
    zoneout: Tensor | None
    dropout: Tensor | None
    save: bool

    def cell(self, acc: torch.dtype) -> Cell:
        def to_acc(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(acc).contiguous()

        return Cell(
            self.flags,
            to_acc(self.peephole),
            to_acc(self.ln_hh),
            to_acc(self.ln_c),
            self.zoneout,
            self.dropout,
        )


class LayerOutputs(NamedTuple):
    """The forward op's outputs: hs [T + 1, B, P] (out = hs[1:], h_n = hs[T]), out_packed [T, B, P]
    (rows that did not advance zeroed; [0] when not packed), c_n [B, H]; then what the backward
    reads, [0] where the cell has none (`loop.LoopSaved`): cs, gates, h_raw, c_new, ln_saved.
    No output aliases an input or another output."""

    hs: Tensor
    out_packed: Tensor
    c_n: Tensor
    cs: Tensor
    gates: Tensor
    h_raw: Tensor
    c_new: Tensor
    ln_saved: Tensor


def both_directions(a: LayerInputs | BackwardInputs) -> bool:
    """Whether the op's call is both directions of a layer at once (every weight has a leading [2])."""
    return a.w_hh.dim() == 3


def _both_directions_sizes(batch_sizes: Tensor | None) -> Tensor | None:
    """batch_sizes [T] -> [2, T]: direction 1 reads the batch backwards in time, so its rows start
    late and end together (increasing sizes)."""
    return None if batch_sizes is None else torch.stack([batch_sizes, batch_sizes.flip(0)])


def _layer_forward(a: LayerInputs) -> LayerOutputs:
    gx, own_gx = a.x, a.w_ih is not None
    impl = backends.get(a.backend)
    acc = accumulation_dtype(a.x.dtype)
    sizes = a.batch_sizes
    if both_directions(a):  # both directions' input projections in one batched GEMM, one backend call
        T, B, I = a.x.shape
        x2 = torch.stack([a.x, a.x.flip(0)]).view(2, T * B, I)  # direction 1 reads x backwards in time
        gx = gemm.linear_pair(x2, a.w_ih, a.bias).view(2, T, B, -1)  # [2, T, B, 4H]
        sizes = _both_directions_sizes(a.batch_sizes)  # [2, T]
        saved = impl.forward(gx, True, a.h0, a.c0, a.w_hh, None, sizes, a.cell(acc), save=a.save)
    elif own_gx and hasattr(impl, "forward_from_input"):  # the backend fuses the input projection
        saved = impl.forward_from_input(
            a.x, a.w_ih, a.bias, a.h0, a.c0, a.w_hh, a.w_hr, a.batch_sizes, a.cell(acc), save=a.save
        )
    else:
        if own_gx:  # all steps' input projections in one GEMM
            gx = gemm.linear(a.x.reshape(-1, a.x.shape[-1]), a.w_ih, a.bias).view(
                *a.x.shape[:2], -1
            )  # [T, B, 4H]
        saved = impl.forward(gx, own_gx, a.h0, a.c0, a.w_hh, a.w_hr, a.batch_sizes, a.cell(acc), save=a.save)
    B = gx.shape[-2]
    out_packed = gx.new_empty(0)  # a distinct tensor: no two outputs of an op may alias
    if sizes is not None:  # rows that did not advance have no output at that step
        moved = advanced(sizes, B, gx.device).unsqueeze(-1)  # [T, B, 1] ([2, T, B, 1]: both directions)
        out_packed = torch.where(moved, saved.hs[..., 1:, :, :], 0)
    c_n = saved.cs.select(-3, -1).to(a.c0.dtype, copy=True)  # without save a backend may keep c_T alone
    h_raw = gx.new_empty(0) if saved.h_raw is None or not a.save else saved.h_raw

    def or_empty(t: Tensor | None) -> Tensor:
        return gx.new_empty(0, dtype=acc) if t is None or not a.save else t

    return LayerOutputs(
        saved.hs,
        out_packed,
        c_n,
        or_empty(saved.cs),
        or_empty(saved.gates),
        h_raw,
        or_empty(saved.c_new),
        or_empty(saved.ln_saved),
    )


def _fake_forward(a: LayerInputs) -> LayerOutputs:
    T, B = a.x.shape[0], a.x.shape[1]
    G = a.x.shape[2] if a.w_ih is None else a.w_ih.shape[-2]
    H, P = G // 4, a.w_hh.shape[-1]
    lead = tuple(a.w_hh.shape[:-2])  # (2,): both directions of a layer
    dtype, acc = a.x.dtype, accumulation_dtype(a.x.dtype)
    x = a.x

    def kept(wanted: bool, *shape: int, dtype: torch.dtype = acc) -> Tensor:
        return x.new_empty(*lead, *shape, dtype=dtype) if wanted and a.save else x.new_empty(0, dtype=dtype)

    return LayerOutputs(
        x.new_empty(*lead, T + 1, B, P),
        x.new_empty(0) if a.batch_sizes is None else x.new_empty(*lead, T, B, P),
        a.c0.new_empty(*lead, B, H),
        kept(True, T + 1, B, H),
        kept(True, T, B, G),
        kept(a.w_hr is not None, T, B, H, dtype=dtype),
        kept(bool(a.flags & variants.ZONEOUT_C), T, B, H),
        kept(bool(a.flags & variants.LAYER_NORM), T, B, G + 3),
    )


class BackwardInputs(NamedTuple):
    """The backward op's arguments: the gradients of (hs, out_packed, c_n), the forward's saved
    outputs, its inputs that the backward reads, and which of (x, w_ih, bias, w_hh, w_hr,
    peephole, ln_hh, ln_c) want a gradient."""

    d_hs: Tensor
    d_out_packed: Tensor
    d_cn: Tensor
    hs: Tensor
    cs: Tensor
    gates: Tensor
    h_raw: Tensor
    c_new: Tensor
    ln_saved: Tensor
    x: Tensor
    w_ih: Tensor | None
    w_hh: Tensor
    w_hr: Tensor | None
    batch_sizes: Tensor | None
    backend: str
    flags: int
    peephole: Tensor | None
    ln_hh: Tensor | None
    ln_c: Tensor | None
    zoneout: Tensor | None
    dropout: Tensor | None
    needs: list[bool]

    def cell(self, acc: torch.dtype) -> Cell:
        return LayerInputs.cell(self, acc)  # the same fields by name

    def saved(self) -> LoopSaved:
        def or_none(t: Tensor) -> Tensor | None:
            return None if t.numel() == 0 else t

        return LoopSaved(
            self.hs, self.cs, self.gates, or_none(self.h_raw), or_none(self.c_new), or_none(self.ln_saved)
        )


class LayerGrads(NamedTuple):
    """The backward op's outputs, each [0] where not needed (or where the input was None)."""

    d_x: Tensor  # [T, B, I], or ∂L/∂gx [T, B, 4H] when the forward was given gx
    d_w_ih: Tensor
    d_bias: Tensor
    d_h0: Tensor  # [B, P]
    d_c0: Tensor  # [B, H] acc
    d_w_hh: Tensor
    d_w_hr: Tensor
    d_peephole: Tensor  # [3, H] acc
    d_ln_hh: Tensor  # [4H] acc
    d_ln_c: Tensor  # [2, H] acc


def _both_directions_backward(a: BackwardInputs) -> LayerGrads:
    """Both directions' reverse loops in one backend call, then ∂x, ∂W_ih, ∂W_hh and ∂b of each
    direction from its own rows (the vanilla cell: no projection, no variant parameters)."""
    T, B, G = a.gates.shape[-3:]
    I, dtype, acc = a.x.shape[-1], a.hs.dtype, a.cs.dtype
    needs_x, needs_w_ih, needs_bias, needs_w_hh = a.needs[:4]
    sizes = _both_directions_sizes(a.batch_sizes)  # [2, T]
    x_rev = a.x.flip(0).reshape(-1, I) if needs_w_ih else None  # [T·B, I] direction 1's inputs in its order
    args = (a.d_hs, a.d_out_packed, a.d_cn, a.saved(), a.w_hh, None, sizes, a.cell(acc))
    grads = backends.get(a.backend).backward(*args, keep_d_pre=False)
    d_pre = grads.d_pre.view(2, T * B, G)
    # each direction's products on its own rows, no [2, T·B, ·] copies at the backward's peak;
    # direction 1 read x backwards
    d_x = d_w_ih = d_bias = d_w_hh = None
    if needs_x:
        d_x = gemm.mm(d_pre[0], a.w_ih[0]).view(T, B, I)  # [T, B, I]
        d_x += gemm.mm(d_pre[1], a.w_ih[1]).view(T, B, I).flip(0)
    if needs_w_ih:
        d_w_ih = torch.stack([gemm.mm_tn(d_pre[0], a.x.reshape(-1, I)), gemm.mm_tn(d_pre[1], x_rev)])
    if needs_w_hh:
        d_w_hh = torch.stack([gemm.mm_tn(d_pre[d], a.hs[d, :-1].reshape(T * B, -1)) for d in (0, 1)])
    if needs_bias:
        d_bias = d_pre.sum(1)  # [2, 4H]

    def or_empty(g: Tensor | None) -> Tensor:
        return a.hs.new_empty(0) if g is None else g

    return LayerGrads(
        *(or_empty(g) for g in (d_x, d_w_ih, d_bias)), grads.d_h0.to(dtype), grads.d_c0, or_empty(d_w_hh),
        *(or_empty(None) for _ in range(4)),
    )  # fmt: skip


def _layer_backward(a: BackwardInputs) -> LayerGrads:
    if both_directions(a):
        return _both_directions_backward(a)
    T, B, G = a.gates.shape
    H, P = G // 4, a.hs.shape[-1]
    dtype, acc, dev = a.hs.dtype, a.cs.dtype, a.hs.device
    cell = a.cell(acc)
    needs_x, needs_w_ih, needs_bias, needs_w_hh, needs_w_hr = a.needs[:5]
    gx_mode = a.w_ih is None
    impl = backends.get(a.backend)
    args = (a.d_hs, a.d_out_packed, a.d_cn, a.saved(), a.w_hh, a.w_hr, a.batch_sizes, cell)
    d_x = d_w = d_b = None  # ∂x, ∂[W_ih | W_hh] [4H, I + P], ∂b when the backend's steps compute them
    if not gx_mode and hasattr(impl, "backward_from_input"):
        grads, d_x, d_w, d_b = impl.backward_from_input(
            a.x,
            a.w_ih,
            *args,
            keep_d_pre=False,
            want_x=needs_x,
            want_w=needs_w_ih or needs_w_hh or needs_bias,
        )
    else:
        grads = impl.backward(*args, keep_d_pre=gx_mode)
    d_pre_rows = grads.d_pre.view(-1, G)  # [T·B, 4H]

    def h_prev_rows() -> Tensor:  # [T·B, P] the recurrent GEMM's input of every step, h ⊙ m
        h_prev = a.hs[:-1] if cell.dropout is None else a.hs[:-1] * cell.dropout
        return h_prev.reshape(-1, P)

    none = a.hs.new_empty
    d_w_ih = d_bias = d_w_hh = d_w_hr = None
    d_w_hh_fused = needs_w_hh and grads.d_rec is grads.d_pre  # ∂W_hh reads ∂L/∂r: d_pre unless layer norm
    if gx_mode:
        d_x = grads.d_pre
    else:
        I = a.x.shape[-1]
        x_rows = a.x.reshape(-1, I) if d_w is None else None  # [T·B, I]; a copy when batch-first
        if needs_x and d_x is None:
            d_x = gemm.mm(d_pre_rows, a.w_ih).view(T, B, I)  # [T, B, I]
        if needs_bias:
            d_bias = d_pre_rows.sum(0) if d_b is None else d_b  # [4H]
        if d_w is not None:  # summed by the backend's steps; no output aliases another
            d_w_ih = d_w[:, :I].contiguous() if needs_w_ih else None
            d_w_hh = d_w[:, I:].contiguous() if needs_w_hh else None
        elif needs_w_ih and d_w_hh_fused and dev.type == "cpu":
            # one product over both, reading d_pre once: [4H, I + P] (faster on the CPU, where it was
            # measured). On a GPU two products read d_pre twice, as many bytes as writing and reading
            # [x | h], without that [T·B, I + P] buffer at the backward's peak of memory
            x_h = loop.scratch("x_h", T * B, I + P, dtype=dtype, device=dev)
            d_w = gemm.mm_tn(d_pre_rows, torch.cat([x_rows, h_prev_rows()], dim=1, out=x_h))
            d_w_ih, d_w_hh = d_w[:, :I].contiguous(), d_w[:, I:].contiguous()  # no output aliases another
        elif needs_w_ih:
            d_w_ih = gemm.mm_tn(d_pre_rows, x_rows)  # [4H, I]
    if needs_w_hh and d_w_hh is None:
        d_w_hh = gemm.mm_tn(grads.d_rec.view(-1, G), h_prev_rows())  # [4H, P]
    if a.w_hr is not None and needs_w_hr:
        d_w_hr = gemm.mm_tn(grads.d_hp.view(-1, P), a.h_raw.view(-1, H))  # [P, H]
    d_peephole = d_ln_hh = d_ln_c = None
    if cell.peephole is not None:
        d_a = grads.d_pre.view(T, B, 4, H).to(acc)
        c_tilde = a.c_new if cell.zoneout_c else a.cs[1:]  # c̃ of every step
        d_peephole = torch.stack(
            [
                (d_a[:, :, 0] * a.cs[:-1]).sum((0, 1)),  # p_i sees c_{t−1}
                (d_a[:, :, 1] * a.cs[:-1]).sum((0, 1)),  # p_f sees c_{t−1}
                (d_a[:, :, 3] * c_tilde).sum((0, 1)),  # p_o sees c̃
            ]
        )  # [3, H]
    if cell.layer_norm:
        d_ln_hh = (grads.d_pre.to(acc) * a.ln_saved[..., :G]).sum((0, 1))  # Σ ∂L/∂a ⊙ r̂  [4H]
        d_ln_c = grads.d_ln_c_rows.sum((0, 1))  # [2, H]
    return LayerGrads(
        *(none(0) if g is None else g for g in (d_x, d_w_ih, d_bias)),
        grads.d_h0.to(dtype),
        grads.d_c0,
        *(none(0) if g is None else g for g in (d_w_hh, d_w_hr, d_peephole, d_ln_hh, d_ln_c)),
    )


def _fake_backward(a: BackwardInputs) -> LayerGrads:
    needs_x, needs_w_ih, needs_bias, needs_w_hh, needs_w_hr = a.needs[:5]
    G, B, H = a.gates.shape[-1], a.gates.shape[-2], a.cs.shape[-1]
    lead = tuple(a.w_hh.shape[:-2])  # (2,): both directions of a layer
    gx_mode = a.w_ih is None
    none = a.hs.new_empty(0)
    return LayerGrads(
        a.x.new_empty(a.x.shape) if gx_mode or needs_x else none.clone(),
        a.w_ih.new_empty(a.w_ih.shape) if not gx_mode and needs_w_ih else none.clone(),
        a.hs.new_empty(*lead, G) if not gx_mode and needs_bias else none.clone(),
        a.hs.new_empty(*lead, B, a.hs.shape[-1]),
        a.cs.new_empty(*lead, B, H),
        a.w_hh.new_empty(a.w_hh.shape) if needs_w_hh else none.clone(),
        a.w_hr.new_empty(a.w_hr.shape) if a.w_hr is not None and needs_w_hr else none.clone(),
        a.cs.new_empty(3, H) if a.flags & variants.PEEPHOLES else a.cs.new_empty(0),
        a.cs.new_empty(G) if a.flags & variants.LAYER_NORM else a.cs.new_empty(0),
        a.cs.new_empty(2, H) if a.flags & variants.LAYER_NORM else a.cs.new_empty(0),
    )


# ---- the registered operators: what torch.compile, torch.export and CUDA graphs see ----
# Their schemas are the one place the arguments are listed one by one; everything else reads the
# NamedTuples above.


@torch.library.custom_op("lstmlab::lstm_layer_fwd", mutates_args=())
def lstm_layer_fwd(
    x: Tensor,
    w_ih: Tensor | None,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    backend: str,
    flags: int,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    dropout: Tensor | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :class:`LayerInputs` and :class:`LayerOutputs`."""
    return tuple(_layer_forward(LayerInputs(*_args(locals(), LayerInputs))))


@lstm_layer_fwd.register_fake
def _(*args):
    return tuple(_fake_forward(LayerInputs(*args)))


@torch.library.custom_op("lstmlab::lstm_layer_bwd", mutates_args=())
def lstm_layer_bwd(
    d_hs: Tensor,
    d_out_packed: Tensor,
    d_cn: Tensor,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    h_raw: Tensor,
    c_new: Tensor,
    ln_saved: Tensor,
    x: Tensor,
    w_ih: Tensor | None,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    backend: str,
    flags: int,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    dropout: Tensor | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :class:`BackwardInputs` and :class:`LayerGrads`."""
    return tuple(_layer_backward(BackwardInputs(*_args(locals(), BackwardInputs))))


@lstm_layer_bwd.register_fake
def _(*args):
    return tuple(_fake_backward(BackwardInputs(*args)))


def _args(scope: dict, record: type[NamedTuple]) -> list:
    return [scope[name] for name in record._fields]


# the differentiable inputs of the forward op, by position, and their names in BackwardInputs.needs
_GRAD_INPUTS = ("x", "w_ih", "bias", "w_hh", "w_hr", "peephole", "ln_hh", "ln_c")


def _setup_context(ctx, inputs, output) -> None:
    a, out = LayerInputs(*inputs), LayerOutputs(*output)
    ctx.mark_non_differentiable(out.cs, out.gates, out.h_raw, out.c_new, out.ln_saved)
    # The saved outputs never get a gradient: without this autograd would fill a zero tensor for
    # each of them on every backward (gates alone is [T, B, 4H]). _backward fills only what it reads.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*out[:1], *out[3:], a.x, a.w_ih, a.bias, a.h0, a.c0, a.w_hh, a.w_hr,
                          a.batch_sizes, a.peephole, a.ln_hh, a.ln_c, a.zoneout, a.dropout)  # fmt: skip
    ctx.backend, ctx.flags = a.backend, a.flags
    ctx.state_dtypes = (a.h0.dtype, a.c0.dtype)


def _backward(ctx, d_hs, d_out_packed, d_cn, *_saved_grads):
    (hs, cs, gates, h_raw, c_new, ln_saved, x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes,
     peephole, ln_hh, ln_c, zoneout, dropout) = ctx.saved_tensors  # fmt: skip
    a = LayerInputs(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, ctx.backend, ctx.flags,
                    peephole, ln_hh, ln_c, zoneout, dropout, True)  # fmt: skip
    # None: that output did not reach the loss (grads are not materialised, see _setup_context)
    if d_hs is None:
        d_hs = torch.zeros_like(hs)
    if d_out_packed is None:
        d_out_packed = hs.new_zeros(0) if batch_sizes is None else torch.zeros_like(hs[..., 1:, :, :])
    if d_cn is None:
        d_cn = c0.new_zeros(c0.shape)
    wanted = dict(zip(LayerInputs._fields, ctx.needs_input_grad, strict=True))
    wanted = {name: wanted[name] and getattr(a, name) is not None for name in _GRAD_INPUTS}
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the gradient itself must be differentiable (a gradient penalty), which
        # the fused backward is not. Recompute the layer in differentiable ops and differentiate that.
        from .transforms import layer_backward_differentiable

        d_inputs = layer_backward_differentiable(a, ctx.needs_input_grad, (d_hs, d_out_packed, d_cn))
        return tuple(d_inputs)
    gx_mode = w_ih is None
    needs = [wanted[name] for name in _GRAD_INPUTS]
    g = LayerGrads(
        *torch.ops.lstmlab.lstm_layer_bwd(
            d_hs, d_out_packed, d_cn, hs, cs, gates, h_raw, c_new, ln_saved, x, w_ih, w_hh, w_hr,
            batch_sizes, ctx.backend, ctx.flags, peephole, ln_hh, ln_c, zoneout, dropout, needs,
        )
    )  # fmt: skip
    h_dtype, c_dtype = ctx.state_dtypes

    def grad(name: str, value: Tensor, like: Tensor | None) -> Tensor | None:
        return value.to(like.dtype) if wanted[name] else None

    return (
        g.d_x if gx_mode or wanted["x"] else None,
        grad("w_ih", g.d_w_ih, w_ih),
        grad("bias", g.d_bias, bias),
        g.d_h0.to(h_dtype),
        g.d_c0.to(c_dtype),
        grad("w_hh", g.d_w_hh, w_hh),
        grad("w_hr", g.d_w_hr, w_hr),
        None,
        None,
        None,
        grad("peephole", g.d_peephole, peephole),
        grad("ln_hh", g.d_ln_hh, ln_hh),
        grad("ln_c", g.d_ln_c, ln_c),
        None,
        None,
        None,
    )


lstm_layer_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- the public functions: checked arguments in, (out, h_n, c_n) back ----


def batch_sizes_arg(batch_sizes: Sequence[int] | Tensor | None, T: int, B: int) -> Tensor | None:
    """``batch_sizes`` checked and as an int64 CPU tensor (or None), the form the op takes: its
    values are read only by the op itself, so tracing never reads data."""
    if batch_sizes is None:
        return None
    if isinstance(batch_sizes, Tensor):
        if batch_sizes.dim() != 1 or batch_sizes.shape[0] != T or batch_sizes.is_floating_point():
            raise ValueError(
                f"batch_sizes must be a 1-D integer tensor of {T} sizes, got {batch_sizes.dtype} "
                f"of shape {tuple(batch_sizes.shape)}"
            )
        return batch_sizes.to("cpu", torch.int64)  # values are checked by the op
    sizes = [int(n) for n in batch_sizes]
    if len(sizes) != T or any(not 0 <= n <= B for n in sizes):
        raise ValueError(f"batch_sizes must hold {T} sizes in [0, {B}], got {sizes}")
    return torch.tensor(sizes, dtype=torch.int64)


def _check_cell_args(flags: int, T: int, B: int, H: int, P: int, cell: dict[str, Tensor | None]) -> None:
    """Every tensor a flag needs is there with its shape, and none is given that no flag asks for."""
    if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0 or flags & ~variants.ALL_BITS:
        raise ValueError(f"flags must be a combination of the bits in variants.py, got {flags!r}")
    expected = {
        "peephole": (variants.PEEPHOLES, (3, H)),
        "ln_hh": (variants.LAYER_NORM, (4 * H,)),
        "ln_c": (variants.LAYER_NORM, (2, H)),
        "zoneout": (variants.ZONEOUT_C | variants.ZONEOUT_H, (T, B, 2, H)),
        "dropout": (variants.RECURRENT_DROPOUT, (B, P)),
    }
    for name, (bits, shape) in expected.items():
        tensor, wanted = cell[name], bool(flags & bits)
        what = " or ".join(variants.flag_names(bits))
        if wanted and tensor is None:
            raise ValueError(f"flags ask for {what}, which needs {name} {shape}; got None")
        if not wanted and tensor is not None:
            raise ValueError(f"{name} was given but flags ({flags}) do not ask for {what}")
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if cell["zoneout"] is not None and cell["zoneout"].dtype != torch.uint8:
        raise ValueError(f"zoneout masks must be uint8 (0 or 1), got {cell['zoneout'].dtype}")
    if P != H and flags & variants.ZONEOUT_H:
        raise ValueError(
            f"zoneout on h mixes h_(t-1) [B, {P}] with the new h before its projection [B, {H}]; "
            "it cannot be combined with proj_size"
        )


def lstm_layer(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    batch_sizes: Sequence[int] | Tensor | None = None,
    backend: str = "reference",
    *,
    w_ih: Tensor | None = None,
    bias: Tensor | None = None,
    flags: int = 0,
    peephole: Tensor | None = None,
    ln_hh: Tensor | None = None,
    ln_c: Tensor | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Runs one LSTM layer in one direction over a sequence, any cell variant.

    Args:
        gx: [T, B, 4H] input projection x_t·W_ihᵀ + b_ih + b_hh for every step, gates i, f, g, o
            (with layer norm: γ_ih ⊙ LN(x·W_ihᵀ) + b). With ``w_ih`` given, gx is the input x
            [T, B, I] and the layer projects it itself (one GEMM; its backward then computes
            ∂W_ih and ∂W_hh in one product, reading ∂L/∂gates once).
        h0: [B, P] initial hidden state (P = proj_size, or H without projection).
        c0: [B, H] initial cell state.
        w_hh: [4H, P] recurrent weights.
        w_hr: [P, H] projection weights, or None.
        batch_sizes: rows that advance at each step (packed sequences): a list of T ints or an
            integer tensor [T] (as ``PackedSequence.batch_sizes``), or None for all B.
        backend: the implementation, one of ``KERNEL_BACKENDS`` (`backends.py`);
            :func:`lstmlab.resolve_backend` picks one for ``"auto"``/``"triton"`` as the modules
            do. One that cannot run this layer raises, saying why.
        w_ih: [4H, I] input weights, with ``bias`` [4H] (b_ih + b_hh) or None: see ``gx``.
        flags: the cell variant's bits, ``CellVariant.flags`` plus ``variants.ZONEOUT_C`` /
            ``ZONEOUT_H`` / ``RECURRENT_DROPOUT`` when their masks are given (training).
        peephole: [3, H] (p_i, p_f, p_o). ln_hh: [4H] γ_hh. ln_c: [2, H] (γ_c, β_c).
        zoneout: [T, B, 2, H] uint8 masks (z^c, z^h), 1 = keep the previous value.
        dropout: [B, P] recurrent dropout mask, 0 or 1/(1 − p), dtype of gx.

    Returns:
        out [T, B, P] (h after every step; zero in rows that did not advance at that step),
        h_n [B, P], c_n [B, H].

    Example:
        >>> T, B, H = 5, 3, 8
        >>> gx, h0, c0 = torch.randn(T, B, 4 * H), torch.zeros(B, H), torch.zeros(B, H)
        >>> out, h_n, c_n = lstm_layer(gx, h0, c0, torch.randn(4 * H, H))
        >>> out.shape
        torch.Size([5, 3, 8])
    """
    x = gx
    if x.dim() != 3:
        expected = "x must be [T, B, I]" if w_ih is not None else "gx must be [T, B, 4H]"
        raise ValueError(f"{expected}, got shape {tuple(x.shape)}")
    T, B, I = x.shape
    if w_ih is None:
        if I % 4:
            raise ValueError(f"gx must be [T, B, 4H], got shape {tuple(x.shape)}")
        G = I
        if bias is not None:
            raise ValueError("bias is added by the input projection: pass it with w_ih, or fold it into gx")
    else:
        if w_ih.dim() != 2 or w_ih.shape[0] % 4 or w_ih.shape[1] != I:
            raise ValueError(f"w_ih must be [4H, {I}], got shape {tuple(w_ih.shape)}")
        G = w_ih.shape[0]
        if bias is not None and tuple(bias.shape) != (G,):
            raise ValueError(f"bias must have shape ({G},), got {tuple(bias.shape)}")
    H = G // 4
    P = H if w_hr is None else w_hr.shape[0]
    expected = {"h0": (B, P), "c0": (B, H), "w_hh": (G, P)}
    if w_hr is not None:
        expected["w_hr"] = (P, H)
    got = {"h0": h0, "c0": c0, "w_hh": w_hh, "w_hr": w_hr}
    for name, shape in expected.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(got[name].shape)}")
    cell = {"peephole": peephole, "ln_hh": ln_hh, "ln_c": ln_c, "zoneout": zoneout, "dropout": dropout}
    _check_cell_args(flags, T, B, H, P, cell)
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    backends.check_available(backend, x.device, B, H, P if w_hr is not None else 0, x.dtype, flags)
    sizes = batch_sizes_arg(batch_sizes, T, B)
    return run_layer(x, w_ih, bias, h0, c0, w_hh, w_hr, sizes, backend, flags, *cell.values())


# a module's weights are Parameters: a Tensor subclass that intercepts nothing
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _plain_eager(a: LayerInputs) -> bool:
    """Whether the op's implementation may run without the op: eager, on CPU tensors of type Tensor
    (or Parameter), with nothing that records or intercepts ops (compile, export, TorchScript
    tracing, torch function or dispatch modes, fake tensors, the profiler). Nothing can tell the two
    apart there, and inference skips the custom op's autograd wrapper, redispatch and alias checks:
    45 µs a call, 3.5 % of a B16 H64 T100 forward on the CPU kernel."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._autograd._profiler_enabled():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(
        t is None or (type(t) in _PLAIN_TENSORS and t.device.type == "cpu")
        for t in a
        if not isinstance(t, (str, int))  # backend, flags, save
    )


def run_layer(*args) -> tuple[Tensor, Tensor, Tensor]:
    """The op on checked arguments (:class:`LayerInputs`' order) -> out, h_n, c_n. Under a
    torch.func transform or forward-mode AD the same function runs in differentiable ops; eager CPU
    inference runs the op's implementation itself (:func:`_plain_eager`)."""
    # a backward may follow only if grad mode is on and an input asks for one: else nothing is kept
    save = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args)
    a = LayerInputs(*args, save)
    from .transforms import layer_forward_differentiable, transform_active

    if transform_active(a):
        return layer_forward_differentiable(a)
    if not save and _plain_eager(a):
        return _outputs(a, _layer_forward(a))
    return _outputs(a, LayerOutputs(*lstm_layer_fwd(*a)))  # the op: torch.ops.lstmlab.lstm_layer_fwd


def _outputs(a: LayerInputs, out: LayerOutputs) -> tuple[Tensor, Tensor, Tensor]:
    """out [T, B, P] (h after every step, zero in rows that did not advance), h_n, c_n (both
    directions: each with a leading [2])."""
    hs = out.hs
    return (hs[..., 1:, :, :] if a.batch_sizes is None else out.out_packed), hs.select(-3, -1), out.c_n


def lstm_layer_from_input(
    x: Tensor,
    w_ih: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None = None,
    batch_sizes: Sequence[int] | Tensor | None = None,
    backend: str = "reference",
    **cell,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One LSTM layer over the inputs x [T, B, I], input projection included:
    ``lstm_layer(x, h0, c0, w_hh, w_hr, batch_sizes, backend, w_ih=w_ih, bias=bias, **cell)``.

    Example:
        >>> T, B, I, H = 5, 3, 4, 8
        >>> x, h0, c0 = torch.randn(T, B, I), torch.zeros(B, H), torch.zeros(B, H)
        >>> w_ih, w_hh = torch.randn(4 * H, I), torch.randn(4 * H, H)
        >>> out, h_n, c_n = lstm_layer_from_input(x, w_ih, None, h0, c0, w_hh)
        >>> out.shape
        torch.Size([5, 3, 8])
    """
    return lstm_layer(x, h0, c0, w_hh, w_hr, batch_sizes, backend, w_ih=w_ih, bias=bias, **cell)


def lstm_layer_both_directions(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    bias: Tensor | None,
    w_hh: Tensor,
    batch_sizes: Sequence[int] | Tensor | None = None,
    backend: str = "triton_persistent",
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Both directions of a bidirectional LSTM layer (the vanilla cell) in one call of the layer op,
    on a backend that runs them at once (``backends.both_directions_reason``: the persistent kernels,
    one launch for both directions each way, where the SMs hold both grids).

    Args:
        x: [T, B, I]; the reverse direction (1) reads it from x[T − 1] back to x[0].
        h0, c0: [2, B, H] initial states of the forward and the reverse direction.
        w_ih: [2, 4H, I], bias: [2, 4H] (b_ih + b_hh) or None, w_hh: [2, 4H, H]: each direction's.
        batch_sizes: as in :func:`lstm_layer` (a packed batch's sizes, decreasing).
        backend: one of ``KERNEL_BACKENDS`` whose row runs both directions at once; else RuntimeError.

    Returns:
        out [T, B, 2H] (both directions' h at each time step, as ``torch.nn.LSTM``'s bidirectional
        output; zero in rows that did not advance), h_n [2, B, H], c_n [2, B, H].
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {tuple(x.shape)}")
    T, B, I = x.shape
    if w_ih.dim() != 3 or w_ih.shape[0] != 2 or w_ih.shape[1] % 4 or w_ih.shape[2] != I:
        raise ValueError(f"w_ih must be [2, 4H, {I}], got shape {tuple(w_ih.shape)}")
    H = w_ih.shape[1] // 4
    expected = {"h0": (2, B, H), "c0": (2, B, H), "w_hh": (2, 4 * H, H), "bias": (2, 4 * H)}
    for name, t in (("h0", h0), ("c0", c0), ("w_hh", w_hh), ("bias", bias)):
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    reason = backends.both_directions_reason(backend, x.device, B, H, 0, x.dtype, 0)
    if reason is not None:
        raise RuntimeError(
            f"both directions of a layer in one call: {reason} (B={B}, H={H}, {x.dtype} on {x.device}). "
            "Run each direction with lstm_layer."
        )
    sizes = batch_sizes_arg(batch_sizes, T, B)
    no_variant = (None,) * 5  # peephole, ln_hh, ln_c, zoneout, dropout
    out, h_n, c_n = run_layer(x, w_ih, bias, h0, c0, w_hh, None, sizes, backend, 0, *no_variant)
    return torch.cat([out[0], out[1].flip(0)], dim=-1), h_n, c_n  # [T, B, 2H], in time order


def one_direction(a: LayerInputs, d: int) -> LayerInputs:
    """Direction ``d`` of a both-directions call as a call of its own (direction 1 over the
    time-flipped x and batch sizes): what the differentiable path (transforms.py) runs."""

    def in_order(t: Tensor) -> Tensor:
        return t.flip(0) if d == 1 else t

    return a._replace(
        x=in_order(a.x), w_ih=a.w_ih[d], bias=None if a.bias is None else a.bias[d], h0=a.h0[d], c0=a.c0[d],
        w_hh=a.w_hh[d], batch_sizes=None if a.batch_sizes is None else in_order(a.batch_sizes),
    )  # fmt: skip


def gates_forward(pre: Tensor, c_prev: Tensor, backend: str = "reference") -> tuple[Tensor, Tensor, Tensor]:
    """The fused vanilla step alone: pre [B, 4H], c_prev [B, H] -> gates [B, 4H], c [B, H], h [B, H].

    gates and c come back in fp32 (fp64 for fp64 inputs), h in the dtype of ``pre``.
    """
    gate_math = backends.per_step(backend).gate_math
    B, G = pre.shape
    acc = accumulation_dtype(pre.dtype)
    gates = loop.empty(B, G, dtype=acc, device=pre.device)
    c = loop.empty(B, G // 4, dtype=acc, device=pre.device)
    h = loop.empty(B, G // 4, dtype=pre.dtype, device=pre.device)
    gate_math.gates_forward_into(pre.contiguous(), c_prev.contiguous(), gates, c, h)
    return gates, c, h


def gates_backward(
    dh: Tensor, dc: Tensor, gates: Tensor, c: Tensor, c_prev: Tensor, backend: str = "reference"
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`gates_forward`: -> dpre [B, 4H] (dtype of ``dh``), dc_prev [B, H]."""
    impl = backends.per_step(backend)
    B, G = gates.shape
    d_pre = loop.empty(B, G, dtype=dh.dtype, device=dh.device)
    cs = torch.stack([c_prev, c])
    step = loop._BackwardSteps(
        impl.gate_math, impl.coefficients, Cell(), gates.contiguous()[None], cs, cs[1:],
        None, d_pre[None], d_pre[None], None,
    )  # fmt: skip
    d_c = dc.to(c.dtype, copy=True)  # the step writes dc_prev over it
    step(0, B, dh.to(c.dtype), d_c)
    return d_pre, d_c
