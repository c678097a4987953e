"""Persistent LSTM kernels in Triton: one launch runs every timestep of one layer and direction.

The per-step path (`layer.py`) launches a GEMM and a gate kernel per step each way; at small batch
the GPU then waits on launches. Here one program per slice of U hidden units lives for the whole
sequence, keeps its part of W_hh on chip, and meets the other programs at a grid-wide barrier
between steps (design and diagram: docs/persistent.md).

Forward, program p owns units j ∈ [pU, pU + U): the 4U rows of W_hh that produce their four gates,
stacked unit-major with the gate fastest, so one [B, H]×[H, 4U] dot per step yields all of them.
  step t: h_{t−1} [B, H] from global memory (L2) -> dot + gx_t -> gates -> c_t in fp32
          -> store own slice of h_t (and c_t, gates when saved) -> prefetch gx_{t+1} -> grid barrier
With one batch chunk (B ≤ BLOCK_B) c_{t−1}, own h_{t−1} and gx_t stay in registers across steps
(loaded at t_start, so a launch can start or stop at any step); with several chunks of BLOCK_B rows
each program reads its own c_{t−1} and h_{t−1} back from what it stored.
Backward, program p owns the same units but the 4H columns j of W_hh, since
∂L/∂h_{t−1}[:, j] = Σ_r ∂L/∂pre_t[:, r]·W_hh[r, j] needs every gate row of unit j.
  step t: grid barrier -> ∂L/∂pre_{t+1} [B, 4H] from global memory -> dot -> ∂L/∂h_t (own units)
          -> gate derivatives of step t -> store own columns of ∂L/∂pre_t, carry ∂L/∂c
In 16 bits the dot is W_colsᵀ [U, 4H]·∂L/∂preᵀ [4H, B]: 16 units on the mma's M side, the whole batch
(up to 128 rows) on N, 4H walked in unpadded static chunks, each split across the warps up to B = 32
(a 3-D dot over SPLIT_K slices, summed); fp32 and fp64 keep the first generation's ∂L/∂pre·W_cols
in 16-row chunks. With one chunk ∂L/∂h and ∂L/∂c stay in registers and step t's saved gates and c
are loaded before the barrier. ∂W_hh, ∂W_ih and ∂x are one GEMM each after
the loop, in the caller.

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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import variants
from .triton_gates import (
    F_CIFG,
    F_NO_FORGET_GATE,
    F_NO_INPUT_ACTIVATION,
    F_NO_INPUT_GATE,
    F_NO_OUTPUT_ACTIVATION,
    F_NO_OUTPUT_GATE,
    F_PEEPHOLES,
    F_RECURRENT_DROPOUT,
    F_ZONEOUT_C,
    F_ZONEOUT_H,
    _sigmoid,
    _tanh,
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
def _grid_barrier(p_sync, i_bar, n_sync, spin_limit, aborted, ACQUIRE_LOAD: tl.constexpr):
    """The i_bar-th grid barrier of this launch (1-based) among n_sync programs.

    Returns whether the run is aborted: by this program (it waited spin_limit polls) or another.
    """
    # every thread's stores are issued before the arrival, which releases them at gpu scope
    tl.debug_barrier()
    b_seen = tl.atomic_add(p_sync, 1, sem="acq_rel", scope="gpu") + 1
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


@triton.jit(do_not_specialize=["t_start", "t_end", "spin_limit", "n_sync"])
def lstm_persistent_fwd_kernel(
    p_gx,  # [T, B, G] input projection incl. biases
    p_w,  # [G, H] W_hh
    p_hs,  # [T + 1, B, H] hs[0] = h0 (written by the host), hs[t + 1] = h after step t
    p_cs,  # [T + 1, B, H] acc, same convention (SAVE); else [2, B, H]: slot t % 2 holds c_{t−1}
    p_gates,  # [T, B, G] acc: activated i, f, g, o, saved for the backward (SAVE)
    p_peep,  # [3, H] acc: p_i, p_f, p_o (PEEPHOLES)
    p_zone,  # [T, B, 2, H] uint8: z^c, z^h, 1 = keep the previous value (ZONEOUT_C, ZONEOUT_H)
    p_drop,  # [B, H] recurrent dropout mask m, dtype of gx (RECURRENT_DROPOUT)
    p_cnew,  # [T, B, H] acc out: c̃, the cell before zoneout (ZONEOUT_C)
    p_hd,  # [2, B, H] dtype of hs: h ⊙ m, slot t % 2 = h_{t−1} ⊙ m (RECURRENT_DROPOUT; host writes slot 0)
    p_sizes,  # [T] int32: rows that advance at each step (PACKED)
    p_sync,  # [2] int32: barrier counter, timeout flag
    t_start,
    t_end,
    B,
    H,
    spin_limit,
    n_sync,  # programs that meet at the barrier
    U: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SPLIT_K: tl.constexpr,  # slices of the H contraction side by side, summed (1: one 2-D dot)
    PACKED: tl.constexpr,
    FLAGS: tl.constexpr,  # variants.py's bits but LAYER_NORM
    SAVE: tl.constexpr,  # store gates and every c_t for a backward; else only h_t (and c in a ring)
    ONE_CHUNK: tl.constexpr,  # B ≤ BLOCK_B: c_{t−1}, own h_{t−1} and gx_t stay in registers across steps
    SYNC: tl.constexpr,
    ACQUIRE_LOAD: tl.constexpr,  # the barrier polls with ld.acquire (CUDA), else an atomic
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    G = 4 * H
    acc = p_cs.dtype.element_ty

    o_k = tl.arange(0, BLOCK_H)
    m_k = o_k < H
    o_u = i_p * U + tl.arange(0, U)  # own units
    m_u = o_u < H
    o_q = tl.arange(0, 4 * U) % 4  # gate of each stacked column
    o_uq = i_p * U + tl.arange(0, 4 * U) // 4  # unit of each stacked column
    m_uq = o_uq < H
    o_r = o_q * H + o_uq  # [4U] stacked rows of W_hh = columns of gx and gates

    # this program's 4U rows of W_hh, loaded once and kept on chip for the whole sequence
    if SPLIT_K == 1:
        b_w = tl.load(p_w + o_r[:, None] * H + o_k[None, :], mask=m_uq[:, None] & m_k[None, :], other=0)
    else:  # [S, BLOCK_H / S, 4U]: slice s of the H columns, transposed, for the 3-D dot
        o_k3 = (tl.arange(0, SPLIT_K) * (BLOCK_H // SPLIT_K))[:, None, None]
        o_k3 += tl.arange(0, BLOCK_H // SPLIT_K)[None, :, None]
        b_w = tl.load(p_w + o_r[None, None, :] * H + o_k3, mask=m_uq[None, None, :] & (o_k3 < H), other=0)
    # tanh(x) = 2σ(2x) − 1: one sigmoid activates all four gates of the stacked tile
    b_s = tl.where(o_q == 2, 2.0, 1.0).to(acc)[None, :]  # [1, 4U]
    if F_PEEPHOLES & FLAGS:  # [1, U] each
        b_pi = tl.load(p_peep + o_u, mask=m_u, other=0)[None, :]
        b_pf = tl.load(p_peep + H + o_u, mask=m_u, other=0)[None, :]
        b_po = tl.load(p_peep + 2 * H + o_u, mask=m_u, other=0)[None, :]

    if ONE_CHUNK:  # the state as the launch finds it; then carried in registers, gx_{t+1} prefetched
        t0 = tl.cast(t_start, tl.int64)
        o_b = tl.arange(0, BLOCK_B)
        o_own = o_b[:, None] * H + o_u[None, :]
        m_own = (o_b < B)[:, None] & m_u[None, :]
        p_c0 = p_cs + (t0 if SAVE else t0 % 2) * B * H
        b_c_reg = tl.load(p_c0 + o_own, mask=m_own, other=0, cache_modifier=".cg")  # [BLOCK_B, U]
        b_h_reg = tl.load(p_hs + t0 * B * H + o_own, mask=m_own, other=0, cache_modifier=".cg")
        o_gate = o_b[:, None] * G + o_r[None, :]
        b_gx_reg = tl.load(p_gx + t0 * B * G + o_gate, mask=(o_b < B)[:, None] & m_uq[None, :], other=0)

    aborted = tl.program_id(0) < 0
    for t in range(t_start, t_end):
        t64 = tl.cast(t, tl.int64)
        n_rows = B
        if PACKED:
            n_rows = tl.load(p_sizes + t)
        n_chunks = tl.cdiv(B, BLOCK_B)
        if ONE_CHUNK:
            n_chunks = 1
        # after an abort every value this program writes is NaN
        b_poison = tl.where(aborted, float("nan"), 0.0).to(acc)
        p_h_prev = p_hs + t64 * B * H  # [B, H] slices of step t
        p_c_prev, p_c_next = p_cs + t64 * B * H, p_cs + (t64 + 1) * B * H
        if not SAVE:
            p_c_prev, p_c_next = p_cs + (t64 % 2) * B * H, p_cs + ((t64 + 1) % 2) * B * H
        # the dot's operand d_t: h_{t−1}, or h_{t−1} ⊙ m as its owners stored it (so that no program
        # multiplies a whole [BLOCK_B, H] tile)
        p_d_prev = p_hd + (t64 % 2) * B * H if F_RECURRENT_DROPOUT & FLAGS else p_h_prev
        # batch rows in chunks of BLOCK_B: the h tile of one chunk is what fits on chip
        for i_b in range(0, n_chunks):
            o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
            m_b = o_b < B
            o_own = o_b[:, None] * H + o_u[None, :]  # [BLOCK_B, U]
            m_own = m_b[:, None] & m_u[None, :]
            o_gate = o_b[:, None] * G + o_r[None, :]  # [BLOCK_B, 4U]
            m_gate = m_b[:, None] & m_uq[None, :]
            if ONE_CHUNK:
                b_c, b_h, b_gx = b_c_reg, b_h_reg, b_gx_reg
            else:  # this program's own state as it stored it (c in acc, h in the dtype of hs), read
                # before the dot, and gx_t; .cg like every load of data written during the launch
                b_c = tl.load(p_c_prev + o_own, mask=m_own, other=0, cache_modifier=".cg")
                b_h = tl.load(p_h_prev + o_own, mask=m_own, other=0, cache_modifier=".cg")
                b_gx = tl.load(p_gx + t64 * B * G + o_gate, mask=m_gate, other=0)

            # .cg: h_{t−1} was written by other SMs; read it from L2, never from a stale L1 line
            if SPLIT_K == 1:
                p_h_all = p_d_prev + o_b[:, None] * H + o_k[None, :]
                b_hp = tl.load(p_h_all, mask=m_b[:, None] & m_k[None, :], other=0, cache_modifier=".cg")
                b_pre = _dot(b_hp, tl.trans(b_w), acc, DOT_PRECISION, UPCAST_DOT)  # [BLOCK_B, 4U]
            else:  # [S, BLOCK_B, H/S]×[S, H/S, 4U], then Σ over s
                o_kh = (tl.arange(0, SPLIT_K) * (BLOCK_H // SPLIT_K))[:, None, None]
                o_kh += tl.arange(0, BLOCK_H // SPLIT_K)[None, None, :]
                p_h_all = p_d_prev + o_b[None, :, None] * H + o_kh
                b_hp = tl.load(p_h_all, mask=m_b[None, :, None] & (o_kh < H), other=0, cache_modifier=".cg")
                b_pre = tl.sum(_dot(b_hp, b_w, acc, DOT_PRECISION, UPCAST_DOT), axis=0)
            b_pre += b_gx.to(acc)
            if (F_SPLIT_GATES & FLAGS) == 0:
                b_act = _sigmoid(b_pre * b_s) * b_s - (b_s - 1) + b_poison
                if SAVE:
                    tl.store(p_gates + t64 * B * G + o_gate, b_act, mask=m_gate)
                b_i, b_f, b_g, b_o = _split_gates(b_act, BLOCK_B, U)
                b_c_next = b_f * b_c + b_i * b_g
            else:  # gate by gate: peepholes need c_{t−1} and c̃, CIFG crosses gates
                b_i, b_f, b_g, b_a_o = _split_gates(b_pre + b_poison, BLOCK_B, U)  # pre-activations
                b_one = tl.full((BLOCK_B, U), 1, acc) + b_poison  # a removed gate
                if F_PEEPHOLES & FLAGS:
                    b_i += b_pi * b_c
                    b_f += b_pf * b_c
                b_i = b_one if F_NO_INPUT_GATE & FLAGS else _sigmoid(b_i)
                if F_CIFG & FLAGS:
                    b_f = 1 - b_i
                elif F_NO_FORGET_GATE & FLAGS:
                    b_f = b_one
                else:
                    b_f = _sigmoid(b_f)
                if (F_NO_INPUT_ACTIVATION & FLAGS) == 0:
                    b_g = _tanh(b_g)
                b_c_next = b_f * b_c + b_i * b_g
                if F_PEEPHOLES & FLAGS:
                    b_a_o += b_po * b_c_next
                b_o = b_one if F_NO_OUTPUT_GATE & FLAGS else _sigmoid(b_a_o)
                p_g = p_gates + t64 * B * G + o_own + (o_b * (G - H))[:, None]  # gate i of own units
                if SAVE:
                    tl.store(p_g, b_i, mask=m_own)
                    tl.store(p_g + H, b_f, mask=m_own)
                    tl.store(p_g + 2 * H, b_g, mask=m_own)
                    tl.store(p_g + 3 * H, b_o, mask=m_own)
            b_h_next = b_o * b_c_next if F_NO_OUTPUT_ACTIVATION & FLAGS else b_o * _tanh(b_c_next)
            m_step = (o_b < n_rows)[:, None]  # rows that advance; the others carry h and c
            p_z = p_zone + t64 * 2 * B * H + o_own + (o_b * H)[:, None]  # z^c of own units; z^h at + H
            if F_ZONEOUT_C & FLAGS:  # c̃ for the backward, then c_t = c_{t−1} where z^c = 1
                tl.store(p_cnew + t64 * B * H + o_own, tl.where(m_step, b_c_next, b_c) + b_poison, mask=m_own)
                b_z = tl.load(p_z, mask=m_own, other=0)
                b_c_next = tl.where(b_z != 0, b_c + b_poison, b_c_next)
            if F_ZONEOUT_H & FLAGS:
                b_z = tl.load(p_z + H, mask=m_own, other=0)
                b_h_next = tl.where(b_z != 0, b_h.to(acc) + b_poison, b_h_next)
            b_c = tl.where(m_step, b_c_next, b_c + b_poison)
            b_h = tl.where(m_step, b_h_next.to(b_h.dtype), b_h + b_poison.to(b_h.dtype))
            tl.store(p_h_prev + B * H + o_own, b_h, mask=m_own)
            tl.store(p_c_next + o_own, b_c, mask=m_own)
            if F_RECURRENT_DROPOUT & FLAGS:  # the next step's d: h_t ⊙ m, rounded once (exact in acc)
                b_m = tl.load(p_drop + o_own, mask=m_own, other=0).to(acc)
                p_d_next = p_hd + ((t64 + 1) % 2) * B * H + o_own
                tl.store(p_d_next, (b_h.to(acc) * b_m).to(b_h.dtype), mask=m_own)
            if ONE_CHUNK:  # gx_{t+1} is a launch input: its load overlaps the barrier
                b_c_reg, b_h_reg = b_c, b_h
                m_next = m_gate & (o_gate * 0 + t64 + 1 < t_end)  # a tensor: the interpreter masks no scalars
                b_gx_reg = tl.load(p_gx + (t64 + 1) * B * G + o_gate, mask=m_next, other=0)
        if SYNC:  # h_t complete in every program before anyone reads it
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
def _grad_h(p_dpre, p_dhs, p_sizes, p_zone, p_drop, b_w, b_dh, t, B, H, o_b, o_own, m_own,
            U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, N_K: tl.constexpr,
            EVEN_K: tl.constexpr, K_AHEAD: tl.constexpr, SPLIT_K: tl.constexpr, BATCH_N: tl.constexpr,
            PACKED: tl.constexpr, FLAGS: tl.constexpr, DOT_PRECISION: tl.constexpr,
            UPCAST_DOT: tl.constexpr):  # fmt: skip
    """∂L/∂hs[t] of rows o_b, own units, from b_dh = ∂L/∂hs[t + 1] (what carried rows pass on):
    rows that advanced at step t get ∂L/∂pre_t·W_hh instead, from every program's ∂L/∂pre_t
    (⊙ m with recurrent dropout; + z^h ⊙ ∂L/∂hs[t + 1] with zoneout on h)."""
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
        if i_k == K_AHEAD:
            b_acc = _dot(b_w[0], b_dp[0], acc, DOT_PRECISION, UPCAST_DOT) if BATCH_N else _dot(
                b_dp[0], b_w[0], acc, DOT_PRECISION, UPCAST_DOT)  # fmt: skip
        elif i_k > K_AHEAD:
            if BATCH_N:  # ∂L/∂hᵀ [S, U, BLOCK_B]: the batch on the mma's N side
                b_acc += _dot(b_w[i_k - K_AHEAD], b_dp[i_k - K_AHEAD], acc, DOT_PRECISION, UPCAST_DOT)
            else:  # [S, BLOCK_B, U]
                b_acc += _dot(b_dp[i_k - K_AHEAD], b_w[i_k - K_AHEAD], acc, DOT_PRECISION, UPCAST_DOT)
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
    p_gates,  # [T, B, G] acc (or the dtype of hs), saved by the forward
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
    EVEN_K: tl.constexpr,  # N_K·BLOCK_K = 4H: no chunk needs a mask on k
    K_AHEAD: tl.constexpr,  # chunks of ∂L/∂pre whose loads are issued ahead of the chunk multiplied
    SPLIT_K: tl.constexpr,  # slices of each chunk, one per warp, summed after the dot (1: a 2-D dot)
    BATCH_N: tl.constexpr,  # the dot is W_colsᵀ·∂L/∂preᵀ: the batch on the mma's N side
    PACKED: tl.constexpr,
    FLAGS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # B ≤ BLOCK_B: ∂L/∂h, ∂L/∂c in registers, gates and c loaded before the barrier
    SYNC: tl.constexpr,
    ACQUIRE_LOAD: tl.constexpr,
    FINISH: tl.constexpr,  # end with step t_start's recurrent part: p_dh becomes ∂L/∂hs[t_start]
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # per-element offsets are int32 (within one step's [B, 4H] slice, which the launcher bounds); each
    # step's base, t·B·4H, is int64. Few offset tensors, shared by every load and store of the step:
    # they are loop invariant, so the compiler keeps them in registers for the whole sequence
    i_p = tl.program_id(0)
    G = 4 * H
    acc = p_dh.dtype.element_ty

    o_u = i_p * U + tl.arange(0, U)
    m_u = o_u < H

    # the columns of W_hh for this program's units, every gate row: loaded once, N_K chunks
    b_w = ()
    for i_k in tl.static_range(N_K):
        b_w = b_w + (_bwd_w_chunk(p_w, o_u, m_u, i_k, H, BLOCK_K, SPLIT_K, BATCH_N),)  # noqa: RUF005
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
                               m_own, U, BLOCK_B, BLOCK_K, N_K, EVEN_K, K_AHEAD, SPLIT_K, BATCH_N, PACKED,
                               FLAGS, DOT_PRECISION, UPCAST_DOT)  # fmt: skip
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
                if F_NO_OUTPUT_ACTIVATION & FLAGS:
                    b_do = b_dh_new * b_c
                    b_dc_new += b_dh_new * b_o
                else:
                    b_tanh_c = _tanh(b_c)
                    b_do = b_dh_new * b_tanh_c
                    b_dc_new += b_dh_new * b_o * (1 - b_tanh_c * b_tanh_c)
                b_zero = tl.zeros((BLOCK_B, U), acc)  # a removed gate has no pre-activation
                b_do = b_zero if F_NO_OUTPUT_GATE & FLAGS else b_do * b_o * (1 - b_o)
                if F_PEEPHOLES & FLAGS:
                    b_dc_new += b_po * b_do
                b_di = b_dc_new * b_g
                b_df = b_dc_new * b_c_prev
                b_dg = b_dc_new * b_i
                b_dc_prev = b_dc_new * b_f
                if F_ZONEOUT_C & FLAGS:
                    b_dc_prev += tl.where(b_zc, b_dc, 0)
                if F_CIFG & FLAGS:  # f = 1 − i
                    b_di -= b_df
                    b_df = b_zero
                elif F_NO_FORGET_GATE & FLAGS:
                    b_df = b_zero
                else:
                    b_df = b_df * b_f * (1 - b_f)
                b_di = b_zero if F_NO_INPUT_GATE & FLAGS else b_di * b_i * (1 - b_i)
                if (F_NO_INPUT_ACTIVATION & FLAGS) == 0:
                    b_dg = b_dg * (1 - b_g * b_g)
                if F_PEEPHOLES & FLAGS:
                    b_dc_prev += b_pi * b_di + b_pf * b_df
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
            aborted = _grid_barrier(p_sync, i_bar + 1, n_sync, spin_limit, aborted, ACQUIRE_LOAD)
        b_poison = tl.where(aborted, float("nan"), 0.0).to(acc)
        for i_b in range(0, tl.cdiv(B, BLOCK_B)):
            o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
            o_own = o_b[:, None] * H + o_u[None, :]
            m_own = (o_b < B)[:, None] & m_u[None, :]
            b_dh = tl.load(p_dh + o_own, mask=m_own, other=0, cache_modifier=".cg")
            b_dh = _grad_h(p_dpre, p_dhs, p_sizes, p_zone, p_drop, b_w, b_dh, t_start, B, H, o_b, o_own,
                           m_own, U, BLOCK_B, BLOCK_K, N_K, EVEN_K, K_AHEAD, SPLIT_K, BATCH_N, PACKED, FLAGS,
                           DOT_PRECISION, UPCAST_DOT)  # fmt: skip
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
    batch rows of one chunk (a program walks the batch in chunks of block_b rows each step) and
    split_k: the slices of the dot's contraction (4H in the backward, H in the forward) that run side
    by side, one per warp, summed after the dot (1: one 2-D dot).

    Backward only: block_k, the 4H contraction walked in static chunks of block_k (a power of two;
    0: one chunk, 4H padded to a power of two), each chunk split in split_k slices; batch_n, the dot
    computed as W_colsᵀ·∂L/∂preᵀ with the batch on the mma's N side ([U, block_b] output) instead of
    ∂L/∂pre·W_cols ([block_b, U]); k_ahead, the chunks of ∂L/∂pre whose loads are issued ahead of
    the chunk being multiplied (0: each right before its dot)."""

    units: int
    num_warps: int
    block_b: int = 16
    split_k: int = 1
    block_k: int = 0
    batch_n: bool = False
    k_ahead: int = 0

    def programs(self, H: int) -> int:
        return triton.cdiv(H, self.units)


