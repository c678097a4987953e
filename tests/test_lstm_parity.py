"""lstmlab.LSTM / LSTMCell compute the same function as torch's after a state_dict copy (float64).

Like minGPT's test: the same weights in two implementations, the same outputs and gradients.
"""

import itertools

import pytest
import torch
from _utils import device_for, rel_err
from lstmlab.kernels import HAS_TRITON
from torch.nn.utils.rnn import pack_sequence

import lstmlab

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no triton")
# "triton" runs the per-step kernels on a CPU (through the interpreter) and, on a GPU, the persistent
# ones where the shape qualifies; the persistent kernels have a test of their own below
BACKENDS = ["reference", "cpu", pytest.param("triton", marks=needs_triton)]
TOL = 1e-10


def twins(backend, **kwargs):
    """torch.nn.LSTM and lstmlab.LSTM in float64, the second loaded from the first's state_dict.
    torch's runs on the CPU (ATen's float64 LSTM): cuDNN refuses a backward in eval mode."""
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(**kwargs, dtype=torch.float64)
    ours = lstmlab.LSTM(**kwargs, dtype=torch.float64, device=device_for(backend), backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def rand(*shape, backend="reference"):
    """float64 noise from torch's global RNG, on the device the backend's tests run on."""
    return torch.randn(*shape, dtype=torch.float64).to(device_for(backend))


def outputs_and_grads(model, inputs, hx):
    """Runs the model; returns its outputs and the gradients of a fixed random projection of them
    w.r.t. every parameter, the inputs and the initial states."""
    device = next(model.parameters()).device
    inputs = [x.detach().to(device).requires_grad_(True) for x in inputs]
    hx = None if hx is None else tuple(s.detach().to(device).requires_grad_(True) for s in hx)
    packed = len(inputs) > 1 or isinstance(inputs[0], list)
    x = pack_sequence(inputs, enforce_sorted=False) if packed else inputs[0]
    out, (h_n, c_n) = model(x) if hx is None else model(x, hx)
    out = out.data if packed else out
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in (out, h_n, c_n)]
    loss = sum((t * n).sum() for t, n in zip((out, h_n, c_n), noise, strict=True))
    leaves = [*model.parameters(), *inputs, *(hx or ())]
    return [out, h_n, c_n, *torch.autograd.grad(loss, leaves)]


def assert_same(theirs, ours, inputs, hx=None):
    expected = outputs_and_grads(theirs, inputs, hx)
    actual = outputs_and_grads(ours, inputs, hx)
    labels = ["output", "h_n", "c_n", *(f"grad {n}" for n, _ in theirs.named_parameters())]
    labels += [f"grad input{i}" for i in range(len(inputs))] + ["grad h_0", "grad c_0"]
    for label, a, e in zip(labels, actual, expected, strict=False):
        assert rel_err(a, e) <= TOL, label
    assert len(actual) == len(expected)


