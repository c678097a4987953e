"""One layer (one direction) of an LSTM cell variant (`variants.py`) as one registered operator each way.

`lstmlab::lstm_variant_layer_fwd` / `lstm_variant_layer_bwd` are the variant twins of `layer.py`'s
ops: the vanilla cell never comes here, so its path stays exactly what it was. They take the input
projection gx already done (with layer norm that is γ_ih ⊙ LN(x·W_ihᵀ) + b, which autograd
differentiates outside the op), run the time loop with one of three step implementations, and
return what the backward needs:

    reference          torch_gates.variant_gates_forward_into / _backward_into, per step
    triton_step        triton_gates' variant launchers, one fused launch per step each way
    triton_persistent  triton_persistent's kernels with the variant's constexpr switches (no layer
                       norm: it needs a grid-wide reduction per step; lstmlab.backends never picks
                       the persistent kernels for it)

Per step: r_t = (h_{t−1} ⊙ m)·W_hhᵀ (one GEMM; m the recurrent dropout mask), then the step. After
the reverse loop: ∂W_hh is one GEMM, and the peephole and layer-norm parameter gradients are sums
over rows and steps of what the loop saved.

B: batch  T: time  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import gemm, torch_gates, variants
from .layer import (
    HAS_TRITON,
    _advanced,
    _check_layer_args,
    _loop_start_gradients,
    _sizes,
    _with_packed_output_grad,
    accumulation_dtype,
    empty,
    scratch,
)

if HAS_TRITON:
    from . import triton_gates, triton_persistent


def _step_functions(backend: str):
    """(forward_into, backward_into) of a per-step backend (the variant contract)."""
    if backend == "reference":
        return torch_gates.variant_gates_forward_into, torch_gates.variant_gates_backward_into
    return triton_gates.variant_gates_forward_into, triton_gates.variant_gates_backward_into


def _acc(t: Tensor | None, acc: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(acc).contiguous()


def _variant_forward(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    batch_sizes: Tensor | None,
    backend: str,
    flags: int,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    dropout: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> hs [T + 1, B, H], out_packed [T, B, H] or [0], c_n [B, H], and for the backward
    cs [T + 1, B, H] acc (c_t after zoneout), gates [T, B, 4H] acc, c_new [T, B, H] acc (c̃, under
    zoneout on c; else [0]), ln_saved [T, B, 4H + 3] acc (layer norm; else [0])."""
    T, B, G = gx.shape
    H = G // 4
    acc, dev = accumulation_dtype(gx.dtype), gx.device
    peephole, ln_hh, ln_c = _acc(peephole, acc), _acc(ln_hh, acc), _acc(ln_c, acc)
    layer_norm = bool(flags & variants.LAYER_NORM)
    c_new = empty(T, B, H, dtype=acc, device=dev) if flags & variants.ZONEOUT_C else None
    if backend == "triton_persistent":
        hs, cs, gates = triton_persistent.persistent_forward(
            gx.contiguous(), h0, c0, w_hh, batch_sizes,
            flags=flags, peephole=peephole, zoneout=zoneout, dropout=dropout, c_new=c_new,
        )  # fmt: skip
        ln_saved = None
    else:
        hs, cs, gates, ln_saved = _step_forward(
            gx, h0, c0, w_hh, _sizes(batch_sizes, T, B), backend, flags,
            peephole, ln_hh, ln_c, zoneout, dropout, c_new,
        )  # fmt: skip
    out_packed = gx.new_empty(0)
    if batch_sizes is not None:  # rows that did not advance have no output at that step
        out_packed = torch.where(_advanced(batch_sizes, B, dev).unsqueeze(2), hs[1:], 0)
    c_n = cs[T].to(c0.dtype, copy=True)
    none = gx.new_empty(0, dtype=acc)
    c_new = none if c_new is None else c_new
    ln_saved = none.clone() if not layer_norm else ln_saved  # a distinct tensor: outputs may not alias
    return hs, out_packed, c_n, cs, gates, c_new, ln_saved


