"""Packed sequences to padded and back, as registered operators that compilers can trace.

``torch.nn.utils.rnn.pad_packed_sequence`` reads ``batch_sizes[0]`` on the host to size its result,
which torch.compile cannot trace (Dynamo skips the function: a graph break). These two ops carry the
same computation behind a fake implementation: the padded batch B comes from the caller when it is
known from a tensor's shape (``sorted_indices``, ``h_0``), and is otherwise a data-dependent size
(an unbacked SymInt) that the rest of the graph carries symbolically.

N: packed rows (sum of batch_sizes)  T: time  B: batch  F: features
"""

from __future__ import annotations

import torch
from torch import Tensor


def _lengths(batch_sizes: Tensor, batch: int) -> Tensor:
    """Sequence lengths [B], longest first, from batch_sizes [T] (both int64 on the CPU)."""
    return (batch_sizes.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)


@torch.library.custom_op("lstmlab::pad_packed", mutates_args=())
def pad_packed(data: Tensor, batch_sizes: Tensor, batch: int | None = None) -> Tensor:
    """data [N, F] packed, batch_sizes [T] -> [T, B, F], zero past each sequence's end.

    ``batch`` is B if the caller knows it; it must then equal ``batch_sizes[0]``.
    """
    T = batch_sizes.shape[0]
    longest = int(batch_sizes[0]) if T else 0
    if batch is not None and batch != longest:
        raise RuntimeError(f"Expected a batch of {batch} sequences (from the hidden state), got {longest}")
    padded, _ = torch.ops.aten._pad_packed_sequence(data, batch_sizes, False, 0.0, T)
    return padded


@pad_packed.register_fake
def _(data, batch_sizes, batch=None):
    if batch is None:  # known only from the data: a size the graph carries symbolically
        batch = torch.library.get_ctx().new_dynamic_size()
    return data.new_empty(batch_sizes.shape[0], batch, data.shape[1])


@torch.library.custom_op("lstmlab::pack_padded", mutates_args=())
def pack_padded(padded: Tensor, batch_sizes: Tensor, rows: int) -> Tensor:
    """padded [T, B, F], batch_sizes [T] -> data [N, F] with N = ``rows`` = sum(batch_sizes)."""
    data, _ = torch.ops.aten._pack_padded_sequence(padded, _lengths(batch_sizes, padded.shape[1]), False)
    if data.shape[0] != rows:
        raise RuntimeError(f"batch_sizes sum to {data.shape[0]} rows, expected {rows}")
    return data


@pack_padded.register_fake
def _(padded, batch_sizes, rows):
    return padded.new_empty(rows, padded.shape[2])


# each op's backward is the other op


def _pad_packed_setup(ctx, inputs, output) -> None:
    data, batch_sizes, _ = inputs
    ctx.save_for_backward(batch_sizes)
    ctx.rows = data.shape[0]  # N


def _pad_packed_backward(ctx, d_padded):
    (batch_sizes,) = ctx.saved_tensors
    return pack_padded(d_padded, batch_sizes, ctx.rows), None, None


def _pack_padded_setup(ctx, inputs, output) -> None:
    padded, batch_sizes, _ = inputs
    ctx.save_for_backward(batch_sizes)
    ctx.batch = padded.shape[1]  # B


def _pack_padded_backward(ctx, d_data):
    (batch_sizes,) = ctx.saved_tensors
    return pad_packed(d_data, batch_sizes, ctx.batch), None, None


pad_packed.register_autograd(_pad_packed_backward, setup_context=_pad_packed_setup)
pack_padded.register_autograd(_pack_padded_backward, setup_context=_pack_padded_setup)


# ---- under torch.func transforms and forward-mode AD: the same maps in differentiable ops ----


def _steps_and_rows(batch_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """(step, row) of every packed element, in packed order: [N] each, on the CPU."""
    T = batch_sizes.shape[0]
    longest = int(batch_sizes[0]) if T else 0
    return (torch.arange(longest).unsqueeze(0) < batch_sizes.unsqueeze(1)).nonzero().unbind(1)


def pad(data: Tensor, batch_sizes: Tensor, batch: int | None = None) -> Tensor:
    """:func:`pad_packed`, or under a transform an index_put that every transform differentiates."""
    from .transforms import transform_active

    if not transform_active((data,)):
        return pad_packed(data, batch_sizes, batch)
    steps, rows = _steps_and_rows(batch_sizes)
    longest = int(batch_sizes[0]) if batch_sizes.shape[0] else 0
    if batch is not None and batch != longest:
        raise RuntimeError(f"Expected a batch of {batch} sequences (from the hidden state), got {longest}")
    padded = data.new_zeros(batch_sizes.shape[0], longest, data.shape[-1])
    return padded.index_put((steps.to(data.device), rows.to(data.device)), data)


def pack(padded: Tensor, batch_sizes: Tensor, rows: int) -> Tensor:
    """:func:`pack_padded`, or under a transform a gather that every transform differentiates."""
    from .transforms import transform_active

    if not transform_active((padded,)):
        return pack_padded(padded, batch_sizes, rows)
    steps, batch_rows = _steps_and_rows(batch_sizes)
    return padded[steps.to(padded.device), batch_rows.to(padded.device)]  # [N, F]