MMA_M, MMA_N = 16, 8  # one warp's tensor-core tile (mma.sync m16n8k16): rows and columns of the output


def dot_warps(M: int, N: int, batch: int = 1) -> int:
    """The most warps a [batch, M, N] dot output keeps busy without two warps computing the same
    fragment: Triton places warps on the batch first, then on M in 16s and N in 8s."""
    return batch * max(1, M // MMA_M) * max(1, N // MMA_N)


def pick_config(B: int, H: int, dtype: torch.dtype, backward: bool) -> Config:
    """The heuristic, from sm_90 compiles (no spills, no duplicated warps; tests/test_persistent.py):
    8 units per program (32 rows of W_hh; up to H = 1024 at most 128 programs, one per SM of an
    H100; beyond, the tiles pad to 2048 columns and no longer fit: the per-step path). Forward:
    the batch in chunks of 16 rows (32 in the 16-bit forward at B > 16, where the [32, H] h tile
    still fits beside W_hh) and as many warps as the [block_b, 4U] output has mma tiles (4 or 8).
    fp32 without TF32 and fp64 multiply on CUDA cores (FMA, no mma tiles): 8 warps, which keeps the
    fp32 tiles from spilling. Backward: :func:`pick_bwd_config`."""
    if backward:
        return pick_bwd_config(B, H, dtype)
    block_b = 32 if B > 16 and dtype in (torch.float16, torch.bfloat16) else 16
    if dtype == torch.float64 or (_dot_precision(dtype) == "ieee" and dtype == torch.float32):
        return Config(units=8, num_warps=8, block_b=block_b)  # an FMA dot: no mma tiles to duplicate
    return Config(units=8, num_warps=min(8, dot_warps(block_b, 4 * 8)), block_b=block_b)


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
    return dict(U=cfg.units, BLOCK_B=cfg.block_b, BLOCK_K=block_k, N_K=n_k, EVEN_K=n_k * block_k == 4 * H,
                K_AHEAD=min(cfg.k_ahead, n_k - 1), SPLIT_K=cfg.split_k, BATCH_N=cfg.batch_n)  # fmt: skip


def tile_bytes(B: int, H: int, dtype: torch.dtype, cfg: Config, backward: bool) -> int:
    """On-chip bytes of one program's two dot operands, which the compiler stages in shared memory:
    forward W_hh rows [4U, H] and an h chunk [block_b, H]; backward W_hh columns [4H, U] (every
    chunk, kept for the whole sequence) and one ∂L/∂pre chunk [block_b, block_k] at a time (sizes
    padded to powers of two, 4H to whole chunks)."""
    if backward:
        block_k, n_k = bwd_chunks(H, cfg)
        return (cfg.units * n_k + cfg.block_b) * block_k * dtype.itemsize
    return (cfg.block_b + 4 * cfg.units) * _block(H) * dtype.itemsize


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


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, like the per-step path's cuBLAS GEMM
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# The barrier's poll: an ld.acquire.gpu through inline PTX on CUDA, an atomic under the interpreter.
ACQUIRE_LOAD = not TRITON_INTERPRET
# With one batch chunk, the forward keeps c, own h and the next gx in registers (False: the chunked
# path, which reads them from memory each step; for ablations).
REGISTER_STATE = True


def _compile_options(dtype: torch.dtype, cfg: Config) -> dict:
    return dict(
        ACQUIRE_LOAD=ACQUIRE_LOAD,
        DOT_PRECISION=_dot_precision(dtype),
        UPCAST_DOT=TRITON_INTERPRET and dtype == torch.bfloat16,
        num_warps=cfg.num_warps,
        num_stages=1,  # no software pipelining: a load of step t + 1 must never move above the barrier
    )


def _kernel_args_fwd(gx, w_hh, hs, cs, gates, variant, hd, sizes, sync, t_start, t_end, spin_limit, n_sync,
                     cfg, sync_on):  # fmt: skip
    _, B, G = gx.shape
    H = G // 4
    flags, tensors = variant
    args = (gx, w_hh, hs, cs, *(sync if x is None else x for x in (gates, *tensors, hd)))  # sync: never read
    args += (sizes if sizes is not None else sync, sync, t_start, t_end, B, H, spin_limit, n_sync)
    meta = dict(
        U=cfg.units, BLOCK_B=cfg.block_b, BLOCK_H=_block(H), SPLIT_K=cfg.split_k, PACKED=sizes is not None
    )
    one_chunk = REGISTER_STATE and cfg.block_b >= B
    meta |= dict(FLAGS=flags, SAVE=gates is not None, ONE_CHUNK=one_chunk, SYNC=sync_on)
    return args, meta | _compile_options(gx.dtype, cfg)


def _kernel_args_bwd(d_hs, gates, cs, w_hh, d_pre, d_h, d_c, variant, sizes, sync, t_start, t_end, spin_limit,
                     n_sync, cfg, sync_on, finish):  # fmt: skip
    T, B, G = gates.shape
    H = G // 4
    flags, tensors = variant
    args = (d_hs, gates, cs, w_hh, d_pre, d_h, d_c, *(sync if x is None else x for x in tensors))
    args += (sizes if sizes is not None else sync, sync, t_start, t_end, T, B, H, spin_limit, n_sync)
    meta = bwd_constexprs(H, cfg) | dict(
        PACKED=sizes is not None, ONE_CHUNK=REGISTER_STATE and cfg.block_b >= B
    )
    return args, meta | dict(FLAGS=flags, SYNC=sync_on, FINISH=finish) | bwd_compile_options(d_pre.dtype, cfg)


def bwd_compile_options(dtype: torch.dtype, cfg: Config) -> dict:
    """The backward's compile options: the shared ones and, for the 16-bit layout, the register cap."""
    return _compile_options(dtype, cfg) | (dict(maxnreg=BWD_MAXNREG) if cfg.batch_n else {})


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
    B: int, H: int, dtype: torch.dtype, device: torch.device, flags: int = 0
) -> str | None:
    # compiled with the launch's own shapes (T = 1): B and H specialise the kernels as in the real call,
    # and so do the flags (each variant is its own kernel, with its own register use)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    G = 4 * H
    sync = torch.zeros(2, dtype=torch.int32, device=device)
    gx, w = torch.empty(1, B, G, dtype=dtype, device=device), torch.empty(G, H, dtype=dtype, device=device)
    hs, cs = torch.empty(2, B, H, dtype=dtype, device=device), torch.empty(2, B, H, dtype=acc, device=device)
    gates, d_h = torch.empty(1, B, G, dtype=acc, device=device), torch.empty(B, H, dtype=acc, device=device)
    shapes = _variant_shapes(1, B, H, dtype, acc)
    variant = (flags, tuple(
        torch.empty(shapes[name][0], dtype=shapes[name][1], device=device) if flags & bits else None
        for name, bits in VARIANT_TENSORS.items()
    ))  # fmt: skip
    smem_per_block = _device_limits(device)["smem_per_block"]
    for backward in (False, True):
        cfg = pick_config(B, H, dtype, backward)
        problem = config_problem(B, H, dtype, cfg, backward, smem_per_block)
        if problem is not None:
            return problem
        P = cfg.programs(H)
        if backward:
            args, meta = _kernel_args_bwd(
                hs, gates, cs, w, gx, d_h, d_h, variant, None, sync, 0, 1, 0, P, cfg, True, True
            )
            problem = _compile_problem(lstm_persistent_bwd_kernel, args, meta, P, device)
        else:
            hd = hs if flags & variants.RECURRENT_DROPOUT else None
            args, meta = _kernel_args_fwd(
                gx, w, hs, cs, gates, variant, hd, None, sync, 0, 1, 0, P, cfg, True
            )
            problem = _compile_problem(lstm_persistent_fwd_kernel, args, meta, P, device)
        if problem is not None:
            return problem
    return None


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def persistent_unavailable_reason(
    B: int, H: int, dtype: torch.dtype, device: torch.device, flags: int = 0
) -> str | None:
    """None if the persistent kernels can run this shape and cell variant on this device, else a
    one-line reason.

    CUDA: both kernels compile for the device with the heuristic's configuration and these
    ``flags`` (variants.py's bits), without register spills, and their grids fit on the device at
    once. CPU: only through Triton's interpreter. Layer norm is never taken (LAYER_NORM_REASON).
    """
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        return f"persistent kernels take {[str(d) for d in SUPPORTED_DTYPES]}, not {dtype}"
    if B < 1 or H < 1:
        return f"persistent kernels need B ≥ 1 and H ≥ 1, got B={B}, H={H}"
    problem = _flags_problem(flags)
    if problem is not None:
        return problem
    if device.type == "cpu":
        return None if TRITON_INTERPRET else "on CPU the persistent kernels need TRITON_INTERPRET=1"
    if device.type != "cuda":
        return f"persistent kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not {device.type}"
    if TRITON_INTERPRET:
        return "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cuda_unavailable_reason(B, H, dtype, device, flags)


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


