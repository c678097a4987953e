"""Streamed K chunks of W_hh in the persistent kernels (kernels/triton_persistent.py, Config.stream_k):
chunks read from L2 every step instead of kept on chip, against the naive layer (forward and every
gradient), and the configurations that take them (TF32 at H = 1024 on a 114-SM H100 PCIe).

B: batch  T: time  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

import math

import pytest
import torch
from _utils import lstm_inputs, rel_err

tp = pytest.importorskip("lstmlab.kernels.triton_persistent")
from lstmlab.kernels.naive import lstm_layer_naive  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, B, H = 4, 5, 72
SIZES = [5, 4, 4, 2]  # packed: rows stop in both batch tiles of 4

# H = 72 in K chunks, the last one 8 columns wide (masked), some of them streamed
FORWARD = {
    # 5 chunks of 16, the last 3 streamed, the whole batch as one tile (state in registers)
    "k16_stream3": tp.Config(units=8, num_warps=4, block_b=8, block_k=16, stream_k=3),
    # 3 chunks of 32, the last streamed in 2 slices of 16, the batch in 2 tiles of 4 rows
    "k32_stream1_slices2_tiles": tp.Config(
        units=8, num_warps=4, block_b=4, block_k=32, stream_k=1, stream_split=2
    ),
    # 2 chunks of 64 split in 2 for a 3-D dot, the second streamed in 2 slices of 32
    "k64_split2_stream1_slices2": tp.Config(
        units=16, num_warps=4, block_b=8, block_k=64, split_k=2, stream_k=1, stream_split=2
    ),
}
# 4H = 288 in chunks of W_hh's columns, the last one partial (masked), some of them streamed
BACKWARD = {
    # the batch on N: 5 chunks of 64 in 2 slices, the last 2 streamed
    "batch_n_k64_split2_stream2": tp.Config(
        units=16, num_warps=4, block_b=8, split_k=2, block_k=64, batch_n=True, stream_k=2
    ),
    # the batch on N: 9 chunks of 32, the last 4 streamed, loads one chunk ahead
    "batch_n_k32_ahead1_stream4": tp.Config(
        units=8, num_warps=4, block_b=8, block_k=32, batch_n=True, k_ahead=1, stream_k=4
    ),
    # the first generation's layout (the batch on M) in 2 tiles of 4 rows: 5 chunks of 64, 3 streamed
    "batch_m_k64_split2_stream3_tiles": tp.Config(
        units=8, num_warps=4, block_b=4, split_k=2, block_k=64, stream_k=3
    ),
}


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, followed by 4096 NaN (as in test_persistent.py)."""

    def nan_with_guard(*shape, dtype, device):
        n = math.prod(shape)
        return torch.full((n + 4096,), math.nan, dtype=dtype, device=device)[:n].view(shape)

    monkeypatch.setattr(tp, "empty", nan_with_guard)


@pytest.fixture(params=[True, False], ids=["tf32", "ieee"])
def tf32(request, monkeypatch):
    """Both fp32 dot precisions (the interpreter multiplies TF32 in full fp32; a GPU rounds to TF32)."""
    monkeypatch.setattr(tp, "cudnn_rnn_allows_tf32", lambda: request.param)
    return request.param


def reference(seed: int):
    """fp32 inputs, the naive layer's outputs in fp64 on packed SIZES and, for a backward drawn from
    the same generator, d_hs [T + 1, B, H], d_cn and the expected (∂gx, ∂h0, ∂c0)."""
    g, gx, h0, c0, w_hh = lstm_inputs(T, B, H, seed)
    leaves = [x.double().requires_grad_() for x in (gx, h0, c0)]
    out, _, c_n = lstm_layer_naive(*leaves, w_hh.double(), batch_sizes=torch.tensor(SIZES))
    d_out, d_cn = torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g)
    d_hs = torch.cat([torch.randn(1, B, H, generator=g), d_out])
    for k in range(T):  # the gradient reaches hs[k + 1] only where step k wrote an output
        d_hs[k + 1, SIZES[k] :] = 0
    loss = (d_out.double() * out).sum() + (d_hs[0].double() * leaves[1]).sum() + (d_cn.double() * c_n).sum()
    expected = torch.autograd.grad(loss, leaves)
    return (gx, h0, c0, w_hh), out.detach(), c_n.detach(), d_hs, d_cn, expected


def tolerances(tf32: bool) -> tuple[float, float]:
    return (1e-2, 1e-2) if tf32 and DEVICE.type == "cuda" else (2e-6, 1e-5)


