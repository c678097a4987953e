"""The CPU paths of the reference backend: oneDNN GEMMs (`kernels/gemm.py`), tanh through
sigmoid, gates activated in place, the input projection inside the layer, and the scratch buffers
kept between calls.

Every fp32 check compares with a float64 truth, under both GEMM engines, so a wrong product on
either engine fails whatever the other one does.
"""

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from _utils import rel_err
from lstmlab.kernels import cpu_gemm_engine, gemm, loop, lstm_layer, lstm_layer_from_input, torch_gates
from torch.nn.utils.rnn import pack_sequence

import lstmlab


def outputs_and_grads(model, inputs):
    """Outputs and the gradients of a fixed random projection of them w.r.t. every parameter and
    input; the projection is drawn in float64 whatever the model's dtype, so fp32 and fp64 models
    differentiate the same loss."""
    dtype = next(model.parameters()).dtype
    inputs = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    x = pack_sequence(inputs, enforce_sorted=False) if len(inputs) > 1 else inputs[0]
    out, (h_n, c_n) = model(x)
    out = out.data if len(inputs) > 1 else out
    g = torch.Generator().manual_seed(1)
    loss = sum(
        (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)).sum() for t in (out, h_n, c_n)
    )
    return [out, h_n, c_n, *torch.autograd.grad(loss, [*model.parameters(), *inputs])]


needs_onednn = pytest.mark.skipif(
    gemm.onednn_unavailable_reason() is not None, reason=str(gemm.onednn_unavailable_reason())
)
ENGINES = ["blas", pytest.param("onednn", marks=needs_onednn)]
FP32_TOL = 2e-5  # fp32 products of length ≤ 40, chained through a short recurrence


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 7, 3), (33, 17, 12), (64, 40, 128)])
@pytest.mark.parametrize("steps", [1, 100], ids=["weight-as-is", "weight-packed"])
def test_products_match_float64(engine, M, K, N, steps):
    g = torch.Generator().manual_seed(0)
    a, b_nt, b_nn, bias = (torch.randn(*s, generator=g) for s in ((M, K), (N, K), (K, N), (N,)))
    a_tn, b_tn = torch.randn(K, M, generator=g), torch.randn(K, N, generator=g)
    c = torch.randn(M, N, generator=g)
    d = {
        name: t.double()
        for name, t in dict(a=a, b_nt=b_nt, b_nn=b_nn, bias=bias, a_tn=a_tn, b_tn=b_tn, c=c).items()
    }
    with cpu_gemm_engine(engine):
        weight = gemm.StepWeight(b_nt, rows=M, steps=steps)
        assert (weight.b_onednn is not None) == (engine == "onednn")
        if weight.b_onednn is not None and steps < gemm.PACK_MIN_STEPS:
            assert weight.b_onednn.is_contiguous() and weight.b_onednn.shape == (N, K)  # not packed
        out = torch.empty(M, N)
        results = {
            "linear": (gemm.linear(a, b_nt, bias), d["a"] @ d["b_nt"].t() + d["bias"]),
            "linear no bias": (gemm.linear(a, b_nt), d["a"] @ d["b_nt"].t()),
            "mm": (gemm.mm(a, b_nn), d["a"] @ d["b_nn"]),
            "mm_tn": (gemm.mm_tn(a_tn, b_tn), d["a_tn"].t() @ d["b_tn"]),
            "mm_tn (M < N)": (gemm.mm_tn(b_tn, a_tn), d["b_tn"].t() @ d["a_tn"]),
            "step addmm": (weight.addmm(c, a, out=out), d["c"] + d["a"] @ d["b_nt"].t()),
            "step mm": (weight.mm(a), d["a"] @ d["b_nt"].t()),
            "step mm rows": (weight.mm(a[: max(M - 2, 1)]), (d["a"] @ d["b_nt"].t())[: max(M - 2, 1)]),
        }
    for name, (actual, expected) in results.items():
        assert actual.dtype == torch.float32, name
        assert rel_err(actual, expected) <= 1e-6, name
    assert results["step addmm"][0].data_ptr() == out.data_ptr()


