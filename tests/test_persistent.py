"""The persistent kernels (kernels/triton_persistent.py) against the naive layer, forward and every
gradient; their grid barrier's timeout; and sm_90 compiles of the configurations the heuristic picks.

On a GPU the kernels run as one launch with grid barriers; without one, through Triton's interpreter,
one launch per step with the barrier compiled out (and, with a single program, with it).

B: batch  T: time  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from _utils import lstm_inputs, rel_err

triton_persistent = pytest.importorskip("lstmlab.kernels.triton_persistent")
from lstmlab.kernels.naive import lstm_layer_naive  # noqa: E402

tp = triton_persistent
TRITON_VERSION = tuple(int(part) for part in __import__("triton").__version__.split(".")[:2])
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, B, H = 6, 5, 13
# 4 programs of 4 units (the last one 1 unit wide), the batch in 2 chunks of 4 rows
SMALL = tp.Config(units=4, num_warps=4, block_b=4)
SIZES = {"full": None, "decreasing": [5, 5, 3, 3, 2, 1], "increasing": [1, 2, 2, 4, 5, 5]}
LOW_PRECISION_RTOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}  # measured: 2e-4, 6e-3


def _skip_unless_available(dtype: torch.dtype, b: int = B, h: int = H) -> None:
    reason = tp.persistent_unavailable_reason(b, h, dtype, DEVICE)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, and is followed by 4096 NaN: an element they
    never write fails, and so does a read past the end that a mask should have stopped."""

    def nan_with_guard(*shape, dtype, device):
        n = math.prod(shape)
        return torch.full((n + 4096,), math.nan, dtype=dtype, device=device)[:n].view(shape)

    monkeypatch.setattr(tp, "empty", nan_with_guard)