def _sizes_tensor(batch_sizes: Tensor | None, T: int, device: torch.device) -> Tensor | None:
    if batch_sizes is None:
        return None
    sizes = torch.as_tensor(batch_sizes).to(device=device, dtype=torch.int32)
    if sizes.shape != (T,):
        raise ValueError(f"batch_sizes must have shape ({T},), got {tuple(sizes.shape)}")
    return sizes


def _grid(
    T: int, H: int, cfg: Config, phantom_programs: int, device: torch.device
) -> tuple[int, int, Tensor]:
    """Programs, programs the barrier waits for, and the [2] int32 barrier counter and timeout flag."""
    P = cfg.programs(H)
    n_sync = P + phantom_programs
    if T * n_sync >= ABORT.value:
        raise ValueError(f"T·programs must stay below 2**30 (the barrier counter), got {T}·{n_sync}")
    return P, n_sync, torch.zeros(2, dtype=torch.int32, device=device)


def _check_split_k(cfg: Config, H: int, backward: bool) -> None:
    S, K = cfg.split_k, _block(4 * H if backward else H)
    what = "4H" if backward else "H"
    if backward and cfg.block_k:
        K, what = cfg.block_k, "a 4H chunk"
        if K & (K - 1):
            raise ValueError(f"block_k must be a power of two, got {cfg}")
    if S < 1 or S & (S - 1) or K // S < 16:
        raise ValueError(f"split_k must be a power of two with {what} padded ({K}) / split_k ≥ 16, got {cfg}")