def test_engine_choice_rules():
    x = torch.zeros(16, 128)
    with cpu_gemm_engine("blas"):
        assert not gemm.uses_onednn(x, 4096, 4096, 4096)
    with cpu_gemm_engine("auto"):
        assert not gemm.uses_onednn(x.double(), 4096, 4096, 4096)  # fp64 stays on the BLAS
        assert not gemm.uses_onednn(x.half(), 4096, 4096, 4096)
        assert not gemm.uses_onednn(x, 16, 128, 128)  # below ONEDNN_MIN_MACS
        assert not gemm.uses_onednn(x, 1, 4096, 4096)  # a matrix-vector product: below ONEDNN_MIN_ROWS
        if gemm.onednn_unavailable_reason() is None:
            assert gemm.uses_onednn(x, 64, 256, 1024)
    with pytest.raises(ValueError, match=r"must be one of \('auto', 'blas', 'onednn'\), got 'mkl'"):
        gemm.set_cpu_gemm_engine("mkl")
    assert gemm.get_cpu_gemm_engine() == "auto"


@pytest.mark.parametrize("value,accepted", [("blas", True), ("MKL", False)])
def test_the_environment_variable_sets_the_engine_or_fails_at_import(value, accepted):
    env = {**os.environ, "LSTMLAB_CPU_GEMM": value}
    code = "import lstmlab.kernels as k; print(k.get_cpu_gemm_engine())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    if accepted:
        assert result.returncode == 0 and result.stdout.strip() == value, result.stderr
    else:
        assert result.returncode != 0
        expected = (
            "the environment variable LSTMLAB_CPU_GEMM must be one of ('auto', 'blas', 'onednn'), got 'MKL'"
        )
        assert expected in result.stderr


@pytest.fixture
def broken_onednn(monkeypatch):
    """oneDNN's op returns wrong numbers, as a changed private op might; the probe must catch it."""
    monkeypatch.setattr(gemm, "_probe_result", None)
    monkeypatch.setattr(gemm, "_warned", False)
    monkeypatch.setattr(gemm, "_onednn_linear", lambda a, w, bias=None: torch.zeros(a.shape[0], w.shape[0]))


def test_a_failing_probe_keeps_auto_on_the_blas_with_a_warning(broken_onednn):
    a, b = torch.randn(64, 256), torch.randn(1024, 256)
    with pytest.warns(UserWarning, match="stay on torch.mm because .*disagrees with torch.addmm"):
        product = gemm.linear(a, b)
    assert rel_err(product, a.double() @ b.double().t()) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not on every product
        gemm.linear(a, b)


def test_a_failing_probe_makes_an_explicit_onednn_request_raise(broken_onednn):
    with cpu_gemm_engine("onednn"), pytest.raises(RuntimeError, match="LSTMLAB_CPU_GEMM is 'onednn' but"):
        gemm.linear(torch.randn(3, 4), torch.randn(5, 4))


