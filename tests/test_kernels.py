"""The layer Function and gate kernels against the textbook oracle, forward and every gradient.

Triton runs through its CPU interpreter here (conftest sets TRITON_INTERPRET=1 without a GPU).
"""

import pytest
import torch
from _utils import rel_err
from lstmlab.kernels import (
    HAS_TRITON,
    gates_backward,
    gates_forward,
    lstm_layer,
    lstm_layer_naive,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    pass
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, B, H, P or None, batch_sizes or None): odd sizes, packed prefixes shrinking and growing.
CASES = [
    (1, 1, 1, None, None),
    (5, 3, 7, None, None),
    (4, 5, 13, 6, None),
    (5, 3, 7, None, [3, 3, 2, 1, 1]),
    (5, 3, 7, None, [1, 1, 2, 3, 3]),
    (6, 4, 5, 3, [4, 3, 3, 2, 1, 1]),
]


def make_inputs(T, B, H, P, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    R = P or H

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    tensors = {
        "gx": rand(T, B, 4 * H),
        "h0": rand(B, R),
        "c0": rand(B, H),
        "w_hh": rand(4 * H, R) / H**0.5,
        "w_hr": rand(R, H) / H**0.5 if P else None,
    }
    for t in tensors.values():
        if t is not None:
            t.requires_grad_(True)
    return tensors


def run_and_grad(fn, inputs, seed=1):
    """Outputs of fn plus the gradient of a random projection of them w.r.t. every input."""
    out, h_n, c_n = fn(**inputs)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype).to(t.device)).sum()
        for t in (out, h_n, c_n)
    )
    leaves = [t for t in inputs.values() if t is not None]
    return [out, h_n, c_n, *torch.autograd.grad(loss, leaves)]


def names(inputs):
    return ["out", "h_n", "c_n", *(f"d_{k}" for k, v in inputs.items() if v is not None)]


@pytest.mark.parametrize("T,B,H,P,batch_sizes", CASES)
def test_reference_matches_naive_autograd(T, B, H, P, batch_sizes, poisoned_buffers):
    inputs = make_inputs(T, B, H, P)
    expected = run_and_grad(lambda **kw: lstm_layer_naive(**kw, batch_sizes=batch_sizes), inputs)
    actual = run_and_grad(lambda **kw: lstm_layer(**kw, batch_sizes=batch_sizes, backend="reference"), inputs)
    for name, a, e in zip(names(inputs), actual, expected, strict=True):
        assert rel_err(a, e) <= 1e-12, name