CONFIGS = [
    dict(num_layers=n, bidirectional=bi, proj_size=p)
    for n, bi, p in itertools.product([1, 2, 3], [False, True], [0, 3])
] + [
    dict(bias=False),
    dict(num_layers=2, bias=False, bidirectional=True),
    dict(batch_first=True),
    dict(num_layers=2, batch_first=True, bidirectional=True, proj_size=2),
    dict(num_layers=3, dropout=0.5),  # eval mode: dropout is off in both
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
def test_batched_parity(backend, config, with_state):
    theirs, ours = twins(backend, input_size=5, hidden_size=7, **config)
    T, B = 6, 3
    shape = (B, T, 5) if config.get("batch_first") else (T, B, 5)
    x = rand(*shape, backend=backend)
    hx = None
    if with_state:
        D = 2 if config.get("bidirectional") else 1
        L = config.get("num_layers", 1)
        P = config.get("proj_size") or 7
        hx = (rand(D * L, B, P, backend=backend), rand(D * L, B, 7, backend=backend))
    assert_same(theirs, ours, [x], hx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3), dict(batch_first=True)]
)
def test_unbatched_parity(backend, config):
    theirs, ours = twins(backend, input_size=5, hidden_size=7, **config)
    x = rand(6, 5, backend=backend)
    D = 2 if config.get("bidirectional") else 1
    L, P = config.get("num_layers", 1), config.get("proj_size") or 7
    hx = (rand(D * L, P, backend=backend), rand(D * L, 7, backend=backend))
    assert_same(theirs, ours, [x], hx)
    assert_same(theirs, ours, [x])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=2, bidirectional=True, proj_size=3)],
)
def test_packed_parity_unsorted_lengths(backend, config):
    theirs, ours = twins(backend, input_size=5, hidden_size=7, **config)
    lengths = [3, 6, 1, 4]  # unsorted: enforce_sorted=False, so sorted/unsorted indices are used
    seqs = [rand(n, 5, backend=backend) for n in lengths]
    D = 2 if config.get("bidirectional") else 1
    L, P = config.get("num_layers", 1), config.get("proj_size") or 7
    hx = (rand(D * L, 4, P, backend=backend), rand(D * L, 4, 7, backend=backend))
    assert_same(theirs, ours, seqs, hx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_output_is_a_packed_sequence_like_torchs(backend):
    theirs, ours = twins(backend, input_size=2, hidden_size=3, bidirectional=True)
    packed = pack_sequence([rand(n, 2, backend=backend) for n in (2, 5, 3)], enforce_sorted=False)
    out_t, _ = theirs(packed.to("cpu"))  # the oracle twin runs on the CPU
    out_o, _ = ours(packed)
    assert isinstance(out_o, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out_o.batch_sizes, out_t.batch_sizes)
    assert torch.equal(out_o.sorted_indices.cpu(), out_t.sorted_indices)
    assert torch.equal(out_o.unsorted_indices.cpu(), out_t.unsorted_indices)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_cell_parity(backend, bias, batched):
    torch.manual_seed(0)
    device = device_for(backend)
    theirs = torch.nn.LSTMCell(5, 7, bias=bias, dtype=torch.float64, device=device)
    ours = lstmlab.LSTMCell(5, 7, bias=bias, dtype=torch.float64, device=device, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    shape = (3,) if batched else ()
    x = rand(*shape, 5, backend=backend)
    h0, c0 = rand(*shape, 7, backend=backend), rand(*shape, 7, backend=backend)

    def run(cell):
        leaves = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
        h, c = cell(leaves[0], (leaves[1], leaves[2]))
        loss = (h * torch.linspace(-1, 1, 7, dtype=torch.float64, device=device)).sum() + c.pow(2).sum()
        return [h, c, *torch.autograd.grad(loss, [*cell.parameters(), *leaves])]

    for a, e in zip(run(ours), run(theirs), strict=True):
        assert rel_err(a, e) <= TOL
    h, c = ours(x)  # zero state when hx is omitted
    h_t, c_t = theirs(x)
    assert rel_err(h, h_t) <= TOL and rel_err(c, c_t) <= TOL


@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True, proj_size=3), dict(bias=False)])
def test_same_seed_gives_torchs_initial_weights_and_state_dict_round_trips(kwargs):
    torch.manual_seed(123)
    theirs = torch.nn.LSTM(4, 6, **kwargs)
    torch.manual_seed(123)
    ours = lstmlab.LSTM(4, 6, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    back = torch.nn.LSTM(4, 6, **kwargs)
    back.load_state_dict(ours.state_dict())  # and back: lstmlab -> torch
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(back(x)[0], ours(x)[0], rtol=1e-6, atol=1e-6)


def test_cell_same_seed_gives_torchs_initial_weights():
    torch.manual_seed(7)
    theirs = torch.nn.LSTMCell(4, 6)
    torch.manual_seed(7)
    ours = lstmlab.LSTMCell(4, 6)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_training_mode_dropout_is_applied_between_layers_only():
    torch.manual_seed(0)
    model = lstmlab.LSTM(3, 8, num_layers=2, dropout=0.5)
    x = torch.randn(4, 2, 3)
    model.eval()
    eval_out = model(x)[0]
    model.train()
    torch.manual_seed(1)
    out1 = model(x)[0]
    torch.manual_seed(1)
    out2 = model(x)[0]
    assert torch.equal(out1, out2)  # dropout draws from torch's RNG: reproducible by seed
    assert not torch.allclose(out1, eval_out)
    single = lstmlab.LSTM(3, 8, num_layers=1)  # no layer after the last: dropout never applies
    single.train()
    assert torch.equal(single(x)[0], single.eval()(x)[0])


def test_forget_bias_and_chrono_init():
    H = 16
    torch.manual_seed(0)
    plain = lstmlab.LSTM(3, H, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    fb = lstmlab.LSTM(3, H, num_layers=2, bidirectional=True, forget_bias=1.0)
    for name, p in fb.named_parameters():
        q = dict(plain.named_parameters())[name]
        if name.startswith("bias_ih"):
            torch.testing.assert_close(p[H : 2 * H], q[H : 2 * H] + 1.0)
            assert torch.equal(p[:H], q[:H]) and torch.equal(p[2 * H :], q[2 * H :])
        else:
            assert torch.equal(p, q), name
    chrono = lstmlab.LSTMCell(3, H, chrono_t_max=100)
    b_f = chrono.bias_ih[H : 2 * H]
    assert torch.all(b_f >= 0) and torch.all(b_f <= torch.log(torch.tensor(99.0)))
    torch.testing.assert_close(chrono.bias_ih[:H], -b_f)
    assert torch.all(chrono.bias_hh[: 2 * H] == 0)
    # the forget gate at zero input stays open for about T_max steps at most
    assert b_f.max() > 2.0


TRITON_BACKENDS = [pytest.param(b, marks=needs_triton) for b in ("triton_step", "triton_persistent")]


@pytest.mark.parametrize("backend", ["reference", "cpu", *TRITON_BACKENDS])
def test_last_backend_records_what_ran(backend):
    device = device_for(backend)
    model = lstmlab.LSTM(2, 3, backend=backend, device=device)
    assert model.last_backend is None
    model(torch.randn(4, 1, 2, device=device))
    assert model.last_backend == backend
    cell_backend = backend if backend in ("reference", "cpu") else "triton_step"
    cell = lstmlab.LSTMCell(2, 3, backend=cell_backend, device=device)
    cell(torch.randn(1, 2, device=device))
    assert cell.last_backend == cell_backend


@needs_triton
def test_triton_means_per_step_on_a_cpu_and_for_a_cell():
    device = device_for("triton")
    model = lstmlab.LSTM(2, 3, backend="triton", device=device)
    model(torch.randn(4, 1, 2, device=device))
    expected = ("triton_persistent", "triton_step") if device == "cuda" else ("triton_step",)
    assert model.last_backend in expected
    cell = lstmlab.LSTMCell(2, 3, backend="triton", device=device)
    cell(torch.randn(1, 2, device=device))
    assert cell.last_backend == "triton_step"


@needs_triton
@pytest.mark.parametrize(
    "config",
    [dict(num_layers=2, bidirectional=True), dict(batch_first=True, bias=False)],
    ids=["bidirectional-2-layers", "batch_first-no-bias"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_persistent_parity(config, packed):
    """backend='triton_persistent' (one launch per layer and direction on a GPU; on a CPU the same
    kernel body, one launch per step, through the interpreter) against torch.nn.LSTM in float64."""
    theirs, ours = twins("triton_persistent", input_size=5, hidden_size=7, **config)
    D, L = (2 if config.get("bidirectional") else 1), config.get("num_layers", 1)
    if packed:
        inputs = [rand(n, 5, backend="triton_persistent") for n in (3, 6, 1, 4)]
        B = 4
    else:
        B = 3
        inputs = [rand(*((B, 6) if config.get("batch_first") else (6, B)), 5, backend="triton_persistent")]
    hx = (rand(D * L, B, 7, backend="triton_persistent"), rand(D * L, B, 7, backend="triton_persistent"))
    assert_same(theirs, ours, inputs, hx)
    assert ours.last_backend == "triton_persistent"


def test_non_contiguous_input_and_state():
    theirs, ours = twins("reference", input_size=4, hidden_size=5, num_layers=2)
    x = torch.randn(4, 7, 6, dtype=torch.float64)[:, ::2, :4]  # strided [T, B=4, I=4]
    h = torch.randn(4, 2, 5, dtype=torch.float64).transpose(0, 1)  # [2, 4, 5], non-contiguous
    c = torch.randn(4, 2, 5, dtype=torch.float64).transpose(0, 1)
    assert not x.is_contiguous() and not h.is_contiguous()
    assert_same(theirs, ours, [x], (h, c))


def test_cpu_autocast_runs_in_the_autocast_dtype_and_trains_fp32_weights():
    """Under autocast the layer runs in bf16 and computes what it computes in fp32, to bf16
    precision, gradients included; the weights and their gradients stay fp32."""
    torch.manual_seed(0)
    model = lstmlab.LSTM(4, 6, num_layers=2)
    x = torch.randn(5, 3, 4)
    expected, (expected_h, expected_c) = model(x)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = model(x)
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    for actual, want in ((out, expected), (h, expected_h), (c, expected_c)):
        assert rel_err(actual, want) <= 2e-2  # bf16 keeps 8 bits: 2^-8 per rounding, a few roundings
    grads = torch.autograd.grad(out.float().sum(), list(model.parameters()))
    names = [name for name, _ in model.named_parameters()]
    for name, g, want in zip(names, grads, expected_grads, strict=True):
        assert g.dtype == torch.float32, name
        assert rel_err(g, want) <= 5e-2, name


@pytest.mark.parametrize("module", ["lstmlab.modules", "lstmlab.kernels.layer"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0, result


def test_repr_names_every_non_default_keyword():
    """Both modules share one extra_repr (the base class): opt-in keywords show in both."""
    assert repr(lstmlab.LSTMCell(3, 4, bias=True, forget_bias=1.0)) == "LSTMCell(3, 4, forget_bias=1.0)"
    assert repr(lstmlab.LSTMCell(3, 4, chrono_t_max=10, backend="reference")) == (
        "LSTMCell(3, 4, backend='reference', chrono_t_max=10)"
    )
    assert repr(lstmlab.LSTM(3, 4, num_layers=2, proj_size=2, forget_bias=1.0)) == (
        "LSTM(3, 4, num_layers=2, proj_size=2, forget_bias=1.0)"
    )