def test_a_missing_op_is_reported_by_name(monkeypatch):
    def missing(*args, **kwargs):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'")

    monkeypatch.setattr(gemm, "_probe_result", None)
    monkeypatch.setattr(gemm, "_onednn_linear", missing)
    assert "AttributeError" in gemm.onednn_unavailable_reason()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_cpu_tanh_through_sigmoid(dtype, tol):
    x = torch.cat(
        [torch.linspace(-60, 60, 20001, dtype=dtype), torch.tensor([0.0, 1e-30, -1e-30], dtype=dtype)]
    )
    out = torch_gates.tanh_into(x, out=torch.empty_like(x))
    assert (out - torch.tanh(x)).abs().max().item() <= tol
    assert out[x.abs() > 20].abs().eq(1).all()  # saturates exactly
    special = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)
    assert torch_gates.tanh_into(special, out=torch.empty_like(special)).tolist()[:2] == [1.0, -1.0]
    assert torch_gates.tanh_into(special, out=torch.empty_like(special))[2].isnan()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2, bidirectional=True, proj_size=3), dict(batch_first=True, bias=False)],
    ids=["plain", "2-layer-bi-proj", "batch_first-no-bias"],
)
def test_fp32_module_matches_float64_torch(engine, config):
    """The whole module in fp32 on each engine against torch.nn.LSTM in float64: every output and
    every gradient."""
    torch.manual_seed(0)
    truth = torch.nn.LSTM(5, 7, dtype=torch.float64, **config)
    ours = lstmlab.LSTM(5, 7, **config)
    ours.load_state_dict({k: v.float() for k, v in truth.state_dict().items()})
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    with cpu_gemm_engine(engine):
        actual = outputs_and_grads(ours, [x])
    expected = outputs_and_grads(truth, [x])
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert rel_err(a, e) <= FP32_TOL, i


@pytest.mark.parametrize("engine", ENGINES)
def test_fp32_packed_sequences_and_cell(engine):
    torch.manual_seed(0)
    truth = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = lstmlab.LSTM(5, 7, num_layers=2, bidirectional=True)
    ours.load_state_dict({k: v.float() for k, v in truth.state_dict().items()})
    seqs = [torch.randn(n, 5, dtype=torch.float64) for n in (3, 6, 1, 4)]
    with cpu_gemm_engine(engine):
        actual = outputs_and_grads(ours, seqs)
    expected = outputs_and_grads(truth, seqs)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert rel_err(a, e) <= FP32_TOL, i
    packed_out, _ = ours(pack_sequence([s.float() for s in seqs], enforce_sorted=False))
    assert isinstance(packed_out, torch.nn.utils.rnn.PackedSequence)

    cell_truth = torch.nn.LSTMCell(5, 7, dtype=torch.float64)
    cell = lstmlab.LSTMCell(5, 7)
    cell.load_state_dict({k: v.float() for k, v in cell_truth.state_dict().items()})
    x = torch.randn(4, 5, dtype=torch.float64)
    with cpu_gemm_engine(engine):
        h, c = cell(x.float())
    h_ref, c_ref = cell_truth(x)
    assert rel_err(h, h_ref) <= FP32_TOL and rel_err(c, c_ref) <= FP32_TOL


@pytest.mark.parametrize("frozen", ["nothing", "input", "input_weights", "recurrent_weights", "bias"])
def test_layer_from_input_equals_projection_then_layer(frozen):
    """lstm_layer_from_input = lstm_layer(F.linear(x, W_ih, b)): outputs and every gradient, also
    when some inputs need no gradient (each branch of the shared weight-gradient product)."""
    g = torch.Generator().manual_seed(0)
    T, B, I, H = 5, 3, 4, 6
    leaves = {
        "input": torch.randn(T, B, I, generator=g, dtype=torch.float64),
        "input_weights": torch.randn(4 * H, I, generator=g, dtype=torch.float64),
        "bias": torch.randn(4 * H, generator=g, dtype=torch.float64),
        "h0": torch.randn(B, H, generator=g, dtype=torch.float64),
        "c0": torch.randn(B, H, generator=g, dtype=torch.float64),
        "recurrent_weights": torch.randn(4 * H, H, generator=g, dtype=torch.float64),
    }
    for name, t in leaves.items():
        t.requires_grad_(name != frozen)
    x, w_ih, bias, h0, c0, w_hh = leaves.values()
    trainable = [t for t in leaves.values() if t.requires_grad]
    weights = torch.randn(T, B, H, generator=g, dtype=torch.float64)

    def run(fn):
        out, h_n, c_n = fn()
        loss = (out * weights).sum() + h_n.sum() + 2 * c_n.sum()
        return [out, h_n, c_n, *torch.autograd.grad(loss, trainable)]

    expected = run(lambda: lstm_layer(F.linear(x, w_ih, bias), h0, c0, w_hh))
    actual = run(lambda: lstm_layer_from_input(x, w_ih, bias, h0, c0, w_hh))
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert rel_err(a, e) <= 1e-12, i


