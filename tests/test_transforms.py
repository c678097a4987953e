"""lstmlab.LSTM / LSTMCell under torch.func transforms, forward-mode AD and double backward: the
values torch.nn.LSTM gives (vanilla, float64, 1e-8), and for cell variants the values our own
fused reverse-mode op gives (its Jacobian, built one row at a time by plain autograd).

f7ddefc returned zero tangents from torch.func.jvp without a word: `test_jvp_is_never_silently_zero`
is the test that would have caught it.
"""

import itertools

import pytest
import torch
from _utils import device_for, rel_err
from lstmlab.kernels import HAS_TRITON
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.nn.utils.rnn import pack_padded_sequence

import lstmlab

TOL = 1e-8
T, B, I, H = 4, 3, 3, 4
DT = torch.float64

CONFIGS = {
    "one_layer": {},
    "two_layers_bidirectional": {"num_layers": 2, "bidirectional": True},
    "batch_first": {"batch_first": True},
    "proj_size": {"proj_size": 2},
    "no_bias": {"bias": False},
}


def twins(config, seed=0, **options):
    """lstmlab.LSTM and torch.nn.LSTM with the same weights, float64, eval mode."""
    torch.manual_seed(seed)
    ours = lstmlab.LSTM(I, H, dtype=DT, **config, **options).eval()
    theirs = torch.nn.LSTM(I, H, dtype=DT, **config).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def inputs(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, I) if config.get("batch_first") else (T, B, I)
    return torch.randn(shape, generator=g, dtype=DT), torch.randn(shape, generator=g, dtype=DT)


