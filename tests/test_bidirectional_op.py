"""Both directions of a bidirectional layer in one call of the layer op (`kernels/layer.py`,
:func:`lstm_layer_both_directions`), which the persistent kernels run as one launch each way.

Checked against the reference backend (one call per direction) in fp64: outputs, h_n, c_n and every
gradient, packed too, in inference, under double backward, torch.func, torch.compile and
torch.export. A spy on the persistent backend records the leading shape of each call: (2,) is both
directions at once, () one direction. Without a GPU the kernels run through Triton's interpreter.
"""

import dataclasses

import pytest
import torch
from _utils import device_for, rel_err
from lstmlab.kernels import HAS_TRITON, backends, lstm_layer, lstm_layer_both_directions
from torch.nn.utils.rnn import pack_padded_sequence

import lstmlab

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = device_for("triton_persistent")
T, B, I, H = 6, 4, 3, 5
LENGTHS = [6, 5, 3, 2]  # a packed batch, sorted
TOL = 1e-10  # fp64 on both sides, products summed in different orders


@pytest.fixture
def calls(monkeypatch):
    """("fwd" | "bwd", leading shape) of every call of the persistent backend, in order."""
    seen = []
    impl = backends._Persistent
    forward, backward = impl.forward, impl.backward

    def spy_forward(gx, *args, **kwargs):
        seen.append(("fwd", tuple(gx.shape[:-3])))
        return forward(gx, *args, **kwargs)

    def spy_backward(d_hs, *args, **kwargs):
        seen.append(("bwd", tuple(d_hs.shape[:-3])))
        return backward(d_hs, *args, **kwargs)

    monkeypatch.setattr(impl, "forward", staticmethod(spy_forward))
    monkeypatch.setattr(impl, "backward", staticmethod(spy_backward))
    return seen


def twins(num_layers=2, **kwargs):
    """lstmlab.LSTM on the reference backend and on the persistent kernels, same weights, fp64."""
    torch.manual_seed(0)
    options = dict(num_layers=num_layers, bidirectional=True, dtype=torch.float64, device=DEVICE, **kwargs)
    reference = lstmlab.LSTM(I, H, backend="reference", **options)
    persistent = lstmlab.LSTM(I, H, backend="triton_persistent", **options)
    persistent.load_state_dict(reference.state_dict())
    return reference, persistent


def inputs(num_layers=2, seed=1):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    return rand(T, B, I), rand(2 * num_layers, B, H), rand(2 * num_layers, B, H)