@pytest.mark.parametrize("config", FORWARD.values(), ids=FORWARD.keys())
def test_forward_with_streamed_chunks_matches_naive(config, tf32):
    """h, c and the saved gates (through the backward's gradients) of a forward that reads its last
    stream_k K chunks of W_hh from memory every step."""
    tp._check_split_k(config, H, backward=False)
    inputs, out, c_n, d_hs, d_cn, expected = reference(seed=7)
    fwd_tol, bwd_tol = tolerances(tf32)
    x = [t.to(DEVICE) for t in inputs]
    sizes = torch.tensor(SIZES)
    hs, cs, gates = tp.persistent_forward(*x, sizes, config=config)
    for k in range(T):  # rows that advanced at step k
        assert rel_err(hs[k + 1, : SIZES[k]].cpu(), out[k, : SIZES[k]]) < fwd_tol, k
    assert rel_err(cs[-1].cpu(), c_n) < fwd_tol
    # the saved gates and cs, checked through an unstreamed backward's gradients
    grads = tp.persistent_backward(d_hs.to(DEVICE), d_cn.to(DEVICE), gates, cs, x[3], sizes)
    for name, actual, exp in zip(("d_pre", "d_h0", "d_c0"), grads, expected, strict=True):
        assert rel_err(actual.cpu(), exp) < bwd_tol, name


@pytest.mark.parametrize("config", BACKWARD.values(), ids=BACKWARD.keys())
def test_backward_with_streamed_chunks_matches_autograd(config, tf32):
    """Every gradient of a backward that reads its last stream_k chunks of W_hh's columns from memory
    every step (the forward unstreamed)."""
    tp._check_split_k(config, H, backward=True)
    inputs, _, _, d_hs, d_cn, expected = reference(seed=8)
    _, bwd_tol = tolerances(tf32)
    x = [t.to(DEVICE) for t in inputs]
    sizes = torch.tensor(SIZES)
    _, cs, gates = tp.persistent_forward(*x, sizes)
    grads = tp.persistent_backward(d_hs.to(DEVICE), d_cn.to(DEVICE), gates, cs, x[3], sizes, config=config)
    for name, actual, exp in zip(("d_pre", "d_h0", "d_c0"), grads, expected, strict=True):
        assert rel_err(actual.cpu(), exp) < bwd_tol, name
    for k in range(T):  # exactly 0 where a row did not advance
        assert (grads[0][k, SIZES[k] :] == 0).all()


def test_streamed_forward_and_backward_in_one_launch_with_barriers():
    """A single program (64 units) in one launch with the grid barrier, as on a GPU, both kernels
    streaming (the interpreter runs the barrier path only with one program)."""
    fwd = tp.Config(units=128, num_warps=4, block_b=8, block_k=32, stream_k=2, stream_split=2)
    bwd = tp.Config(units=128, num_warps=4, block_b=8, block_k=64, split_k=2, batch_n=True, stream_k=3)
    inputs, out, c_n, d_hs, d_cn, expected = reference(seed=9)
    x = [t.to(DEVICE) for t in inputs]
    sizes = torch.tensor(SIZES)
    spin_limit = 1 << 20 if DEVICE.type == "cuda" else 4
    options = dict(single_launch=True, spin_limit=spin_limit)
    hs, cs, gates = tp.persistent_forward(*x, sizes, config=fwd, **options)
    for k in range(T):
        assert rel_err(hs[k + 1, : SIZES[k]].cpu(), out[k, : SIZES[k]]) < 2e-6, k
    assert rel_err(cs[-1].cpu(), c_n) < 2e-6
    grads = tp.persistent_backward(
        d_hs.to(DEVICE), d_cn.to(DEVICE), gates, cs, x[3], sizes, config=bwd, **options
    )
    for name, actual, exp in zip(("d_pre", "d_h0", "d_c0"), grads, expected, strict=True):
        assert rel_err(actual.cpu(), exp) < 1e-5, name


