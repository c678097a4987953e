"""torch.compile, torch.export and CUDA graphs see the layer as registered operators and agree with
eager torch.nn.LSTM on the same weights: outputs, h_n, c_n and every gradient.

Most tests compile with the ``aot_eager`` backend: it runs Dynamo and AOTAutograd exactly as the
default compiler does (the graph, the fake tensors, the joint forward-backward), without Inductor's
C++ compile, which costs tens of seconds per graph on a 2-core CPU. Two tests run the default
Inductor compiler end to end.
"""

import io
import warnings

import pytest
import torch
from _utils import rel_err
from lstmlab.kernels import HAS_TRITON, lstm_layer_bwd, lstm_layer_fwd
from lstmlab.kernels.layer import LayerOutputs
from lstmlab.kernels.packed import pack_padded, pad_packed
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import lstmlab

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 round-off: both sides are fp32 and sum in different orders; on a GPU the Triton kernels' exp
# and cuBLAS against cuDNN add a little (the same bound as tests/test_cuda.py)
TOL = 1e-4 if DEVICE == "cuda" else 1e-5

CONFIGS = {
    "plain": dict(),
    "batch_first": dict(batch_first=True),
    "bidirectional-2-layers": dict(num_layers=2, bidirectional=True),
    "proj_size": dict(num_layers=2, proj_size=3),
    "no-bias-bidirectional-proj": dict(bias=False, bidirectional=True, proj_size=4),
}
# (lengths of the sequences in a packed batch, enforce_sorted): unsorted carries the batch size in
# sorted_indices; sorted makes it a data-dependent size inside the graph
PACKED = {"packed-unsorted": ([4, 6, 2], False), "packed-sorted": ([6, 4, 4, 1], True)}


