"""On a GPU: the Triton backend against cuDNN's torch.nn.LSTM in fp32, fp16 and bf16.

Both are measured against a float64 ground truth computed from the same weights; lstmlab passes if
its error is within the dtype's tolerance or no worse than 3× cuDNN's own error.
Skipped without CUDA (`pytest -m cuda` selects these on a GPU machine).
"""

import pytest
import torch
from _utils import rel_err

import lstmlab

pytestmark = pytest.mark.cuda

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
SHAPES = [  # (T, B, I, H, layers, bidirectional, proj_size)
    (16, 1, 32, 64, 1, False, 0),
    (33, 7, 40, 100, 1, False, 0),
    (64, 16, 128, 256, 2, False, 0),
    (20, 5, 24, 48, 2, True, 0),
    (20, 4, 24, 96, 1, False, 32),
    (128, 64, 256, 768, 1, False, 0),
]


def grads(model, x, hx):
    x = x.detach().clone().requires_grad_(True)
    hx = tuple(s.detach().clone().requires_grad_(True) for s in hx)
    out, (h_n, c_n) = model(x, hx)
    g = torch.Generator(device=x.device).manual_seed(1)
    loss = sum(
        (t.float() * torch.randn(t.shape, generator=g, device=x.device)).sum() for t in (out, h_n, c_n)
    )
    return [out, h_n, c_n, *torch.autograd.grad(loss, [*model.parameters(), x, *hx])]


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("backend", ["triton", "triton_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}-L{}-bi{}-p{}".format(*s))
def test_triton_matches_cudnn(shape, dtype, backend):
    """backend='triton' runs the persistent kernels where the shape qualifies (not with proj_size,
    nor where the tiles do not fit on chip), 'triton_step' the per-step kernels."""
    T, B, I, H, L, bi, P = shape
    torch.manual_seed(0)
    cudnn = torch.nn.LSTM(I, H, L, bidirectional=bi, proj_size=P, device="cuda")
    ours = lstmlab.LSTM(I, H, L, bidirectional=bi, proj_size=P, device="cuda", backend=backend)
    truth = lstmlab.LSTM(I, H, L, bidirectional=bi, proj_size=P, device="cuda", backend="reference")
    ours.load_state_dict(cudnn.state_dict())
    truth.load_state_dict(cudnn.state_dict())
    D = 2 if bi else 1
    x = torch.randn(T, B, I, device="cuda")
    hx = (torch.randn(D * L, B, P or H, device="cuda"), torch.randn(D * L, B, H, device="cuda"))

    expected = grads(truth.double(), x.double(), tuple(s.double() for s in hx))
    theirs = grads(cudnn.to(dtype), x.to(dtype), tuple(s.to(dtype) for s in hx))
    actual = grads(ours.to(dtype), x.to(dtype), tuple(s.to(dtype) for s in hx))
    reason = lstmlab.kernels.backends.persistent_unavailable_reason(B, H, dtype, torch.device("cuda"), P)
    fits = reason is None
    assert ours.last_backend == ("triton_persistent" if backend == "triton" and fits else "triton_step")
    labels = [
        "output",
        "h_n",
        "c_n",
        *(f"grad {n}" for n, _ in cudnn.named_parameters()),
        "grad x",
        "grad h0",
        "grad c0",
    ]
    for label, a, t, e in zip(labels, actual, theirs, expected, strict=True):
        assert a.dtype == dtype, label
        ours_err, cudnn_err = rel_err(a, e), rel_err(t, e)
        assert ours_err <= max(TOL[dtype], 3 * cudnn_err), (
            f"{label}: lstmlab {ours_err:.2e}, cuDNN {cudnn_err:.2e}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_runs_in_the_autocast_dtype(dtype):
    """Under autocast: the autocast dtype, values and gradients of the fp32 run to that dtype's
    precision, fp32 weight gradients."""
    torch.manual_seed(0)
    model = lstmlab.LSTM(16, 32, device="cuda")
    x = torch.randn(5, 3, 16, device="cuda")
    expected, _ = model(x)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    with torch.autocast("cuda", dtype=dtype):
        out, (h, c) = model(x)
    assert out.dtype == h.dtype == c.dtype == dtype
    assert rel_err(out, expected) <= 4 * TOL[dtype]
    grads = torch.autograd.grad(out.float().sum(), list(model.parameters()))
    names = [name for name, _ in model.named_parameters()]
    for name, g, want in zip(names, grads, expected_grads, strict=True):
        assert g.dtype == torch.float32, name
        assert rel_err(g, want) <= 4 * TOL[dtype], name