def _step_forward(
    gx, h0, c0, w_hh, sizes, backend, flags, peephole, ln_hh, ln_c, zoneout, dropout, c_new
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The per-step backends' time loop: one GEMM and one variant step per step."""
    forward_into, _ = _step_functions(backend)
    T, B, G = gx.shape
    H = G // 4
    dtype, acc, dev = gx.dtype, accumulation_dtype(gx.dtype), gx.device
    layer_norm = bool(flags & variants.LAYER_NORM)
    hs = empty(T + 1, B, H, dtype=dtype, device=dev)  # hs[k] = h before step k
    cs = empty(T + 1, B, H, dtype=acc, device=dev)  # cs[k] = c before step k
    gates = empty(T, B, G, dtype=acc, device=dev)
    ln_saved = empty(T, B, G + 3, dtype=acc, device=dev) if layer_norm else None
    pre = empty(B, G, dtype=dtype, device=dev)  # a_t before peepholes, or (layer norm) r_t
    dropped = None if dropout is None else empty(B, H, dtype=dtype, device=dev)  # h_{t−1} ⊙ m
    hs[0] = h0
    cs[0] = c0
    recurrent = gemm.StepWeight(w_hh, B, T)
    for k, n in enumerate(sizes):
        h_prev = hs[k, :n]
        d = h_prev if dropout is None else torch.mul(h_prev, dropout[:n], out=dropped[:n])
        if layer_norm:  # the step normalises r_t itself and adds gx_t
            step_pre, rec = gx[k, :n], recurrent.mm(d, out=pre[:n])
        else:
            step_pre, rec = recurrent.addmm(gx[k, :n], d, out=pre[:n]), None  # [n, 4H]
        forward_into(
            flags, step_pre, rec, cs[k, :n],
            h_prev if flags & variants.ZONEOUT_H else None,
            peephole, ln_hh, ln_c,
            None if zoneout is None else zoneout[k, :n],
            gates[k, :n], cs[k + 1, :n], hs[k + 1, :n],
            None if c_new is None else c_new[k, :n],
            None if ln_saved is None else ln_saved[k, :n],
            check=k == 0,  # one step checks the arguments: the others have the same kinds
        )  # fmt: skip
        if n < B:  # rows that do not advance carry their state; the rest is never read
            hs[k + 1, n:] = hs[k, n:]
            cs[k + 1, n:] = cs[k, n:]
            gates[k, n:] = 0
            for saved in (c_new, ln_saved):
                if saved is not None:
                    saved[k, n:] = 0
    return hs, cs, gates, ln_saved


def _variant_backward(
    d_hs: Tensor,
    d_out_packed: Tensor,
    d_cn: Tensor,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    c_new: Tensor,
    ln_saved: Tensor,
    w_hh: Tensor,
    batch_sizes: Tensor | None,
    backend: str,
    flags: int,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    dropout: Tensor | None,
    needs_w_hh: bool,
) -> tuple[Tensor, ...]:
    """-> d_gx [T, B, 4H], d_h0 [B, H], d_c0 [B, H] (acc), d_w_hh [4H, H] (or None), d_peephole
    [3, H], d_ln_hh [4H], d_ln_c [2, H] (acc, or None without that part of the variant)."""
    T, B, G = gates.shape
    H = G // 4
    dtype, acc, dev = hs.dtype, cs.dtype, hs.device
    peephole, ln_hh, ln_c = _acc(peephole, acc), _acc(ln_hh, acc), _acc(ln_c, acc)
    layer_norm = bool(flags & variants.LAYER_NORM)
    ln_saved = ln_saved if layer_norm else None  # [0] placeholders otherwise
    c_tilde = c_new if flags & variants.ZONEOUT_C else cs[1:]  # c̃ of every step [T, B, H]
    d_ln_c_rows = None
    if backend == "triton_persistent":
        d_hs = _with_packed_output_grad(d_hs, d_out_packed, batch_sizes)
        d_pre, d_h, d_c = triton_persistent.persistent_backward(
            d_hs.contiguous(), d_cn.to(acc), gates, cs, w_hh, batch_sizes,
            flags=flags, peephole=peephole, zoneout=zoneout, dropout=dropout,
            c_new=c_new if flags & variants.ZONEOUT_C else None,
        )  # fmt: skip
        d_rec = d_pre
    else:
        d_pre = empty(T, B, G, dtype=dtype, device=dev)  # ∂L/∂gx
        d_rec = empty(T, B, G, dtype=dtype, device=dev) if layer_norm else d_pre  # ∂L/∂r before LN
        d_ln_c_rows = empty(T, B, 2, H, dtype=acc, device=dev) if layer_norm else None
        d_h, d_c = _step_backward(
            d_hs, d_out_packed, d_cn, gates, cs, c_tilde, ln_saved, w_hh, _sizes(batch_sizes, T, B),
            backend, flags, peephole, ln_hh, ln_c, zoneout, dropout, d_pre, d_rec, d_ln_c_rows,
        )  # fmt: skip

    d_w_hh = d_peephole = d_ln_hh = d_ln_c = None
    if needs_w_hh:
        h_prev = hs[:-1] if dropout is None else hs[:-1] * dropout  # the GEMM's input, h ⊙ m
        d_w_hh = gemm.mm_tn(d_rec.view(-1, G), h_prev.reshape(-1, H))  # [4H, H]
    if flags & variants.PEEPHOLES:
        d_a = d_pre.view(T, B, 4, H).to(acc)
        d_peephole = torch.stack(
            [
                (d_a[:, :, 0] * cs[:-1]).sum((0, 1)),  # p_i sees c_{t−1}
                (d_a[:, :, 1] * cs[:-1]).sum((0, 1)),  # p_f sees c_{t−1}
                (d_a[:, :, 3] * c_tilde).sum((0, 1)),  # p_o sees c̃
            ]
        )  # [3, H]
    if layer_norm:
        d_ln_hh = (d_pre.to(acc) * ln_saved[..., :G]).sum((0, 1))  # Σ ∂L/∂a ⊙ r̂  [4H]
        d_ln_c = d_ln_c_rows.sum((0, 1))  # [2, H]
    return d_pre, d_h, d_c, d_w_hh, d_peephole, d_ln_hh, d_ln_c


def _step_backward(
    d_hs, d_out_packed, d_cn, gates, cs, c_tilde, ln_saved, w_hh, sizes, backend, flags,
    peephole, ln_hh, ln_c, zoneout, dropout, d_pre, d_rec, d_ln_c_rows,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The per-step backends' reverse loop: writes d_pre, d_rec (layer norm), d_ln_c_rows and
    returns ∂L/∂h0 [B, H], ∂L/∂c0 [B, H] in acc."""
    _, backward_into = _step_functions(backend)
    T, B, _ = gates.shape
    H = cs.shape[-1]
    acc, dev = cs.dtype, cs.device
    # the reference backend's fast form: without layer norm and zoneout the step backward is
    # linear in (∂h, ∂c) with coefficients that need no gradient, computed for all steps at once
    linear = backend == "reference" and not flags & (
        variants.LAYER_NORM | variants.ZONEOUT_C | variants.ZONEOUT_H
    )
    if linear:
        coef, carry, keep = torch_gates.variant_backward_coefficients(
            flags, gates, c_tilde, cs[:-1], peephole
        )
        coef, d_pre_4 = coef.view(T, B, 4, H), d_pre.view(T, B, 4, H)
    d_out, d_h, d_c = _loop_start_gradients(d_hs, d_out_packed, d_cn, acc)
    zoneout_h = bool(flags & variants.ZONEOUT_H)
    d_h_carry = scratch("d_h_carry", B, H, dtype=acc, device=dev) if zoneout_h else None  # z^h ⊙ ∂L/∂h_t
    recurrent = gemm.StepWeight(w_hh.t(), B, T)  # ∂L/∂r_t·W_hh
    layer_norm = bool(flags & variants.LAYER_NORM)
    # without masks on h the step's ∂L/∂h_{k−1} is the vanilla layer's: one GEMM adding the
    # output gradient, straight into the fp32 state when the GEMM runs in fp32
    plain = dropout is None and not zoneout_h
    gemm_into_state = acc == d_pre.dtype
    d_h[: sizes[-1]] += d_out[T - 1][: sizes[-1]]
    for k in reversed(range(T)):
        n = sizes[k]
        if linear:
            torch_gates.gates_backward_from_coefficients_into(
                d_h[:n], d_c[:n], coef[k, :n, :3], coef[k, :n, 3], carry[k, :n], keep[k, :n],
                d_pre_4[k, :n, :3], d_pre_4[k, :n, 3], d_c[:n],
            )  # fmt: skip
        else:
            backward_into(
                flags, d_h[:n], d_c[:n], gates[k, :n], cs[k, :n], c_tilde[k, :n],
                None if ln_saved is None else ln_saved[k, :n],
                peephole, ln_hh, ln_c,
                None if zoneout is None else zoneout[k, :n],
                d_pre[k, :n],
                d_rec[k, :n] if layer_norm else None,
                d_c[:n],
                d_h_carry[:n] if zoneout_h else None,
                None if d_ln_c_rows is None else d_ln_c_rows[k, :n],
                check=k == T - 1,  # one step checks the arguments: the others have the same kinds
            )  # fmt: skip
        if n < B:  # rows that did not advance contribute nothing to the sums after the loop
            d_pre[k, n:] = 0
            if layer_norm:
                d_rec[k, n:] = 0
                d_ln_c_rows[k, n:] = 0
        # ∂L/∂h_{k−1} = (∂L/∂r_k·W_hh) ⊙ m + z^h ⊙ ∂L/∂h_k + the output gradient of step k − 1
        n_prev = sizes[k - 1] if k > 0 else 0
        if plain and n_prev == n:
            rows = recurrent.addmm(d_out[k - 1][:n], d_rec[k, :n], out=d_h[:n] if gemm_into_state else None)
            if not gemm_into_state:
                d_h[:n] = rows
            continue
        rows = recurrent.mm(d_rec[k, :n]).to(acc)  # [n, H]
        if dropout is not None:
            rows = rows * dropout[:n]
        if zoneout_h:
            rows = rows + d_h_carry[:n]
        d_h[:n] = rows
        if n_prev > 0:
            d_h[:n_prev] += d_out[k - 1][:n_prev]
    return d_h, d_c


# ---- the registered operators ----


@torch.library.custom_op("lstmlab::lstm_variant_layer_fwd", mutates_args=())
def lstm_variant_layer_fwd(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    batch_sizes: Tensor | None,
    backend: str,
    flags: int,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    dropout: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`_variant_forward`: -> hs, out_packed, c_n, and cs, gates, c_new, ln_saved."""
    return _variant_forward(
        gx, h0, c0, w_hh, batch_sizes, backend, flags, peephole, ln_hh, ln_c, zoneout, dropout
    )


@lstm_variant_layer_fwd.register_fake
def _(gx, h0, c0, w_hh, batch_sizes, backend, flags, peephole, ln_hh, ln_c, zoneout, dropout):
    T, B, G = gx.shape
    H = G // 4
    acc = accumulation_dtype(gx.dtype)
    return (
        gx.new_empty(T + 1, B, H),
        gx.new_empty(0) if batch_sizes is None else gx.new_empty(T, B, H),
        c0.new_empty(B, H),
        gx.new_empty(T + 1, B, H, dtype=acc),
        gx.new_empty(T, B, G, dtype=acc),
        gx.new_empty(T, B, H, dtype=acc) if flags & variants.ZONEOUT_C else gx.new_empty(0, dtype=acc),
        gx.new_empty(T, B, G + 3, dtype=acc) if flags & variants.LAYER_NORM else gx.new_empty(0, dtype=acc),
    )


@torch.library.custom_op("lstmlab::lstm_variant_layer_bwd", mutates_args=())
def lstm_variant_layer_bwd(
    d_hs: Tensor,
    d_out_packed: Tensor,
    d_cn: Tensor,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    c_new: Tensor,
    ln_saved: Tensor,
    w_hh: Tensor,
    batch_sizes: Tensor | None,
    backend: str,
    flags: int,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    dropout: Tensor | None,
    needs_w_hh: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`_variant_backward`; a gradient that is not needed comes back as an empty tensor."""
    grads = _variant_backward(
        d_hs, d_out_packed, d_cn, hs, cs, gates, c_new, ln_saved, w_hh, batch_sizes, backend, flags,
        peephole, ln_hh, ln_c, zoneout, dropout, needs_w_hh,
    )  # fmt: skip
    return tuple(cs.new_empty(0) if g is None else g for g in grads)


@lstm_variant_layer_bwd.register_fake
def _(d_hs, d_out_packed, d_cn, hs, cs, gates, c_new, ln_saved, w_hh, batch_sizes, backend, flags,
      peephole, ln_hh, ln_c, zoneout, dropout, needs_w_hh):  # fmt: skip
    T, B, G = gates.shape
    H = G // 4
    none = cs.new_empty(0)
    return (
        hs.new_empty(T, B, G),
        cs.new_empty(B, H),
        cs.new_empty(B, H),
        w_hh.new_empty(w_hh.shape) if needs_w_hh else none,
        cs.new_empty(3, H) if flags & variants.PEEPHOLES else cs.new_empty(0),
        cs.new_empty(G) if flags & variants.LAYER_NORM else cs.new_empty(0),
        cs.new_empty(2, H) if flags & variants.LAYER_NORM else cs.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    gx, h0, c0, w_hh, batch_sizes, backend, flags, peephole, ln_hh, ln_c, zoneout, dropout = inputs
    hs, _, _, cs, gates, c_new, ln_saved = output
    ctx.mark_non_differentiable(cs, gates, c_new, ln_saved)
    ctx.save_for_backward(
        w_hh, batch_sizes, hs, cs, gates, c_new, ln_saved, peephole, ln_hh, ln_c, zoneout, dropout
    )
    ctx.backend, ctx.flags = backend, flags
    ctx.dtypes = (gx.dtype, h0.dtype, c0.dtype)


def _backward(ctx, d_hs, d_out_packed, d_cn, *_saved_grads):
    w_hh, batch_sizes, hs, cs, gates, c_new, ln_saved, peephole, ln_hh, ln_c, zoneout, dropout = (
        ctx.saved_tensors
    )
    needs_w_hh = ctx.needs_input_grad[3]
    d_gx, d_h0, d_c0, d_w_hh, d_peephole, d_ln_hh, d_ln_c = torch.ops.lstmlab.lstm_variant_layer_bwd(
        d_hs, d_out_packed, d_cn, hs, cs, gates, c_new, ln_saved, w_hh, batch_sizes, ctx.backend,
        ctx.flags, peephole, ln_hh, ln_c, zoneout, dropout, needs_w_hh,
    )  # fmt: skip
    _, h_dtype, c_dtype = ctx.dtypes

    def param_grad(grad: Tensor, param: Tensor | None, index: int) -> Tensor | None:
        return grad.to(param.dtype) if param is not None and ctx.needs_input_grad[index] else None

    return (
        d_gx,
        d_h0.to(h_dtype),
        d_c0.to(c_dtype),
        d_w_hh if needs_w_hh else None,
        None,
        None,
        None,
        param_grad(d_peephole, peephole, 7),
        param_grad(d_ln_hh, ln_hh, 8),
        param_grad(d_ln_c, ln_c, 9),
        None,
        None,
    )


lstm_variant_layer_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_variant_args(
    flags: int,
    T: int,
    B: int,
    H: int,
    peephole: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    zoneout: Tensor | None,
    dropout: Tensor | None,
) -> None:
    """Every tensor a flag needs is there with its shape, and none is given that no flag asks for."""
    expected = {
        "peephole": (variants.PEEPHOLES, peephole, (3, H)),
        "ln_hh": (variants.LAYER_NORM, ln_hh, (4 * H,)),
        "ln_c": (variants.LAYER_NORM, ln_c, (2, H)),
        "zoneout": (variants.ZONEOUT_C | variants.ZONEOUT_H, zoneout, (T, B, 2, H)),
        "dropout": (variants.RECURRENT_DROPOUT, dropout, (B, H)),
    }
    for name, (bits, tensor, shape) in expected.items():
        wanted = bool(flags & bits)
        what = " or ".join(variants.flag_names(bits))
        if wanted and tensor is None:
            raise ValueError(f"flags ask for {what}, which needs {name} {shape}; got None")
        if not wanted and tensor is not None:
            raise ValueError(f"{name} was given but flags ({flags}) do not ask for {what}")
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if zoneout is not None and zoneout.dtype != torch.uint8:
        raise ValueError(f"zoneout masks must be uint8 (0 or 1), got {zoneout.dtype}")


def lstm_variant_layer(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    flags: int,
    *,
    peephole: Tensor | None = None,
    ln_hh: Tensor | None = None,
    ln_c: Tensor | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
    batch_sizes: Sequence[int] | Tensor | None = None,
    backend: str = "reference",
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Runs one layer and direction of a cell variant over a sequence whose input projection is done.

    Args:
        gx: [T, B, 4H] input projection (with layer norm: γ_ih ⊙ LN(x·W_ihᵀ) + b).
        h0, c0: [B, H] initial states. w_hh: [4H, H].
        flags: ``CellVariant.flags``, plus ``variants.ZONEOUT_C`` / ``ZONEOUT_H`` /
            ``RECURRENT_DROPOUT`` when the matching masks are given (training).
        peephole: [3, H] (p_i, p_f, p_o). ln_hh: [4H] γ_hh. ln_c: [2, H] (γ_c, β_c).
        zoneout: [T, B, 2, H] uint8 masks (z^c, z^h), 1 = keep the previous value.
        dropout: [B, H] recurrent dropout mask, 0 or 1/(1 − p), dtype of gx.
        batch_sizes, backend: as :func:`lstmlab.kernels.lstm_layer`.

    Returns:
        out [T, B, H], h_n [B, H], c_n [B, H].
    """
    if gx.dim() != 3 or gx.shape[-1] % 4:
        raise ValueError(f"gx must be [T, B, 4H], got shape {tuple(gx.shape)}")
    T, B, G = gx.shape
    batch_sizes = _check_layer_args(T, B, G, h0, c0, w_hh, None, batch_sizes, backend)
    if backend == "triton_persistent" and flags & variants.LAYER_NORM:
        raise ValueError("layer norm runs on the per-step kernels, not 'triton_persistent'")
    _check_variant_args(flags, T, B, G // 4, peephole, ln_hh, ln_c, zoneout, dropout)
    hs, out_packed, c_n, *_ = torch.ops.lstmlab.lstm_variant_layer_fwd(
        gx, h0, c0, w_hh, batch_sizes, backend, flags, peephole, ln_hh, ln_c, zoneout, dropout
    )
    out = hs[1:] if batch_sizes is None else out_packed
    return out, hs[-1], c_n