def test_launchers_reject_streaming_they_cannot_run():
    inputs = [t.to(DEVICE) for t in reference(seed=7)[0]]
    bad = {
        "all 5 chunks streamed": (tp.Config(units=8, num_warps=4, block_k=16, stream_k=5), False),
        "a 16-column chunk in 2 slices": (
            tp.Config(units=8, num_warps=4, block_k=16, stream_k=1, stream_split=2),
            False,
        ),
        "slices in the backward": (
            tp.Config(units=8, num_warps=4, block_k=64, stream_k=1, stream_split=2),
            True,
        ),
        "all 5 backward chunks streamed": (tp.Config(units=8, num_warps=4, block_k=64, stream_k=5), True),
    }
    for what, (config, backward) in bad.items():
        with pytest.raises(ValueError, match="stream"):
            if backward:
                _, cs, gates = tp.persistent_forward(*inputs)
                tp.persistent_backward(
                    torch.zeros(T + 1, B, H), torch.zeros(B, H), gates, cs, inputs[3], config=config
                )
            else:
                tp.persistent_forward(*inputs, config=config)
            pytest.fail(what)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_tf32_at_h_1024_streams_where_the_sms_are_too_few(backward):
    """fp32_config's branch for 114 SMs: TF32 at H = 1024 streams chunks of W_hh, so that the forward
    runs two programs per SM (128 programs) and the backward one (64 programs, 16 units), each within
    an SM's shared memory by the tile rule; the sm_90 compiles are in test_persistent.py's hopper test."""
    for b in (1, 16, 64, 128, 300):
        cfg = tp.pick_config(b, 1024, torch.float32, backward, tf32=True, sms=114)
        assert cfg.stream_k > 0, b
        assert tp.config_problem(b, 1024, torch.float32, cfg, backward) is None
        tp._check_split_k(cfg, 1024, backward)
        need = tp.tile_bytes(b, 1024, torch.float32, cfg, backward) + 1024
        if backward:
            assert cfg.units == 16 and cfg.programs(1024) == 64 and cfg.batch_n
            kept = (tp.bwd_chunks(1024, cfg)[1] - cfg.stream_k) * cfg.block_k * cfg.units * 4
            assert (
                kept <= tp.FP32_STREAM_KEEP_BYTES < kept + cfg.block_k * cfg.units * 4
            )  # the fewest streamed
        else:
            assert cfg.programs(1024) == 128 and 2 * need <= tp.SMEM_PER_SM  # two programs per SM
            assert cfg.stream_k == 2 and cfg.stream_split == 8
        assert cfg.stream_k < (tp.bwd_chunks(1024, cfg)[1] if backward else 8)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_streaming_only_where_the_grid_cannot_be_resident(backward):
    """Nothing streams anywhere else, and fp32 gets what it got before streaming existed (when it
    took no SM count): fp32 without TF32, more SMs or none given, or a grid that fits (H ≤ 768).
    (The 16-bit forward has its own rule for 114 SMs, without streaming.)"""
    dtypes = ((torch.float32, True), (torch.float32, False), (torch.bfloat16, None), (torch.float16, None))
    for dtype, tf32 in dtypes:
        for b in (1, 16, 64, 128):
            for h in (13, 256, 512, 768, 1024):
                plain = tp.pick_config(b, h, dtype, backward, tf32)
                assert plain.stream_k == 0
                for sms in (132, 114, None):
                    cfg = tp.pick_config(b, h, dtype, backward, tf32, sms=sms)
                    streamed = dtype == torch.float32 and tf32 and h == 1024 and sms == 114
                    assert (cfg.stream_k > 0) == streamed, (dtype, tf32, b, h, sms)
                    if dtype == torch.float32:
                        assert (cfg != plain) == streamed, (tf32, b, h, sms)


def test_cuda_check_on_114_sms_compiles_the_streamed_tf32_kernels(monkeypatch):
    """_cuda_unavailable_reason on a 114-SM H100 PCIe (device facts faked, compiles recorded, on
    CPU tensors): TF32 at H = 1024 compiles both streamed kernels with their full argument lists and
    the streaming constexprs (128 forward programs, 64 backward), the backward with maxnreg 255;
    true fp32 still compiles the 132-SM configuration (128 programs each way)."""
    limits = {"sms": 114, "regs_per_sm": 65536, "threads_per_sm": 2048, "smem_per_sm": 233472}
    monkeypatch.setattr(tp, "_device_limits", lambda device: limits | {"smem_per_block": 232448})
    checked = []

    def compile_problem(kernel, args, meta, programs, device):
        constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages", "maxnreg")}
        assert len(args) + len(constexprs) == len(kernel.arg_names)
        assert set(constexprs) == set(kernel.arg_names[len(args) :])
        checked.append((kernel.__name__, programs, meta["N_STREAM"], meta.get("maxnreg")))

    monkeypatch.setattr(tp, "_compile_problem", compile_problem)
    check = tp._cuda_unavailable_reason.__wrapped__
    assert check(16, 1024, torch.float32, torch.device("cpu"), 0, "tf32") is None
    assert checked == [
        ("lstm_persistent_fwd_kernel", 128, 2, None),
        ("lstm_persistent_bwd_kernel", 64, 5, 255),
    ]
    checked.clear()
    assert check(16, 1024, torch.float32, torch.device("cpu"), 0, "ieee") is None
    assert checked == [
        ("lstm_persistent_fwd_kernel", 128, 0, None),
        ("lstm_persistent_bwd_kernel", 128, 0, None),
    ]


def test_both_launchers_pass_the_sms_to_pick_config(monkeypatch):
    """The launchers choose with the device's SMs per direction, as the availability check does, so
    that on 114 SMs the backward runs the streamed configuration the check compiled."""
    monkeypatch.setattr(tp, "_sms_per_direction", lambda device, directions: 114 // directions)
    asked = []
    pick = tp.pick_config

    def recording_pick(B, H, dtype, backward, tf32=None, sms=None):
        asked.append((backward, sms))
        return pick(B, H, dtype, backward, tf32, sms)

    monkeypatch.setattr(tp, "pick_config", recording_pick)
    inputs = [t.to(DEVICE) for t in reference(seed=7)[0]]
    _, cs, gates = tp.persistent_forward(*inputs)
    tp.persistent_backward(torch.zeros(T + 1, B, H), torch.zeros(B, H), gates, cs, inputs[3])
    assert asked == [(False, 114), (True, 114)]