@pytest.mark.parametrize("T,B,H,P,batch_sizes", CASES[1:4])
def test_reference_backward_passes_gradcheck(T, B, H, P, batch_sizes):
    inputs = make_inputs(T, B, H, P)
    keys = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        kw = dict(zip(keys, tensors, strict=True))
        return lstm_layer(**kw, batch_sizes=batch_sizes, backend="reference")

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in keys), eps=1e-6, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("backend", ["triton_step", "triton_persistent"])
@pytest.mark.parametrize("T,B,H,P,batch_sizes", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_layer_matches_reference(T, B, H, P, batch_sizes, dtype, backend, poisoned_buffers):
    """The layer op on either Triton path, packed rows and the GEMMs around the kernels included."""
    if backend == "triton_persistent" and P:
        pytest.skip("the persistent kernels have no projection (proj_size stays on the per-step path)")
    inputs = make_inputs(T, B, H, P, dtype=dtype, device=DEVICE)
    expected = run_and_grad(
        lambda **kw: lstm_layer_naive(**kw, batch_sizes=batch_sizes),
        make_inputs(T, B, H, P, dtype=torch.float64),
    )
    actual = run_and_grad(lambda **kw: lstm_layer(**kw, batch_sizes=batch_sizes, backend=backend), inputs)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, e in zip(names(inputs), actual, expected, strict=True):
        assert torch.isfinite(a).all(), f"{name} has unwritten (NaN) elements"
        assert rel_err(a.cpu(), e) <= tol, name


@needs_triton
@pytest.mark.parametrize("backend", ["triton_step", "triton_persistent"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_triton_layer_low_precision(dtype, tol, backend, poisoned_buffers):
    T, B, H = 6, 3, 11
    inputs = make_inputs(T, B, H, None, dtype=dtype, device=DEVICE)
    expected = run_and_grad(lstm_layer_naive, make_inputs(T, B, H, None, dtype=torch.float64))
    actual = run_and_grad(lambda **kw: lstm_layer(**kw, backend=backend), inputs)
    for name, a, e in zip(names(inputs), actual, expected, strict=True):
        assert a.dtype == dtype, name
        # errors compound through the recurrence: a few ulps per step at these sizes
        assert rel_err(a.cpu(), e) <= 4 * tol, name


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton_step", marks=needs_triton)])
def test_gates_saturate_exactly(backend):
    """At saturating pre-activations the gates hit their limits exactly (0, 1, ±1, all finite) and
    the step's gradients equal autograd's through torch's own sigmoid and tanh."""
    H = 4
    big = torch.tensor([50.0, -50.0, 1e4, -1e4], dtype=torch.float32)
    pre = big.repeat(4).reshape(1, 4 * H).to(DEVICE)  # every gate sees ±50 and ±1e4
    c_prev = torch.tensor([[0.5, -2.0, 1e4, -3.0]], device=DEVICE)
    gates, c, h = gates_forward(pre, c_prev, backend)
    assert torch.isfinite(gates).all() and torch.isfinite(c).all() and torch.isfinite(h).all()
    # the limits, exactly: σ(50) = σ(1e4) = 1, σ(−1e4) = 0, tanh(±50) = ±1
    for k in (0, 1, 3):
        assert gates[0, k * H : (k + 1) * H][[0, 2, 3]].tolist() == [1.0, 1.0, 0.0]
    assert gates[0, 2 * H : 3 * H].tolist() == [1.0, -1.0, 1.0, -1.0]
    # σ(−50) ≈ 1.9e-22: a GPU's exp differs from the CPU's in the last bits (2e-28 seen on an H200)
    near_zero = gates[0, [1, H + 1, 3 * H + 1]].cpu()
    torch.testing.assert_close(near_zero, torch.sigmoid(big[1]).expand(3), rtol=1e-5, atol=0)

    # expected gradients: autograd through torch.sigmoid / torch.tanh on the same step
    pre_ref = pre.detach().cpu().double().requires_grad_()
    c_prev_ref = c_prev.cpu().double().requires_grad_()
    i, f, g, o = pre_ref.chunk(4, dim=1)
    c_ref = torch.sigmoid(f) * c_prev_ref + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    dh = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    dc = torch.tensor([[-1.0, 0.25, 2.0, 1.0]])
    expected = torch.autograd.grad((h_ref * dh).sum() + (c_ref * dc).sum(), [pre_ref, c_prev_ref])
    d_pre, d_c = gates_backward(dh.to(DEVICE), dc.to(DEVICE), gates, c, c_prev, backend)
    assert torch.isfinite(d_pre).all() and torch.isfinite(d_c).all()
    for actual, want in zip((d_pre, d_c), expected, strict=True):
        torch.testing.assert_close(actual.cpu(), want.float(), rtol=1e-5, atol=1e-30)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_gates_match_reference_on_strided_inputs(dtype):
    B, H = 5, 9
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(B, 8 * H, generator=g).to(dtype).to(DEVICE)
    pre = wide[:, ::2]  # non-contiguous [B, 4H]
    c_prev = torch.randn(H, B, generator=g).to(DEVICE).t()  # transposed [B, H]
    expected = gates_forward(pre, c_prev, "reference")
    actual = gates_forward(pre, c_prev, "triton_step")
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 if a.dtype == torch.float32 else 1e-2)
    dh = torch.randn(B, H, generator=g).to(dtype).to(DEVICE)
    dc = torch.randn(B, H, generator=g).to(DEVICE)
    gates, c, _ = expected
    for a, e in zip(
        gates_backward(dh, dc, gates, c, c_prev, "triton_step"),
        gates_backward(dh, dc, gates, c, c_prev, "reference"),
        strict=True,
    ):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 if a.dtype == torch.float32 else 1e-2)


def test_lstm_layer_rejects_bad_shapes():
    inputs = make_inputs(3, 2, 4, None)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 4\), got \(3, 4\)"):
        lstm_layer(inputs["gx"], torch.zeros(3, 4, dtype=torch.float64), inputs["c0"], inputs["w_hh"])
    with pytest.raises(ValueError, match=r"gx must be \[T, B, 4H\]"):
        lstm_layer(inputs["gx"][0], inputs["h0"], inputs["c0"], inputs["w_hh"])
    with pytest.raises(ValueError, match=r"batch_sizes must hold 3 sizes in \[0, 2\], got \[2, 3, 1\]"):
        lstm_layer(**inputs, batch_sizes=[2, 3, 1])
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        lstm_layer(**inputs, backend="cudnn")
    if HAS_TRITON:  # the step functions never swap in another path for the one asked for
        with pytest.raises(ValueError, match="not 'triton_persistent'"):
            gates_forward(torch.zeros(1, 16), torch.zeros(1, 4), backend="triton_persistent")


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lstmlab.kernels import triton_gates as tg

def sig(names, types):
    return dict(zip(names, types)) | {"BLOCK_H": "constexpr"}

for dt in ("fp32", "bf16"):
    acc = "*fp32"
    strides = ["i32"] * 6
    fwd = sig(
        ["p_pre", "p_c_prev", "p_gates", "p_c", "p_h", "H", "stride_pre", "stride_c_prev",
         "stride_gates", "stride_c", "stride_h"],
        [f"*{dt}", acc, acc, acc, f"*{dt}", *strides],
    )
    bwd = sig(
        ["p_dh", "p_dc", "p_gates", "p_c", "p_c_prev", "p_dpre", "p_dc_prev", "H", "stride_dh",
         "stride_dc", "stride_gates", "stride_c", "stride_c_prev", "stride_dpre", "stride_dc_prev"],
        [acc, acc, acc, acc, acc, f"*{dt}", acc, "i32", *strides, "i32"],
    )
    for kernel, signature in ((tg.lstm_gates_fwd_kernel, fwd), (tg.lstm_gates_bwd_kernel, bwd)):
        src = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_H": 256})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in compiled.asm["ptx"], kernel
        print("compiled", kernel.__name__, dt)
"""


@needs_triton
def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels' Python; this runs Triton's real compiler down to sm_90
    PTX and cubin (ptxas ships with triton), catching what only compilation checks."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a 3.9 deprecation warning
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 4