def _check_available(B: int, H: int, dtype: torch.dtype, device: torch.device, flags: int) -> None:
    reason = persistent_unavailable_reason(B, H, dtype, device, flags)
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
        gx: [T, B, 4H] input projection incl. biases, contiguous (fp32, fp16, bf16 or fp64).
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
        (same convention; both after zoneout), gates [T, B, 4H] acc: i, f, g, o of each step as the
        cell used them (1 for a removed gate, 1 − i for f under CIFG, a_g without input activation).

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
    if gx.dim() != 3 or gx.shape[-1] % 4:
        raise ValueError(f"gx must be [T, B, 4H], got shape {tuple(gx.shape)}")
    T, B, G = gx.shape
    H = G // 4
    dtype, device = gx.dtype, gx.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, t, shape in (("h0", h0, (B, H)), ("c0", c0, (B, H)), ("w_hh", w_hh, (G, H))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if w_hh.dtype != dtype:  # one dot of h (stored in the dtype of gx) with W_hh
        raise ValueError(f"w_hh must have the dtype of gx ({dtype}), got {w_hh.dtype}")
    tensors = {"peephole": peephole, "zoneout": zoneout, "dropout": dropout, "c_new": c_new}
    variant = _check_variant(flags, tensors, T, B, H, dtype, acc, device)
    if c_new is not None and not c_new.is_contiguous():
        raise ValueError("c_new is an output: it must be contiguous")
    _check_available(B, H, dtype, device, flags)
    gx, w_hh = gx.contiguous(), w_hh.contiguous()
    sizes = _sizes_tensor(batch_sizes, T, device)

    hs = empty(T + 1, B, H, dtype=dtype, device=device)
    cs = empty(T + 1 if save else 2, B, H, dtype=acc, device=device)  # unsaved: a ring of c_{t−1}, c_t
    gates = empty(T, B, G, dtype=acc, device=device) if save else None
    hs[0] = h0
    cs[0] = c0
    if T == 0:
        return hs, cs if save else cs[:1], gates
    hd = None  # h ⊙ m of the last two steps: d_t, the dot's operand under recurrent dropout
    if flags & variants.RECURRENT_DROPOUT:
        hd = empty(2, B, H, dtype=dtype, device=device)
        hd[0] = hs[0] * variant[1][2]
    cfg = config or pick_config(B, H, dtype, backward=False)
    _check_split_k(cfg, H, backward=False)
    P, n_sync, sync = _grid(T, H, cfg, phantom_programs, device)
    if _single_launch(device, single_launch):
        args, meta = _kernel_args_fwd(
            gx, w_hh, hs, cs, gates, variant, hd, sizes, sync, 0, T, spin_limit, n_sync, cfg, True
        )
        lstm_persistent_fwd_kernel[(P,)](*args, **meta)
    else:
        for t in range(T):
            args, meta = _kernel_args_fwd(
                gx, w_hh, hs, cs, gates, variant, hd, sizes, sync, t, t + 1, spin_limit, n_sync, cfg, False
            )
            lstm_persistent_fwd_kernel[(P,)](*args, **meta)
    _watch_timeout(sync, f"persistent LSTM forward (T={T}, B={B}, H={H}, {dtype}, {P} programs)")
    return hs, cs if save else cs[T % 2 : T % 2 + 1], gates


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
        d_hs: [T + 1, B, H] dtype of gx: gradient reaching each hs[k] from outside the recurrence.
        d_cn: [B, H] ∂L/∂c_n.
        gates: [T, B, 4H] acc (or the dtype of d_hs) and cs [T + 1, B, H] acc, as
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
    if gates.dim() != 3 or gates.shape[-1] % 4:
        raise ValueError(f"gates must be [T, B, 4H], got shape {tuple(gates.shape)}")
    T, B, G = gates.shape
    H = G // 4
    dtype, acc, device = d_hs.dtype, cs.dtype, d_hs.device
    expected = {"d_hs": (T + 1, B, H), "d_cn": (B, H), "cs": (T + 1, B, H), "w_hh": (G, H)}
    for name, t in (("d_hs", d_hs), ("d_cn", d_cn), ("cs", cs), ("w_hh", w_hh)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
    if gates.dtype not in (acc, dtype) or w_hh.dtype != dtype:  # the kernel reads gates in either
        raise ValueError(
            f"gates must have the dtype of cs ({acc}) or of d_hs, and w_hh that of d_hs ({dtype})"
        )
    if B * G >= 2**31:  # the backward's per-step offsets are int32
        raise ValueError(f"B·4H must stay below 2**31, got {B}·{G}")
    tensors = {"peephole": peephole, "zoneout": zoneout, "dropout": dropout, "c_new": c_new}
    variant = _check_variant(flags, tensors, T, B, H, dtype, acc, device)
    _check_available(B, H, dtype, device, flags)
    d_hs, gates, cs, w_hh = d_hs.contiguous(), gates.contiguous(), cs.contiguous(), w_hh.contiguous()
    sizes = _sizes_tensor(batch_sizes, T, device)

    d_pre = empty(T, B, G, dtype=dtype, device=device)
    d_h = empty(B, H, dtype=acc, device=device)  # ∂L/∂hs[T], then ∂L/∂h0
    d_c = empty(B, H, dtype=acc, device=device)  # ∂L/∂c_n, then ∂L/∂c0
    d_h.copy_(d_hs[T])
    d_c.copy_(d_cn)
    if T == 0:
        return d_pre, d_h, d_c
    cfg = config or pick_config(B, H, dtype, backward=True)
    _check_split_k(cfg, H, backward=True)
    P, n_sync, sync = _grid(T, H, cfg, phantom_programs, device)

    def launch(t_start: int, t_end: int, sync_on: bool, finish: bool) -> None:
        args, meta = _kernel_args_bwd(
            d_hs, gates, cs, w_hh, d_pre, d_h, d_c, variant, sizes, sync, t_start, t_end, spin_limit,
            n_sync, cfg, sync_on, finish,
        )  # fmt: skip
        lstm_persistent_bwd_kernel[(P,)](*args, **meta)

    if _single_launch(device, single_launch):
        launch(0, T, True, True)
    else:  # each launch ends where a barrier would be: after the step's ∂L/∂pre is stored
        for t in reversed(range(T)):
            launch(t, t + 1, False, False)
        launch(0, 0, False, True)
    _watch_timeout(sync, f"persistent LSTM backward (T={T}, B={B}, H={H}, {dtype}, {P} programs)")
    return d_pre, d_h, d_c