def run(model, x, h0, c0, packed):
    """Outputs and the gradients of a fixed random function of them w.r.t. x, h0, c0 and every
    parameter."""
    out, (h_n, c_n) = model(pack_padded_sequence(x, LENGTHS) if packed else x, (h0, c0))
    out = out.data if packed else out
    g = torch.Generator().manual_seed(7)
    loss = sum(
        (t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum() for t in (out, h_n, c_n)
    )
    return (out, h_n, c_n), torch.autograd.grad(loss, [x, h0, c0, *model.parameters()])


@pytest.mark.parametrize(
    ("packed", "options"),
    [(False, {}), (True, {}), (False, {"bias": False})],
    ids=["full", "packed", "no-bias"],
)
def test_one_call_per_layer_runs_both_directions(packed, options, calls, poisoned_buffers):
    """Two layers: one forward and one backward call per layer, both directions each, and the same
    outputs and gradients as the reference running one direction per call."""
    reference, persistent = twins(**options)
    x, h0, c0 = inputs()
    want_out, want_grads = run(reference, x, h0, c0, packed)
    got_out, got_grads = run(persistent, x, h0, c0, packed)
    assert calls == [("fwd", (2,)), ("fwd", (2,)), ("bwd", (2,)), ("bwd", (2,))]
    assert persistent.last_backend == "triton_persistent"
    for name, got, want in zip(("out", "h_n", "c_n"), got_out, want_out, strict=True):
        assert rel_err(got, want) < TOL, name
    names = ["x", "h0", "c0", *(name for name, _ in persistent.named_parameters())]
    for name, got, want in zip(names, got_grads, want_grads, strict=True):
        assert rel_err(got, want) < TOL, name


def test_inference_runs_both_directions_at_once(calls, poisoned_buffers):
    reference, persistent = twins(num_layers=1)
    x, h0, c0 = inputs(num_layers=1)
    with torch.no_grad():
        want = reference(x, (h0, c0))
        got = persistent(x, (h0, c0))
    assert calls == [("fwd", (2,))]
    for got_t, want_t in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert rel_err(got_t, want_t) < TOL


def test_one_direction_per_call_where_the_backend_says_no(calls, monkeypatch):
    """Where the backend cannot hold both directions at once (here: told so), each direction is a
    call of its own, with the same results."""
    row = backends.TABLE["triton_persistent"]
    refuses = dataclasses.replace(row, both_directions_reason=lambda *shape: "no room for both grids")
    monkeypatch.setitem(backends.TABLE, "triton_persistent", refuses)
    reference, persistent = twins(num_layers=1)
    x, h0, c0 = inputs(num_layers=1)
    want_out, want_grads = run(reference, x, h0, c0, packed=False)
    got_out, got_grads = run(persistent, x, h0, c0, packed=False)
    assert calls == [("fwd", ()), ("fwd", ()), ("bwd", ()), ("bwd", ())]
    for got, want in zip((*got_out, *got_grads), (*want_out, *want_grads), strict=True):
        assert rel_err(got, want) < TOL


def test_a_cell_variant_runs_one_direction_per_call(calls):
    _, peepholes = twins(num_layers=1, peepholes=True)
    with torch.no_grad():
        peepholes(inputs(num_layers=1)[0])
    assert calls == [("fwd", ()), ("fwd", ())]


def test_double_backward_through_both_directions(calls):
    """create_graph=True: the op's backward recomputes both directions in differentiable ops."""
    reference, persistent = twins(num_layers=1)
    x, _, _ = inputs(num_layers=1)
    results = []
    for model in (reference, persistent):
        out, _ = model(x)
        (d_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(d_x.pow(2).sum(), [x, *model.parameters()]))
    # the create_graph backward recomputed the layer; the second one reaches the op's output through
    # ∂(out²)/∂out = 2·out and runs the fused backward once
    assert calls == [("fwd", (2,)), ("bwd", (2,))]
    for got, want in zip(results[1], results[0], strict=True):
        assert rel_err(got, want) < TOL


def test_torch_func_jvp_of_a_bidirectional_layer(calls):
    """Under torch.func the layer runs in differentiable ops, one direction per call (composite)."""
    reference, persistent = twins(num_layers=1)
    x, _, _ = inputs(num_layers=1)
    tangent = torch.randn_like(x)
    results = [
        torch.func.jvp(lambda x, m=m: m(x)[0], (x.detach(),), (tangent,)) for m in (reference, persistent)
    ]
    assert calls == [] and persistent.last_backend == "composite"
    for got, want in zip(results[1], results[0], strict=True):
        assert rel_err(got, want) < TOL


@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
def test_compiled_and_exported_layers_call_the_op_once_per_layer(packed, calls):
    reference, persistent = twins()
    x, h0, c0 = inputs()
    compiled = torch.compile(persistent, backend="aot_eager", fullgraph=True)
    want_out, want_grads = run(reference, x, h0, c0, packed)
    got_out, got_grads = run(compiled, x, h0, c0, packed)
    assert calls == [("fwd", (2,)), ("fwd", (2,)), ("bwd", (2,)), ("bwd", (2,))]
    for got, want in zip((*got_out, *got_grads), (*want_out, *want_grads), strict=True):
        assert rel_err(got, want) < TOL
    if packed:
        return
    exported = torch.export.export(persistent, (x.detach(), (h0.detach(), c0.detach())))
    layer_ops = [n for n in exported.graph.nodes if n.target == torch.ops.lstmlab.lstm_layer_fwd.default]
    assert len(layer_ops) == 2
    got = exported.module()(x.detach(), (h0.detach(), c0.detach()))
    assert rel_err(got[0], want_out[0]) < TOL


def test_the_function_matches_two_one_direction_layers():
    torch.manual_seed(3)
    x, h0, c0 = inputs(num_layers=1)
    w_ih = torch.randn(2, 4 * H, I, dtype=torch.float64, device=DEVICE)
    w_hh = torch.randn(2, 4 * H, H, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(2, 4 * H, dtype=torch.float64, device=DEVICE)
    sizes = torch.tensor([4, 4, 3, 3, 2, 1])  # a packed batch's sizes: the reverse direction starts late
    out, h_n, c_n = lstm_layer_both_directions(x, h0, c0, w_ih, bias, w_hh, sizes)
    forward = lstm_layer(x, h0[0], c0[0], w_hh[0], batch_sizes=sizes, w_ih=w_ih[0], bias=bias[0])
    reverse = lstm_layer(
        x.flip(0), h0[1], c0[1], w_hh[1], batch_sizes=sizes.flip(0), w_ih=w_ih[1], bias=bias[1]
    )
    assert rel_err(out, torch.cat([forward[0], reverse[0].flip(0)], dim=-1)) < TOL
    assert rel_err(h_n, torch.stack([forward[1], reverse[1]])) < TOL
    assert rel_err(c_n, torch.stack([forward[2], reverse[2]])) < TOL


def test_the_function_says_what_it_expected():
    x, h0, c0 = (t.detach() for t in inputs(num_layers=1))
    w_ih = torch.zeros(2, 4 * H, I, dtype=torch.float64, device=DEVICE)
    w_hh = torch.zeros(2, 4 * H, H, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"backend 'reference' runs one direction per call.*lstm_layer"):
        lstm_layer_both_directions(x, h0, c0, w_ih, None, w_hh, backend="reference")
    with pytest.raises(ValueError, match=rf"w_ih must be \[2, 4H, {I}\], got shape \(20, 3\)"):
        lstm_layer_both_directions(x, h0, c0, w_ih[0], None, w_hh)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 4, 5\), got \(4, 5\)"):
        lstm_layer_both_directions(x, h0[0], c0, w_ih, None, w_hh)