def twins(device=DEVICE, backend="auto", **kwargs):
    """torch.nn.LSTM and lstmlab.LSTM on the same weights."""
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(5, 7, device=device, **kwargs)
    ours = lstmlab.LSTM(5, 7, device=device, backend=backend, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def make_input(seed, T=6, B=3, batch_first=False, lengths=None, enforce_sorted=True, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    if lengths is not None:
        seqs = [torch.randn(n, 5, generator=g).to(device).requires_grad_() for n in lengths]
        return seqs, lambda: pack_sequence(seqs, enforce_sorted=enforce_sorted)  # a fresh graph per call
    x = torch.randn(*((B, T) if batch_first else (T, B)), 5, generator=g).to(device).requires_grad_()
    return [x], lambda: x


def outputs_and_grads(model, leaves, make_x):
    """Outputs of the model and the gradients of a fixed random projection of them w.r.t. every
    parameter and input."""
    out, (h_n, c_n) = model(make_x())
    out = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in (out, h_n, c_n))
    return [out, h_n, c_n, *torch.autograd.grad(loss, [*model.parameters(), *leaves])]


def assert_same(compiled, eager, leaves, make_x, labels):
    actual = outputs_and_grads(compiled, leaves, make_x)
    expected = outputs_and_grads(eager, leaves, make_x)
    assert len(actual) == len(expected) == len(labels)
    for label, a, e in zip(labels, actual, expected, strict=True):
        assert rel_err(a, e) <= TOL, f"{label}: {rel_err(a, e):.2e}"


def labels_for(model, n_inputs):
    return ["out", "h_n", "c_n", *(f"grad {n}" for n, _ in model.named_parameters())] + [
        f"grad input{i}" for i in range(n_inputs)
    ]


@pytest.fixture(autouse=True)
def fresh_dynamo_and_no_tf32():
    """Each test compiles afresh; on a GPU, fp32 products stay fp32 on both sides (no TF32)."""
    torch._dynamo.reset()
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    torch._dynamo.reset()


@pytest.mark.parametrize("name", [*CONFIGS, *PACKED])
def test_fullgraph_compile_matches_torch_lstm(name):
    """No graph break (fullgraph=True), right answers, again with new values of the same shape
    (nothing stale is cached), and again at a new shape (a recompile or dynamic shapes)."""
    kwargs = CONFIGS.get(name, {})
    theirs, ours = twins(**kwargs)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    if name in PACKED:
        lengths, enforce_sorted = PACKED[name]
        calls = [(lengths, 0), (lengths, 1), ([7, 3, 5, 5, 2], 2)]
        for lengths_k, seed in calls:
            if enforce_sorted:
                lengths_k = sorted(lengths_k, reverse=True)
            leaves, x = make_input(seed, lengths=lengths_k, enforce_sorted=enforce_sorted)
            assert_same(compiled, theirs, leaves, x, labels_for(theirs, len(leaves)))
    else:
        for seed, (T, B) in enumerate([(6, 3), (6, 3), (9, 4)]):
            leaves, x = make_input(seed, T, B, batch_first=kwargs.get("batch_first", False))
            assert_same(compiled, theirs, leaves, x, labels_for(theirs, 1))
    on_gpu = DEVICE == "cuda" and HAS_TRITON
    assert ours.last_backend in (("triton_persistent", "triton_step") if on_gpu else ("cpu",))


def test_fullgraph_compile_with_initial_state_and_unbatched_input():
    theirs, ours = twins(num_layers=2)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(3)
    hx = tuple(torch.randn(2, 3, 7, generator=g).to(DEVICE) for _ in range(2))
    x = torch.randn(6, 3, 5, generator=g).to(DEVICE)
    for a, e in zip(compiled(x, hx)[1], theirs(x, hx)[1], strict=True):
        assert rel_err(a, e) <= TOL
    unbatched = x[:, 0]
    out, (h_n, _) = compiled(unbatched)
    expected, (expected_h_n, _) = theirs(unbatched)
    assert out.shape == (6, 7) and h_n.shape == (2, 7)
    assert rel_err(out, expected) <= TOL and rel_err(h_n, expected_h_n) <= TOL


def test_lstm_cell_compiles_without_graph_break():
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(5, 7, device=DEVICE)
    ours = lstmlab.LSTMCell(5, 7, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    h, c = compiled(x)
    h_ref, c_ref = theirs(x)
    assert rel_err(h, h_ref) <= TOL and rel_err(c, c_ref) <= TOL
    grads = torch.autograd.grad((h * c).sum(), [x, *ours.parameters()])
    grads_ref = torch.autograd.grad((h_ref * c_ref).sum(), [x, *theirs.parameters()])
    for a, e in zip(grads, grads_ref, strict=True):
        assert rel_err(a, e) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["no-bias-bidirectional-proj", "packed-unsorted"])
def test_default_inductor_compile_matches_torch_lstm(name):
    """``torch.compile(model)`` as users write it: Inductor, graph breaks allowed (there are none)."""
    kwargs = CONFIGS.get(name, {})
    theirs, ours = twins(**kwargs)
    compiled = torch.compile(ours)
    if name in PACKED:
        leaves, x = make_input(0, lengths=PACKED[name][0], enforce_sorted=False)
    else:
        leaves, x = make_input(0)
    assert_same(compiled, theirs, leaves, x, labels_for(theirs, len(leaves)))


def test_export_round_trip():
    """torch.export, saved and loaded again, computes the eager function, also at another batch."""
    theirs, ours = twins(num_layers=2, bidirectional=True, proj_size=3)
    x = torch.randn(6, 3, 5, device=DEVICE)
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(ours, (x,), dynamic_shapes=({1: batch},))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for B in (3, 5):
        x_b = torch.randn(6, B, 5, device=DEVICE)
        out, (h_n, c_n) = loaded(x_b)
        expected, (expected_h_n, expected_c_n) = theirs(x_b)
        assert out.shape == (6, B, 6)
        for a, e in ((out, expected), (h_n, expected_h_n), (c_n, expected_c_n)):
            assert rel_err(a, e) <= TOL
    assert "lstmlab.lstm_layer_fwd" in str(exported.graph)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_export_with_the_persistent_backend_checks_the_shape_on_real_tensors(monkeypatch):
    """On a GPU the persistent kernels' shape check compiles them on tensors it allocates: under
    torch.export those must be real, not the tracer's fake ones (checked here with a spy)."""
    from lstmlab.kernels import triton_persistent
    from torch._subclasses.fake_tensor import FakeTensor

    seen = []
    real_check = triton_persistent.persistent_unavailable_reason

    def spy(batch, hidden, dtype, device, *rest, **kwargs):  # rest: flags, directions
        seen.append(type(torch.zeros(1, device=device)))
        return real_check(batch, hidden, dtype, device, *rest, **kwargs)

    monkeypatch.setattr(triton_persistent, "persistent_unavailable_reason", spy)
    theirs, ours = twins(backend="triton_persistent")
    x = torch.randn(6, 3, 5, device=DEVICE)
    exported = torch.export.export(ours, (x,))
    assert seen and not any(issubclass(t, FakeTensor) for t in seen)
    assert rel_err(exported.module()(x)[0], theirs(x)[0]) <= TOL


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("backend", ["triton_step", "triton_persistent"])
def test_triton_backends_under_compile(backend):
    """The Triton kernels inside the compiled graph (through the interpreter on a CPU), packed too."""
    theirs, ours = twins(backend=backend, bidirectional=True)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    leaves, x = make_input(0)
    assert_same(compiled, theirs, leaves, x, labels_for(theirs, 1))
    leaves, x = make_input(1, lengths=[4, 6, 2], enforce_sorted=False)
    assert_same(compiled, theirs, leaves, x, labels_for(theirs, 3))
    for seed, (T, B) in enumerate([(8, 5), (9, 2)], start=2):  # new batch sizes: dynamic shapes
        leaves, x = make_input(seed, T, B)
        assert_same(compiled, theirs, leaves, x, labels_for(theirs, 1))
    assert ours.last_backend == backend


def layer_args(with_w_ih, proj, packed, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    T, B, I, H = 4, 3, 5, 6
    P = 2 if proj else H

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE).requires_grad_()

    x = rand(T, B, I) if with_w_ih else rand(T, B, 4 * H)
    w_ih, bias = (rand(4 * H, I), rand(4 * H)) if with_w_ih else (None, None)
    sizes = torch.tensor([3, 2, 2, 1]) if packed else None
    w_hr = rand(P, H) if proj else None
    cell = (None,) * 5  # the vanilla cell: flags 0, no variant tensors
    return (x, w_ih, bias, rand(B, P), rand(B, H), rand(4 * H, P), w_hr, sizes, "reference", 0, *cell, True)


OP_CASES = [(True, False, False), (False, False, False), (True, True, True), (False, True, True)]


@pytest.mark.parametrize("with_w_ih,proj,packed", OP_CASES)
def test_opcheck_layer_ops(with_w_ih, proj, packed):
    """Schema (no input mutated, no output aliasing), fake tensors, autograd registration and
    AOT dispatch with dynamic shapes, for the forward op; the backward op runs inside the latter."""
    args = layer_args(with_w_ih, proj, packed)
    torch.library.opcheck(lstm_layer_fwd, args)
    out = LayerOutputs(*lstm_layer_fwd(*args))
    x, w_ih, _, _, _, w_hh, w_hr, sizes, backend, flags, *cell, _save = args
    d_hs, d_out, d_cn = torch.randn_like(out.hs), torch.randn_like(out.out_packed), torch.randn_like(out.c_n)
    needs = [True, with_w_ih, with_w_ih, True, proj, False, False, False]
    bwd_args = (d_hs, d_out, d_cn, out.hs, out.cs, out.gates, out.h_raw, out.c_new, out.ln_saved, x, w_ih,
                w_hh, w_hr, sizes, backend, flags, *cell, needs)  # fmt: skip
    torch.library.opcheck(lstm_layer_bwd, tuple(a.detach() if torch.is_tensor(a) else a for a in bwd_args))


def test_opcheck_packing_ops():
    data = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    sizes = torch.tensor([3, 2, 1, 1])
    torch.library.opcheck(pad_packed, (data, sizes, 3))
    torch.library.opcheck(pad_packed, (data, sizes))
    padded = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(pack_padded, (padded, sizes, 7))
    with pytest.raises(RuntimeError, match="Expected a batch of 4 sequences"):
        pad_packed(data, sizes, 4)


# ---- eager CPU inference runs the op's implementation without the op (kernels/layer.py,
# _plain_eager); everything that records or intercepts ops still sees the op ----


@pytest.fixture
def op_calls(monkeypatch):
    """The layer's calls of the forward op (which still runs)."""
    from lstmlab.kernels import layer

    calls = []

    def counted(*args):
        calls.append(args)
        return lstm_layer_fwd(*args)

    monkeypatch.setattr(layer, "lstm_layer_fwd", counted)
    return calls


def test_eager_cpu_inference_skips_the_op_and_computes_the_same(op_calls):
    theirs, ours = twins("cpu", backend="reference", num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        out, (h_n, c_n) = ours(x)  # a module's weights are Parameters: still plain tensors
        expected, (expected_h, expected_c) = theirs(x)
    assert op_calls == []
    for a, e in ((out, expected), (h_n, expected_h), (c_n, expected_c)):
        assert rel_err(a, e) <= 1e-5
    out_grad, _ = ours(x)  # a backward may follow: the op, whose autograd saves what it needs
    assert len(op_calls) == 4 and torch.equal(out_grad.detach(), out)


def test_ops_are_seen_by_modes_and_the_profiler_in_inference(op_calls):
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class FunctionNames(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    ours = lstmlab.LSTM(4, 6, backend="reference")
    x = torch.randn(5, 3, 4)
    with torch.no_grad(), Names() as mode:
        ours(x)
    assert "lstmlab.lstm_layer_fwd.default" in mode.names
    with torch.no_grad(), FunctionNames() as function_mode:
        ours(x)
    assert "lstmlab.lstm_layer_fwd.default" in function_mode.names
    with torch.no_grad(), torch.profiler.profile() as prof:
        ours(x)
    assert "lstmlab::lstm_layer_fwd" in {e.key for e in prof.key_averages()}
    assert len(op_calls) == 3


def test_compiled_inference_records_the_op():
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    theirs, ours = twins("cpu", backend="reference")
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        out, _ = torch.compile(ours, backend=keep_graph, fullgraph=True)(x)
        expected, _ = theirs(x)
    assert len(graphs) == 1 and "torch.ops.lstmlab.lstm_layer_fwd.default" in graphs[0]
    assert rel_err(out, expected) <= 1e-5


def test_a_torchscript_trace_of_inference_records_the_op(op_calls):
    from lstmlab.kernels import lstm_layer_from_input

    w_ih, w_hh, zeros = torch.randn(24, 4), torch.randn(24, 6), torch.zeros(3, 6)

    def layer(x):
        return lstm_layer_from_input(x, w_ih, None, zeros, zeros, w_hh)[0]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape checks become constants
        traced = torch.jit.trace(layer, torch.randn(5, 3, 4), check_trace=False)
    assert "lstmlab::lstm_layer_fwd" in str(traced.graph) and len(op_calls) == 1


@pytest.mark.cuda
def test_make_graphed_callables_matches_eager():
    theirs, ours = twins("cuda", num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 5, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(ours, (x,))
    for seed in (0, 1):  # replays with new values in the captured input buffers
        (x_k,), _ = make_input(seed, device="cuda")
        out, (h_n, c_n) = graphed(x_k)
        expected, (expected_h_n, expected_c_n) = theirs(x_k)
        for a, e in ((out, expected), (h_n, expected_h_n), (c_n, expected_c_n)):
            assert rel_err(a, e) <= TOL
        loss = out.square().sum() + h_n.sum() + c_n.sum()
        loss_ref = expected.square().sum() + expected_h_n.sum() + expected_c_n.sum()
        grads = torch.autograd.grad(loss, [*ours.parameters(), x_k])
        grads_ref = torch.autograd.grad(loss_ref, [*theirs.parameters(), x_k])
        for a, e in zip(grads, grads_ref, strict=True):
            assert rel_err(a, e) <= TOL


@pytest.mark.cuda
def test_reduce_overhead_compile_matches_eager():
    theirs, ours = twins("cuda", proj_size=3)
    compiled = torch.compile(ours, mode="reduce-overhead", fullgraph=True)
    for seed in range(3):  # warm-up, record, replay
        leaves, x = make_input(seed, device="cuda")
        assert_same(compiled, theirs, leaves, x, labels_for(theirs, 1))