def test_layer_from_input_rejects_bad_shapes():
    x, h0, c0, w_hh = torch.randn(5, 3, 4), torch.zeros(3, 6), torch.zeros(3, 6), torch.randn(24, 6)
    with pytest.raises(ValueError, match=r"w_ih must be \[4H, 4\], got shape \(24, 5\)"):
        lstm_layer_from_input(x, torch.randn(24, 5), None, h0, c0, w_hh)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\), got \(23,\)"):
        lstm_layer_from_input(x, torch.randn(24, 4), torch.randn(23), h0, c0, w_hh)
    with pytest.raises(ValueError, match=r"x must be \[T, B, I\], got shape \(3, 4\)"):
        lstm_layer_from_input(x[0], torch.randn(24, 4), None, h0, c0, w_hh)


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    out, _ = model(x)
    return torch.autograd.grad(out.square().sum(), [x, *model.parameters()])


def test_scratch_buffers_are_reused_and_never_leak_between_calls():
    """A small call after a large one reuses the large buffers (no new allocation) and computes
    exactly what it computes on fresh memory; clear_workspace() frees them."""
    torch.manual_seed(0)
    model = lstmlab.LSTM(6, 8, backend="reference")
    small, large = torch.randn(4, 2, 6), torch.randn(9, 5, 6)
    loop.clear_workspace()
    fresh = _grads(model, small)
    _grads(model, large)
    kept = {key: t.data_ptr() for key, t in loop._workspace.buffers.items()}
    assert {name for name, _ in kept} >= {"coef", "carry", "d_pre", "x_h"}
    again = _grads(model, small)
    assert {key: t.data_ptr() for key, t in loop._workspace.buffers.items()} == kept
    for a, b in zip(again, fresh, strict=True):
        assert torch.equal(a, b)
    loop.clear_workspace()
    assert not loop._workspace.buffers


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_threads_do_not_share_scratch_buffers(backend):
    torch.manual_seed(0)
    model = lstmlab.LSTM(6, 8, backend=backend)
    inputs = [torch.randn(7, 3, 6) for _ in range(4)]
    expected = [_grads(model, x) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = _grads(model, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-7), (torch.float64, 1e-15)])
def test_gates_activated_in_place_equal_separate_buffers(dtype, tol):
    """The layer writes each step's pre-activations into its gates slot and activates them there;
    that path must compute what separate buffers compute, saturated gates included."""
    g = torch.Generator().manual_seed(0)
    B, H = 5, 6
    pre = torch.randn(B, 4 * H, generator=g, dtype=dtype) * 4
    pre[0] = torch.linspace(-80, 80, 4 * H, dtype=dtype)
    c_prev = torch.randn(B, H, generator=g, dtype=dtype)
    results = []
    for in_place in (False, True):
        gates, c, h = torch.empty_like(pre), torch.empty_like(c_prev), torch.empty_like(c_prev)
        if in_place:
            gates.copy_(pre)
        torch_gates.gates_forward_into(gates if in_place else pre, c_prev, gates, c, h)
        results.append((gates, c, h))
    i, f, gg, o = pre.chunk(4, dim=1)
    c_true = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(gg)
    for gates, c, h in results:
        assert (gates[:, 2 * H : 3 * H] - torch.tanh(gg)).abs().max() <= tol
        assert (c - c_true).abs().max() <= 4 * tol
        assert (h - torch.sigmoid(o) * torch.tanh(c_true)).abs().max() <= 4 * tol
