"""Persistent LSTM kernels in Triton: one launch runs every timestep of one layer and direction.

The per-step path (`layer.py`) launches a GEMM and a gate kernel per step each way; at small batch
the GPU then waits on launches. Here one program per slice of U hidden units lives for the whole
sequence, keeps its part of W_hh on chip, and meets the other programs at a grid-wide barrier
between steps (design and diagram: docs/persistent.md).

Forward, program p owns units j ∈ [pU, pU + U): the 4U rows of W_hh that produce their four gates,
stacked gate-major (row qU + u), held on chip in K chunks of BLOCK_K columns. The dot is transposed,
W[4U, K]×hᵀ[K, BLOCK_B] -> preᵀ [4U, BLOCK_B], so the batch sits on its N side: one tile up to B = 128.
  step t: h_{t−1}ᵀ chunk by chunk from global memory (L2) -> dot -> + gx_t -> gates -> c_t in fp32
          -> store own slice of h_t -> arrive at the barrier -> store c_t, gates (when saved) and
          prefetch gx_{t+1} -> wait at the barrier
With one batch tile (B ≤ BLOCK_B) c_{t−1}, own h_{t−1} and gx_t stay in registers across steps
(loaded at t_start, so a launch can start or stop at any step); with several tiles of BLOCK_B rows
each program reads its own c_{t−1} and h_{t−1} back from what it stored.
Backward, program p owns the same units but the 4H columns j of W_hh, since
∂L/∂h_{t−1}[:, j] = Σ_r ∂L/∂pre_t[:, r]·W_hh[r, j] needs every gate row of unit j.
  step t: load step t's saved gates and c -> wait at the barrier -> ∂L/∂pre_{t+1} [B, 4H] from global
          memory -> dot -> ∂L/∂h_t (own units) -> gate derivatives of step t -> store own columns of
          ∂L/∂pre_t -> arrive at the barrier, carry ∂L/∂c
In 16 bits the dot is W_colsᵀ [U, 4H]·∂L/∂preᵀ [4H, B]: 16 units on the mma's M side, the whole batch
(up to 128 rows) on N, 4H walked in unpadded static chunks, each split across the warps up to B = 32
(a 3-D dot over SPLIT_K slices, summed); so does fp32 where it compiles (TF32 up to H = 768, FMA at
B ≤ 16), else it keeps, as fp64 does, the first generation's ∂L/∂pre·W_cols in 16-row chunks (fp32:
4 above H = 512). fp32's forward takes the whole batch as one tile only where it compiles, else
16-row batch tiles (fp32_config). Where W_hh does not fit on chip at the grid the SMs allow (TF32 at
H = 1024 on a 114-SM H100 PCIe), the last stream_k K chunks of either kernel are read from L2 every
step instead of kept (fp32_streamed_config).
Both directions of a bidirectional layer can run in one launch (BIDIR: grid (P, 2), every tensor
stacked on a leading [2], a barrier counter per direction). With one chunk ∂L/∂h and ∂L/∂c stay
in registers and step t's saved gates and c are loaded between the arrive and the wait (with several
chunks: arrive and wait at once, before the loads). ∂W_hh, ∂W_ih and ∂x are one GEMM each after the
loop, in the caller.

The barrier is bounded: a program that waits too long marks the run aborted and every program then
writes NaN; the next launcher call raises PersistentKernelTimeout (the flag is read lazily, with no
host sync per call). Without a GPU (TRITON_INTERPRET=1) the interpreter runs programs one after
another, so the same kernels run one launch per step with the barrier compiled out (SYNC=False).

B: batch  T: time  H: hidden size  G = 4H: stacked gates (i, f, g, o)  U: hidden units per program
P = ceil(H / U): programs  acc: fp32 (fp64 for fp64 inputs)
"""

from __future__ import annotations

import atexit
import functools
import os
import warnings
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import variants
from .triton_gates import (
    F_PEEPHOLES,
    F_RECURRENT_DROPOUT,
    F_ZONEOUT_C,
    F_ZONEOUT_H,
    _sigmoid,
    _tanh,
    _variant_gates_bwd,
    _variant_gates_fwd,
    _variant_h_bwd,
    _variant_h_fwd,
)

# Triton decides at import time whether kernels run compiled or through its CPU interpreter.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Bit 30 of the barrier counter: set by a program that timed out, it releases every waiter at once.
# Arrivals count in the bits below it, so T·P must stay under 2**30.
ABORT = tl.constexpr(1 << 30)
# Polls of the barrier counter before a program gives up (each poll is an L2 round trip, ≈1 µs):
# seconds, far beyond any step, so only programs that are not co-resident ever reach it.
SPIN_LIMIT = 1 << 22

# The cell variants' bits as compile-time switches, the encoding triton_gates.py defines for both
# Triton files: each kernel takes FLAGS as a tl.constexpr and tests `F_… & FLAGS`, so the vanilla cell
# (FLAGS = 0) compiles to the code it had before variants existed. Layer norm is not among them (see
# LAYER_NORM_REASON).
# gate math that one stacked activation of [BLOCK_B, 4U] cannot do: the gates are split first
F_SPLIT_GATES = tl.constexpr(
    variants.PEEPHOLES
    | variants.CIFG
    | variants.NO_INPUT_GATE
    | variants.NO_FORGET_GATE
    | variants.NO_OUTPUT_GATE
    | variants.NO_INPUT_ACTIVATION
)
# every bit the persistent kernels take: all of variants.py's but LAYER_NORM
PERSISTENT_FLAGS = functools.reduce(int.__or__, variants.FLAG_NAMES) & ~variants.LAYER_NORM
LAYER_NORM_REASON = (
    "layer norm is not in the persistent kernels: it normalises the recurrent product over 4H and "
    "the cell over H at every step, a grid-wide reduction (more barriers per step) where each "
    "program owns a few units; it runs on the per-step kernels ('triton_step')"
)


@triton.jit
def _poll(p_sync, ACQUIRE_LOAD: tl.constexpr):
    """The barrier counter, read with acquire semantics at gpu scope."""
    if ACQUIRE_LOAD:  # a plain load in every thread: no atomic unit, no broadcast through shared memory
        return tl.inline_asm_elementwise(
            "ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [p_sync], dtype=tl.int32, is_pure=False, pack=1
        )
    else:  # the interpreter has no inline assembly
        return tl.atomic_add(p_sync, 0, sem="acquire", scope="gpu")


@triton.jit
def _barrier_arrive(p_sync):
    """Arrive at the next grid barrier: returns the counter as this arrival left it."""
    # every thread's stores are issued before the arrival, which releases them at gpu scope
    tl.debug_barrier()
    return tl.atomic_add(p_sync, 1, sem="acq_rel", scope="gpu") + 1


@triton.jit
def _barrier_wait(p_sync, b_seen, i_bar, n_sync, spin_limit, aborted, ACQUIRE_LOAD: tl.constexpr):
    """Wait at the i_bar-th grid barrier of this launch (1-based) among n_sync programs, after
    _barrier_arrive returned b_seen; work that no other program waits for may run in between.

    Returns whether the run is aborted: by this program (it waited spin_limit polls) or another.
    """
    n_target = i_bar * n_sync
    n_spins = i_bar * 0
    while ((b_seen & ABORT) == 0) & (b_seen < n_target) & (n_spins < spin_limit):
        b_seen = _poll(p_sync, ACQUIRE_LOAD)
        n_spins += 1
    timed_out = ((b_seen & ABORT) == 0) & (b_seen < n_target)
    if timed_out:
        tl.atomic_or(p_sync, ABORT, sem="relaxed", scope="gpu")
        tl.atomic_xchg(p_sync + 1, 1, sem="relaxed", scope="gpu")  # the flag the host reads
    tl.debug_barrier()
    return aborted | timed_out | ((b_seen & ABORT) != 0)


@triton.jit
def _grid_barrier(p_sync, i_bar, n_sync, spin_limit, aborted, ACQUIRE_LOAD: tl.constexpr):
    """Arrive and wait at once (nothing in between)."""
    b_seen = _barrier_arrive(p_sync)
    return _barrier_wait(p_sync, b_seen, i_bar, n_sync, spin_limit, aborted, ACQUIRE_LOAD)


@triton.jit
def _split_gates(b_x, BLOCK_B: tl.constexpr, U: tl.constexpr):
    """[BLOCK_B, 4U], column 4u + q = gate q of unit u -> i, f, g, o, each [BLOCK_B, U]."""
    # q = 2a + b: the last axis of [BLOCK_B, U, 2(a), 2(b)] splits (i, g) from (f, o)
    b_ig, b_fo = tl.split(tl.reshape(b_x, (BLOCK_B, U, 2, 2)))
    b_i, b_g = tl.split(b_ig)
    b_f, b_o = tl.split(b_fo)
    return b_i, b_f, b_g, b_o