def make_inputs(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(H)
    inputs = {
        "gx": torch.randn(T, B, 4 * H, generator=g, dtype=torch.float64),
        "h0": torch.randn(B, H, generator=g, dtype=torch.float64) * 0.5,
        "c0": torch.randn(B, H, generator=g, dtype=torch.float64),
        "w_hh": (torch.rand(4 * H, H, generator=g, dtype=torch.float64) * 2 - 1) * scale * 2,
    }
    return {k: v.to(dtype) for k, v in inputs.items()}


def wide_inputs(h: int, seed: int) -> tuple:
    """lstm_inputs at this file's T and B, for tests at a hidden size other than H."""
    return lstm_inputs(T, B, h, seed)


def packed_reference(g, gx, h0, c0, w_hh, sizes):
    """The naive layer in fp64 on packed ``sizes`` -> out [T, B, h], c_n, and for a backward drawn
    from ``g``: d_hs [T + 1, B, h] (zero where a step wrote no output), d_cn, and the expected
    (∂gx, ∂h0, ∂c0)."""
    h = h0.shape[-1]
    leaves = [x.double().requires_grad_() for x in (gx, h0, c0)]
    out, _, c_n = lstm_layer_naive(*leaves, w_hh.double(), batch_sizes=sizes)
    d_out, d_cn = torch.randn(T, B, h, generator=g), torch.randn(B, h, generator=g)
    d_hs = torch.cat([torch.zeros(1, B, h), d_out])
    for k in range(T):  # the gradient reaches hs[k + 1] only where step k wrote an output
        d_hs[k + 1, sizes[k] :] = 0
    expected = torch.autograd.grad((d_out.double() * out).sum() + (d_cn.double() * c_n).sum(), leaves)
    return out.detach(), c_n.detach(), d_hs, d_cn, expected


def naive_states(gx, h0, c0, w_hh, sizes):
    """hs [T + 1, B, H] (carried rows copied), c_n, from the naive layer, differentiable."""
    out, _, c_n = lstm_layer_naive(gx, h0, c0, w_hh, batch_sizes=sizes)
    hs = [h0]
    for k in range(gx.shape[0]):
        n = B if sizes is None else sizes[k]
        hs.append(torch.cat([out[k, :n], hs[-1][n:]]))
    return torch.stack(hs), c_n


def naive_cs_gates(inputs, sizes):
    """cs [T + 1, B, H] and activated gates [T, B, 4H] (rows that advanced) in fp64, step by step."""
    gx, h, c, w = (inputs[k].double() for k in ("gx", "h0", "c0", "w_hh"))
    cs, gates = [c], []
    for k in range(gx.shape[0]):
        n = gx.shape[1] if sizes is None else sizes[k]
        i, f, g, o = (gx[k] + h @ w.T).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        c, h = torch.cat([c_new[:n], c[n:]]), torch.cat([h_new[:n], h[n:]])
        cs.append(c)
        gates.append(torch.cat([i, f, g, o], dim=-1))
    return torch.stack(cs), torch.stack(gates)


def run_forward(inputs, sizes, **options):
    args = {k: v.to(DEVICE) for k, v in inputs.items()}
    sizes_t = None if sizes is None else torch.tensor(sizes)
    return tp.persistent_forward(**args, batch_sizes=sizes_t, **options)


def run_backward(d_hs, d_cn, cs, gates, w_hh, sizes, **options):
    sizes_t = None if sizes is None else torch.tensor(sizes)
    return tp.persistent_backward(d_hs, d_cn, gates, cs, w_hh.to(DEVICE), batch_sizes=sizes_t, **options)


def check_forward(inputs, sizes, rtol, **options):
    hs, cs, gates = run_forward(inputs, sizes, **options)
    expected_hs, expected_cn = naive_states(*(inputs[k].double() for k in ("gx", "h0", "c0", "w_hh")), sizes)
    expected_cs, expected_gates = naive_cs_gates(inputs, sizes)
    dtype = inputs["gx"].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert hs.dtype == dtype and cs.dtype == acc and gates.dtype == tp.saved_gates_dtype(dtype)
    assert rel_err(hs.cpu(), expected_hs) < rtol
    assert rel_err(cs.cpu(), expected_cs) < rtol
    assert rel_err(cs[-1].cpu(), expected_cn) < rtol
    for k in range(T):  # rows that did not advance: any finite value
        n = B if sizes is None else sizes[k]
        assert rel_err(gates[k, :n].cpu(), expected_gates[k, :n]) < rtol
        assert torch.isfinite(gates[k]).all()
    return hs, cs, gates


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_forward_matches_naive(dtype, sizes):
    _skip_unless_available(dtype)
    check_forward(make_inputs(dtype), sizes, 1e-12 if dtype == torch.float64 else 2e-6, config=SMALL)


def check_backward(dtype, sizes, rtol, bwd_config="same", gates_dtype=None, **options):
    """The forward with options, then the backward with them (or with bwd_config as its config)."""
    inputs = make_inputs(dtype)
    _, cs, gates = run_forward(inputs, sizes, **options)
    if gates_dtype is not None:
        gates = gates.to(gates_dtype)
    if bwd_config != "same":
        options = options | {"config": bwd_config}
    g = torch.Generator().manual_seed(1)
    d_hs = torch.randn(T + 1, B, H, generator=g, dtype=torch.float64)  # every step, and h0 itself
    d_cn = torch.randn(B, H, generator=g, dtype=torch.float64)

    leaves = {k: inputs[k].double().requires_grad_() for k in ("gx", "h0", "c0")}
    hs, c_n = naive_states(leaves["gx"], leaves["h0"], leaves["c0"], inputs["w_hh"].double(), sizes)
    loss = (d_hs * hs).sum() + (d_cn * c_n).sum()
    expected = torch.autograd.grad(loss, [leaves["gx"], leaves["h0"], leaves["c0"]])

    acc = cs.dtype
    d_pre, d_h0, d_c0 = run_backward(
        d_hs.to(DEVICE, dtype), d_cn.to(DEVICE, acc), cs, gates, inputs["w_hh"], sizes, **options
    )
    assert d_pre.dtype == dtype and d_h0.dtype == acc and d_c0.dtype == acc
    for name, actual, exp in zip(("d_pre", "d_h0", "d_c0"), (d_pre, d_h0, d_c0), expected, strict=True):
        assert rel_err(actual.cpu(), exp) < rtol, name
    for k in range(T):  # exactly 0 where a row did not advance
        n = B if sizes is None else sizes[k]
        assert (d_pre[k, n:] == 0).all()


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_backward_matches_autograd(dtype, sizes):
    _skip_unless_available(dtype)
    check_backward(dtype, sizes, 1e-12 if dtype == torch.float64 else 1e-5, config=SMALL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_forward_and_backward(dtype):
    _skip_unless_available(dtype)
    rtol = LOW_PRECISION_RTOL[dtype]
    check_forward(make_inputs(dtype), SIZES["decreasing"], rtol, config=SMALL)
    check_backward(dtype, SIZES["decreasing"], rtol, config=SMALL)


def test_default_config_forward_and_backward():
    """The heuristic's configuration (on CPU: per-step launches; on a GPU: one launch)."""
    _skip_unless_available(torch.float32)
    check_forward(make_inputs(torch.float32), SIZES["increasing"], 2e-6)
    check_backward(torch.float32, SIZES["increasing"], 1e-5)


def spy_unsaved_gates(monkeypatch) -> torch.Tensor:
    """Hands the forward kernel a NaN [T, B, 4H] buffer where save=False passes a dummy for the gates:
    a kernel that stored gates anyway would write into it."""
    sentinel = torch.full((T, B, 4 * H), math.nan, device=DEVICE)
    kernel_args = tp._kernel_args_fwd

    def spy(*a):
        args, meta = kernel_args(*a)
        assert meta["SAVE"] is False
        return (*args[:4], sentinel, *args[5:]), meta

    monkeypatch.setattr(tp, "_kernel_args_fwd", spy)
    return sentinel


@pytest.mark.parametrize("single_launch", [False, True], ids=["per_step", "one_launch"])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_forward_without_save_stores_no_gates_and_gives_the_same_states(sizes, single_launch, monkeypatch):
    """save=False (no backward to come): hs and c_T bit for bit as with save=True, no gates stored,
    and c kept in a two-slot ring instead of [T + 1, B, H]."""
    _skip_unless_available(torch.float32)
    config = (
        SMALL if DEVICE.type == "cuda" or not single_launch else tp.Config(units=16, num_warps=4, block_b=4)
    )
    inputs = make_inputs(torch.float32)
    hs, cs, _ = run_forward(inputs, sizes, config=config, single_launch=single_launch)
    sentinel = spy_unsaved_gates(monkeypatch)
    allocated = []
    monkeypatch.setattr(tp, "empty", lambda *shape, dtype, device: allocated.append(shape) or torch.full(
        shape, math.nan, dtype=dtype, device=device))  # fmt: skip
    hs_unsaved, c_n, gates = run_forward(
        inputs, sizes, config=config, single_launch=single_launch, save=False
    )
    assert gates is None and allocated == [(T + 1, B, H), (2, B, H)]
    assert torch.equal(hs_unsaved, hs) and c_n.shape == (1, B, H) and torch.equal(c_n[0], cs[-1])
    assert sentinel.isnan().all()


@pytest.mark.parametrize("block_b", [4, 8], ids=["chunks", "one_chunk"])
def test_one_launch_with_barriers_matches_per_step_launches(block_b):
    """The barrier path: on CPU with one program (the interpreter runs programs one after another),
    on a GPU with several. A miscounted barrier would time out fast with this spin limit."""
    _skip_unless_available(torch.float32)
    # block_b = 8 ≥ B: one chunk, whose c, own h and next gx stay in registers across the steps of a
    # launch; per-step launches read them back from memory
    units = 4 if DEVICE.type == "cuda" else 16
    config = tp.Config(units=units, num_warps=4, block_b=block_b)
    spin_limit = 1 << 20 if DEVICE.type == "cuda" else 4
    inputs, sizes = make_inputs(torch.float32), SIZES["decreasing"]
    per_step = run_forward(inputs, sizes, config=config, single_launch=False)
    one = run_forward(inputs, sizes, config=config, single_launch=True, spin_limit=spin_limit)
    for a, b in zip(per_step, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    _, cs, gates = per_step
    d_hs, d_cn = torch.randn(T + 1, B, H, device=DEVICE), torch.randn(B, H, device=DEVICE)
    # the backward also with the batch on the dot's N side, 4H in 4 chunks, one chunk's load ahead
    for bwd in (config, replace(config, block_k=16, batch_n=True, k_ahead=1)):
        per_step = run_backward(d_hs, d_cn, cs, gates, inputs["w_hh"], sizes, config=bwd, single_launch=False)
        one = run_backward(
            d_hs,
            d_cn,
            cs,
            gates,
            inputs["w_hh"],
            sizes,
            config=bwd,
            single_launch=True,
            spin_limit=spin_limit,
        )
        for a, b in zip(per_step, one, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("split", [True, False], ids=["split", "at_once"])
def test_backward_split_barrier_in_one_launch_matches_autograd(split, monkeypatch):
    """BWD_SPLIT_BARRIER: with one batch tile the backward arrives once ∂L/∂pre_t is stored and waits
    at step t − 1 after loading its saved gates and c. One launch with barriers, packed input, fp64,
    every gradient against autograd on the naive layer, both backward layouts; and either way the
    barrier counter ends at T arrivals per program (T − 1 barriers in the loop, FINISH's): an arrival
    without its wait, or a missing one (a timeout with this spin limit), fails. On CPU one program
    (the interpreter runs programs one after another), on a GPU four."""
    _skip_unless_available(torch.float64)
    monkeypatch.setattr(tp, "BWD_SPLIT_BARRIER", split)
    counters = []
    grid = tp._grid

    def recording_grid(*args, **kwargs):
        P, n_sync, sync = grid(*args, **kwargs)
        counters.append((P, sync))
        return P, n_sync, sync

    monkeypatch.setattr(tp, "_grid", recording_grid)
    units = 4 if DEVICE.type == "cuda" else 16
    one_tile = tp.Config(units=units, num_warps=4, block_b=8)  # B = 5: one tile, state in registers
    spin_limit = 1 << 20 if DEVICE.type == "cuda" else 4
    for bwd in (one_tile, replace(one_tile, block_k=16, batch_n=True, k_ahead=1)):
        counters.clear()
        check_backward(torch.float64, SIZES["decreasing"], 1e-12, bwd_config=bwd, config=one_tile,
                       single_launch=True, spin_limit=spin_limit)  # fmt: skip
        (P, sync) = counters[1]  # the forward's, then the backward's
        assert sync.tolist() == [T * P, 0]


def zeros_allocator(monkeypatch) -> list:
    """Launchers allocate zeros, not NaN (the NaN must come from the kernel); returns the list of them."""
    allocated = []

    def zeros(*shape, dtype, device):
        allocated.append(torch.zeros(shape, dtype=dtype, device=device))
        return allocated[-1]

    monkeypatch.setattr(tp, "empty", zeros)
    return allocated


TIMEOUT = dict(config=SMALL, single_launch=True, spin_limit=3, phantom_programs=1)


@pytest.mark.parametrize("one_chunk", [False, True], ids=["chunks", "one_chunk"])
def test_barrier_timeout_poisons_outputs_and_the_next_call_raises(monkeypatch, one_chunk):
    """The barrier waits for one program that does not exist: every program must give up and write
    NaN from then on. The launcher returns without reading the flag (no host sync); the next call
    of either launcher raises, naming the shape of the launch that timed out, and only once. With
    one batch tile the forward arrives, saves the step and prefetches gx, then waits, and the backward
    arrives after storing ∂L/∂pre_t and waits at step t − 1 after loading its gates and c (split
    barriers)."""
    _skip_unless_available(torch.float32)
    allocated = zeros_allocator(monkeypatch)
    inputs = make_inputs(torch.float32)
    forward = TIMEOUT | (dict(config=tp.Config(units=4, num_warps=4, block_b=8)) if one_chunk else {})
    hs, cs, gates = run_forward(inputs, None, **forward)
    assert allocated == [hs, cs, gates]
    # the first barrier follows step 0: from step 1 on, everything written is NaN
    assert hs[2:].isnan().all() and cs[2:].isnan().all() and gates[1:].isnan().all()
    assert not hs[:2].isnan().any() and not cs[:2].isnan().any() and not gates[:1].isnan().any()
    with pytest.raises(tp.PersistentKernelTimeout, match=rf"forward \(T={T}, B={B}, H={H}, .*4 programs\)"):
        run_forward(inputs, None, config=SMALL)
    _, cs, gates = run_forward(inputs, None, config=SMALL)  # raised once: this call goes through

    allocated.clear()
    d_hs, d_cn = torch.randn(T + 1, B, H, device=DEVICE), torch.randn(B, H, device=DEVICE)
    run_backward(d_hs, d_cn, cs, gates, inputs["w_hh"], None, **forward)
    d_pre, d_h, d_c = allocated
    # the first barrier precedes step T − 2: it and every earlier step are NaN, and so are d_h0, d_c0
    assert d_pre[: T - 1].isnan().all() and d_h.isnan().all() and d_c.isnan().all()
    assert not d_pre[T - 1].isnan().any()
    with pytest.raises(tp.PersistentKernelTimeout, match=rf"backward \(T={T}, B={B}, H={H}"):
        tp.raise_pending_timeouts(wait=True)
    assert tp._pending == []


def test_sync_check_raises_in_the_call_that_timed_out(monkeypatch):
    """LSTMLAB_PERSISTENT_SYNC_CHECK=1 (SYNC_CHECK): each launcher reads its own flag before it returns."""
    _skip_unless_available(torch.float32)
    zeros_allocator(monkeypatch)
    tp.raise_pending_timeouts(wait=True)  # on a GPU, earlier tests' launches may still be queued
    monkeypatch.setattr(tp, "SYNC_CHECK", True)
    inputs = make_inputs(torch.float32)
    with pytest.raises(tp.PersistentKernelTimeout, match=rf"forward \(T={T}, B={B}, H={H}, .*4 programs\)"):
        run_forward(inputs, None, **TIMEOUT)
    assert tp._pending == []
    run_forward(inputs, None, config=SMALL)


def test_check_timeout_reads_the_flag():
    tp.check_timeout(torch.tensor([12, 0], dtype=torch.int32), "ok")
    with pytest.raises(tp.PersistentKernelTimeout, match=r"^layer 3 \(B=7\): a grid barrier waited"):
        tp.check_timeout(torch.tensor([5, 1], dtype=torch.int32), "layer 3 (B=7)")


def test_unavailable_reasons():
    assert "not torch.int32" in tp.persistent_unavailable_reason(4, 8, torch.int32, DEVICE)
    assert "B ≥ 1" in tp.persistent_unavailable_reason(0, 8, torch.float32, DEVICE)
    if DEVICE.type == "cpu":
        assert tp.persistent_unavailable_reason(4, 8, torch.float32, DEVICE) is None  # interpreter
    else:  # fp32 at H = 2048: W_hh's rows and an h chunk do not fit in an SM
        reason = tp.persistent_unavailable_reason(16, 2048, torch.float32, DEVICE)
        assert "on chip per program at H=2048" in reason, reason
        assert tp.persistent_unavailable_reason(16, 256, torch.bfloat16, DEVICE) is None
        assert tp.persistent_unavailable_reason(16, 512, torch.float32, DEVICE) is None


def test_launchers_reject_bad_shapes():
    inputs = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"h0 must have shape \(5, 13\), got \(4, 13\)"):
        tp.persistent_forward(inputs["gx"], inputs["h0"][:4], inputs["c0"], inputs["w_hh"])
    with pytest.raises(
        ValueError, match=r"w_hh must have the dtype of gx \(torch.float32\), got torch.float64$"
    ):
        tp.persistent_forward(inputs["gx"], inputs["h0"], inputs["c0"], inputs["w_hh"].double())
    with pytest.raises(ValueError, match=r"batch_sizes must have shape \(6,\), got \(5,\)"):
        run_forward(inputs, [5, 4, 3, 2, 1])


@pytest.mark.parametrize("block_b", [4, 8], ids=["chunks", "one_chunk"])
def test_split_k_forward_and_backward_match_naive(block_b):
    """Both contractions split in 4 slices (H = 40: the forward's 64 padded columns, the backward's 256
    padded gate rows), several programs, packed input, against the naive layer and autograd."""
    h = 40
    g, gx, h0, c0, w_hh = wide_inputs(h, seed=3)
    sizes = torch.tensor(SIZES["decreasing"])
    out, c_n, d_hs, d_cn, expected = packed_reference(g, gx, h0, c0, w_hh, sizes)
    config = tp.Config(units=16, num_warps=4, block_b=block_b, split_k=4)
    hs, cs, gates = tp.persistent_forward(gx, h0, c0, w_hh, sizes, config=config)
    for k in range(T):  # rows that advanced at step k
        assert rel_err(hs[k + 1, : sizes[k]], out[k, : sizes[k]]) < 2e-6
    assert rel_err(cs[-1], c_n) < 2e-6
    d_pre, d_h0, d_c0 = tp.persistent_backward(d_hs, d_cn, gates, cs, w_hh, sizes, config=config)
    for name, actual, exp in zip(("d_pre", "d_h0", "d_c0"), (d_pre, d_h0, d_c0), expected, strict=True):
        assert rel_err(actual, exp) < 1e-5, name


@pytest.fixture
def cudnn_fp32_flags():
    """Restores torch's fp32 precision flags (legacy and per-op) after a test that flips them."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.allow_tf32, torch.backends.fp32_precision, cudnn.fp32_precision)
    saved_ops = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    yield cudnn
    # the legacy flag first: it sets the conv and rnn entries, which a parent's setter also overwrites
    cudnn.allow_tf32, torch.backends.fp32_precision, cudnn.fp32_precision = saved
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved_ops


def test_fp32_dots_follow_cudnns_rnn_tf32_flag(cudnn_fp32_flags, monkeypatch):
    """TF32 where torch.nn.LSTM's cuDNN path may use it (legacy flag and per-op flag), true fp32
    otherwise; the choice reaches the configuration and the kernels' DOT_PRECISION, and only fp32."""
    cudnn = cudnn_fp32_flags
    launched = []
    options = tp._compile_options
    monkeypatch.setattr(
        tp, "_compile_options", lambda *a: launched.append(options(*a)["DOT_PRECISION"]) or options(*a)
    )
    inputs = make_inputs(torch.float32)
    for set_flag, tf32 in (
        (lambda: setattr(cudnn, "allow_tf32", True), True),  # torch's default
        (lambda: setattr(cudnn, "allow_tf32", False), False),
        (lambda: setattr(cudnn, "allow_tf32", True), True),
        (lambda: setattr(cudnn.rnn, "fp32_precision", "ieee"), False),  # the per-op flag, conv untouched
        (lambda: setattr(cudnn.rnn, "fp32_precision", "tf32"), True),
        # "none" defers to the parent: cuDNN's "all", then the generic one, as ATen's float32Precision
        (
            lambda: (setattr(cudnn, "fp32_precision", "ieee"), setattr(cudnn.rnn, "fp32_precision", "none")),
            False,
        ),
        (
            lambda: (
                setattr(torch.backends, "fp32_precision", "tf32"),
                setattr(cudnn, "fp32_precision", "none"),
                setattr(cudnn.rnn, "fp32_precision", "none"),
            ),
            True,
        ),
    ):
        set_flag()
        assert tp.cudnn_rnn_allows_tf32() is tf32
        assert tp._dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
        assert tp._dot_precision(torch.bfloat16) == tp._dot_precision(torch.float64) == "ieee"
        assert tp.pick_config(16, 1024, torch.float32, False) == tp.fp32_config(16, 1024, False, tf32)
        launched.clear()
        tp.persistent_forward(**{k: v.to(DEVICE) for k, v in inputs.items()}, config=SMALL)
        assert launched and set(launched) == {"tf32" if tf32 else "ieee"}
    # TF32 and true fp32 are different configurations (mma on 2 warps; FMA on 8, each 128-column K
    # chunk in 8 slices), the whole batch as one tile
    assert tp.fp32_config(16, 1024, False, True) == tp.Config(units=8, num_warps=2, block_b=16)
    assert tp.fp32_config(64, 768, False, False) == tp.Config(units=8, num_warps=8, block_b=64, split_k=8)


@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_fp32_configs_match_naive(tf32, cudnn_fp32_flags):
    """fp32 with the heuristic's own configurations at H = 40, B = 5, packed input, forward and every
    gradient against the naive layer: those it picks at B = 5 (forward: 16-row tile, FMA: its one K
    chunk in 4 slices; backward: the batch on N, 4H in chunks of 128 in 8 slices), at B = 64 and
    B = 128 (the whole batch as one tile: the forward on 8 warps in 2 or 8 slices; the TF32 backward
    with the batch on N, 4H in chunks of 32, no split; the FMA backward's first-generation layout
    there) and the first-generation backward's 4-row chunks of H = 1024 (two chunks at B = 5). The
    interpreter multiplies TF32 dots in full fp32 (checked: the same error as "ieee" on random
    16×16 tiles), so on the CPU both settings have fp32's tolerance; on a GPU TF32 rounds the operands."""
    cudnn_fp32_flags.allow_tf32 = tf32
    h = 40
    g, gx, h0, c0, w_hh = wide_inputs(h, seed=5)
    sizes = torch.tensor(SIZES["decreasing"])
    out, c_n, d_hs, d_cn, expected = packed_reference(g, gx, h0, c0, w_hh, sizes)
    fwd_tol, bwd_tol = (1e-2, 1e-2) if tf32 and DEVICE.type == "cuda" else (2e-6, 1e-5)
    wide = tp.fp32_config(16, 1024, backward=True, tf32=tf32)  # [4, 4H] chunks, 8 slices
    assert (wide.block_b, wide.split_k, wide.batch_n) == (4, 8, False)
    own = tp.pick_config(B, h, torch.float32, False), tp.pick_config(B, h, torch.float32, True)
    assert own[0].split_k == (1 if tf32 else 4)  # FMA: H = 40's one 64-column K chunk in 4 slices
    assert own[1].batch_n and own[1].units == 16 and tp.bwd_chunks(h, own[1]) == (128, 2)
    b64 = tuple(tp.fp32_config(64, h, backward, tf32) for backward in (False, True))
    b128 = tuple(tp.fp32_config(128, h, backward, tf32) for backward in (False, True))
    assert (b64[0].block_b, b64[0].num_warps, b64[0].split_k) == (64, 8, 1 if tf32 else 4)
    assert b128[0].block_b == 16  # 16-row tiles above B = 64
    assert b64[1].batch_n == tf32 and b128[1].batch_n == tf32  # FMA above B = 16: the first generation
    if tf32:
        assert tp.bwd_chunks(h, b64[1]) == (32, 5) and b64[1].split_k == 1
    for fwd_cfg, bwd_cfg in (own, (own[0], wide), b64, b128):
        x = [t.to(DEVICE) for t in (gx, h0, c0, w_hh)]
        hs, cs, gates = tp.persistent_forward(*x, sizes, config=fwd_cfg)
        for k in range(T):  # rows that advanced at step k
            assert rel_err(hs[k + 1, : sizes[k]].cpu(), out[k, : sizes[k]]) < fwd_tol, fwd_cfg
        assert rel_err(cs[-1].cpu(), c_n) < fwd_tol
        grads = tp.persistent_backward(
            d_hs.to(DEVICE), d_cn.to(DEVICE), gates, cs, x[3], sizes, config=bwd_cfg
        )
        for name, actual, exp in zip(("d_pre", "d_h0", "d_c0"), grads, expected, strict=True):
            assert rel_err(actual.cpu(), exp) < bwd_tol, (name, bwd_cfg)


@pytest.mark.parametrize(
    ("config", "single_launch"),
    [(SMALL, False), (tp.Config(units=16, num_warps=4, block_b=8), True)],
    ids=["4_programs_per_step", "1_program_barriers"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
def test_both_directions_in_one_launch_match_two_launches(config, single_launch, packed, monkeypatch):
    """A bidirectional layer's two directions as one launch (grid (P, 2), every tensor stacked on a
    leading [2], direction 1 over the time-flipped sequence as the module runs it) give each
    direction's launch alone, bit for bit, forward and every gradient. With one program per direction
    the barriers run, and each direction counts its own: T arrivals of its P programs each way."""
    if DEVICE.type == "cuda" and single_launch:
        pytest.skip("one program per direction with barriers is the interpreter's check")
    counters = []
    grid = tp._grid
    monkeypatch.setattr(tp, "_grid", lambda *a: counters.append(grid(*a)) or counters[-1])
    dirs = [make_inputs(torch.float32, seed) for seed in (0, 1)]
    dirs[1]["gx"] = dirs[1]["gx"].flip(0)  # the reverse direction's own time order
    sizes = [SIZES["decreasing"], SIZES["decreasing"][::-1]] if packed else [None, None]
    options = dict(config=config, single_launch=single_launch)
    alone = [run_forward(x, sz, **options) for x, sz in zip(dirs, sizes, strict=True)]
    stacked = {k: torch.stack([x[k] for x in dirs]) for k in dirs[0]}
    both = run_forward(stacked, sizes if packed else None, **options)
    for name, got, want in zip(("hs", "cs", "gates"), both, zip(*alone, strict=True), strict=True):
        assert got.shape == (2, *want[0].shape), name
        assert torch.equal(got, torch.stack(want)), name
    for d in (0, 1):  # and against the naive layer
        expected_hs, _ = naive_states(*(dirs[d][k].double() for k in ("gx", "h0", "c0", "w_hh")), sizes[d])
        assert rel_err(both[0][d].cpu(), expected_hs) < 2e-6
    g = torch.Generator().manual_seed(2)
    d_hs = torch.randn(2, T + 1, B, H, generator=g).to(DEVICE)
    d_cn = torch.randn(2, B, H, generator=g).to(DEVICE)
    grads_alone = [
        run_backward(d_hs[d], d_cn[d], alone[d][1], alone[d][2], dirs[d]["w_hh"], sizes[d], **options)
        for d in (0, 1)
    ]
    w_hh = torch.stack([x["w_hh"] for x in dirs])
    grads = run_backward(d_hs, d_cn, both[1], both[2], w_hh, sizes if packed else None, **options)
    for name, got, want in zip(("d_pre", "d_h0", "d_c0"), grads, zip(*grads_alone, strict=True), strict=True):
        assert torch.equal(got, torch.stack(want)), name
    if single_launch:  # forward and backward of both directions: [counter, flag] per direction
        both_fwd, both_bwd = (sync.tolist() for _, _, sync in (counters[2], counters[5]))
        assert both_fwd == both_bwd == [T * 1, 0, T * 1, 0]


def test_both_directions_take_the_vanilla_cell_only():
    stacked = {k: torch.stack([v, v]) for k, v in make_inputs(torch.float32).items()}
    peephole = torch.zeros(3, H)
    with pytest.raises(ValueError, match=r"both directions in one launch take the vanilla cell only"):
        tp.persistent_forward(**stacked, flags=tp.variants.PEEPHOLES, peephole=peephole)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 5, 13\)"):
        tp.persistent_forward(**(stacked | {"h0": stacked["h0"][0]}))


@pytest.mark.parametrize("single_launch", [False, True], ids=["per_step", "one_launch"])
@pytest.mark.parametrize(
    ("block_b", "block_k", "split_k"), [(8, 16, 1), (4, 16, 1), (8, 32, 2), (4, 64, 1)],
    ids=["one_tile_k16", "tiles_k16", "one_tile_k32_split2", "tiles_k64"],
)  # fmt: skip
def test_forward_k_chunks_match_naive(block_b, block_k, split_k, single_launch):
    """The forward walks H = 40 in K chunks (16: 3 chunks, the last one padded; 32: 2; 64: one), with
    the whole batch as one tile (state in registers) or in tiles, against the naive layer; one
    program on CPU (64 units) so that the barrier path runs there too."""
    h = 40
    _, gx, h0, c0, w_hh = wide_inputs(h, seed=4)
    sizes = SIZES["decreasing"]
    units = 16 if DEVICE.type == "cuda" or not single_launch else 64
    config = tp.Config(units=units, num_warps=4, block_b=block_b, split_k=split_k, block_k=block_k)
    args = [x.to(DEVICE) for x in (gx, h0, c0, w_hh)]
    spin_limit = 1 << 20 if DEVICE.type == "cuda" else 4
    hs, cs, gates = tp.persistent_forward(
        *args, torch.tensor(sizes), config=config, single_launch=single_launch, spin_limit=spin_limit
    )
    out, _, c_n = lstm_layer_naive(*(x.double() for x in (gx, h0, c0, w_hh)), batch_sizes=torch.tensor(sizes))
    for k in range(T):  # rows that advanced at step k
        assert rel_err(hs[k + 1, : sizes[k]].cpu(), out[k, : sizes[k]]) < 2e-6
    assert rel_err(cs[-1].cpu(), c_n) < 2e-6
    inputs = {"gx": gx, "h0": h0, "c0": c0, "w_hh": w_hh}
    expected_cs, expected_gates = naive_cs_gates(inputs, sizes)
    assert rel_err(cs.cpu(), expected_cs) < 2e-6
    for k in range(T):
        assert rel_err(gates[k, : sizes[k]].cpu(), expected_gates[k, : sizes[k]]) < 2e-6


# the second-generation backward layout at the test's sizes (4H = 52): the batch on the dot's N side,
# 4H walked in chunks (4 of 16, the last one 12 long; 2 of 32 with 2 slices each), loads issued ahead
BATCH_N = {
    "chunks_of_16": tp.Config(units=4, num_warps=4, block_b=8, split_k=1, block_k=16, batch_n=True),
    "split_2_ahead_1": tp.Config(
        units=8, num_warps=4, block_b=8, split_k=2, block_k=32, batch_n=True, k_ahead=1
    ),
    "batch_chunks_all_ahead": tp.Config(units=4, num_warps=4, block_b=4, block_k=16, batch_n=True, k_ahead=3),
}


@pytest.mark.parametrize("config", BATCH_N.values(), ids=BATCH_N.keys())
def test_backward_with_the_batch_on_n_matches_autograd(config):
    """fp64, several programs (the last one partly outside H), every row advancing at every step, so
    that a read past 4H in the last chunk would meet the NaN after the buffer (packed input with
    this layout: tests/test_variant_persistent.py)."""
    _skip_unless_available(torch.float64)
    check_backward(torch.float64, SIZES["full"], 1e-12, config=SMALL, bwd_config=config)


def test_backward_reads_gates_saved_in_the_compute_dtype():
    """Gates stored in bf16 (a forward may save them so) give the same gradients within bf16's error."""
    _skip_unless_available(torch.bfloat16)
    config = BATCH_N["split_2_ahead_1"]
    check_backward(
        torch.bfloat16, SIZES["decreasing"], 2e-2, config=SMALL, bwd_config=config, gates_dtype=torch.bfloat16
    )


def test_default_config_backward_in_bf16():
    """pick_config's 16-bit backward (16 units, the batch on N, split in 8 slices) against autograd."""
    _skip_unless_available(torch.bfloat16)
    assert tp.pick_config(B, H, torch.bfloat16, backward=True).batch_n
    check_backward(torch.bfloat16, SIZES["increasing"], 2e-2, config=SMALL, bwd_config=None)


def test_launchers_reject_a_split_k_they_cannot_run():
    inputs = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"split_k must be a power of two with the K chunk \(16\)"):
        tp.persistent_forward(**inputs, config=tp.Config(units=4, num_warps=4, block_b=4, split_k=2))
    hs, cs, gates = run_forward(inputs, None, config=SMALL)
    for split_k in (3, 8):  # not a power of two; 64 / 8 < 16
        with pytest.raises(ValueError, match=r"split_k must be a power of two with 4H padded \(64\)"):
            tp.persistent_backward(
                torch.zeros_like(hs), cs[0], gates, cs, inputs["w_hh"], config=tp.Config(4, 4, 4, split_k)
            )
    for block_k, match in ((24, r"block_k must be a power of two"), (16, r"with a 4H chunk padded \(16\)")):
        with pytest.raises(ValueError, match=match):
            tp.persistent_backward(
                torch.zeros_like(hs), cs[0], gates, cs, inputs["w_hh"], config=tp.Config(4, 4, 4, 2, block_k)
            )


def test_resident_programs_counts_the_scarcest_resource():
    # 80 registers × 256 threads: 3 blocks by registers; 99 KiB shared memory: 2 by shared memory
    assert tp.resident_programs(80, 8, 99 * 1024, sms=132) == 264
    assert tp.resident_programs(212, 8, 196608, sms=132) == 132
    assert tp.resident_programs(255, 16, 0, sms=132) == 0  # 255 × 512 registers exceed an SM


HOPPER_LIMITS = {"sms": 132, "regs_per_sm": 65536, "threads_per_sm": 2048, "smem_per_sm": 233472,
                 "smem_per_block": 232448}  # fmt: skip


class FakeCompiled:
    """What _compile_problem reads from a compiled kernel, as a GPU run would report it."""

    def __init__(self, n_regs, n_spills, shared):
        self.n_regs, self.n_spills, self.metadata = n_regs, n_spills, SimpleNamespace(shared=shared)

    def _init_handles(self):
        pass


def test_compile_problem_reports_spills_and_grids_that_do_not_fit(monkeypatch):
    """The GPU-only host check, fed what the driver reports for the bf16 backward at H = 1024."""
    monkeypatch.setattr(tp, "_device_limits", lambda device: HOPPER_LIMITS)
    compiled = FakeCompiled(212, 0, 196608)
    kernel = SimpleNamespace(__name__="k", warmup=lambda *args, grid, **meta: compiled)
    meta = {"num_warps": 8}
    assert tp._compile_problem(kernel, (), meta, 132, DEVICE) is None
    assert "k needs 133 co-resident programs, the device holds 132" in tp._compile_problem(
        kernel, (), meta, 133, DEVICE
    )
    compiled.n_spills = 40
    assert tp._compile_problem(kernel, (), meta, 8, DEVICE) == "k spills 40 registers with 8 warps"


def test_cuda_check_compiles_both_kernels_with_every_argument(monkeypatch):
    """_cuda_unavailable_reason builds each kernel's full argument list (on a GPU it compiles them):
    every parameter bound exactly once, so a launcher and its kernel cannot drift apart."""
    monkeypatch.setattr(tp, "_device_limits", lambda device: HOPPER_LIMITS)
    checked = []

    def compile_problem(kernel, args, meta, programs, device):
        constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages", "maxnreg")}
        assert len(args) + len(constexprs) == len(kernel.arg_names), kernel.arg_names
        assert set(constexprs) == set(kernel.arg_names[len(args) :])
        shapes = {"p_peep": (3, 768), "p_zone": (1, 16, 2, 768), "p_drop": (16, 768), "p_cnew": (1, 16, 768)}
        shapes["p_hd"] = (2, 16, 768)
        for name, shape in shapes.items():
            if name in kernel.arg_names:  # the barrier buffer (2 int32) where the flag is off
                arg = args[kernel.arg_names.index(name)]
                assert tuple(arg.shape) == (shape if meta["FLAGS"] else (2,)), name
        checked.append((kernel.arg_names[0], programs))
        return None

    monkeypatch.setattr(tp, "_compile_problem", compile_problem)
    assert tp._cuda_unavailable_reason.__wrapped__(16, 768, torch.bfloat16, torch.device("cpu")) is None
    assert checked == [("p_gx", 48), ("p_dhs", 48)]  # 16-bit: 16 units per program (forward at B ≤ 32)
    # every variant tensor present, each where its kernel parameter is
    check = tp._cuda_unavailable_reason.__wrapped__
    assert check(16, 768, torch.bfloat16, torch.device("cpu"), tp.PERSISTENT_FLAGS) is None
    assert checked[2:] == [("p_gx", 48), ("p_dhs", 48)]
    # fp32 fits on chip at H = 768 now (a 4-row ∂L/∂pre chunk in the backward): both kernels are
    # compiled, with the dot precision the check was asked about (a key of its cache)
    precisions = []
    monkeypatch.setattr(
        tp, "_compile_problem", lambda k, a, meta, *rest: precisions.append(meta["DOT_PRECISION"])
    )
    for precision in ("tf32", "ieee"):
        assert check(16, 768, torch.float32, torch.device("cpu"), 0, precision) is None
    assert precisions == ["tf32", "tf32", "ieee", "ieee"]
    # both directions in one launch: the BIDIR kernels, with 2P programs resident
    monkeypatch.setattr(tp, "_compile_problem", lambda k, a, meta, n, d: checked.append((meta["BIDIR"], n)))
    checked.clear()
    assert check(16, 512, torch.bfloat16, torch.device("cpu"), 0, "ieee", 2) is None
    assert checked == [(True, 64), (True, 64)]  # 16 units per program each way
    assert "vanilla cell" in tp.persistent_unavailable_reason(
        16, 512, torch.bfloat16, DEVICE, tp.PERSISTENT_FLAGS, 2
    )
    reason = check(16, 2048, torch.float32, torch.device("cpu"), 0, "ieee")
    assert reason.startswith("the forward") and "264 KiB on chip per program at H=2048" in reason


COMPILE_FOR_HOPPER = r"""
import inspect, json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from lstmlab.kernels import triton_persistent as tp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
TF32 = {"fp32": False, "tf32": True}  # fp32 with TF32 dots or without, whatever the flag says here
ptxas = get_ptxas(90) if inspect.signature(get_ptxas).parameters else get_ptxas()

def registers(ptx):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
        out = subprocess.run([ptxas.path, "-v", f"-arch={arch}", path, "-o", path + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return int(re.search(r"Used (\d+) registers", out).group(1)), int(spills[1]) + int(spills[2])

def dot_layouts(ttgir):  # each tt.dot's output shape, the extent one warp covers, the warps per axis
    layouts = {}
    for name, kind, body in re.findall(r"^(#\w+) = #ttg\.(\w+)<\{(.*)\}>", ttgir, re.M):
        field = lambda key: [int(x) for x in re.search(key + r" = \[([\d, ]+)\]", body)[1].split(",")]
        if kind == "nvidia_mma":  # instrShape: [16, 8] (v2), [1, 16, 8] (v2 batched), [16, n, 16] (v3)
            warps = field("warpsPerCTA")
            layouts[name] = (kind, field("instrShape")[: len(warps)], warps)
        elif kind == "blocked":
            per_warp = [a * b for a, b in zip(field("sizePerThread"), field("threadsPerWarp"))]
            layouts[name] = (kind, per_warp, field("warpsPerCTA"))
    dots = []
    # tt.dot (mma.sync, FMA) or ttng.warp_group_dot (wgmma, Hopper's MMAv3, from M = 64 per 4 warps)
    dot_re = r"(tt\.dot|ttng\.warp_group_dot) .* -> tensor<([\dx]+)x\w+, (#\w+)>"
    for op, shape, name in re.findall(dot_re, ttgir):
        kind, per_warp, warps = layouts.get(name, (name, None, None))  # None: a layout this cannot read
        dots.append({"shape": [int(x) for x in shape.split("x")], "kind": kind, "per_warp": per_warp,
                     "warps": warps, "wgmma": op == "ttng.warp_group_dot"})
    return dots

def time_loop(ttgir):  # the names of the tt.load results inside the first scf.for, its local_loads, and
    # the order of its loads (by name), stores, atomics and barrier polls (scf.while)
    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if "scf.for" in line)
    depth, end = 0, len(lines)
    for i in range(start, len(lines)):
        depth += lines[i].count("{") - lines[i].count("}")
        if depth == 0:
            end = i
            break
    body = lines[start:end]
    found = (re.search(r"%(\w+) = tt\.load", x) for x in body)
    loads = sorted({re.sub(r"_\d+$", "", m[1]) for m in found if m})
    ops = (re.search(r"(?:%(\w+) = )?(tt\.load|tt\.store|tt\.atomic_rmw|scf\.while)\b", x) for x in body)
    trace = [re.sub(r"_\d+$", "", m[1] or "") if m[2] == "tt.load" else m[2] for m in ops if m]
    return loads, sum("ttg.local_load" in x for x in body), trace

def compile_kernel(backward, B, H, dt, cfg, flags, bidir):
    acc, w = "*fp32", "*fp32" if dt == "tf32" else f"*{dt}"
    pointers = {"p_gx": w, "p_w": w, "p_hs": w, "p_cs": acc, "p_gates": acc, "p_dhs": w, "p_dpre": w,
                "p_dh": acc, "p_dc": acc, "p_peep": acc, "p_zone": "*u8", "p_drop": w, "p_cnew": acc,
                "p_hd": w, "p_sizes": "*i32", "p_sync": "*i32"}
    if backward:
        fn = tp.lstm_persistent_bwd_kernel
        const = tp.bwd_constexprs(H, cfg) | {"FINISH": True, "ONE_CHUNK": B <= cfg.block_b,
                                             "SPLIT_BARRIER": tp.BWD_SPLIT_BARRIER}
    else:
        fn = tp.lstm_persistent_fwd_kernel
        block_k = tp.fwd_block_k(H, cfg)
        const = {"BLOCK_K": block_k, "N_K": -(-H // block_k), "N_STREAM": cfg.stream_k,
                 "STREAM_SPLIT": cfg.stream_split, "SPLIT_K": cfg.split_k,
                 "SAVE": True, "ONE_CHUNK": B <= cfg.block_b}
    # what a launch passes
    options = (tp.bwd_compile_options if backward else tp._compile_options)(DTYPES[dt], cfg, TF32.get(dt))
    const |= {"U": cfg.units, "BLOCK_B": cfg.block_b, "PACKED": True, "FLAGS": flags, "SYNC": True}
    const["BIDIR"] = bidir
    const |= {k: options.pop(k) for k in ("ACQUIRE_LOAD", "DOT_PRECISION", "UPCAST_DOT")}
    names = [n for n in fn.arg_names if n not in const]  # pointers, then 32-bit ints
    types = [pointers.get(n, "i32") for n in names]
    # as a launch specialises them: 16-byte aligned pointers, B and H divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t.startswith("*")}
    attrs |= {(names.index(n),): [["tt.divisibility", 16]] for n, v in (("B", B), ("H", H)) if v % 16 == 0}
    src = ASTSource(fn=fn, signature=dict(zip(names, types)) | dict.fromkeys(const, "constexpr"),
                    constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    return (*registers(ptx), compiled.metadata.shared, dot_layouts(compiled.asm["ttgir"]),
            "ld.acquire.gpu" in ptx, *time_loop(compiled.asm["ttgir"]))

compiled = {}  # B enters as a multiple of 16 and as B ≤ block_b: B = 64 and 128 share a kernel
for spec in sys.argv[1:]:
    dt, B, H, backward, *flags = spec.split(",")  # "all" (every bit but LAYER_NORM), "bidir", "sms114"
    B, H, backward = int(B), int(H), backward == "bwd"
    bidir = flags == ["bidir"]  # both directions in one launch: grid (P, 2)
    sms = int(flags[0][3:]) if flags and flags[0].startswith("sms") else None  # pick_config's SM count
    flags = tp.PERSISTENT_FLAGS if flags == ["all"] else 0
    cfg = tp.pick_config(B, H, DTYPES[dt], backward, TF32.get(dt), sms)
    problem = tp.config_problem(B, H, DTYPES[dt], cfg, backward)
    if problem is not None:
        print(json.dumps({"spec": spec, "problem": problem}), flush=True)
        continue
    key = (backward, B <= cfg.block_b, B % 16 == 0 or B, H, dt, cfg, flags, bidir)
    if key not in compiled:
        compiled[key] = compile_kernel(backward, B, H, dt, cfg, flags, bidir)
    regs, spills, shared, dots, acquire, loop_loads, loop_local_loads, loop_trace = compiled[key]
    fit = {sms: tp.resident_programs(regs, cfg.num_warps, shared, sms=sms) for sms in (132, 114)}
    k_chunks = tp.bwd_chunks(H, cfg)[1] if backward else -(-H // tp.fwd_block_k(H, cfg))
    print(json.dumps({"spec": spec, "regs": regs, "spills": spills, "shared": shared, "warps": cfg.num_warps,
                      "units": cfg.units, "k_chunks": k_chunks,
                      "programs": cfg.programs(H) * (2 if bidir else 1), "fit": fit[132], "fit_114": fit[114],
                      "dots": dots,
                      "acquire_load": acquire, "loop_loads": loop_loads,
                      "loop_local_loads": loop_local_loads, "loop_trace": loop_trace}), flush=True)
"""

# the issue's shape grid (B 16-128, H 256-1024) in bf16, fwd and bwd; fp16 shares bf16's tile sizes; fp32
# with TF32 dots ("tf32") and without ("fp32") on the same grid
GRID = [(b, h) for h in (256, 512, 768, 1024) for b in (16, 64, 128)]
HOPPER_SPECS = [f"bf16,{b},{h},{d}" for b, h in GRID for d in ("fwd", "bwd")]
HOPPER_SPECS += ["fp16,16,768,fwd", "fp16,16,768,bwd"]
# the forward's other tile sizes: B = 32 (16 units, wgmma on [64, 32]), fp16 with B = 64 on N
HOPPER_SPECS += ["bf16,32,768,fwd", "fp16,64,1024,fwd"]
HOPPER_SPECS += ["fp16,64,1024,bwd", "fp16,128,1024,bwd"]  # the backward's largest 16-bit tiles
HOPPER_SPECS += [f"{dt},{b},{h},{d}" for dt in ("fp32", "tf32") for b, h in GRID for d in ("fwd", "bwd")]
# fp32 at B = 32: TF32's 16-row forward tiles and backward on N, the FMA forward's whole-batch tile
HOPPER_SPECS += [f"{dt},32,768,{d}" for dt in ("fp32", "tf32") for d in ("fwd", "bwd")]
# lstmlab-train's compare preset (B 64, H 64): what its fp32 training on a GPU compiles
HOPPER_SPECS += [f"{dt},64,64,{d}" for dt in ("fp32", "tf32") for d in ("fwd", "bwd")]
# both directions in one launch (2P programs): at B = 16 both 16-bit kernels run 16 units per
# program, 2P = 64 at H = 512, 96 at H = 768 and 128 at H = 1024; the backward holds one program per
# SM (its register cap × 8 warps), and so does the forward at H = 1024 (136 KiB), so 96 fit 132 and
# 114 SMs, 128 only 132
HOPPER_SPECS += [f"bf16,16,{h},{d},bidir" for h in (512, 768, 1024) for d in ("fwd", "bwd")]
NOT_RESIDENT = set()
SPEC_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
SPEC_TF32 = {"fp32": False, "tf32": True}
# the cell variants: every bit the persistent kernels take, switched on at once
HOPPER_SPECS += [f"bf16,{b},768,{d},all" for b in (16, 64) for d in ("fwd", "bwd")]
# an H100 PCIe has 114 SMs: at H = 1024 the forward at B = 128 (8 units per program, 128 programs,
# 8 warps of 181-244 registers) and the fp32 kernels (8 units: 128 programs, one per SM) do not fit
# there, so persistent_unavailable_reason sends the layer to the per-step kernels; the 16-bit forward
# at B ≤ 32 (16 units: 64 programs) and at B = 64 (two programs per SM) and the 16-bit backward
# (16 units: 64 programs, one per SM) do
NOT_RESIDENT_ON_114_SMS = {"bf16,128,1024,fwd", "bf16,16,1024,fwd,bidir", "bf16,16,1024,bwd,bidir"}
# given 114 SMs, pick_config gives the B = 128 forward at H = 1024 B = 64's 4-warp configuration in 64-row
# batch tiles (128 programs, two per SM), which fits; at H = 768 it keeps 96 programs of 8 warps
HOPPER_SPECS += ["bf16,128,768,fwd,sms114", "bf16,128,1024,fwd,sms114", "fp16,128,1024,fwd,sms114"]
NOT_RESIDENT_ON_114_SMS |= {
    f"{dt},{b},1024,{d}" for dt in ("fp32", "tf32") for b in (16, 64, 128) for d in ("fwd", "bwd")
}
# given 114 SMs, TF32 at H = 1024 streams some K chunks of W_hh from L2 every step (fp32_streamed_config):
# the forward two programs per SM (8 units, 128 programs), the backward one (16 units, 64 programs);
# true fp32 (FMA) keeps the 132-SM configuration, which does not fit (no streamed one compiled without
# spills; docs/persistent.md)
HOPPER_SPECS += [f"tf32,{b},1024,{d},sms114" for b in (16, 64, 128) for d in ("fwd", "bwd")]
HOPPER_SPECS += ["fp32,16,1024,bwd,sms114"]
NOT_RESIDENT_ON_114_SMS |= {"fp32,16,1024,bwd,sms114"}
# the load of a streamed chunk of W_hh in the time loop (names as triton ≥ 3.9 gives them): the
# forward's slices, the backward's chunks; no kernel without streamed chunks loads W_hh there
STREAMED_LOAD = {"fwd": "b_ws", "bwd": "b_w"}


# What the time loop may load with one batch chunk (B = 16), vanilla cell, packed input: the step's
# batch size, the operand of the dot (h_{t−1}, ∂L/∂pre_{t+1}) and launch inputs (gx_{t+1} prefetched;
# the saved gates (four [B, U] tiles), c_t, c_{t−1} and ∂L/∂hs[t+1]), never the program's own state,
# which stays in registers. Names as triton ≥ 3.9 gives them (the Python variable's), so checked there only.
LOOP_LOADS = {
    "fwd": ["b_gx", "b_hn", "n_rows"],
    "bwd": ["b_c_pf", "b_c_prev_pf", "b_dh", "b_dp", "b_gf_pf", "b_gg_pf", "b_gi_pf", "b_go_pf", "n_rows"],
}


# the backward's saved gates and c of step t, loaded between step t + 1's arrive and step t's wait
BWD_PREFETCH = ["b_gi_pf", "b_gf_pf", "b_gg_pf", "b_go_pf", "b_c_pf", "b_c_prev_pf"]


def split_barrier_order(trace: list, names: bool) -> bool:
    """Whether a backward time loop (loads by name, stores, atomics, polls in TTGIR order) arrives
    after its ∂L/∂pre stores (the loop's last atomic follows its 4 stores and its last poll) and,
    with names (triton ≥ 3.9), loads step t's gates and c before the poll (the split barrier)."""
    arrive = len(trace) - 1 - trace[::-1].index("tt.atomic_rmw")
    polls = [i for i, op in enumerate(trace) if op == "scf.while"]
    ok = trace[:arrive].count("tt.store") >= 4 and arrive > polls[-1]
    if names:
        ok &= all(trace.index(name) < polls[0] for name in BWD_PREFETCH)
    return ok


def duplicated_warps(dot: dict) -> bool:
    """Whether more warps sit on some axis of a dot's output than that axis has warp-sized tiles."""
    axes = zip(dot["shape"], dot["per_warp"], dot["warps"], strict=True)
    return any(warps > max(1, n // per_warp) for n, per_warp, warps in axes)


def test_duplicated_warps_reads_the_layout():
    """The product's forward before this check: 8 warps as [2, 4] on a [16, 32] output (mma v2)."""
    before = {"shape": [16, 32], "kind": "nvidia_mma", "per_warp": [16, 8], "warps": [2, 4]}
    assert duplicated_warps(before)
    assert not duplicated_warps(before | {"warps": [1, 4]})
    assert duplicated_warps({"shape": [16, 8], "kind": "nvidia_mma", "per_warp": [16, 8], "warps": [8, 1]})
    assert not duplicated_warps({"shape": [8, 16, 8], "kind": "nvidia_mma", "per_warp": [1, 16, 8],
                                 "warps": [8, 1, 1]})  # fmt: skip
    # the transposed forward (sm_90, triton 3.9): U = 8 on 4 warps at B = 16 puts them on M = 32
    assert duplicated_warps({"shape": [32, 16], "kind": "nvidia_mma", "per_warp": [16, 8], "warps": [4, 1]})
    # U = 16: one warpgroup's wgmma on [64, 16] (16 rows per warp); with 8 warps it is computed twice
    wgmma = {"shape": [64, 16], "kind": "nvidia_mma", "per_warp": [16, 16], "warps": [4, 1]}
    assert not duplicated_warps(wgmma)
    assert duplicated_warps(wgmma | {"per_warp": [16, 8], "warps": [8, 1]})
    # the second-generation backward, the batch on N: [S, U, block_b] = [8, 16, 16] (B16), [2, 16, 64]
    # (B64), [16, 128] (B128), as compiled; then 8 warps on [1, 16, 16]: 4 on N's 2 tiles, 2 on M's 1
    mma3 = {"kind": "nvidia_mma", "per_warp": [1, 16, 8]}
    assert not duplicated_warps(mma3 | {"shape": [8, 16, 16], "warps": [8, 1, 1]})
    assert not duplicated_warps(mma3 | {"shape": [2, 16, 64], "warps": [2, 1, 4]})
    assert not duplicated_warps(
        {"shape": [16, 128], "kind": "nvidia_mma", "per_warp": [16, 8], "warps": [1, 8]}
    )
    assert duplicated_warps(mma3 | {"shape": [1, 16, 16], "warps": [1, 2, 4]})


@pytest.mark.parametrize(("B", "H"), [(b, h) for b in (16, 64, 128) for h in (256, 512, 768, 1024, 13)])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_heuristic_never_gives_a_dot_more_warps_than_tiles(B, H, backward):
    """The rule behind the compiled-layout check, for every dtype: warps ≤ mma tiles of the output."""
    for dtype, tf32 in (
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.float32, True),
        (torch.float32, False),
    ):
        cfg = tp.pick_config(B, H, dtype, backward, tf32)
        if backward and cfg.batch_n:  # [S, U, block_b], warps on the slices, then on N
            assert cfg.units == 16 and cfg.block_b == min(128, tp._block(B))
            assert dtype != torch.float32 or (H <= 768 and (tf32 or B <= 16))  # fp32: where it compiled
            assert cfg.num_warps <= tp.dot_warps(cfg.units, cfg.block_b, cfg.split_k)
            block_k, n_k = tp.bwd_chunks(H, cfg)
            assert block_k // cfg.split_k >= 16
            assert block_k * cfg.block_b * dtype.itemsize <= tp.BWD_CHUNK_BYTES
            assert block_k * n_k == 4 * H or H == 13  # no padding where 4H has a power of two ≥ 16·S
        elif backward:  # fp32: one [block_b, U] tile per warp, one warp per slice of the 4H contraction
            assert dtype == torch.float32
            assert cfg.num_warps == cfg.split_k == tp.dot_warps(cfg.block_b, cfg.units, cfg.split_k)
            assert tp._block(4 * H) // cfg.split_k >= 16
        elif tf32 is False:  # FMA, no mma tiles: 8 warps on the slices of each K chunk and the rows
            assert cfg.num_warps == 8 and tp.fwd_block_k(H, cfg) // cfg.split_k >= 16
            assert cfg.block_b == (16 if B > 64 or H > 768 else max(16, 1 << (B - 1).bit_length()))
        else:  # the transposed dot: [4U, block_b] output, the whole batch up to 128 in one tile
            assert cfg.num_warps <= tp.dot_warps(4 * cfg.units, cfg.block_b, cfg.split_k)
            whole_batch = min(128, max(16, 1 << (B - 1).bit_length()))
            if dtype == torch.float32:  # TF32: the whole batch at B = 64 up to H = 256, else 16-row tiles
                assert cfg.split_k == 1 and cfg.block_b == (64 if whole_batch == 64 and H <= 256 else 16)
            else:
                assert cfg.split_k == 1 and cfg.block_b == whole_batch
        if not backward:  # K in at most MAX_K_CHUNKS chunks, only the last one padded
            assert -(-H // tp.fwd_block_k(H, cfg)) <= tp.MAX_K_CHUNKS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_heuristic_tiles_the_forward_batch_where_the_sms_are_too_few(dtype):
    """16-bit forward above B = 64: 8 units per program on 8 warps, one program per SM, so H = 1024
    (128 programs) does not fit a 114-SM H100 PCIe; given the SMs, B = 64's 4-warp configuration
    in 64-row batch tiles (two programs per SM; the compile test checks it). Elsewhere unchanged."""
    tiled = tp.Config(units=8, num_warps=4, block_b=64)
    whole = tp.Config(units=8, num_warps=8, block_b=128)
    for B in (65, 128):
        assert tp.pick_config(B, 1024, dtype, False) == whole
        assert tp.pick_config(B, 1024, dtype, False, sms=132) == whole
        cfg = tp.pick_config(B, 1024, dtype, False, sms=114)
        assert cfg == tiled and cfg.num_warps <= tp.dot_warps(4 * cfg.units, cfg.block_b)
        assert tp.config_problem(B, 1024, dtype, cfg, backward=False) is None
        assert tp.pick_config(B, 768, dtype, False, sms=114) == whole  # 96 programs: fits
        assert tp.pick_config(B, 512, dtype, False, sms=57) == tiled  # one direction of two on 114
    for B in (16, 64):  # 16 units already, or two 4-warp programs per SM
        assert tp.pick_config(B, 1024, dtype, False, sms=114) == tp.pick_config(B, 1024, dtype, False)
    assert tp.pick_config(128, 1024, dtype, True, sms=114) == tp.pick_config(128, 1024, dtype, True)


def test_forward_in_batch_tiles_for_few_sms_matches_naive():
    """The configuration above at a small size: 3 programs of 8 units (the last 4 units wide), the
    batch in two 64-row tiles (the second 8 rows), packed input whose rows stop in both tiles;
    forward (fp16) and every gradient of the backward on its states, against the naive layer."""
    T_, B_, H_ = 3, 72, 20
    cfg = tp.pick_config(B_, H_, torch.float16, False, sms=2)
    assert cfg == tp.Config(units=8, num_warps=4, block_b=64)
    _skip_unless_available(torch.float16, B_, H_)
    sizes = [72, 66, 60]
    g = torch.Generator().manual_seed(3)
    gx = torch.randn(T_, B_, 4 * H_, generator=g, dtype=torch.float64)
    h0, c0 = torch.randn(B_, H_, generator=g, dtype=torch.float64) * 0.5, torch.randn(B_, H_, generator=g)
    w = (torch.rand(4 * H_, H_, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(H_)
    inputs = {"gx": gx.half(), "h0": h0.half(), "c0": c0.float(), "w_hh": w.half()}
    hs, cs, gates = tp.persistent_forward(
        **{k: v.to(DEVICE) for k, v in inputs.items()}, batch_sizes=torch.tensor(sizes), config=cfg
    )
    leaves = {k: inputs[k].double().requires_grad_() for k in ("gx", "h0", "c0")}
    out, _, c_n = lstm_layer_naive(*leaves.values(), inputs["w_hh"].double(), batch_sizes=sizes)
    rtol = LOW_PRECISION_RTOL[torch.float16]
    for k, n in enumerate(sizes):
        assert rel_err(hs[k + 1, :n].cpu(), out[k, :n]) < rtol, k
    assert rel_err(cs[-1].cpu(), c_n) < rtol
    d_hs = torch.randn(T_ + 1, B_, H_, generator=g, dtype=torch.float64)
    d_hs[1:] *= (torch.arange(B_)[None, :] < torch.tensor(sizes)[:, None])[..., None]  # rows that ran
    d_cn = torch.randn(B_, H_, generator=g, dtype=torch.float64)
    loss = (d_hs[1:] * out).sum() + (d_hs[0] * leaves["h0"]).sum() + (d_cn * c_n).sum()
    expected = torch.autograd.grad(loss, list(leaves.values()))
    grads = tp.persistent_backward(
        d_hs.half().to(DEVICE), d_cn.float().to(DEVICE), gates, cs, inputs["w_hh"].to(DEVICE),
        batch_sizes=torch.tensor(sizes),
    )  # fmt: skip
    for name, actual, exp in zip(("d_gx", "d_h0", "d_c0"), grads, expected, strict=True):
        assert rel_err(actual.cpu(), exp) < rtol, name


@pytest.mark.parametrize(("H", "dtype"), [(2048, torch.float32), (512, torch.float64)])
def test_heuristic_refuses_backward_tiles_that_do_not_fit_on_chip(H, dtype):
    cfg = tp.pick_config(16, H, dtype, backward=True)
    assert "backward" in tp.config_problem(16, H, dtype, cfg, backward=True)


@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_fp32_tiles_fit_on_chip_up_to_h_1024(tf32):
    """fp32's tiles fit on chip: the second-generation backward (the batch on N) up to H = 768 (FMA:
    B ≤ 16); elsewhere the first generation's ∂L/∂pre chunk shrinks where 16 rows do not fit: 16 rows
    up to H = 512, then 4; the FMA backward takes 8 at H = 512, where 16 spilled with triton 3.6."""
    for B, H in ((b, h) for b in (16, 64, 128) for h in (13, 256, 512, 768, 1024)):
        for backward in (False, True):
            cfg = tp.pick_config(B, H, torch.float32, backward, tf32)
            assert tp.config_problem(B, H, torch.float32, cfg, backward) is None, (H, backward, cfg)
            assert cfg.programs(H) <= 132
        bwd = tp.pick_config(B, H, torch.float32, True, tf32)
        if H <= 768 and (tf32 or B <= 16):  # the second generation: the whole batch on N
            assert bwd.batch_n and bwd.block_b == B
        else:
            rows = 16 if H <= 256 or (tf32 and H <= 512) else 8 if H <= 512 else 4
            assert not bwd.batch_n and bwd.block_b == rows


@pytest.mark.slow
def test_heuristic_configs_compile_for_hopper_without_spills_and_fit_resident():
    """Triton's real compiler down to sm_90 cubin (ptxas ships with triton), in two processes on
    the two cores: registers and spills from ptxas, shared memory from the compiled metadata."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a 3.9 deprecation warning
    halves = [HOPPER_SPECS[0::2], HOPPER_SPECS[1::2]]
    command = [sys.executable, "-c", COMPILE_FOR_HOPPER]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    procs = [subprocess.Popen(command + half, **pipes) for half in halves]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        for line in out.splitlines():
            row = json.loads(line)
            results[row["spec"]] = row
    assert set(results) == set(HOPPER_SPECS)
    failures = []
    for spec in HOPPER_SPECS:
        row = results[spec]
        print(json.dumps(row))  # the registers and layouts, with pytest -s
        checks = {"fits on chip": "problem" not in row}
        if "problem" not in row:
            checks["no duplicated warps"] = all(
                dot["per_warp"] and not duplicated_warps(dot) for dot in row["dots"]
            )
            checks["a dot"] = bool(row["dots"])
            checks["the barrier polls with ld.acquire.gpu"] = row["acquire_load"]
            checks["no spills"] = row["spills"] == 0
            checks["shared memory ≤ 227 KiB per block"] = row["shared"] <= 232448
            checks["resident on 132 SMs as expected"] = (row["programs"] <= row["fit"]) == (
                spec not in NOT_RESIDENT
            )
            on_114 = row["programs"] <= row["fit_114"]
            checks["resident on 114 SMs as expected"] = on_114 == (spec not in NOT_RESIDENT_ON_114_SMS)
            dt, b, h, d, *variant = spec.split(",")
            sms = int(variant[0][3:]) if variant and variant[0].startswith("sms") else None
            cfg = tp.pick_config(int(b), int(h), SPEC_DTYPES[dt], d == "bwd", SPEC_TF32.get(dt), sms)
            # the ldmatrix reads of the two dot operands from shared memory (per K chunk of either
            # kernel, per slice of a streamed chunk; none with wgmma, which reads shared memory
            # itself), nothing else
            dots_per_step = row["k_chunks"] + cfg.stream_k * (cfg.stream_split - 1)
            checks["at most 2 local_loads per K chunk in the time loop"] = (
                row["loop_local_loads"] <= 2 * dots_per_step
            )
            if d == "fwd" and dt != "fp32" and row["units"] == 16:  # M = 4U = 64: one warpgroup's wgmma
                checks["wgmma (ttng.warp_group_dot)"] = all(dot["wgmma"] for dot in row["dots"])
            # one dot per 4H chunk, in the loop and after it (16 bits, and fp32 where it takes this layout)
            if d == "bwd" and (dt in ("bf16", "fp16") or cfg.batch_n):
                n_k = row["k_chunks"]
                checks["the batch on the dot's N side, 4H in unpadded chunks"] = cfg.batch_n and (
                    len(row["dots"]) == 2 * n_k
                    and n_k * tp.bwd_chunks(int(h), cfg)[0] == 4 * int(h)
                    and all(dot["shape"][-2:] == [cfg.units, cfg.block_b] for dot in row["dots"])
                )
            if TRITON_VERSION >= (3, 9):  # W_hh in the time loop exactly where chunks are streamed
                checks["streamed chunks loaded in the time loop"] = (
                    STREAMED_LOAD[d] in row["loop_loads"]
                ) == (cfg.stream_k > 0)
            if b == "16" and dt in ("bf16", "fp16") and not variant and TRITON_VERSION >= (3, 9):
                checks["only the intended loads in the time loop"] = row["loop_loads"] == LOOP_LOADS[d]
            if d == "bwd" and dt in ("bf16", "fp16") and not variant:  # one batch tile: split barrier
                checks["the backward's split barrier"] = split_barrier_order(
                    row["loop_trace"], TRITON_VERSION >= (3, 9)
                )
        failures += [f"{spec}: not {what}: {row}" for what, ok in checks.items() if not ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gates_saved_in_the_compute_dtype(dtype, monkeypatch):
    """GATES_IN_COMPUTE_DTYPE (off by default, for ablations): the forward saves 16-bit gates, the
    backward converts them to fp32 as it loads them; forward and every gradient against naive."""
    _skip_unless_available(dtype)
    monkeypatch.setattr(tp, "GATES_IN_COMPUTE_DTYPE", True)
    rtol = LOW_PRECISION_RTOL[dtype]
    _, _, gates = check_forward(make_inputs(dtype), SIZES["decreasing"], rtol, config=SMALL)
    assert gates.dtype == dtype
    check_backward(dtype, SIZES["decreasing"], rtol, config=SMALL)
    check_backward(dtype, None, rtol, config=tp.Config(units=4, num_warps=4, block_b=8))  # one tile