def initial_state(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    D = 2 if model.bidirectional else 1
    P = model.proj_size or model.hidden_size
    h0 = torch.randn(model.num_layers * D, B, P, generator=g, dtype=DT)
    return h0, torch.randn(model.num_layers * D, B, model.hidden_size, generator=g, dtype=DT)


def assert_close(actual, expected, what):
    actual, expected = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert rel_err(a, e) <= TOL, (what, i, rel_err(a, e))


def everything(model):
    """A function of the input that returns every output: output, h_n, c_n."""

    def run(x, hx=None):
        out, (h_n, c_n) = model(x, hx)
        return out, h_n, c_n

    return run


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_jvp_and_forward_ad_match_torch(config):
    ours, theirs = twins(CONFIGS[config])
    x, v = inputs(CONFIGS[config])
    hx = initial_state(ours)
    hv = tuple(torch.randn_like(s) for s in hx)
    expected = jvp(lambda x, h, c: everything(theirs)(x, (h, c)), (x, *hx), (v, *hv))
    actual = jvp(lambda x, h, c: everything(ours)(x, (h, c)), (x, *hx), (v, *hv))
    assert_close(actual, expected, "jvp")
    assert ours.last_backend == "composite"
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = everything(ours)(fwAD.make_dual(x, v))
        tangents = [fwAD.unpack_dual(t).tangent for t in out]
    with fwAD.dual_level():
        out = everything(theirs)(fwAD.make_dual(x, v))
        expected_tangents = [fwAD.unpack_dual(t).tangent for t in out]
    assert_close(tangents, expected_tangents, "forward_ad")


def test_jvp_is_never_silently_zero():
    """The defect of f7ddefc: jvp through the op returned exact zeros."""
    ours, theirs = twins({})
    x, _ = inputs({})
    tangent = jvp(lambda x: ours(x)[0], (x,), (torch.ones_like(x),))[1]
    assert tangent.abs().sum() > 0.1
    assert rel_err(tangent, jvp(lambda x: theirs(x)[0], (x,), (torch.ones_like(x),))[1]) <= TOL
    jacobian = jacfwd(lambda x: ours(x)[0].sum())(x)
    assert rel_err(jacobian, jacfwd(lambda x: theirs(x)[0].sum())(x)) <= TOL


@pytest.mark.parametrize("config", ["one_layer", "two_layers_bidirectional", "proj_size"])
def test_jacrev_jacfwd_and_hessian_match_torch(config):
    ours, theirs = twins(CONFIGS[config])
    x, _ = inputs(CONFIGS[config])
    x = x[:2, :2]  # a small Hessian: [2·2·I]²

    def scalar(model):
        return lambda x: model(x)[0].tanh().sum()

    assert_close(jacrev(everything(ours))(x), jacrev(everything(theirs))(x), "jacrev")
    assert_close(jacfwd(everything(ours))(x), jacfwd(everything(theirs))(x), "jacfwd")
    assert_close(hessian(scalar(ours))(x), hessian(scalar(theirs))(x), "hessian")


@pytest.mark.parametrize("config", ["one_layer", "two_layers_bidirectional", "batch_first", "proj_size"])
def test_vmap_over_an_extra_batch_dimension(config):
    ours, theirs = twins(CONFIGS[config])
    """torch.nn.LSTM has no batching rule (aten::lstm): the expected values are a loop over it."""
    xs = torch.stack([inputs(CONFIGS[config], seed)[0] for seed in range(3)])  # [V, T, B, I]
    looped = [everything(theirs)(x) for x in xs]
    assert_close(vmap(everything(ours))(xs), [torch.stack(t) for t in zip(*looped, strict=True)], "loop")


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no triton")
BACKENDS = ["reference", pytest.param("triton_step", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["one_layer", "two_layers_bidirectional", "proj_size"])
def test_double_backward_matches_torch(config, backend):
    """A gradient penalty: ∂/∂θ ‖∂L/∂x‖². The forward runs on the fused op; its backward, asked
    for a graph, recomputes the layer in differentiable ops."""
    device = device_for(backend)
    ours, theirs = twins(CONFIGS[config], backend=backend)  # theirs stays on the CPU: cuDNN refuses
    ours = ours.to(device)  # a backward in eval mode
    x = inputs(CONFIGS[config])[0]
    hx = initial_state(ours)

    def penalty_grads(model, device):
        x_ = x.to(device).requires_grad_()
        hx_ = tuple(s.to(device).requires_grad_() for s in hx)
        out, (h_n, c_n) = model(x_, hx_)
        loss = out.square().sum() + h_n.sum() + c_n.square().sum()
        (d_x,) = torch.autograd.grad(loss, x_, create_graph=True)
        return torch.autograd.grad(d_x.square().sum(), [*model.parameters(), *hx_])

    actual = penalty_grads(ours, device)
    assert ours.last_backend == backend  # the forward ran the op
    assert_close([g.cpu() for g in actual], penalty_grads(theirs, "cpu"), "double backward")


def test_packed_input_under_jvp_vmap_and_double_backward():
    """torch's pack_padded_sequence has no forward-mode formula, so the tangent enters through the
    PackedSequence's data."""
    ours, theirs = twins({"bidirectional": True})
    x, _ = inputs({})
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
    v = torch.randn_like(packed.data)

    def run(model):
        def f(data):
            out, (h_n, c_n) = model(packed._replace(data=data))
            return out.data, h_n, c_n

        return f

    # torch.nn.LSTM cannot take a jvp of packed input ("Cannot access data pointer"): the expected
    # tangent is J·v with J from our op's own reverse mode, the vmap's a loop over the op
    primal, tangent = jvp(lambda d: run(ours)(d)[0], (packed.data,), (v,))
    assert rel_err(primal, run(theirs)(packed.data)[0]) <= TOL
    J = op_jacobian(lambda d: run(ours)(d)[0], packed.data)  # [N, 2H, N, I]
    assert rel_err(tangent, (J * v).sum((-2, -1))) <= TOL
    datas = torch.stack([packed.data, v])
    looped = [torch.stack(t) for t in zip(*(run(ours)(d) for d in datas), strict=True)]
    assert_close(vmap(run(ours))(datas), looped, "packed vmap")
    assert rel_err(jacrev(lambda d: run(ours)(d)[0])(packed.data), J) <= TOL  # the reverse-mode path

    def penalty(model):
        data = packed.data.clone().requires_grad_()
        out, h_n, c_n = run(model)(data)
        (d_data,) = torch.autograd.grad(out.square().sum() + h_n.sum() + c_n.sum(), data, create_graph=True)
        return torch.autograd.grad(d_data.square().sum(), list(model.parameters()))

    assert_close(penalty(ours), penalty(theirs), "packed double backward")


def test_lstm_cell_under_transforms_matches_torch():
    torch.manual_seed(0)
    ours = lstmlab.LSTMCell(I, H, dtype=DT)
    theirs = torch.nn.LSTMCell(I, H, dtype=DT)
    theirs.load_state_dict(ours.state_dict())
    x, v = torch.randn(B, I, dtype=DT), torch.randn(B, I, dtype=DT)
    hx = (torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT))
    assert_close(jvp(lambda x: ours(x, hx), (x,), (v,)), jvp(lambda x: theirs(x, hx), (x,), (v,)), "cell jvp")
    assert_close(jacrev(lambda x: ours(x, hx))(x), jacrev(lambda x: theirs(x, hx))(x), "cell jacrev")
    xs = torch.randn(2, B, I, dtype=DT)
    looped = [torch.stack(t) for t in zip(*(theirs(x, hx) for x in xs), strict=True)]
    assert_close(vmap(lambda x: ours(x, hx))(xs), looped, "cell vmap")


# ---- per-sample gradients ----


def per_sample_grads(model, x, y):
    """vmap(grad(loss)) over functional_call: one gradient of every parameter per sample."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x, y):  # one sample: x [T, I], y [H]
        out, _ = functional_call(model, params, (x.unsqueeze(1),))
        return (out[-1, 0] - y).square().sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("config", ["one_layer", "two_layers_bidirectional", "proj_size"])
def test_per_sample_gradients_equal_a_loop_of_single_sample_gradients(config):
    ours, _ = twins(CONFIGS[config])
    g = torch.Generator().manual_seed(3)
    P = (ours.proj_size or H) * (2 if ours.bidirectional else 1)
    x, y = torch.randn(B, T, I, generator=g, dtype=DT), torch.randn(B, P, generator=g, dtype=DT)
    batched = per_sample_grads(ours, x, y)
    for b in range(B):
        ours.zero_grad()
        out, _ = ours(x[b].unsqueeze(1))
        (out[-1, 0] - y[b]).square().sum().backward()
        for name, p in ours.named_parameters():
            assert rel_err(batched[name][b], p.grad) <= TOL, (name, b)


# ---- cell variants: the transforms against our own fused reverse mode ----

VARIANTS = {
    "peepholes_cifg": {"peepholes": True, "cifg": True},
    "layer_norm_noaf": {"layer_norm": True, "output_activation": False},
    "gates_removed": {"input_gate": False, "output_gate": False, "peepholes": True},
}


def op_jacobian(fn, x):
    """The Jacobian of fn at x by plain reverse-mode autograd, one output element at a time: it runs
    the op's own fused backward, never a transform."""
    x = x.clone().requires_grad_()
    out = fn(x)
    rows = [torch.autograd.grad(out.reshape(-1)[k], x, retain_graph=True)[0] for k in range(out.numel())]
    return torch.stack(rows).view(*out.shape, *x.shape)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_variant_transforms_match_the_ops_reverse_mode(variant):
    torch.manual_seed(0)
    model = lstmlab.LSTM(I, H, bidirectional=True, dtype=DT, **VARIANTS[variant]).eval()
    x, v = inputs({})
    x, v = x[:3, :2], v[:3, :2]

    def out(x):
        return model(x)[0]

    J = op_jacobian(out, x)  # [T, B, 2H, T, B, I]
    assert model.last_backend in ("cpu", "reference")  # the op ran: the fused kernel where it has the cell
    expected_tangent = (J * v).sum((-3, -2, -1))
    assert rel_err(jvp(out, (x,), (v,))[1], expected_tangent) <= TOL
    assert rel_err(jacrev(out)(x), J) <= TOL
    assert rel_err(jacfwd(out)(x), J) <= TOL
    assert model.last_backend == "composite"


def test_variant_double_backward_matches_finite_differences():
    """∂/∂θ ‖∂L/∂x‖² for a variant (no torch twin): against central differences of the op's own
    first-order gradient, which runs the fused backward."""
    torch.manual_seed(0)
    model = lstmlab.LSTM(I, H, dtype=DT, peepholes=True, layer_norm=True).eval()
    x = inputs({})[0][:3, :2]

    def grad_norm(create_graph):
        x_ = x.clone().requires_grad_()
        (d_x,) = torch.autograd.grad(model(x_)[0].square().sum(), x_, create_graph=create_graph)
        return d_x.square().sum()

    (analytic,) = torch.autograd.grad(grad_norm(True), [model.weight_peephole_l0])
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    weight = model.weight_peephole_l0
    for idx in itertools.product(*map(range, analytic.shape)):
        with torch.no_grad():
            weight[idx] += eps
        up = grad_norm(False)
        with torch.no_grad():
            weight[idx] -= 2 * eps
        down = grad_norm(False)
        with torch.no_grad():
            weight[idx] += eps
        numeric[idx] = (up - down) / (2 * eps)
    assert rel_err(analytic, numeric) <= 1e-6


# ---- on a GPU ----


@pytest.mark.cuda
def test_jvp_double_backward_and_per_sample_gradients_on_cuda():
    """CUDA tensors with backend='triton': tangents, a gradient penalty and per-sample gradients
    against torch.nn.LSTM on the CPU in float64 (cuDNN has no forward-mode formula)."""
    config = {"num_layers": 2}
    ours, theirs = twins(config, backend="triton")
    ours = ours.cuda()
    x, v = inputs(config)
    actual = jvp(everything(ours), (x.cuda(),), (v.cuda(),))
    assert_close(
        [t.cpu() for t in torch.utils._pytree.tree_leaves(actual)], jvp(everything(theirs), (x,), (v,)), "jvp"
    )

    def penalty(model, x):
        x = x.clone().requires_grad_()
        (d_x,) = torch.autograd.grad(model(x)[0].square().sum(), x, create_graph=True)
        return torch.autograd.grad(d_x.square().sum(), list(model.parameters()))

    assert_close([g.cpu() for g in penalty(ours, x.cuda())], penalty(theirs, x), "double backward")
    assert ours.last_backend in ("triton_step", "triton_persistent")
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(B, T, I, generator=g, dtype=DT), torch.randn(B, H, generator=g, dtype=DT)
    batched = per_sample_grads(ours, xs.cuda(), ys.cuda())
    for b in range(B):
        theirs.zero_grad()
        out, _ = theirs(xs[b].unsqueeze(1))
        (out[-1, 0] - ys[b]).square().sum().backward()
        for name, p in theirs.named_parameters():
            assert rel_err(batched[name][b].cpu(), p.grad) <= TOL, (name, b)


def test_the_readmes_private_training_step_runs_and_clips():
    """The README's differentially private step, run as written: its clip factors are at most 1 and
    its per-sample gradients are those of single-sample backwards (checked on the first sample)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Transforms, higher-order gradients and ONNX") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the example updates its parameters in place
    lstm, head, x, y, grads = (scope[k] for k in ("lstm", "head", "x", "y", "grads"))
    assert torch.isfinite(scope["norm"]).all() and (scope["clip"] <= 1).all()
    out, _ = lstm(x[:1])
    # the example's update has run: sample 0's gradient at the updated weights, both ways
    fresh = vmap(grad(scope["loss"]), in_dims=(None, 0, 0))(scope["params"], x[:2], y[:2])
    loss = (head(out[0, -1]) - y[0]).square().sum()
    expected = torch.autograd.grad(loss, list(lstm.parameters()))
    for (name, _), e in zip(lstm.named_parameters(), expected, strict=True):
        assert rel_err(fresh["lstm"][name][0], e) <= 1e-5, name
    assert grads["lstm"]["weight_hh_l0"].shape == (64, 128, 32)