@triton.jit
def _dot(b_a, b_b, acc: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers
        b_a, b_b = b_a.to(tl.float32), b_b.to(tl.float32)
    return tl.dot(b_a, b_b, out_dtype=acc, input_precision=DOT_PRECISION)


@triton.jit
def _split_gates_t(b_x, U: tl.constexpr, BLOCK_B: tl.constexpr):
    """[4U, BLOCK_B], row qU + u = gate q of unit u -> i, f, g, o, each [U, BLOCK_B]."""
    # q = 2a + b: the last axis of [U, BLOCK_B, 2(a), 2(b)] splits (i, g) from (f, o)
    b_x = tl.permute(tl.reshape(b_x, (2, 2, U, BLOCK_B)), (2, 3, 0, 1))
    b_ig, b_fo = tl.split(b_x)
    b_i, b_g = tl.split(b_ig)
    b_f, b_o = tl.split(b_fo)
    return b_i, b_f, b_g, b_o


@triton.jit
def _dot_acc(b_a, b_b, b_acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers
        b_a, b_b = b_a.to(tl.float32), b_b.to(tl.float32)
    return tl.dot(b_a, b_b, b_acc, out_dtype=b_acc.dtype, input_precision=DOT_PRECISION)


@triton.jit
def _w_chunk(p_w, o_r, m_r, k0, H, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of this program's 4U rows of W_hh: [4U, BLOCK_K], or
    [S, 4U, BLOCK_K / S] (slice s of the chunk's columns) for a 3-D dot."""
    if SPLIT_K == 1:
        o_k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(p_w + o_r[:, None] * H + o_k[None, :], mask=m_r[:, None] & (o_k < H)[None, :], other=0)
    else:
        o_k = k0 + (tl.arange(0, SPLIT_K) * (BLOCK_K // SPLIT_K))[:, None, None]
        o_k += tl.arange(0, BLOCK_K // SPLIT_K)[None, None, :]
        return tl.load(p_w + o_r[None, :, None] * H + o_k, mask=m_r[None, :, None] & (o_k < H), other=0)


@triton.jit
def _h_chunk(p_d, k0, o_b, m_b, H, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Rows [k0, k0 + BLOCK_K) of h_{t−1}ᵀ: [BLOCK_K, BLOCK_B], or [S, BLOCK_K / S, BLOCK_B].
    .cg: h_{t−1} was written by other SMs; read it from L2, never from a stale L1 line."""
    if SPLIT_K == 1:
        o_k = k0 + tl.arange(0, BLOCK_K)
        p_h = p_d + o_k[:, None] + o_b[None, :] * H
        return tl.load(p_h, mask=(o_k < H)[:, None] & m_b[None, :], other=0, cache_modifier=".cg")
    else:
        o_k = k0 + (tl.arange(0, SPLIT_K) * (BLOCK_K // SPLIT_K))[:, None, None]
        o_k += tl.arange(0, BLOCK_K // SPLIT_K)[None, :, None]
        p_h = p_d + o_k + o_b[None, None, :] * H
        return tl.load(p_h, mask=(o_k < H) & m_b[None, None, :], other=0, cache_modifier=".cg")


@triton.jit
def _dot_chunk(
    b_w, b_hp, b_pre, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr
):
    """b_pre [4U, BLOCK_B] + a W chunk · an h_{t−1}ᵀ chunk: the batch on the dot's N side."""
    if SPLIT_K == 1:
        return _dot_acc(b_w, b_hp, b_pre, DOT_PRECISION, UPCAST_DOT)
    else:  # [S, 4U, BLOCK_K/S]×[S, BLOCK_K/S, BLOCK_B], then Σ over s
        b_zero = tl.zeros((SPLIT_K, b_pre.shape[0], b_pre.shape[1]), b_pre.dtype)
        return b_pre + tl.sum(_dot_acc(b_w, b_hp, b_zero, DOT_PRECISION, UPCAST_DOT), axis=0)


@triton.jit
def _pick(k: tl.constexpr, b_0, b_1, b_2, b_3, b_4, b_5, b_6, b_7):
    """The k-th of eight tiles (k known at compile time)."""
    if k == 0:  # noqa: SIM116 (a Triton JIT function has no dicts)
        return b_0
    elif k == 1:
        return b_1
    elif k == 2:
        return b_2
    elif k == 3:
        return b_3
    elif k == 4:
        return b_4
    elif k == 5:
        return b_5
    elif k == 6:
        return b_6
    else:
        return b_7


@triton.jit
def _fwd_cell(p_d, b_w0, b_w1, b_w2, b_w3, b_w4, b_w5, b_w6, b_w7, b_gx, b_c, b_h, b_s, b_pi, b_pf, b_po,
              p_h_next, p_zone_t, p_drop, p_hd_next, p_cnew_t, o_b, m_b, o_u, m_u, H, n_rows, b_poison,
              p_w, o_r, m_r, U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
              N_K: tl.constexpr, N_STREAM: tl.constexpr, STREAM_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
              FLAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):  # fmt: skip
    """One step of one batch tile, transposed (units × batch): the dot over K chunks (the last
    N_STREAM of them read from W_hh in memory, p_w rows o_r, the others held on chip), gx added
    after it, the gates, c_t and h_t; stores h_t (and h_t ⊙ m, c̃), which other programs or the
    caller read. Returns the new c [U, BLOCK_B] acc and h [U, BLOCK_B] (dtype of hs), and i, f, g, o
    [U, BLOCK_B]."""
    tl.static_assert(N_K <= 8, "at most 8 K chunks (MAX_K_CHUNKS)")
    tl.static_assert(N_STREAM < N_K, "at least one K chunk on chip")
    N_KEEP: tl.constexpr = N_K - N_STREAM
    SB: tl.constexpr = BLOCK_K // STREAM_SPLIT  # columns of one slice of a streamed chunk
    acc = b_c.dtype
    b_pre = tl.zeros((4 * U, BLOCK_B), acc)
    # h chunk k + 1 is in flight while chunk k is multiplied, never more: a thread barrier after
    # dot k keeps the load of chunk k + 2 below it (else all of [H, BLOCK_B] is loaded into
    # registers at once: 255 registers and spills at B = 64, H = 768)
    b_hn = _h_chunk(p_d, 0, o_b, m_b, H, BLOCK_K, SPLIT_K)
    for k in tl.static_range(N_K):
        b_hk = b_hn
        b_w = _pick(k, b_w0, b_w1, b_w2, b_w3, b_w4, b_w5, b_w6, b_w7)
        if k + 1 < N_KEEP:  # (N_KEEP ≤ N_K) a streamed chunk loads its own h slices
            b_hn = _h_chunk(p_d, (k + 1) * BLOCK_K, o_b, m_b, H, BLOCK_K, SPLIT_K)
        if k < N_KEEP:
            b_pre = _dot_chunk(b_w, b_hk, b_pre, SPLIT_K, DOT_PRECISION, UPCAST_DOT)
        else:  # a chunk not kept on chip: read from L2 every step, for its own dot only (one staging
            # buffer in shared memory for all of them), in STREAM_SPLIT column slices one after another
            # so that a [4U, BLOCK_K / STREAM_SPLIT] tile is all a slice holds in registers
            for j in tl.static_range(STREAM_SPLIT):
                b_ws = _w_chunk(p_w, o_r, m_r, k * BLOCK_K + j * SB, H, SB, SPLIT_K)
                b_hs = _h_chunk(p_d, k * BLOCK_K + j * SB, o_b, m_b, H, SB, SPLIT_K)
                b_pre = _dot_chunk(b_ws, b_hs, b_pre, SPLIT_K, DOT_PRECISION, UPCAST_DOT)
                if STREAM_SPLIT > 1:
                    tl.debug_barrier()
        if k + 2 < N_K:
            tl.debug_barrier()
    b_pre += b_gx.to(acc)  # [4U, BLOCK_B]; gx is added after the dot, off its critical path
    if (F_SPLIT_GATES & FLAGS) == 0:
        b_act = _sigmoid(b_pre * b_s) * b_s - (b_s - 1) + b_poison
        b_i, b_f, b_g, b_o = _split_gates_t(b_act, U, BLOCK_B)
        b_c_next = b_f * b_c + b_i * b_g
    else:  # gate by gate: peepholes need c_{t−1} and c̃, CIFG crosses gates
        b_a_i, b_a_f, b_a_g, b_a_o = _split_gates_t(b_pre + b_poison, U, BLOCK_B)  # [U, BLOCK_B] each
        b_one = tl.full((U, BLOCK_B), 1, acc) + b_poison  # a removed gate
        b_i, b_f, b_g, b_o, b_c_next = _variant_gates_fwd(
            b_a_i, b_a_f, b_a_g, b_a_o, b_c, b_pi, b_pf, b_po, b_one, FLAGS
        )
    b_h_next = _variant_h_fwd(b_o, b_c_next, FLAGS)
    m_step = (o_b < n_rows)[None, :]  # rows that advance; the others carry h and c
    o_own = o_u[:, None] + o_b[None, :] * H  # [U, BLOCK_B]
    m_own = m_u[:, None] & m_b[None, :]
    p_z = p_zone_t + o_own + (o_b * H)[None, :]  # z^c of own units; z^h at + H
    if F_ZONEOUT_C & FLAGS:  # c̃ for the backward, then c_t = c_{t−1} where z^c = 1
        tl.store(p_cnew_t + o_own, tl.where(m_step, b_c_next, b_c) + b_poison, mask=m_own)
        b_z = tl.load(p_z, mask=m_own, other=0)
        b_c_next = tl.where(b_z != 0, b_c + b_poison, b_c_next)
    if F_ZONEOUT_H & FLAGS:
        b_z = tl.load(p_z + H, mask=m_own, other=0)
        b_h_next = tl.where(b_z != 0, b_h.to(acc) + b_poison, b_h_next)
    b_c = tl.where(m_step, b_c_next, b_c + b_poison)
    b_h = tl.where(m_step, b_h_next.to(b_h.dtype), b_h + b_poison.to(b_h.dtype))
    tl.store(p_h_next + o_own, b_h, mask=m_own)
    if F_RECURRENT_DROPOUT & FLAGS:  # the next step's d: h_t ⊙ m, rounded once (exact in acc)
        b_m = tl.load(p_drop + o_own, mask=m_own, other=0).to(acc)
        tl.store(p_hd_next + o_own, (b_h.to(acc) * b_m).to(b_h.dtype), mask=m_own)
    return b_c, b_h, b_i, b_f, b_g, b_o


@triton.jit
def _fwd_save(p_gates_t, p_c_next, b_c, b_i, b_f, b_g, b_o, o_b, m_b, o_u, m_u, H, SAVE: tl.constexpr,
              m_c=None):  # fmt: skip
    """What only the caller reads: the gates (SAVE, in the dtype of p_gates) and c_t (where m_c)."""
    o_own = o_u[:, None] + o_b[None, :] * H  # [U, BLOCK_B]
    m_own = m_u[:, None] & m_b[None, :]
    if SAVE:
        p_g = p_gates_t + o_u[:, None] + o_b[None, :] * (4 * H)  # gate i of own units; f, g, o at + qH
        gate_ty = p_gates_t.dtype.element_ty
        tl.store(p_g, b_i.to(gate_ty), mask=m_own)
        tl.store(p_g + H, b_f.to(gate_ty), mask=m_own)
        tl.store(p_g + 2 * H, b_g.to(gate_ty), mask=m_own)
        tl.store(p_g + 3 * H, b_o.to(gate_ty), mask=m_own)
    if m_c is None:
        tl.store(p_c_next + o_own, b_c, mask=m_own)
    else:
        tl.store(p_c_next + o_own, b_c, mask=m_own & m_c)


@triton.jit(do_not_specialize=["t_start", "t_end", "T", "spin_limit", "n_sync"])
def lstm_persistent_fwd_kernel(
    p_gx,  # [T, B, G] input projection incl. biases
    p_w,  # [G, H] W_hh
    p_hs,  # [T + 1, B, H] hs[0] = h0 (written by the host), hs[t + 1] = h after step t
    p_cs,  # [T + 1, B, H] acc, same convention (SAVE); else [2, B, H]: slot t % 2 holds c_{t−1}
    p_gates,  # [T, B, G] activated i, f, g, o, saved for the backward (SAVE); acc or the dtype of gx
    p_peep,  # [3, H] acc: p_i, p_f, p_o (PEEPHOLES)
    p_zone,  # [T, B, 2, H] uint8: z^c, z^h, 1 = keep the previous value (ZONEOUT_C, ZONEOUT_H)
    p_drop,  # [B, H] recurrent dropout mask m, dtype of gx (RECURRENT_DROPOUT)
    p_cnew,  # [T, B, H] acc out: c̃, the cell before zoneout (ZONEOUT_C)
    p_hd,  # [2, B, H] dtype of hs: h ⊙ m, slot t % 2 = h_{t−1} ⊙ m (RECURRENT_DROPOUT; host writes slot 0)
    p_sizes,  # [T] int32: rows that advance at each step (PACKED)
    p_sync,  # [2] int32: barrier counter, timeout flag
    t_start,
    t_end,
    T,
    B,
    H,
    spin_limit,
    n_sync,  # programs that meet at the barrier
    U: tl.constexpr,
    BLOCK_B: tl.constexpr,  # batch rows of one tile, the dot's N
    BLOCK_K: tl.constexpr,  # columns of one K chunk of the dot (N_K chunks cover H, unpadded but the last)
    N_K: tl.constexpr,  # ceil(H / BLOCK_K) ≤ 8 (MAX_K_CHUNKS)
    N_STREAM: tl.constexpr,  # the last N_STREAM < N_K chunks are read from W_hh every step, not kept on chip
    STREAM_SPLIT: tl.constexpr,  # each streamed chunk in this many column slices, one after another
    SPLIT_K: tl.constexpr,  # slices of each K chunk side by side, summed (1: one 2-D dot per chunk)
    PACKED: tl.constexpr,
    FLAGS: tl.constexpr,  # variants.py's bits but LAYER_NORM
    SAVE: tl.constexpr,  # store gates and every c_t for a backward; else only h_t (and c in a ring)
    ONE_CHUNK: tl.constexpr,  # B ≤ BLOCK_B: c_{t−1}, own h_{t−1} and gx_t stay in registers across steps
    SYNC: tl.constexpr,
    ACQUIRE_LOAD: tl.constexpr,  # the barrier polls with ld.acquire (CUDA), else an atomic
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BIDIR: tl.constexpr,  # grid (P, 2): both directions, each tensor stacked on a leading [2]
):
    i_p = tl.program_id(0).to(tl.int64)
    G = 4 * H
    if BIDIR:  # direction 1's tensors follow direction 0's; each direction has its own barrier counter
        i_d = tl.program_id(1).to(tl.int64)
        p_gx += i_d * T * B * G
        p_w += i_d * G * H
        p_hs += i_d * (T + 1) * B * H
        p_cs += i_d * (T + 1 if SAVE else 2) * B * H
        p_gates += i_d * T * B * G if SAVE else 0
        p_sizes += i_d * T if PACKED else 0
        p_sync += i_d * 2

    o_u = i_p * U + tl.arange(0, U)  # own units
    m_u = o_u < H
    o_q = tl.arange(0, 4 * U) // U  # gate of each stacked row
    o_uq = i_p * U + tl.arange(0, 4 * U) % U  # unit of each stacked row
    m_uq = o_uq < H
    o_r = o_q * H + o_uq  # [4U] stacked rows of W_hh = columns of gx and gates, gate-major

    # this program's 4U rows of W_hh in N_K chunks of BLOCK_K columns: the first N_K − N_STREAM
    # loaded once, on chip for the whole sequence (a chunk that does not exist or is streamed is a
    # copy of the first, never read)
    N_KEEP: tl.constexpr = N_K - N_STREAM
    b_w0 = _w_chunk(p_w, o_r, m_uq, 0, H, BLOCK_K, SPLIT_K)
    b_w1 = _w_chunk(p_w, o_r, m_uq, BLOCK_K, H, BLOCK_K, SPLIT_K) if N_KEEP > 1 else b_w0
    b_w2 = _w_chunk(p_w, o_r, m_uq, 2 * BLOCK_K, H, BLOCK_K, SPLIT_K) if N_KEEP > 2 else b_w0
    b_w3 = _w_chunk(p_w, o_r, m_uq, 3 * BLOCK_K, H, BLOCK_K, SPLIT_K) if N_KEEP > 3 else b_w0
    b_w4 = _w_chunk(p_w, o_r, m_uq, 4 * BLOCK_K, H, BLOCK_K, SPLIT_K) if N_KEEP > 4 else b_w0
    b_w5 = _w_chunk(p_w, o_r, m_uq, 5 * BLOCK_K, H, BLOCK_K, SPLIT_K) if N_KEEP > 5 else b_w0
    b_w6 = _w_chunk(p_w, o_r, m_uq, 6 * BLOCK_K, H, BLOCK_K, SPLIT_K) if N_KEEP > 6 else b_w0
    b_w7 = _w_chunk(p_w, o_r, m_uq, 7 * BLOCK_K, H, BLOCK_K, SPLIT_K) if N_KEEP > 7 else b_w0
    acc = p_cs.dtype.element_ty
    # tanh(x) = 2σ(2x) − 1: one sigmoid activates all four gates of the stacked tile
    b_s = tl.where(o_q == 2, 2.0, 1.0).to(acc)[:, None]  # [4U, 1]
    b_pi, b_pf, b_po = b_s, b_s, b_s  # unread without PEEPHOLES
    if F_PEEPHOLES & FLAGS:  # [U, 1] each
        b_pi = tl.load(p_peep + o_u, mask=m_u, other=0)[:, None]
        b_pf = tl.load(p_peep + H + o_u, mask=m_u, other=0)[:, None]
        b_po = tl.load(p_peep + 2 * H + o_u, mask=m_u, other=0)[:, None]

    if ONE_CHUNK:  # the state as the launch finds it; then carried in registers, gx_{t+1} prefetched
        t0 = tl.cast(t_start, tl.int64)
        o_b = tl.arange(0, BLOCK_B)
        m_b = o_b < B
        o_own = o_u[:, None] + o_b[None, :] * H  # [U, BLOCK_B]
        m_own = m_u[:, None] & m_b[None, :]
        o_gate = o_r[:, None] + o_b[None, :] * G  # [4U, BLOCK_B]
        m_gate = m_uq[:, None] & m_b[None, :]
        p_c0 = p_cs + (t0 if SAVE else t0 % 2) * B * H
        b_c = tl.load(p_c0 + o_own, mask=m_own, other=0, cache_modifier=".cg")
        b_h = tl.load(p_hs + t0 * B * H + o_own, mask=m_own, other=0, cache_modifier=".cg")
        b_gx = tl.load(p_gx + t0 * B * G + o_gate, mask=m_gate, other=0)

    aborted = tl.program_id(0) < 0
    for t in range(t_start, t_end):
        t64 = tl.cast(t, tl.int64)
        n_rows = B
        if PACKED:
            n_rows = tl.load(p_sizes + t)
        # after an abort every value this program writes is NaN
        b_poison = tl.where(aborted, float("nan"), 0.0).to(acc)
        p_h_prev = p_hs + t64 * B * H  # [B, H] slices of step t
        p_c_prev, p_c_next = p_cs + t64 * B * H, p_cs + (t64 + 1) * B * H
        if not SAVE:
            p_c_prev, p_c_next = p_cs + (t64 % 2) * B * H, p_cs + ((t64 + 1) % 2) * B * H
        # the dot's operand d_t: h_{t−1}, or h_{t−1} ⊙ m as its owners stored it (so that no program
        # multiplies a whole h tile)
        p_d_prev = p_hd + (t64 % 2) * B * H if F_RECURRENT_DROPOUT & FLAGS else p_h_prev
        p_hd_next = p_hd + ((t64 + 1) % 2) * B * H
        p_zone_t, p_cnew_t, p_gates_t = p_zone + t64 * 2 * B * H, p_cnew + t64 * B * H, p_gates + t64 * B * G
        if ONE_CHUNK:
            b_c, b_h, b_i, b_f, b_g, b_o = _fwd_cell(
                p_d_prev, b_w0, b_w1, b_w2, b_w3, b_w4, b_w5, b_w6, b_w7, b_gx, b_c, b_h, b_s, b_pi, b_pf,
                b_po, p_h_prev + B * H, p_zone_t, p_drop, p_hd_next, p_cnew_t, o_b, m_b, o_u, m_u, H, n_rows,
                b_poison, p_w, o_r, m_uq, U, BLOCK_B, BLOCK_K, N_K, N_STREAM, STREAM_SPLIT, SPLIT_K, FLAGS,
                DOT_PRECISION, UPCAST_DOT,
            )  # fmt: skip
            if SYNC:  # h_t is stored: arrive now, and wait only after the work no program waits for
                b_seen = _barrier_arrive(p_sync)
            # c_t: every step for the backward, else only the launch's last (the ring's slot for the
            # next launch and c_T)
            m_c = o_own * 0 + t + 1 == t_end  # a tensor: the interpreter masks no scalars
            if SAVE:
                m_c = o_own * 0 == 0
            _fwd_save(p_gates_t, p_c_next, b_c, b_i, b_f, b_g, b_o, o_b, m_b, o_u, m_u, H, SAVE, m_c)
            # gx_{t+1} is a launch input: its load overlaps the wait
            m_next = m_gate & (o_gate * 0 + t64 + 1 < t_end)
            b_gx = tl.load(p_gx + (t64 + 1) * B * G + o_gate, mask=m_next, other=0)
            if SYNC:  # h_t complete in every program before anyone reads it
                aborted = _barrier_wait(
                    p_sync, b_seen, t - t_start + 1, n_sync, spin_limit, aborted, ACQUIRE_LOAD
                )
        else:  # batch tiles of BLOCK_B rows one after another; the own state read back from memory
            for i_b in range(0, tl.cdiv(B, BLOCK_B)):
                o_bc = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
                m_bc = o_bc < B
                o_ownc = o_u[:, None] + o_bc[None, :] * H  # [U, BLOCK_B]
                m_ownc = m_u[:, None] & m_bc[None, :]
                o_gatec = o_r[:, None] + o_bc[None, :] * G  # [4U, BLOCK_B]
                # c in acc, h in the dtype of hs, as this program stored them; .cg like every load of
                # data written during the launch
                b_cc = tl.load(p_c_prev + o_ownc, mask=m_ownc, other=0, cache_modifier=".cg")
                b_hc = tl.load(p_h_prev + o_ownc, mask=m_ownc, other=0, cache_modifier=".cg")
                b_gxc = tl.load(p_gx + t64 * B * G + o_gatec, mask=m_uq[:, None] & m_bc[None, :], other=0)
                b_cc, b_hc, b_i, b_f, b_g, b_o = _fwd_cell(
                    p_d_prev, b_w0, b_w1, b_w2, b_w3, b_w4, b_w5, b_w6, b_w7, b_gxc, b_cc, b_hc, b_s, b_pi,
                    b_pf, b_po, p_h_prev + B * H, p_zone_t, p_drop, p_hd_next, p_cnew_t, o_bc, m_bc, o_u, m_u,
                    H, n_rows, b_poison, p_w, o_r, m_uq, U, BLOCK_B, BLOCK_K, N_K, N_STREAM, STREAM_SPLIT,
                    SPLIT_K, FLAGS, DOT_PRECISION, UPCAST_DOT,
                )  # fmt: skip
                _fwd_save(p_gates_t, p_c_next, b_cc, b_i, b_f, b_g, b_o, o_bc, m_bc, o_u, m_u, H, SAVE)
            if SYNC:
                aborted = _grid_barrier(p_sync, t - t_start + 1, n_sync, spin_limit, aborted, ACQUIRE_LOAD)


@triton.jit
def _bwd_w_chunk(p_w, o_u, m_u, i_k, H, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, BATCH_N: tl.constexpr):
    """Chunk i_k of this program's W_hh columns: gate rows k ∈ [i_k·BLOCK_K, (i_k + 1)·BLOCK_K), own
    units, in SPLIT_K slices of the rows (one per warp), as the dot's operand: [S, U, K/S] (A, batch
    on N) or [S, K/S, U] (B, batch on M); 2-D without a split."""
    G = 4 * H
    if SPLIT_K == 1:
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        if BATCH_N:  # [U, BLOCK_K]
            b_w = tl.load(
                p_w + o_k[None, :] * H + o_u[:, None], mask=(o_k < G)[None, :] & m_u[:, None], other=0
            )
        else:  # [BLOCK_K, U]
            b_w = tl.load(
                p_w + o_k[:, None] * H + o_u[None, :], mask=(o_k < G)[:, None] & m_u[None, :], other=0
            )
    else:
        o_k = i_k * BLOCK_K + (tl.arange(0, SPLIT_K) * (BLOCK_K // SPLIT_K))[:, None]
        o_k += tl.arange(0, BLOCK_K // SPLIT_K)[None, :]  # [S, K/S]
        if BATCH_N:  # [S, U, K/S]
            p = p_w + o_k[:, None, :] * H + o_u[None, :, None]
            b_w = tl.load(p, mask=(o_k < G)[:, None, :] & m_u[None, :, None], other=0)
        else:  # [S, K/S, U]
            p = p_w + o_k[:, :, None] * H + o_u[None, None, :]
            b_w = tl.load(p, mask=(o_k < G)[:, :, None] & m_u[None, None, :], other=0)
    return b_w


@triton.jit
def _bwd_dp_offsets(o_b, G, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, BATCH_N: tl.constexpr):
    """Offsets in ∂L/∂pre [B, 4H] of the first chunk of rows o_b (chunk i: + i·BLOCK_K, an immediate
    offset, so one set of addresses serves every chunk), and each element's index k in its chunk:
    [BLOCK_K, BLOCK_B] / [S, K/S, BLOCK_B] (batch on N) or [BLOCK_B, BLOCK_K] / [S, BLOCK_B, K/S]."""
    if SPLIT_K == 1:
        o_k = tl.arange(0, BLOCK_K)
        if BATCH_N:
            o_k = o_k[:, None]
            o_dp = o_b[None, :] * G + o_k
        else:
            o_k = o_k[None, :]
            o_dp = o_b[:, None] * G + o_k
    else:
        o_k = (tl.arange(0, SPLIT_K) * (BLOCK_K // SPLIT_K))[:, None] + tl.arange(0, BLOCK_K // SPLIT_K)[
            None, :
        ]
        if BATCH_N:
            o_k = o_k[:, :, None]
            o_dp = o_b[None, None, :] * G + o_k
        else:
            o_k = o_k[:, None, :]
            o_dp = o_b[None, :, None] * G + o_k
    return o_dp, o_k


@triton.jit
def _grad_h(p_dpre, p_dhs, p_sizes, p_zone, p_drop, b_w, b_dh, t, B, H, o_b, o_own, m_own, p_w, o_u, m_u,
            U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, N_K: tl.constexpr,
            N_STREAM: tl.constexpr, EVEN_K: tl.constexpr, K_AHEAD: tl.constexpr, SPLIT_K: tl.constexpr,
            BATCH_N: tl.constexpr, PACKED: tl.constexpr, FLAGS: tl.constexpr, DOT_PRECISION: tl.constexpr,
            UPCAST_DOT: tl.constexpr):  # fmt: skip
    """∂L/∂hs[t] of rows o_b, own units, from b_dh = ∂L/∂hs[t + 1] (what carried rows pass on):
    rows that advanced at step t get ∂L/∂pre_t·W_hh instead, from every program's ∂L/∂pre_t
    (⊙ m with recurrent dropout; + z^h ⊙ ∂L/∂hs[t + 1] with zoneout on h). b_w: the first
    N_K − N_STREAM chunks of W_hh's columns o_u, on chip; the others are read from p_w here."""
    t64 = tl.cast(t, tl.int64)
    G = 4 * H
    acc = b_dh.dtype
    o_dp, o_k = _bwd_dp_offsets(o_b, G, BLOCK_K, SPLIT_K, BATCH_N)
    m_b = o_b < B
    if BATCH_N:
        m_dp = m_b[None, :] if SPLIT_K == 1 else m_b[None, None, :]
    else:
        m_dp = m_b[:, None] if SPLIT_K == 1 else m_b[None, :, None]
    p_dp = p_dpre + t64 * B * G + o_dp
    # the 4H contraction in N_K static chunks of BLOCK_K (4H = 3072: 6 × 512 at B16, no padding), each split
    # into SPLIT_K slices, one per warp; every warp accumulates its slices, summed once at the end.
    # The load of chunk i + K_AHEAD is issued before chunk i's dot (.cg: ∂L/∂pre_t was written by
    # other SMs; read it from L2, never from a stale L1 line)
    b_dp = ()
    for i_k in tl.static_range(N_K + K_AHEAD):
        if i_k < N_K:
            m_k = m_dp if EVEN_K else m_dp & (o_k < G - i_k * BLOCK_K)
            b_dp = b_dp + (tl.load(p_dp + i_k * BLOCK_K, mask=m_k, other=0, cache_modifier=".cg"),)  # noqa: RUF005 (Triton's tuples)
            if i_k >= N_K - N_STREAM:  # a chunk of W_hh's columns not kept on chip: from L2, every step
                b_w = b_w + (_bwd_w_chunk(p_w, o_u, m_u, i_k, H, BLOCK_K, SPLIT_K, BATCH_N),)  # noqa: RUF005
        if i_k == K_AHEAD:
            b_acc = _dot(b_w[0], b_dp[0], acc, DOT_PRECISION, UPCAST_DOT) if BATCH_N else _dot(
                b_dp[0], b_w[0], acc, DOT_PRECISION, UPCAST_DOT)  # fmt: skip
        elif i_k > K_AHEAD:
            if BATCH_N:  # ∂L/∂hᵀ [S, U, BLOCK_B]: the batch on the mma's N side
                b_acc += _dot(b_w[i_k - K_AHEAD], b_dp[i_k - K_AHEAD], acc, DOT_PRECISION, UPCAST_DOT)
            else:  # [S, BLOCK_B, U]
                b_acc += _dot(b_dp[i_k - K_AHEAD], b_w[i_k - K_AHEAD], acc, DOT_PRECISION, UPCAST_DOT)
        if N_STREAM > 0:  # noqa: SIM102
            if i_k + 1 >= N_K - N_STREAM and i_k + 1 < N_K:
                # the next streamed chunk's loads stay below this dot (else they are all issued at once)
                tl.debug_barrier()
    b_rec = b_acc
    if SPLIT_K > 1:
        b_rec = tl.sum(b_rec, axis=0)
    if BATCH_N:
        b_rec = tl.trans(b_rec)  # [BLOCK_B, U]
    if F_RECURRENT_DROPOUT & FLAGS:
        b_rec *= tl.load(p_drop + o_own, mask=m_own, other=0).to(acc)
    if F_ZONEOUT_H & FLAGS:
        b_z = tl.load(p_zone + t64 * 2 * B * H + o_own + (o_b * H)[:, None] + H, mask=m_own, other=0)
        b_rec += tl.where(b_z != 0, b_dh, 0)
    n_rows = B
    if PACKED:
        n_rows = tl.load(p_sizes + t)
    b_dh = tl.where((o_b < n_rows)[:, None], b_rec, b_dh)
    return b_dh + tl.load(p_dhs + t64 * B * H + o_own, mask=m_own, other=0).to(acc)


@triton.jit(do_not_specialize=["t_start", "t_end", "T", "spin_limit", "n_sync"])
def lstm_persistent_bwd_kernel(
    p_dhs,  # [T + 1, B, H] gradient arriving at each hs[k] from outside the recurrence
    p_gates,  # [T, B, G] saved by the forward: acc, or the dtype of d_hs (saved_gates_dtype); read as acc
    p_cs,  # [T + 1, B, H] acc, saved by the forward
    p_w,  # [G, H] W_hh
    p_dpre,  # [T, B, G] out: ∂L/∂pre-activations
    p_dh,  # [B, H] acc state, in: ∂L/∂hs[t_end] less step t_end's part; out: the same at t_start
    p_dc,  # [B, H] acc state, in: ∂L/∂cs[t_end]; out: ∂L/∂cs[t_start]
    p_peep,  # [3, H] acc (PEEPHOLES)
    p_zone,  # [T, B, 2, H] uint8 (ZONEOUT_C, ZONEOUT_H)
    p_drop,  # [B, H] (RECURRENT_DROPOUT)
    p_cnew,  # [T, B, H] acc: c̃, saved by the forward (ZONEOUT_C)
    p_sizes,  # [T] int32 (PACKED)
    p_sync,  # [2] int32: barrier counter, timeout flag
    t_start,
    t_end,
    T,
    B,
    H,
    spin_limit,
    n_sync,
    U: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,  # the 4H contraction walked in N_K chunks of BLOCK_K (a power of two)
    N_K: tl.constexpr,
    N_STREAM: tl.constexpr,  # the last N_STREAM < N_K chunks of W_hh's columns are read every step, not kept
    EVEN_K: tl.constexpr,  # N_K·BLOCK_K = 4H: no chunk needs a mask on k
    K_AHEAD: tl.constexpr,  # chunks of ∂L/∂pre whose loads are issued ahead of the chunk multiplied
    SPLIT_K: tl.constexpr,  # slices of each chunk, one per warp, summed after the dot (1: a 2-D dot)
    BATCH_N: tl.constexpr,  # the dot is W_colsᵀ·∂L/∂preᵀ: the batch on the mma's N side
    PACKED: tl.constexpr,
    FLAGS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # B ≤ BLOCK_B: ∂L/∂h, ∂L/∂c in registers, gates and c loaded before the barrier
    SYNC: tl.constexpr,
    SPLIT_BARRIER: tl.constexpr,  # ONE_CHUNK: arrive after ∂L/∂pre_t is stored, wait at step t − 1
    ACQUIRE_LOAD: tl.constexpr,
    FINISH: tl.constexpr,  # end with step t_start's recurrent part: p_dh becomes ∂L/∂hs[t_start]
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BIDIR: tl.constexpr,  # grid (P, 2), as in the forward
):
    # per-element offsets are int32 (within one step's [B, 4H] slice, which the launcher bounds); each
    # step's base, t·B·4H, is int64. Few offset tensors, shared by every load and store of the step:
    # they are loop invariant, so the compiler keeps them in registers for the whole sequence
    i_p = tl.program_id(0)
    G = 4 * H
    acc = p_dh.dtype.element_ty
    if BIDIR:
        i_d = tl.program_id(1).to(tl.int64)
        p_dhs += i_d * (T + 1) * B * H
        p_gates += i_d * T * B * G
        p_cs += i_d * (T + 1) * B * H
        p_w += i_d * G * H
        p_dpre += i_d * T * B * G
        p_dh += i_d * B * H
        p_dc += i_d * B * H
        p_sizes += i_d * T if PACKED else 0
        p_sync += i_d * 2

    o_u = i_p * U + tl.arange(0, U)
    m_u = o_u < H

    # the columns of W_hh for this program's units, every gate row: loaded once, N_K chunks (but the
    # last N_STREAM, which _grad_h reads every step)
    tl.static_assert(N_STREAM < N_K, "at least one chunk of W_hh's columns on chip")
    b_w = ()
    for i_k in tl.static_range(N_K - N_STREAM):
        b_w = b_w + (_bwd_w_chunk(p_w, o_u, m_u, i_k, H, BLOCK_K, SPLIT_K, BATCH_N),)  # noqa: RUF005
    b_pi, b_pf, b_po = p_peep, p_peep, p_peep  # unread without PEEPHOLES
    if F_PEEPHOLES & FLAGS:  # [1, U] each
        b_pi = tl.load(p_peep + o_u, mask=m_u, other=0)[None, :]
        b_pf = tl.load(p_peep + H + o_u, mask=m_u, other=0)[None, :]
        b_po = tl.load(p_peep + 2 * H + o_u, mask=m_u, other=0)[None, :]

    if ONE_CHUNK:  # the state as the launch finds it, then carried in registers
        o_b = tl.arange(0, BLOCK_B)
        o_own = o_b[:, None] * H + o_u[None, :]  # [BLOCK_B, U] in a [B, H] slice
        o_gate = o_b[:, None] * G + o_u[None, :]  # gate i of own units in a [B, 4H] slice; gate q at + qH
        m_own = (o_b < B)[:, None] & m_u[None, :]
        b_dh_reg = tl.load(p_dh + o_own, mask=m_own, other=0, cache_modifier=".cg")
        b_dc_reg = tl.load(p_dc + o_own, mask=m_own, other=0, cache_modifier=".cg")

    aborted = tl.program_id(0) < 0
    i_bar = tl.program_id(0) * 0  # barriers passed in this launch
    # split barrier: what this program's arrival returned, −1 while it has not arrived at the next one
    b_seen = i_bar - 1
    SPLIT: tl.constexpr = SYNC and SPLIT_BARRIER and ONE_CHUNK
    for s in range(t_start, t_end):
        t = t_start + t_end - 1 - s  # steps run backwards
        t64 = tl.cast(t, tl.int64)
        p_gates_t = p_gates + t64 * B * G
        # c̃ (the cell before zoneout) and c_{t−1}
        p_c_t = p_cnew + t64 * B * H if F_ZONEOUT_C & FLAGS else p_cs + (t64 + 1) * B * H
        p_c_prev = p_cs + t64 * B * H
        n_chunks = tl.cdiv(B, BLOCK_B)
        if ONE_CHUNK:  # launch inputs of step t, in their stored dtype: their loads overlap the barrier
            n_chunks = 1
            b_gi_pf = tl.load(p_gates_t + o_gate, mask=m_own, other=0)
            b_gf_pf = tl.load(p_gates_t + H + o_gate, mask=m_own, other=0)
            b_gg_pf = tl.load(p_gates_t + 2 * H + o_gate, mask=m_own, other=0)
            b_go_pf = tl.load(p_gates_t + 3 * H + o_gate, mask=m_own, other=0)
            b_c_pf = tl.load(p_c_t + o_own, mask=m_own, other=0)
            b_c_prev_pf = tl.load(p_c_prev + o_own, mask=m_own, other=0)
        if SYNC:  # noqa: SIM102 (Triton cannot `and` a constexpr with a runtime condition)
            if t + 1 < T:  # ∂L/∂hs[t + 1] needs step t + 1's ∂L/∂pre from every program
                i_bar += 1
                if SPLIT:  # arrived after step t + 1's stores; the loads above overlap the wait
                    if b_seen < 0:  # the launch's first step: nothing stored before it
                        b_seen = _barrier_arrive(p_sync)
                    aborted = _barrier_wait(p_sync, b_seen, i_bar, n_sync, spin_limit, aborted, ACQUIRE_LOAD)
                else:
                    aborted = _grid_barrier(p_sync, i_bar, n_sync, spin_limit, aborted, ACQUIRE_LOAD)
        n_rows = B
        if PACKED:
            n_rows = tl.load(p_sizes + t)
        b_poison = tl.where(aborted, float("nan"), 0.0).to(acc)
        for i_b in range(0, n_chunks):
            if ONE_CHUNK:
                b_dh, b_dc = b_dh_reg, b_dc_reg
                b_i, b_f, b_g, b_o = b_gi_pf.to(acc), b_gf_pf.to(acc), b_gg_pf.to(acc), b_go_pf.to(acc)
                b_c, b_c_prev = b_c_pf.to(acc), b_c_prev_pf.to(acc)
            else:
                o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
                o_own = o_b[:, None] * H + o_u[None, :]
                o_gate = o_b[:, None] * G + o_u[None, :]
                m_own = (o_b < B)[:, None] & m_u[None, :]
                b_dh = tl.load(p_dh + o_own, mask=m_own, other=0, cache_modifier=".cg")
                b_dc = tl.load(p_dc + o_own, mask=m_own, other=0, cache_modifier=".cg")
                b_i = tl.load(p_gates_t + o_gate, mask=m_own, other=0).to(acc)
                b_f = tl.load(p_gates_t + H + o_gate, mask=m_own, other=0).to(acc)
                b_g = tl.load(p_gates_t + 2 * H + o_gate, mask=m_own, other=0).to(acc)
                b_o = tl.load(p_gates_t + 3 * H + o_gate, mask=m_own, other=0).to(acc)
                b_c = tl.load(p_c_t + o_own, mask=m_own, other=0).to(acc)
                b_c_prev = tl.load(p_c_prev + o_own, mask=m_own, other=0).to(acc)
            if t + 1 < T:
                b_dh = _grad_h(p_dpre, p_dhs, p_sizes, p_zone, p_drop, b_w, b_dh, t + 1, B, H, o_b, o_own,
                               m_own, p_w, o_u, m_u, U, BLOCK_B, BLOCK_K, N_K, N_STREAM, EVEN_K, K_AHEAD,
                               SPLIT_K, BATCH_N, PACKED, FLAGS, DOT_PRECISION, UPCAST_DOT)  # fmt: skip
            m_step = (o_b < n_rows)[:, None]  # rows that advance; the others pass ∂L/∂h, ∂L/∂c on
            if FLAGS == 0:
                b_tanh_c = _tanh(b_c)
                b_dc_step = b_dc + b_dh * b_o * (1 - b_tanh_c * b_tanh_c)
                # rows that did not advance have no pre-activations: exactly 0
                b_di = tl.where(m_step, b_dc_step * b_g * b_i * (1 - b_i), 0) + b_poison
                b_df = tl.where(m_step, b_dc_step * b_c_prev * b_f * (1 - b_f), 0) + b_poison
                b_dg = tl.where(m_step, b_dc_step * b_i * (1 - b_g * b_g), 0) + b_poison
                b_do = tl.where(m_step, b_dh * b_tanh_c * b_o * (1 - b_o), 0) + b_poison
                b_dc = tl.where(m_step, b_dc_step * b_f, b_dc) + b_poison
            else:  # the step contract's backward, gate by gate (gates hold what the forward used)
                p_z = p_zone + t64 * 2 * B * H + o_own + (o_b * H)[:, None]  # z^c of own units; z^h at + H
                b_dh_new = b_dh  # ∂L/∂h̃, the output before zoneout
                if F_ZONEOUT_H & FLAGS:  # the part z^h ⊙ ∂L/∂h_t reaches h_{t−1} in _grad_h
                    b_dh_new = tl.where(tl.load(p_z + H, mask=m_own, other=0) != 0, 0, b_dh)
                b_dc_new = b_dc  # ∂L/∂c̃
                if F_ZONEOUT_C & FLAGS:
                    b_zc = tl.load(p_z, mask=m_own, other=0) != 0
                    b_dc_new = tl.where(b_zc, 0, b_dc)
                b_dy, b_do = _variant_h_bwd(b_dh_new, b_o, b_c, FLAGS)
                b_dc_new += b_dy
                b_zero = tl.zeros((BLOCK_B, U), acc)  # a removed gate has no pre-activation
                b_di, b_df, b_dg, b_do, b_dc_prev = _variant_gates_bwd(
                    b_dc_new, b_do, b_i, b_f, b_g, b_o, b_c_prev, b_pi, b_pf, b_po, b_zero, FLAGS
                )  # [BLOCK_B, U] each
                if F_ZONEOUT_C & FLAGS:
                    b_dc_prev += tl.where(b_zc, b_dc, 0)
                b_di = tl.where(m_step, b_di, 0) + b_poison
                b_df = tl.where(m_step, b_df, 0) + b_poison
                b_dg = tl.where(m_step, b_dg, 0) + b_poison
                b_do = tl.where(m_step, b_do, 0) + b_poison
                b_dc = tl.where(m_step, b_dc_prev, b_dc) + b_poison

            p_dp = p_dpre + t64 * B * G + o_gate  # gate i of own units
            dpre_ty = p_dpre.dtype.element_ty
            tl.store(p_dp, b_di.to(dpre_ty), mask=m_own)
            tl.store(p_dp + H, b_df.to(dpre_ty), mask=m_own)
            tl.store(p_dp + 2 * H, b_dg.to(dpre_ty), mask=m_own)
            tl.store(p_dp + 3 * H, b_do.to(dpre_ty), mask=m_own)
            if SPLIT:  # ∂L/∂pre_t is all step t − 1 (or FINISH) waits for: arrive now, wait there
                t_arrive = t_start if FINISH else t_start + 1  # no barrier follows a launch's last step
                if t >= t_arrive:
                    b_seen = _barrier_arrive(p_sync)
            if ONE_CHUNK:  # stored once, after the launch's last step
                b_dh_reg, b_dc_reg = b_dh + b_poison, b_dc
                m_last = m_own & (o_own * 0 + t == t_start)  # a tensor: the interpreter masks no scalars
                tl.store(p_dh + o_own, b_dh_reg, mask=m_last)
                tl.store(p_dc + o_own, b_dc_reg, mask=m_last)
            else:
                tl.store(p_dh + o_own, b_dh + b_poison, mask=m_own)
                tl.store(p_dc + o_own, b_dc, mask=m_own)

    if FINISH:
        if SYNC:
            if SPLIT:
                if b_seen < 0:  # an empty launch
                    b_seen = _barrier_arrive(p_sync)
                aborted = _barrier_wait(p_sync, b_seen, i_bar + 1, n_sync, spin_limit, aborted, ACQUIRE_LOAD)
            else:
                aborted = _grid_barrier(p_sync, i_bar + 1, n_sync, spin_limit, aborted, ACQUIRE_LOAD)
        b_poison = tl.where(aborted, float("nan"), 0.0).to(acc)
        for i_b in range(0, tl.cdiv(B, BLOCK_B)):
            o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
            o_own = o_b[:, None] * H + o_u[None, :]
            m_own = (o_b < B)[:, None] & m_u[None, :]
            b_dh = tl.load(p_dh + o_own, mask=m_own, other=0, cache_modifier=".cg")
            b_dh = _grad_h(p_dpre, p_dhs, p_sizes, p_zone, p_drop, b_w, b_dh, t_start, B, H, o_b, o_own,
                           m_own, p_w, o_u, m_u, U, BLOCK_B, BLOCK_K, N_K, N_STREAM, EVEN_K, K_AHEAD, SPLIT_K,
                           BATCH_N, PACKED, FLAGS, DOT_PRECISION, UPCAST_DOT)  # fmt: skip
            tl.store(p_dh + o_own, b_dh + b_poison, mask=m_own)
            b_dc = tl.load(p_dc + o_own, mask=m_own, other=0, cache_modifier=".cg")
            tl.store(p_dc + o_own, b_dc + b_poison, mask=m_own)


class PersistentKernelTimeout(RuntimeError):
    """A grid barrier of a persistent kernel waited past its bound: its outputs are NaN."""


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocator for every buffer the launchers write; tests swap it for a NaN-filled one."""
    return torch.empty(*shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Config:
    """Launch configuration of one persistent kernel: U units per program, warps per program, the
    batch rows of one tile (the forward's dot N, the backward's N with batch_n; a program walks a
    larger batch in tiles of block_b rows each step), split_k: the slices of the dot's contraction
    (each K chunk) that run side by side, summed after the dot (1: one 2-D dot), and block_k: the K
    chunk of the kernel's dot, a power of two: the forward's H columns (0: :func:`fwd_block_k` picks
    it), the backward's 4H gate rows walked in static chunks (0: one chunk, 4H padded to a power of
    two).

    Backward only: batch_n, the dot computed as W_colsᵀ·∂L/∂preᵀ with the batch on the mma's N side
    ([U, block_b] output) instead of ∂L/∂pre·W_cols ([block_b, U]); k_ahead, the chunks of ∂L/∂pre
    whose loads are issued ahead of the chunk being multiplied (0: each right before its dot).

    stream_k: the last stream_k K chunks of W_hh (forward: of its H columns; backward: of its 4H
    gate rows) are read from memory (L2) every step instead of kept on chip (0: all kept; at least
    one is). stream_split (forward only): each streamed chunk is loaded and multiplied in that many
    column slices one after another, to bound the registers a load takes."""

    units: int
    num_warps: int
    block_b: int = 16
    split_k: int = 1
    block_k: int = 0
    batch_n: bool = False
    k_ahead: int = 0
    stream_k: int = 0
    stream_split: int = 1

    def programs(self, H: int) -> int:
        return triton.cdiv(H, self.units)


MMA_M, MMA_N = 16, 8  # one warp's tensor-core tile (mma.sync m16n8k16): rows and columns of the output
# The forward's K chunks: W_hh's rows are held as at most this many [4U, block_k] tiles
MAX_K_CHUNKS = 8


def dot_warps(M: int, N: int, batch: int = 1) -> int:
    """The most warps a [batch, M, N] dot output keeps busy without two warps computing the same
    fragment: Triton places warps on the batch first, then on M in 16s and N in 8s."""
    return batch * max(1, M // MMA_M) * max(1, N // MMA_N)


def fwd_block_b(B: int) -> int:
    """The forward's batch tile: all of B up to 128 (a power of two, at least 16), else 128-row tiles."""
    return min(128, max(16, triton.next_power_of_2(B)))


def fwd_block_k(H: int, cfg: Config) -> int:
    """The forward's K chunk: cfg.block_k, else 128 columns (H padded to a power of two if smaller).
    A chunk's W operand and h chunk pass through registers; 256 spills at B ≥ 64 (sm_90 compiles)."""
    return cfg.block_k or min(128, _block(H))


def pick_config(
    B: int, H: int, dtype: torch.dtype, backward: bool, tf32: bool | None = None, sms: int | None = None
) -> Config:
    """The heuristic, from sm_90 compiles (no spills, no duplicated warps; tests/test_persistent.py,
    numbers in docs/persistent.md). Forward: the transposed dot W[4U, K]×hᵀ[K, block_b], the whole
    batch on its N side up to B = 128 (fwd_block_b), K in unpadded 128-column chunks:
    - B ≤ 32: 16 units per program on 4 warps: M = 4U = 64 is one warpgroup's wgmma (Hopper's MMAv3,
      both operands read from shared memory), half the programs of U = 8 (whose [32, ≤ 32] output
      Triton gives 4 warps on M: duplicated);
    - B ≤ 64: 8 units (M = 32, mma.sync) on 4 warps, all on N (U = 16 spills there);
    - B > 64: 8 units on 8 warps (4 spill), one program per SM; where that grid has more programs
      than ``sms`` (the SMs one direction's grid may hold; None: no limit), as at H = 1024 on a
      114-SM H100 PCIe, B = 64's 4-warp tile walked in 64-row batch tiles (the state through memory
      each step): two programs per SM. 16 units (64 programs) spill: with triton 3.6 in 64- and
      32-row tiles, with 3.9 on all 128 rows (4 or 8 warps).
    fp64 multiplies on CUDA cores (FMA, no mma tiles): 8 units on 8 warps, each K chunk split in 8
    slices of 16 (an FMA dot over a whole 128-column chunk spills). Backward: :func:`pick_bwd_config`.
    Up to H = 1024: at most 128 programs, one per SM of an H100; beyond, the per-step path.
    fp32 has its own rule (:func:`fp32_config`); ``tf32``: whether its dots may use TF32 (default:
    what :func:`cudnn_rnn_allows_tf32` says now)."""
    if dtype == torch.float32:
        return fp32_config(B, H, backward, _dot_precision(dtype, tf32) == "tf32", sms)
    if backward:
        return pick_bwd_config(B, H, dtype)
    block_b = fwd_block_b(B)
    if dtype == torch.float64:
        return _fma_fwd_config(H, block_b)
    if block_b <= 32:
        return Config(units=16, num_warps=4, block_b=block_b)
    cfg = Config(units=8, num_warps=4 if block_b <= 64 else 8, block_b=block_b)
    if block_b > 64 and sms is not None and cfg.programs(H) > sms:
        return Config(units=8, num_warps=4, block_b=64)
    return cfg


def _fma_fwd_config(H: int, block_b: int) -> Config:
    # an FMA dot holds its operands' whole K in registers: each K chunk split in slices of 16, one
    # per warp (8 warps, no mma tiles to duplicate)
    split_k = min(8, fwd_block_k(H, Config(8, 8, block_b)) // 16)
    return Config(units=8, num_warps=8, block_b=block_b, split_k=split_k)


BWD_CHUNK_BYTES = 16 << 10  # one ∂L/∂pre chunk [block_k, block_b] staged in shared memory
# The backward's register cap. Without one, ptxas (triton 3.6's) chose 128 registers for the B16
# H1024 kernel and spilled; capped at 224 no 16-bit configuration spills on 3.6 or 3.9, and 224
# leaves room under 255. One program per SM is all the 16-unit grid (P ≤ 64) needs.
BWD_MAXNREG = 224


def pick_bwd_config(B: int, H: int, dtype: torch.dtype) -> Config:
    """The backward's heuristic (sm_90 compiles, triton 3.6 and 3.9; docs/persistent.md).

    16-bit: 16 units per program (M = 16, one mma row tile: P = 48 at H = 768, 64 at H = 1024, so
    the grid fits a 114-SM H100 PCIe), the whole batch up to 128 rows as one tile on the mma's N
    side, 8 warps: the 4H contraction split in 8 slices up to B = 32 (warps [8, 1, 1], each warp
    all of N), not split from B = 64 on (the warps on N's 8 or 16 tiles), walked in unpadded chunks of 16 KiB
    (block_k = 512 at B = 16, 64 at B = 128; 4H = 3072 is 6 × 512). Compiled with maxnreg
    (BWD_MAXNREG). fp32 and fp64 keep the first-generation layout: 16-row chunks, the batch on M,
    4H padded to a power of two and split in up to 8 slices."""
    if dtype not in (torch.float16, torch.bfloat16):
        split_k = min(8, _block(4 * H) // 16)
        return Config(units=8, num_warps=split_k, block_b=16, split_k=split_k)
    block_b = min(128, _block(B))
    # triton 3.6 puts every warp of a 3-D dot on its first axis, so a split uses all 8 warps; from
    # B = 64 on, N has 8 tiles or more and the warps take those instead (8 slices of [16, 64] spilled
    # with triton 3.6 under the register cap)
    split_k = 8 if block_b <= 32 else 1
    block_k = BWD_CHUNK_BYTES // (block_b * dtype.itemsize)
    block_k = max(16 * split_k, min(block_k, 4 * H & -4 * H))  # a power of two that divides 4H
    return Config(units=16, num_warps=8, block_b=block_b, split_k=split_k, block_k=block_k, batch_n=True)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs K ≥ 16; M and N are padded to 16 anyway


def bwd_chunks(H: int, cfg: Config) -> tuple[int, int]:
    """(block_k, n_k): the backward walks its 4H contraction in n_k static chunks of block_k."""
    block_k = cfg.block_k or _block(4 * H)
    return block_k, triton.cdiv(4 * H, block_k)


def bwd_constexprs(H: int, cfg: Config) -> dict:
    """The backward kernel's shape constexprs for this configuration."""
    block_k, n_k = bwd_chunks(H, cfg)
    return dict(U=cfg.units, BLOCK_B=cfg.block_b, BLOCK_K=block_k, N_K=n_k, N_STREAM=cfg.stream_k,
                EVEN_K=n_k * block_k == 4 * H,
                K_AHEAD=min(cfg.k_ahead, n_k - 1), SPLIT_K=cfg.split_k, BATCH_N=cfg.batch_n)  # fmt: skip


def tile_bytes(B: int, H: int, dtype: torch.dtype, cfg: Config, backward: bool) -> int:
    """On-chip bytes of one program's two dot operands, which the compiler stages in shared memory:
    forward W_hh rows [4U, H] (in K chunks, only the last one padded) and one [block_k, block_b] h
    chunk; backward W_hh columns [4H, U] (every chunk, kept for the whole sequence) and one ∂L/∂pre
    chunk [block_b, block_k] at a time (sizes padded to powers of two, 4H to whole chunks). With
    cfg.stream_k, only the chunks kept on chip, plus one staging tile of a streamed chunk (the
    forward's [4U, block_k / stream_split] slice, the backward's [block_k, U] chunk)."""
    stream = cfg.stream_k > 0
    if backward:
        block_k, n_k = bwd_chunks(H, cfg)
        return (cfg.units * (n_k - cfg.stream_k + stream) + cfg.block_b) * block_k * dtype.itemsize
    block_k = fwd_block_k(H, cfg)
    kept = 4 * cfg.units * (triton.cdiv(H, block_k) - cfg.stream_k) + cfg.block_b
    return (kept * block_k + stream * 4 * cfg.units * block_k // cfg.stream_split) * dtype.itemsize


def config_problem(
    B: int, H: int, dtype: torch.dtype, cfg: Config, backward: bool, smem_per_block: int = 232448
) -> str | None:
    """Why a configuration cannot keep its tiles on chip (default: Hopper's 227 KiB per block), or
    None. Checked before compiling: such kernels would take minutes to compile only to spill."""
    need = tile_bytes(B, H, dtype, cfg, backward)
    if need > smem_per_block:
        kind = "backward (W_hh columns, a ∂L/∂pre chunk)" if backward else "forward (W_hh rows, an h chunk)"
        return (
            f"the {kind} tiles of {cfg} need {need >> 10} KiB on chip per program at H={H}, {dtype}; "
            f"an SM gives a block {smem_per_block >> 10} KiB"
        )
    return None


def resident_programs(
    n_regs: int,
    num_warps: int,
    shared: int,
    sms: int,
    regs_per_sm: int = 65536,
    threads_per_sm: int = 2048,
    smem_per_sm: int = 233472,
    max_blocks_per_sm: int = 32,
) -> int:
    """How many programs of a compiled kernel fit on the device at once (defaults: Hopper SM)."""
    regs_per_warp = triton.cdiv(n_regs * 32, 256) * 256  # allocated per warp in units of 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_threads = threads_per_sm // (32 * num_warps)
    by_smem = smem_per_sm // (shared + 1024) if shared else max_blocks_per_sm  # 1 KiB per block reserved
    return sms * min(by_regs, by_threads, by_smem, max_blocks_per_sm)


def cudnn_rnn_allows_tf32() -> bool:
    """Whether torch.nn.LSTM's cuDNN path may multiply fp32 on TF32 tensor cores now, which the fp32
    persistent kernels follow: ATen's ``allowTF32CuDNN(Float32Op::RNN)``, i.e.
    ``torch.backends.cudnn.rnn.fp32_precision`` ("none" defers to ``torch.backends.cudnn.fp32_precision``,
    then to ``torch.backends.fp32_precision``, then means IEEE). The legacy
    ``torch.backends.cudnn.allow_tf32`` sets it (True: "tf32", False: "none"); torch < 2.9 has
    only that flag. Default: allowed."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    precision = getattr(rnn, "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for p in (precision, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if p != "none":
            return p == "tf32"
    return False


def _dot_precision(dtype: torch.dtype, tf32: bool | None = None) -> str:
    # fp32: TF32 tensor cores where cuDNN's fp32 LSTM may use them (tf32=None: its flag now), else
    # true fp32; a constexpr of both kernels, so flipping the flag compiles (and caches) the other one
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if (cudnn_rnn_allows_tf32() if tf32 is None else tf32) else "ieee"


def fp32_config(B: int, H: int, backward: bool, tf32: bool, sms: int | None = None) -> Config:
    """fp32's configuration, from sm_90 compiles with triton 3.6 and 3.9 (0 spills for H ≤ 1024;
    docs/persistent.md, "fp32").

    Backward: the second generation's layout where it compiles (W_colsᵀ·∂L/∂preᵀ, the batch on the
    mma's N side, one tile up to B = 128, 4H in unpadded chunks of 16 KiB): TF32 up to H = 768 and the
    FMA dot (true fp32) at B ≤ 16 up to H = 768, 16 units on 8 warps as in 16 bits (8 units, M = 8,
    spilled: 104 bytes at B16 H768 and 624 at B64 H256 with TF32; 16 units need [4H, 16] fp32 W_hh
    columns, 256 KiB at H = 1024, more than an SM gives). FMA slices are 16 deep (block_k = 128 in
    8): the FMA dot holds its slice's K in registers. Elsewhere (H = 1024; FMA at B > 16, which
    spilled 4,964 bytes at B64 H256 in 8 slices and 248 in 4) the first generation's layout
    (∂L/∂pre·W_cols, 4H padded, 8 slices), its ∂L/∂pre chunk shrunk from 16 rows to 4 where 16 do
    not fit on chip (H > 512: [4H, 8] W_hh columns + [4, 4H]), and the FMA backward takes 8 at
    H = 512, where 16 spilled 8 bytes at B = 16 with triton 3.6.

    Forward (the transposed dot W[4U, K]×hᵀ[K, block_b], K in 128-column chunks, 8 units): the FMA
    dot (8 warps, each K chunk split in slices of 16) takes the whole batch as one tile (state in
    registers) up to B = 64 and H = 768, 16-row tiles elsewhere (as one tile it spilled 184 bytes at
    B = 64, H = 1024 with triton 3.6, and 159,040 at B = 128, H = 1024 with 3.9). TF32: 2 warps on
    [32, 16] at B ≤ 16; the whole batch on 8 warps ([32, 64], no split) at 32 < B ≤ 64 up to
    H = 256; 16-row tiles elsewhere (the state through memory each step): on triton 3.6 the whole
    batch spilled at B = 64 from H = 512 (248 bytes unsplit on 8 warps, 456 in 8 slices, 3,016 in 4
    on 4 warps), and 3.6 put a 2-slice split's 8 warps on its 2 slices (duplicated); a [32, 32]
    tile (B = 32) on 8 warps came out duplicated on both versions.
    Tiles above 16 rows compile with FP32_MAXNREG.

    ``sms`` (the SMs one direction's grid may hold; None: no limit): where the grid above has more
    programs than that and two of its programs cannot share an SM's shared memory, so that it
    cannot be resident (H = 1024 on a 114-SM H100 PCIe), TF32 takes :func:`fp32_streamed_config`;
    true fp32 keeps the configuration above (no streamed one compiled without spills; the launch
    check then refuses it)."""
    cfg = _fp32_config(B, H, backward, tf32)
    if sms is None or not tf32 or cfg.programs(H) <= sms:
        return cfg
    if 2 * (tile_bytes(B, H, torch.float32, cfg, backward) + 1024) <= SMEM_PER_SM:
        return cfg  # two programs per SM may fit: the compile check on the device decides
    return fp32_streamed_config(B, H, backward)


# An SM's shared memory (Hopper), as resident_programs counts it: 1 KiB per block is reserved.
SMEM_PER_SM = 233472
# The streamed backward keeps at most this much of its W_hh columns on chip (the rest streams).
FP32_STREAM_KEEP_BYTES = 176 << 10


def fp32_streamed_config(B: int, H: int, backward: bool) -> Config:
    """TF32 where W_hh does not fit on chip at the grid the SMs allow (H = 1024 on 114 SMs): some
    K chunks of W_hh are read from L2 every step (``stream_k``) instead of kept on chip.

    Forward: 8 units on 2 warps in 16-row tiles as for 132 SMs, the fewest streamed 128-column
    chunks for two programs per SM: 2 of 8 at H = 1024, 112 KiB; each in 8 slices of 16 columns
    (in 4 slices of 32 triton 3.6 spilled 60 bytes at B = 64). Backward: 16 units (64 programs at
    H = 1024, one per SM), the second generation's layout (the batch on N, up to 64 rows a tile: 128
    spilled; 4H in 16 KiB chunks), W_hh's columns [4H, 16] on chip up to FP32_STREAM_KEEP_BYTES, the
    remaining chunks streamed. Sm_90 numbers: docs/persistent.md."""
    if not backward:
        block_k = 128
        cfg = Config(units=8, num_warps=2, block_b=16, stream_split=8)
        for stream_k in range(triton.cdiv(H, block_k)):
            cfg = replace(cfg, stream_k=stream_k)
            if 2 * (tile_bytes(B, H, torch.float32, cfg, False) + 1024) <= SMEM_PER_SM:
                break
        return cfg
    block_b = min(64, _block(B))  # the whole batch on N spilled at B = 128 (144 bytes, 40 chunks streamed)
    split_k = 8 if block_b <= 32 else 1  # as _fp32_config: warps on the slices, then on N
    block_k = max(16 * split_k, min(BWD_CHUNK_BYTES // (block_b * 4), 4 * H & -4 * H))  # 256 rows at B16, 64
    cfg = Config(units=16, num_warps=8, block_b=block_b, split_k=split_k, block_k=block_k, batch_n=True)
    block_k, n_k = bwd_chunks(H, cfg)
    chunk = cfg.units * block_k * 4  # one chunk of W_hh's columns, [block_k, 16] fp32
    return replace(cfg, stream_k=max(0, n_k - FP32_STREAM_KEEP_BYTES // chunk))


def _fp32_config(B: int, H: int, backward: bool, tf32: bool) -> Config:
    if backward:
        block_b = min(128, _block(B))
        if H <= 768 and (tf32 or block_b <= 16):
            split_k = 8 if block_b <= 32 else 1  # as pick_bwd_config: warps on the slices, then on N
            block_k = BWD_CHUNK_BYTES // (block_b * 4) if tf32 else 16 * split_k
            block_k = max(16 * split_k, min(block_k, 4 * H & -4 * H))  # a power of two dividing 4H
            return Config(
                units=16, num_warps=8, block_b=block_b, split_k=split_k, block_k=block_k, batch_n=True
            )
        split_k = min(8, _block(4 * H) // 16)
        for block_b in (16, 4) if tf32 or H <= 256 else (8, 4):
            cfg = Config(units=8, num_warps=split_k, block_b=block_b, split_k=split_k)
            if config_problem(16, H, torch.float32, cfg, backward=True) is None:
                break
        return cfg
    if tf32:
        if fwd_block_b(B) == 64 and H <= 256:  # the whole batch: [32, 64] on 8 warps
            return Config(units=8, num_warps=8, block_b=64)
        return Config(units=8, num_warps=2, block_b=16)  # [32, 16]: one warp per 16 rows of M
    return _fma_fwd_config(H, fwd_block_b(B) if B <= 64 and H <= 768 else 16)


# fp32's whole-batch tiles compile with this register cap: without one ptxas (triton 3.9) chose 128
# registers and spilled 8 bytes for the FMA forward at B64 H64 (lstmlab-train's compare preset).
# (The backward with the batch on N takes BWD_MAXNREG instead.)
FP32_MAXNREG = 255


# Save the forward's activated gates in the compute dtype (fp16, bf16) instead of fp32. Accurate
# enough (gradient errors against fp64 grow 1.3-1.8×, docs/persistent.md), but off: the 16-bit
# stores push the B ≥ 64 forward (8 units, 4 warps) from 186 registers to 255 and spills on sm_90
# (triton 3.9). Only for ablations: the layer op's fake (layer.py) assumes the default.
GATES_IN_COMPUTE_DTYPE = False


def saved_gates_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward saves its activated gates in for the backward: the accumulation dtype,
    or fp16 / bf16 for those inputs with GATES_IN_COMPUTE_DTYPE (the backward reads either)."""
    if GATES_IN_COMPUTE_DTYPE and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


# The barrier's poll: an ld.acquire.gpu through inline PTX on CUDA, an atomic under the interpreter.
ACQUIRE_LOAD = not TRITON_INTERPRET
# With one batch chunk, the forward keeps c, own h and the next gx in registers (False: the chunked
# path, which reads them from memory each step; for ablations).
REGISTER_STATE = True
# With one batch chunk, the backward arrives at the barrier once its ∂L/∂pre_t is stored and waits at
# step t − 1, after loading that step's saved gates and c (False: arrive and wait at once; for ablations).
BWD_SPLIT_BARRIER = True


def _compile_options(dtype: torch.dtype, cfg: Config, tf32: bool | None = None) -> dict:
    options = dict(
        ACQUIRE_LOAD=ACQUIRE_LOAD,
        DOT_PRECISION=_dot_precision(dtype, tf32),
        UPCAST_DOT=TRITON_INTERPRET and dtype == torch.bfloat16,
        num_warps=cfg.num_warps,
        num_stages=1,  # no software pipelining: a load of step t + 1 must never move above the barrier
    )
    if dtype == torch.float32 and cfg.block_b > 16:  # fp32's whole-batch tiles (fp32_config)
        options["maxnreg"] = FP32_MAXNREG
    return options


def _kernel_args_fwd(gx, w_hh, hs, cs, gates, variant, hd, sizes, sync, t_start, t_end, spin_limit, n_sync,
                     cfg, sync_on):  # fmt: skip
    T, B, G = gx.shape[-3:]  # [2, T, B, G] for both directions in one launch
    H = G // 4
    flags, tensors = variant
    args = (gx, w_hh, hs, cs, *(sync if x is None else x for x in (gates, *tensors, hd)))  # sync: never read
    args += (sizes if sizes is not None else sync, sync, t_start, t_end, T, B, H, spin_limit, n_sync)
    block_k = fwd_block_k(H, cfg)
    meta = dict(U=cfg.units, BLOCK_B=cfg.block_b, BLOCK_K=block_k, N_K=triton.cdiv(H, block_k))
    meta |= dict(N_STREAM=cfg.stream_k, STREAM_SPLIT=cfg.stream_split)
    meta |= dict(SPLIT_K=cfg.split_k, PACKED=sizes is not None)
    one_chunk = REGISTER_STATE and cfg.block_b >= B
    meta |= dict(FLAGS=flags, SAVE=gates is not None, ONE_CHUNK=one_chunk, SYNC=sync_on, BIDIR=gx.dim() == 4)
    return args, meta | _compile_options(gx.dtype, cfg)


def _kernel_args_bwd(d_hs, gates, cs, w_hh, d_pre, d_h, d_c, variant, sizes, sync, t_start, t_end, spin_limit,
                     n_sync, cfg, sync_on, finish):  # fmt: skip
    T, B, G = gates.shape[-3:]
    H = G // 4
    flags, tensors = variant
    args = (d_hs, gates, cs, w_hh, d_pre, d_h, d_c, *(sync if x is None else x for x in tensors))
    args += (sizes if sizes is not None else sync, sync, t_start, t_end, T, B, H, spin_limit, n_sync)
    meta = bwd_constexprs(H, cfg) | dict(
        PACKED=sizes is not None, ONE_CHUNK=REGISTER_STATE and cfg.block_b >= B
    )
    meta |= dict(BIDIR=gates.dim() == 4, SPLIT_BARRIER=BWD_SPLIT_BARRIER)
    return args, meta | dict(FLAGS=flags, SYNC=sync_on, FINISH=finish) | bwd_compile_options(d_pre.dtype, cfg)


def bwd_compile_options(dtype: torch.dtype, cfg: Config, tf32: bool | None = None) -> dict:
    """The backward's compile options: the shared ones and, for the 16-bit layout, the register cap."""
    if cfg.stream_k:  # streamed chunks (fp32_streamed_config): at BWD_MAXNREG TF32 B16 H1024 spilled
        return _compile_options(dtype, cfg, tf32) | dict(maxnreg=255)
    return _compile_options(dtype, cfg, tf32) | (dict(maxnreg=BWD_MAXNREG) if cfg.batch_n else {})


def _compile_problem(kernel, args: tuple, meta: dict, programs: int, device: torch.device) -> str | None:
    """Compiles a kernel for the real device and says why its grid cannot run as one launch."""
    compiled = kernel.warmup(*args, grid=(programs,), **meta)
    if hasattr(compiled, "result"):  # a future when Triton compiles asynchronously
        compiled = compiled.result()
    compiled._init_handles()  # loads the binary: n_regs and n_spills come from the driver
    if compiled.n_spills:
        return f"{kernel.__name__} spills {compiled.n_spills} registers with {meta['num_warps']} warps"
    limits = _device_limits(device)
    fit = resident_programs(
        compiled.n_regs, meta["num_warps"], compiled.metadata.shared, limits["sms"],
        limits["regs_per_sm"], limits["threads_per_sm"], limits["smem_per_sm"],
    )  # fmt: skip
    if programs > fit:
        return (
            f"{kernel.__name__} needs {programs} co-resident programs, the device holds {fit} "
            f"({compiled.n_regs} registers × {32 * meta['num_warps']} threads, "
            f"{compiled.metadata.shared} B shared memory each)"
        )
    return None


def _sms_per_direction(device: torch.device, directions: int) -> int | None:
    """The SMs one direction's grid may take (pick_config's ``sms``; None off CUDA: the interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count // directions


def _device_limits(device: torch.device) -> dict[str, int]:
    props = torch.cuda.get_device_properties(device)
    smem_per_block = (
        getattr(props, "shared_memory_per_block_optin", 0)
        or (triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"])
    )
    return {
        "sms": props.multi_processor_count,
        "regs_per_sm": props.regs_per_multiprocessor,
        "threads_per_sm": props.max_threads_per_multi_processor,
        # older torch lacks the per-SM figure: an SM holds a largest block plus its 1 KiB reserve
        "smem_per_sm": getattr(props, "shared_memory_per_multiprocessor", 0) or smem_per_block + 1024,
        "smem_per_block": smem_per_block,
    }


@functools.lru_cache(maxsize=256)
def _cuda_unavailable_reason(
    B: int,
    H: int,
    dtype: torch.dtype,
    device: torch.device,
    flags: int = 0,
    precision: str = "ieee",
    directions: int = 1,
) -> str | None:
    # compiled with the launch's own shapes (T = 1): B and H specialise the kernels as in the real call,
    # and so do the flags (each variant is its own kernel, with its own register use) and the dot
    # precision (fp32: TF32 or not, another configuration and kernel; a key of this cache)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    G = 4 * H
    sync = torch.zeros(2, dtype=torch.int32, device=device)
    gx, w = torch.empty(1, B, G, dtype=dtype, device=device), torch.empty(G, H, dtype=dtype, device=device)
    hs, cs = torch.empty(2, B, H, dtype=dtype, device=device), torch.empty(2, B, H, dtype=acc, device=device)
    gates = torch.empty(1, B, G, dtype=saved_gates_dtype(dtype), device=device)  # specialises both kernels
    d_h = torch.empty(B, H, dtype=acc, device=device)
    shapes = _variant_shapes(1, B, H, dtype, acc)
    variant = (flags, tuple(
        torch.empty(shapes[name][0], dtype=shapes[name][1], device=device) if flags & bits else None
        for name, bits in VARIANT_TENSORS.items()
    ))  # fmt: skip
    limits = _device_limits(device)
    smem_per_block = limits["smem_per_block"]
    for backward in (False, True):
        cfg = pick_config(B, H, dtype, backward, tf32=precision == "tf32", sms=limits["sms"] // directions)
        problem = config_problem(B, H, dtype, cfg, backward, smem_per_block)
        if problem is not None:
            return problem
        P = cfg.programs(H)
        if backward:
            args, meta = _kernel_args_bwd(
                hs, gates, cs, w, gx, d_h, d_h, variant, None, sync, 0, 1, 0, P, cfg, True, True
            )
            meta |= bwd_compile_options(dtype, cfg, tf32=precision == "tf32")  # the precision of the key
            meta["BIDIR"] = directions == 2  # both directions' programs resident at once
            problem = _compile_problem(lstm_persistent_bwd_kernel, args, meta, P * directions, device)
        else:
            hd = hs if flags & variants.RECURRENT_DROPOUT else None
            args, meta = _kernel_args_fwd(
                gx, w, hs, cs, gates, variant, hd, None, sync, 0, 1, 0, P, cfg, True
            )
            meta |= _compile_options(dtype, cfg, tf32=precision == "tf32")
            meta["BIDIR"] = directions == 2
            problem = _compile_problem(lstm_persistent_fwd_kernel, args, meta, P * directions, device)
        if problem is not None:
            return problem
    return None


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def persistent_unavailable_reason(
    B: int, H: int, dtype: torch.dtype, device: torch.device, flags: int = 0, directions: int = 1
) -> str | None:
    """None if the persistent kernels can run this shape and cell variant on this device, else a
    one-line reason.

    CUDA: both kernels compile for the device with the heuristic's configuration and these
    ``flags`` (variants.py's bits), without register spills, and their grids fit on the device at
    once (``directions=2``: both directions of a bidirectional layer in one launch, 2P programs,
    the vanilla cell only). CPU: only through Triton's interpreter. Layer norm is never taken
    (LAYER_NORM_REASON).
    """
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        return f"persistent kernels take {[str(d) for d in SUPPORTED_DTYPES]}, not {dtype}"
    if B < 1 or H < 1:
        return f"persistent kernels need B ≥ 1 and H ≥ 1, got B={B}, H={H}"
    problem = _flags_problem(flags)
    if problem is not None:
        return problem
    if directions not in (1, 2) or (directions == 2 and flags):
        return (
            f"directions must be 1, or 2 with the vanilla cell (flags=0), got {directions} with flags {flags}"
        )
    if device.type == "cpu":
        return None if TRITON_INTERPRET else "on CPU the persistent kernels need TRITON_INTERPRET=1"
    if device.type != "cuda":
        return f"persistent kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not {device.type}"
    if TRITON_INTERPRET:
        return "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cuda_unavailable_reason(B, H, dtype, device, flags, _dot_precision(dtype), directions)


def _timeout_message(what: str) -> str:
    return (
        f"{what}: a grid barrier waited past its bound, so the programs were not all resident "
        "(another kernel holding SMs, or more programs than fit); the outputs are NaN"
    )


def check_timeout(sync: Tensor, what: str) -> None:
    """Raises PersistentKernelTimeout if a kernel's grid barrier timed out (reads the flag: a sync).

    Skipped while a CUDA graph is captured: nothing has run yet; the outputs then carry the NaN."""
    if sync.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if int(sync[1]) != 0:
        raise PersistentKernelTimeout(_timeout_message(what))


# Read every launch's timeout flag right after it (a host sync per call), instead of lazily.
SYNC_CHECK = os.environ.get("LSTMLAB_PERSISTENT_SYNC_CHECK", "0") == "1"
# Launches whose timeout flag the host has not read yet: (flag, CUDA event or None, what).
_pending: list[tuple[Tensor, object, str]] = []


def _watch_timeout(sync: Tensor, what: str) -> None:
    """After a launch: queue its timeout flag for raise_pending_timeouts, with no host sync (on CUDA
    an asynchronous copy to pinned memory and an event), or read it now under SYNC_CHECK."""
    if SYNC_CHECK:
        check_timeout(sync, what)
        return
    if not sync.is_cuda:  # the interpreter has finished: reading the flag costs nothing
        _pending.append((sync[1:], None, what))
        return
    if torch.cuda.is_current_stream_capturing():  # nothing has run; the outputs will carry the NaN
        return
    flag = torch.empty(1, dtype=torch.int32, pin_memory=True)
    flag.copy_(sync[1:], non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((flag, event, what))


def raise_pending_timeouts(wait: bool = False) -> None:
    """Raises PersistentKernelTimeout if an earlier launch, now finished, timed out at a barrier
    (the first such launch is named; its outputs are NaN). Launches still running stay queued,
    unless ``wait`` (a host sync: waits for all of them). Every launcher calls this first."""
    still, failed = [], None
    for flag, event, what in _pending:
        if event is not None and not event.query():
            if not wait:
                still.append((flag, event, what))
                continue
            event.synchronize()
        if failed is None and int(flag[0]) != 0:
            failed = what
    _pending[:] = still
    if failed is not None:
        raise PersistentKernelTimeout(_timeout_message(failed))


@atexit.register
def _warn_unread_timeouts() -> None:
    try:
        raise_pending_timeouts(wait=True)
    except PersistentKernelTimeout as e:
        warnings.warn(str(e), RuntimeWarning, stacklevel=1)
    except Exception:  # the CUDA context may be gone at exit
        pass


def _single_launch(device: torch.device, single_launch: bool | None) -> bool:
    return device.type == "cuda" if single_launch is None else single_launch


def _sizes_tensor(batch_sizes: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor | None:
    if batch_sizes is None:
        return None
    sizes = torch.as_tensor(batch_sizes).to(device=device, dtype=torch.int32)
    if sizes.shape != shape:
        raise ValueError(f"batch_sizes must have shape {shape}, got {tuple(sizes.shape)}")
    return sizes.contiguous()


def _grid(
    T: int, H: int, cfg: Config, phantom_programs: int, device: torch.device, directions: int = 1
) -> tuple[int, int, Tensor]:
    """Programs per direction, programs a barrier waits for, and the [2·directions] int32 barrier
    counters and timeout flags (one pair per direction)."""
    P = cfg.programs(H)
    n_sync = P + phantom_programs
    if T * n_sync >= ABORT.value:
        raise ValueError(f"T·programs must stay below 2**30 (the barrier counter), got {T}·{n_sync}")
    return P, n_sync, torch.zeros(2 * directions, dtype=torch.int32, device=device)


def _check_split_k(cfg: Config, H: int, backward: bool) -> None:
    if not backward:
        K = fwd_block_k(H, cfg)
        if K < 16 or K & (K - 1) or triton.cdiv(H, K) > MAX_K_CHUNKS:
            raise ValueError(
                f"the forward's K chunk (block_k) must be a power of two ≥ 16 with H = {H} in at most "
                f"{MAX_K_CHUNKS} chunks, got {K} ({cfg})"
            )
        what = "the K chunk"
    else:
        K, what = _block(4 * H), "4H padded"
        if cfg.block_k:
            K, what = cfg.block_k, "a 4H chunk padded"
            if K & (K - 1):
                raise ValueError(f"block_k must be a power of two, got {cfg}")
    S = cfg.split_k
    if S < 1 or S & (S - 1) or K // S < 16:
        raise ValueError(f"split_k must be a power of two with {what} ({K}) / split_k ≥ 16, got {cfg}")
    n_k = bwd_chunks(H, cfg)[1] if backward else triton.cdiv(H, K)
    if not 0 <= cfg.stream_k < n_k:
        raise ValueError(f"stream_k must be ≥ 0 and leave one of the {n_k} chunks on chip, got {cfg}")
    R = cfg.stream_split
    if R < 1 or R & (R - 1) or (backward and R != 1) or K // R // S < 16:
        raise ValueError(
            f"stream_split must be a power of two (1 in the backward) with {what} ({K}) / stream_split / "
            f"split_k ≥ 16, got {cfg}"
        )


def _check_available(
    B: int, H: int, dtype: torch.dtype, device: torch.device, flags: int, directions: int = 1
) -> None:
    reason = persistent_unavailable_reason(B, H, dtype, device, flags, directions)
    if reason is not None:
        raise RuntimeError(f"the persistent LSTM kernels cannot run B={B}, H={H}, {dtype}: {reason}")


# the launchers' variant tensors, in the kernels' order, and the flag bits that call for each
VARIANT_TENSORS = {
    "peephole": variants.PEEPHOLES,
    "zoneout": variants.ZONEOUT_C | variants.ZONEOUT_H,
    "dropout": variants.RECURRENT_DROPOUT,
    "c_new": variants.ZONEOUT_C,
}
_BIT_NAMES = {
    variants.PEEPHOLES: "PEEPHOLES",
    variants.ZONEOUT_C: "ZONEOUT_C",
    variants.ZONEOUT_H: "ZONEOUT_H",
    variants.RECURRENT_DROPOUT: "RECURRENT_DROPOUT",
}


def _flags_problem(flags: int) -> str | None:
    if isinstance(flags, bool) or not isinstance(flags, int) or flags < 0:
        return f"flags must be a non-negative int (variants.py's bits), got {flags!r}"
    if flags & variants.LAYER_NORM:
        return LAYER_NORM_REASON
    if flags & ~PERSISTENT_FLAGS:
        return f"flags has bits {flags & ~PERSISTENT_FLAGS:#x} that variants.py does not define"
    return None


def _variant_shapes(T: int, B: int, H: int, dtype: torch.dtype, acc: torch.dtype) -> dict:
    return {
        "peephole": ((3, H), acc),
        "zoneout": ((T, B, 2, H), torch.uint8),
        "dropout": ((B, H), dtype),
        "c_new": ((T, B, H), acc),
    }


def _check_variant(flags: int, tensors: dict, T: int, B: int, H: int, dtype: torch.dtype, acc: torch.dtype,
                   device: torch.device) -> tuple[int, tuple]:  # fmt: skip
    """(flags, the variant tensors in the kernels' order, contiguous), or ValueError: each tensor
    given iff its flag is set, with its shape, dtype and device."""
    problem = _flags_problem(flags)
    if problem is not None:
        raise ValueError(problem)
    shapes = _variant_shapes(T, B, H, dtype, acc)
    for name, t in tensors.items():
        bits = VARIANT_TENSORS[name]
        wanted = " or ".join(_BIT_NAMES[bit] for bit in _BIT_NAMES if bit & bits)
        if t is None and flags & bits:
            given = " and ".join(_BIT_NAMES[bit] for bit in _BIT_NAMES if bit & bits & flags)
            raise ValueError(f"flags has {given} but {name} is None: pass {name} {list(shapes[name][0])}")
        if t is not None and not flags & bits:
            raise ValueError(f"{name} is given but flags has no {wanted}: pass it only with that flag")
        if t is None:
            continue
        shape, want = shapes[name]
        if tuple(t.shape) != shape or t.dtype != want or t.device != device:
            raise ValueError(
                f"{name} must be {list(shape)} {want} on {device} (for {wanted}), "
                f"got {list(t.shape)} {t.dtype} on {t.device}"
            )
    return flags, tuple(None if t is None else t.contiguous() for t in tensors.values())


def persistent_forward(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    batch_sizes: Tensor | None = None,
    *,
    flags: int = 0,
    peephole: Tensor | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
    c_new: Tensor | None = None,
    config: Config | None = None,
    single_launch: bool | None = None,
    spin_limit: int = SPIN_LIMIT,
    phantom_programs: int = 0,
    save: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""All T steps of one LSTM layer and direction in one launch (CPU interpreter: one per step).

    The cell is the one of ``flags`` (variants.py writes out each variant's equations); each
    variant tensor is given iff its flag is set, else ValueError.

    Args:
        gx: [T, B, 4H] input projection incl. biases, contiguous (fp32, fp16, bf16 or fp64). Or
            [2, T, B, 4H]: both directions of a bidirectional layer in one launch (grid (P, 2), a
            barrier counter per direction; direction 1 over its time-flipped sequence), every other
            tensor and output then with the same leading [2] (batch_sizes [2, T]); vanilla cell only.
        h0: [B, H] initial hidden state (cast to the dtype of gx, as hs[0]).
        c0: [B, H] initial cell state, any float dtype.
        w_hh: [4H, H] recurrent weights, dtype of gx.
        batch_sizes: None, or [T] ints: at step k only rows b < batch_sizes[k] advance, the others
            carry h and c unchanged (packed sequences, decreasing or increasing) and ignore their
            masks. Copied to the device if elsewhere (while capturing a CUDA graph, pass them on
            the device).
        flags: variants.py's bits (``CellVariant.flags`` plus the mask bits), all but LAYER_NORM.
        peephole: [3, H] acc (p_i, p_f, p_o), iff PEEPHOLES.
        zoneout: [T, B, 2, H] uint8 in {0, 1} (z^c, z^h; 1 keeps the previous value), iff
            ZONEOUT_C or ZONEOUT_H.
        dropout: [B, H] dtype of gx, the recurrent dropout mask m (0 or 1/(1 − p)), one per
            sequence, iff RECURRENT_DROPOUT: the dot takes h_{t−1} ⊙ m.
        c_new: [T, B, H] acc, contiguous, iff ZONEOUT_C: an output, c̃ (the cell before zoneout) of
            each step (c_{t−1} in rows that did not advance).
        config: units per program and warps (default: :func:`pick_config`).
        single_launch: one launch with grid barriers (default on CUDA) or one launch per step
            without them (default on CPU, where the interpreter runs programs one after another).
        spin_limit: polls of the barrier counter before a program gives up.
        phantom_programs: the barrier also waits for this many programs that do not exist
            (tests of the timeout path only).
        save: store what the backward reads (gates and every c_t). False (no backward will run,
            e.g. under ``torch.no_grad()``): only h_t is stored each step, ``cs`` is [1, B, H]
            holding c_T alone and ``gates`` is None.

    Returns:
        hs [T + 1, B, H] dtype of gx (hs[0] = h0, hs[k + 1] = h after step k), cs [T + 1, B, H] acc
        (same convention; both after zoneout), gates [T, B, 4H] in saved_gates_dtype (acc by
        default): i, f, g, o of each step as the cell used them (1 for a removed gate,
        1 − i for f under CIFG, a_g without input activation).

    A barrier that times out (programs not all resident) makes every later output NaN; the next
    call of either launcher raises PersistentKernelTimeout once this launch has finished (at once
    with LSTMLAB_PERSISTENT_SYNC_CHECK=1; :func:`raise_pending_timeouts` checks on demand).

    Example:
        >>> T, B, H = 5, 3, 8
        >>> gx, h0, c0 = torch.randn(T, B, 4 * H), torch.zeros(B, H), torch.zeros(B, H)
        >>> hs, cs, gates = persistent_forward(gx, h0, c0, torch.randn(4 * H, H))
        >>> hs.shape
        torch.Size([6, 3, 8])
    """
    raise_pending_timeouts()  # an earlier launch's timeout, now that it has finished
    if gx.dim() not in (3, 4) or gx.shape[-1] % 4 or (gx.dim() == 4 and gx.shape[0] != 2):
        raise ValueError(
            f"gx must be [T, B, 4H] (or [2, T, B, 4H], both directions), got shape {tuple(gx.shape)}"
        )
    lead = tuple(gx.shape[:-3])  # (2,): both directions of a bidirectional layer in one launch
    T, B, G = gx.shape[-3:]
    H = G // 4
    dtype, device = gx.dtype, gx.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if lead and flags:
        raise ValueError(f"both directions in one launch take the vanilla cell only (flags=0), got {flags}")
    for name, t, shape in (
        ("h0", h0, (*lead, B, H)),
        ("c0", c0, (*lead, B, H)),
        ("w_hh", w_hh, (*lead, G, H)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if w_hh.dtype != dtype:  # one dot of h (stored in the dtype of gx) with W_hh
        raise ValueError(f"w_hh must have the dtype of gx ({dtype}), got {w_hh.dtype}")
    tensors = {"peephole": peephole, "zoneout": zoneout, "dropout": dropout, "c_new": c_new}
    variant = _check_variant(flags, tensors, T, B, H, dtype, acc, device)
    if c_new is not None and not c_new.is_contiguous():
        raise ValueError("c_new is an output: it must be contiguous")
    _check_available(B, H, dtype, device, flags, 1 + len(lead))
    gx, w_hh = gx.contiguous(), w_hh.contiguous()
    sizes = _sizes_tensor(batch_sizes, (*lead, T), device)

    hs = empty(*lead, T + 1, B, H, dtype=dtype, device=device)
    cs = empty(*lead, T + 1 if save else 2, B, H, dtype=acc, device=device)  # unsaved: a ring of c_{t−1}, c_t
    gates = empty(*lead, T, B, G, dtype=saved_gates_dtype(dtype), device=device) if save else None
    hs.select(-3, 0).copy_(h0)
    cs.select(-3, 0).copy_(c0)
    if T == 0:
        return hs, cs if save else cs[..., :1, :, :], gates
    hd = None  # h ⊙ m of the last two steps: d_t, the dot's operand under recurrent dropout
    if flags & variants.RECURRENT_DROPOUT:
        hd = empty(2, B, H, dtype=dtype, device=device)
        hd[0] = hs[0] * variant[1][2]
    cfg = config or pick_config(B, H, dtype, backward=False, sms=_sms_per_direction(device, 1 + len(lead)))
    _check_split_k(cfg, H, backward=False)
    P, n_sync, sync = _grid(T, H, cfg, phantom_programs, device, 1 + len(lead))
    grid = (P, *lead)  # (P, 2): one barrier counter per direction
    if _single_launch(device, single_launch):
        args, meta = _kernel_args_fwd(
            gx, w_hh, hs, cs, gates, variant, hd, sizes, sync, 0, T, spin_limit, n_sync, cfg, True
        )
        lstm_persistent_fwd_kernel[grid](*args, **meta)
    else:
        for t in range(T):
            args, meta = _kernel_args_fwd(
                gx, w_hh, hs, cs, gates, variant, hd, sizes, sync, t, t + 1, spin_limit, n_sync, cfg, False
            )
            lstm_persistent_fwd_kernel[grid](*args, **meta)
    for d in range(1 + len(lead)):
        where = f", direction {d}" if lead else ""
        what = f"persistent LSTM forward (T={T}, B={B}, H={H}, {dtype}, {P} programs{where})"
        _watch_timeout(sync[2 * d : 2 * d + 2], what)
    return hs, cs if save else cs[..., T % 2 : T % 2 + 1, :, :], gates


def persistent_backward(
    d_hs: Tensor,
    d_cn: Tensor,
    gates: Tensor,
    cs: Tensor,
    w_hh: Tensor,
    batch_sizes: Tensor | None = None,
    *,
    flags: int = 0,
    peephole: Tensor | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
    c_new: Tensor | None = None,
    config: Config | None = None,
    single_launch: bool | None = None,
    spin_limit: int = SPIN_LIMIT,
    phantom_programs: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The reverse recurrence of :func:`persistent_forward` in one launch (CPU: one per step).

    Args:
        d_hs: [T + 1, B, H] dtype of gx: gradient reaching each hs[k] from outside the recurrence
            (with the forward's leading [2] for both directions in one launch, as every tensor here).
        d_cn: [B, H] ∂L/∂c_n.
        gates: [T, B, 4H] acc (or the dtype of d_hs: saved_gates_dtype) and cs [T + 1, B, H] acc, as
            :func:`persistent_forward` returned them.
        w_hh: [4H, H] recurrent weights, dtype of d_hs.
        batch_sizes, config, single_launch, spin_limit, phantom_programs: as in the forward.
        flags, peephole, zoneout, dropout: those of the forward.
        c_new: [T, B, H] acc, iff ZONEOUT_C: the c̃ that the forward wrote.

    Returns:
        d_pre [T, B, 4H] dtype of d_hs (∂L/∂a_t = ∂L/∂gx_t; exactly 0 in rows that did not advance
        at that step and for a removed gate), d_h0 [B, H] acc, d_c0 [B, H] acc. Left to the
        caller: ∂L/∂W_hh = d_preᵀ·(hs[:-1] ⊙ m) and the peepholes' Σ da_i ⊙ c_{t−1},
        Σ da_f ⊙ c_{t−1}, Σ da_o ⊙ c̃ (c̃ = c_new, or cs[1:] without zoneout on c).

    Example:
        >>> T, B, H = 5, 3, 8
        >>> gx, w_hh = torch.randn(T, B, 4 * H), torch.randn(4 * H, H)
        >>> hs, cs, gates = persistent_forward(gx, torch.zeros(B, H), torch.zeros(B, H), w_hh)
        >>> d_pre, d_h0, d_c0 = persistent_backward(torch.randn_like(hs), torch.zeros(B, H), gates, cs, w_hh)
        >>> d_pre.shape
        torch.Size([5, 3, 32])
    """
    raise_pending_timeouts()
    if gates.dim() not in (3, 4) or gates.shape[-1] % 4 or (gates.dim() == 4 and gates.shape[0] != 2):
        raise ValueError(f"gates must be [T, B, 4H] (or [2, T, B, 4H]), got shape {tuple(gates.shape)}")
    lead = tuple(gates.shape[:-3])  # (2,): both directions in one launch, as the forward ran them
    T, B, G = gates.shape[-3:]
    H = G // 4
    dtype, acc, device = d_hs.dtype, cs.dtype, d_hs.device
    if lead and flags:
        raise ValueError(f"both directions in one launch take the vanilla cell only (flags=0), got {flags}")
    expected = {"d_hs": (T + 1, B, H), "d_cn": (B, H), "cs": (T + 1, B, H), "w_hh": (G, H)}
    expected = {name: (*lead, *shape) for name, shape in expected.items()}
    for name, t in (("d_hs", d_hs), ("d_cn", d_cn), ("cs", cs), ("w_hh", w_hh)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
    if gates.dtype not in (acc, dtype) or w_hh.dtype != dtype:  # the kernel reads gates in either
        raise ValueError(
            f"gates must have the dtype of cs ({acc}) or of d_hs (saved_gates_dtype), and w_hh that of "
            f"d_hs ({dtype}), got {gates.dtype} and {w_hh.dtype}"
        )
    if B * G >= 2**31:  # the backward's per-step offsets are int32
        raise ValueError(f"B·4H must stay below 2**31, got {B}·{G}")
    tensors = {"peephole": peephole, "zoneout": zoneout, "dropout": dropout, "c_new": c_new}
    variant = _check_variant(flags, tensors, T, B, H, dtype, acc, device)
    _check_available(B, H, dtype, device, flags, 1 + len(lead))
    d_hs, gates, cs, w_hh = d_hs.contiguous(), gates.contiguous(), cs.contiguous(), w_hh.contiguous()
    sizes = _sizes_tensor(batch_sizes, (*lead, T), device)

    d_pre = empty(*lead, T, B, G, dtype=dtype, device=device)
    d_h = empty(*lead, B, H, dtype=acc, device=device)  # ∂L/∂hs[T], then ∂L/∂h0
    d_c = empty(*lead, B, H, dtype=acc, device=device)  # ∂L/∂c_n, then ∂L/∂c0
    d_h.copy_(d_hs.select(-3, T))
    d_c.copy_(d_cn)
    if T == 0:
        return d_pre, d_h, d_c
    cfg = config or pick_config(B, H, dtype, backward=True, sms=_sms_per_direction(device, 1 + len(lead)))
    _check_split_k(cfg, H, backward=True)
    P, n_sync, sync = _grid(T, H, cfg, phantom_programs, device, 1 + len(lead))

    def launch(t_start: int, t_end: int, sync_on: bool, finish: bool) -> None:
        args, meta = _kernel_args_bwd(
            d_hs, gates, cs, w_hh, d_pre, d_h, d_c, variant, sizes, sync, t_start, t_end, spin_limit,
            n_sync, cfg, sync_on, finish,
        )  # fmt: skip
        lstm_persistent_bwd_kernel[(P, *lead)](*args, **meta)

    if _single_launch(device, single_launch):
        launch(0, T, True, True)
    else:  # each launch ends where a barrier would be: after the step's ∂L/∂pre is stored
        for t in reversed(range(T)):
            launch(t, t + 1, False, False)
        launch(0, 0, False, True)
    for d in range(1 + len(lead)):
        where = f", direction {d}" if lead else ""
        what = f"persistent LSTM backward (T={T}, B={B}, H={H}, {dtype}, {P} programs{where})"
        _watch_timeout(sync[2 * d : 2 * d + 2], what)
    return d_pre, d_h, d_c
