"""Cell variants (kernels/variants.py) in every backend against the oracle, kernels/naive.py, in fp64;
and the modules' variant options: drop-in when off, parameters, masks, state_dict, errors."""

import pytest
import torch
from _utils import device_for, rel_err
from lstmlab.kernels import HAS_TRITON, layer, variants
from lstmlab.kernels.naive import input_projection_naive, lstm_layer_naive
from lstmlab.kernels.variants import GREFF_VARIANTS, CellVariant
from torch.nn.utils.rnn import pack_sequence

import lstmlab

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no triton")
T, B, H = 5, 3, 4
TOL = 1e-10

# every variant a test of the layer runs: Greff's eight, layer norm, the masks, and all at once
LAYER_CASES = {name: (CellVariant.greff(name), 0.0, 0.0, 0.0) for name in GREFF_VARIANTS}
LAYER_CASES |= {
    "layer_norm": (CellVariant(layer_norm=True), 0.0, 0.0, 0.0),
    "zoneout_c": (CellVariant(), 0.5, 0.0, 0.0),
    "zoneout_h": (CellVariant(), 0.0, 0.5, 0.0),
    "recurrent_dropout": (CellVariant(), 0.0, 0.0, 0.3),
    "everything": (
        CellVariant(peepholes=True, cifg=True, output_activation=False, layer_norm=True),
        0.3,
        0.4,
        0.3,
    ),
    "all_but_layer_norm": (CellVariant(peepholes=True, cifg=True, output_activation=False), 0.3, 0.4, 0.3),
}


def layer_inputs(variant, zoneout_c, zoneout_h, dropout_p, device, dtype=torch.float64, seed=0):
    """Random leaves of one layer call, masks and flags: what lstm_layer and the oracle take."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale + shift).to(device).requires_grad_()

    leaves = {"gx": rand(T, B, 4 * H), "h0": rand(B, H), "c0": rand(B, H), "w_hh": rand(4 * H, H, scale=0.5)}
    if variant.peepholes:
        leaves["peephole"] = rand(3, H)
    if variant.layer_norm:
        leaves["ln_hh"] = rand(4 * H, scale=0.3, shift=1.0)
        leaves["ln_c"] = rand(2, H, scale=0.3)
    flags, masks = variant.flags, {}
    if zoneout_c or zoneout_h:
        keep = torch.rand(T, B, 2, H, generator=g) < torch.tensor([zoneout_c, zoneout_h]).view(2, 1)
        masks["zoneout"] = keep.to(torch.uint8).to(device)
        flags |= variants.ZONEOUT_C * (zoneout_c > 0) | variants.ZONEOUT_H * (zoneout_h > 0)
    if dropout_p:
        kept = (torch.rand(B, H, generator=g) >= dropout_p).to(dtype) / (1 - dropout_p)
        masks["dropout"] = kept.to(device)
        flags |= variants.RECURRENT_DROPOUT
    return leaves, masks, flags


def oracle(variant, leaves, masks, batch_sizes=None):
    ln_c = None if "ln_c" not in leaves else tuple(leaves["ln_c"].unbind(0))
    return lstm_layer_naive(
        leaves["gx"], leaves["h0"], leaves["c0"], leaves["w_hh"], None, batch_sizes,
        variant=variant, peephole=leaves.get("peephole"), ln_hh=leaves.get("ln_hh"), ln_c=ln_c,
        zoneout=masks.get("zoneout"), dropout=masks.get("dropout"),
    )  # fmt: skip


def ours(flags, leaves, masks, backend, batch_sizes=None):
    return layer.lstm_layer(
        leaves["gx"], leaves["h0"], leaves["c0"], leaves["w_hh"], None, batch_sizes, backend, flags=flags,
        peephole=leaves.get("peephole"), ln_hh=leaves.get("ln_hh"), ln_c=leaves.get("ln_c"), **masks,
    )  # fmt: skip


def outputs_and_grads(outputs, leaves):
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in outputs]
    loss = sum((t * n).sum() for t, n in zip(outputs, noise, strict=True))
    return [*outputs, *torch.autograd.grad(loss, list(leaves.values()))]


@pytest.fixture(autouse=True)
def poisoned(poisoned_buffers):
    """Every layer test here runs on NaN-filled buffers (conftest.py)."""


def assert_layer_matches_oracle(case, backend, batch_sizes=None, tol=TOL):
    variant, zoneout_c, zoneout_h, dropout_p = LAYER_CASES[case]
    leaves, masks, flags = layer_inputs(variant, zoneout_c, zoneout_h, dropout_p, device_for(backend))
    expected = outputs_and_grads(oracle(variant, leaves, masks, batch_sizes), leaves)
    actual = outputs_and_grads(ours(flags, leaves, masks, backend, batch_sizes), leaves)
    labels = ["out", "h_n", "c_n", *(f"grad {name}" for name in leaves)]
    for label, a, e in zip(labels, actual, expected, strict=True):
        assert rel_err(a, e) <= tol, (case, backend, label, rel_err(a, e))


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_reference_layer_matches_the_oracle(case):
    assert_layer_matches_oracle(case, "reference")


@pytest.mark.parametrize("case", ["everything", "V", "zoneout_h"])
def test_reference_layer_matches_the_oracle_on_packed_steps(case):
    assert_layer_matches_oracle(case, "reference", batch_sizes=[3, 3, 2, 2, 1])


# the fused C++ kernel (backend "cpu") has every variant but layer norm
CPU_CASES = [case for case, (variant, *_) in LAYER_CASES.items() if not variant.layer_norm]


@pytest.mark.parametrize("case", CPU_CASES)
def test_cpu_kernel_layer_matches_the_oracle(case):
    assert_layer_matches_oracle(case, "cpu")
    assert_layer_matches_oracle(case, "cpu", batch_sizes=[3, 3, 2, 2, 1])


def test_layer_norm_is_refused_by_the_cpu_kernel():
    leaves, _, flags = layer_inputs(CellVariant(layer_norm=True), 0.0, 0.0, 0.0, "cpu")
    with pytest.raises(RuntimeError, match=r"backend='cpu' was requested but layer norm is not in"):
        ours(flags, leaves, {}, "cpu")


# through the interpreter every case costs seconds: the Triton paths run the widest cases here (the
# kernels' own files test every variant step by step: test_variant_triton_step.py,
# test_variant_persistent.py)
TRITON_CASES = ["everything", "CIFG", "NOAF"]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_step_layer_matches_the_oracle(case):
    assert_layer_matches_oracle(case, "triton_step")


@needs_triton
def test_triton_step_layer_matches_the_oracle_on_packed_steps():
    assert_layer_matches_oracle("everything", "triton_step", batch_sizes=[3, 3, 2, 2, 1])


@needs_triton
@pytest.mark.parametrize("case", ["V", "recurrent_dropout", "zoneout_h"])
def test_triton_persistent_layer_matches_the_oracle(case):
    assert_layer_matches_oracle(case, "triton_persistent")


@needs_triton
def test_triton_persistent_layer_matches_the_oracle_on_packed_steps():
    assert_layer_matches_oracle("all_but_layer_norm", "triton_persistent", batch_sizes=[3, 3, 2, 2, 1])


@needs_triton
def test_layer_norm_is_refused_by_the_persistent_layer():
    leaves, _, flags = layer_inputs(CellVariant(layer_norm=True), 0.0, 0.0, 0.0, "cpu")
    with pytest.raises(RuntimeError, match=r"backend='triton_persistent' was requested but .*layer norm"):
        ours(flags, leaves, {}, "triton_persistent")


def test_gradcheck_on_every_input_of_the_op():
    variant, *probabilities = LAYER_CASES["everything"]
    leaves, masks, flags = layer_inputs(variant, *probabilities, device="cpu")

    def layer(*tensors):
        return ours(flags, dict(zip(leaves, tensors, strict=True)), masks, "reference")

    assert torch.autograd.gradcheck(layer, tuple(leaves.values()))


PROJ_BACKENDS = ["reference", pytest.param("triton_step", marks=needs_triton)]  # the cpu kernel: below


@pytest.mark.parametrize("backend", PROJ_BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_variant_with_a_projection_matches_the_oracle(backend, packed):
    """proj_size with every variant that can take it (all but zoneout on h): peepholes, CIFG, no
    output activation, layer norm, zoneout on c and recurrent dropout on the projected h, at once."""
    P, device = 2, device_for(backend)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (
            (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift)
            .to(device)
            .requires_grad_()
        )

    variant = CellVariant(peepholes=True, cifg=True, output_activation=False, layer_norm=True)
    leaves = {"gx": rand(T, B, 4 * H), "h0": rand(B, P), "c0": rand(B, H), "w_hh": rand(4 * H, P, scale=0.5),
              "w_hr": rand(P, H, scale=0.5), "peephole": rand(3, H),
              "ln_hh": rand(4 * H, scale=0.3, shift=1.0), "ln_c": rand(2, H, scale=0.3)}  # fmt: skip
    zoneout = (torch.rand(T, B, 2, H, generator=g) < torch.tensor([0.4, 0.0]).view(2, 1)).to(torch.uint8)
    dropout = (torch.rand(B, P, generator=g) >= 0.3).double() / 0.7
    masks = {"zoneout": zoneout.to(device), "dropout": dropout.to(device)}
    flags = variant.flags | variants.ZONEOUT_C | variants.RECURRENT_DROPOUT
    sizes = [3, 3, 2, 2, 1] if packed else None
    expected = lstm_layer_naive(
        leaves["gx"], leaves["h0"], leaves["c0"], leaves["w_hh"], leaves["w_hr"], sizes, variant=variant,
        peephole=leaves["peephole"], ln_hh=leaves["ln_hh"], ln_c=tuple(leaves["ln_c"].unbind(0)), **masks,
    )  # fmt: skip
    actual = layer.lstm_layer(
        leaves["gx"], leaves["h0"], leaves["c0"], leaves["w_hh"], leaves["w_hr"], sizes, backend, flags=flags,
        peephole=leaves["peephole"], ln_hh=leaves["ln_hh"], ln_c=leaves["ln_c"], **masks,
    )  # fmt: skip
    labels = ["out", "h_n", "c_n", *(f"grad {name}" for name in leaves)]
    for label, a, e in zip(
        labels, outputs_and_grads(actual, leaves), outputs_and_grads(expected, leaves), strict=True
    ):
        assert rel_err(a, e) <= TOL, (backend, label, rel_err(a, e))


def test_modules_take_proj_size_with_a_variant():
    torch.manual_seed(0)
    model = lstmlab.LSTM(
        3, H, proj_size=2, num_layers=2, peepholes=True, layer_norm=True, dtype=torch.float64
    )
    out, (h_n, c_n) = model(torch.randn(T, B, 3, dtype=torch.float64))
    assert out.shape == (T, B, 2) and h_n.shape == (2, B, 2) and c_n.shape == (2, B, H)
    assert model.weight_hr_l1.shape == (2, H) and model.weight_peephole_l1.shape == (3, H)


@pytest.mark.parametrize(
    ("flags", "given", "message"),
    [
        (variants.PEEPHOLES, {}, r"flags ask for peepholes, which needs peephole \(3, 4\); got None"),
        (0, {"peephole": torch.zeros(3, H)}, r"peephole was given but flags \(0\) do not ask for peepholes"),
        (
            variants.PEEPHOLES,
            {"peephole": torch.zeros(4, H)},
            r"peephole must have shape \(3, 4\), got \(4, 4\)",
        ),
        (variants.ZONEOUT_C, {"zoneout": torch.zeros(T, B, 2, H)}, "zoneout masks must be uint8"),
    ],
)
def test_the_layer_names_a_missing_or_stray_variant_tensor(flags, given, message):
    gx, state, w_hh = torch.zeros(T, B, 4 * H), torch.zeros(B, H), torch.zeros(4 * H, H)
    with pytest.raises(ValueError, match=message):
        layer.lstm_layer(gx, state, state, w_hh, flags=flags, **given)


# ---- the modules ----

OPTIONS = {
    "peepholes": True,
    "cifg": True,
    "input_gate": False,
    "forget_gate": False,
    "output_gate": False,
    "input_activation": False,
    "output_activation": False,
    "layer_norm": True,
    "zoneout_c": 0.2,
    "zoneout_h": 0.2,
    "recurrent_dropout": 0.2,
}


def test_all_options_off_is_the_vanilla_module_bit_for_bit(monkeypatch):
    """Default options, spelled out or not, build torch's parameters and run the vanilla op."""
    off = {name: getattr(CellVariant(), name) for name in OPTIONS}
    torch.manual_seed(0)
    plain = lstmlab.LSTM(3, H, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    spelled = lstmlab.LSTM(3, H, num_layers=2, bidirectional=True, **off)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(3, H, num_layers=2, bidirectional=True)
    assert list(spelled.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(spelled.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    flags = []
    real = layer.lstm_layer
    monkeypatch.setattr(
        lstmlab.modules, "lstm_layer", lambda *a, **k: flags.append(k["flags"]) or real(*a, **k)
    )
    x = torch.randn(T, B, 3)
    assert torch.equal(spelled(x)[0], plain(x)[0])
    assert flags == [0] * 8  # the vanilla cell in every layer and direction of both
    assert repr(spelled) == repr(plain)


def test_a_variant_keeps_torchs_weights_for_a_seed_and_adds_torch_style_parameters():
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(3, H, bidirectional=True)
    torch.manual_seed(0)
    variant = lstmlab.LSTM(3, H, bidirectional=True, peepholes=True, layer_norm=True)
    state = variant.state_dict()
    for name, value in theirs.state_dict().items():
        assert torch.equal(state[name], value), name
    extra = [name for name in state if name not in theirs.state_dict()]
    suffixes = ["l0", "l0_reverse"]
    expected = ["weight_peephole", "weight_ln_ih", "weight_ln_hh", "weight_ln_c", "bias_ln_c"]
    assert extra == [f"{name}_{suffix}" for suffix in suffixes for name in expected]
    assert state["weight_peephole_l0"].shape == (3, H)
    assert torch.equal(state["weight_ln_hh_l0"], torch.ones(4 * H))
    assert torch.equal(state["bias_ln_c_l0"], torch.zeros(H))
    assert repr(variant) == "LSTM(3, 4, bidirectional=True, peepholes=True, layer_norm=True)"


def test_state_dict_round_trip_with_extra_parameters():
    torch.manual_seed(0)
    model = lstmlab.LSTM(3, H, num_layers=2, peepholes=True, layer_norm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the init, so a lost tensor shows
    torch.manual_seed(1)
    clone = lstmlab.LSTM(3, H, num_layers=2, peepholes=True, layer_norm=True).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(T, B, 3)
    assert torch.equal(clone(x)[0], model(x)[0])
    with pytest.raises(RuntimeError, match=r"Unexpected key.*weight_peephole_l0"):
        lstmlab.LSTM(3, H, num_layers=2).load_state_dict(model.state_dict())


def naive_module(model, x, batch_sizes=None):
    """What lstmlab.LSTM computes, layer by layer from naive.py (eval mode: no masks)."""
    layer_input, v = x, model.variant
    for depth in range(model.num_layers):
        outputs = []
        for suffix in model._direction_suffixes(depth):
            p = {name: getattr(model, f"{name}_{suffix}", None) for name in (
                "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_peephole",
                "weight_ln_ih", "weight_ln_hh", "weight_ln_c", "bias_ln_c")}  # fmt: skip
            bias = None if p["bias_ih"] is None else p["bias_ih"] + p["bias_hh"]
            reverse = suffix.endswith("reverse")
            xs = layer_input.flip(0) if reverse else layer_input
            gx = input_projection_naive(xs, p["weight_ih"], bias, v, p["weight_ln_ih"])
            zeros = torch.zeros(x.shape[1], model.hidden_size, dtype=x.dtype)
            ln_c = None if not v.layer_norm else (p["weight_ln_c"], p["bias_ln_c"])
            sizes = None if batch_sizes is None else (batch_sizes[::-1] if reverse else batch_sizes)
            out, _, _ = lstm_layer_naive(
                gx, zeros, zeros, p["weight_hh"], None, sizes, variant=v,
                peephole=p["weight_peephole"], ln_hh=p["weight_ln_hh"], ln_c=ln_c,
            )  # fmt: skip
            outputs.append(out.flip(0) if reverse else out)
        layer_input = torch.cat(outputs, dim=-1)
    return layer_input


@pytest.mark.parametrize("name", ["V", "CIFG", "NOAF"])
def test_module_matches_the_oracle_bidirectional_two_layers(name):
    options = GREFF_VARIANTS[name] | {"layer_norm": name == "NOAF"}
    torch.manual_seed(0)
    model = lstmlab.LSTM(3, H, num_layers=2, bidirectional=True, dtype=torch.float64, **options).eval()
    x = torch.randn(T, B, 3, dtype=torch.float64)
    assert rel_err(model(x)[0], naive_module(model, x)) <= TOL


def test_module_packed_input_matches_the_oracle():
    torch.manual_seed(0)
    model = lstmlab.LSTM(
        3, H, bidirectional=True, peepholes=True, layer_norm=True, dtype=torch.float64
    ).eval()
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 3, 4)]
    out, _ = model(pack_sequence(seqs, enforce_sorted=False))
    padded = torch.nn.utils.rnn.pad_sequence(seqs)  # [T, B, 3]: rows of the packed (sorted) order
    order = out.sorted_indices
    expected = naive_module(model, padded[:, order], out.batch_sizes.tolist())
    got, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
    mask = torch.arange(5).unsqueeze(1) < torch.tensor([5, 3, 4]).unsqueeze(0)
    assert rel_err(got[mask], expected[:, order.argsort()][mask]) <= TOL


def spy_on_masks(monkeypatch):
    """Records the masks lstmlab.LSTM draws for each layer call, letting the call run."""
    seen = []
    real = layer.lstm_layer

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("zoneout", "dropout")})
        return real(*args, **kwargs)

    monkeypatch.setattr(lstmlab.modules, "lstm_layer", spy)
    return seen


def test_training_masks_are_the_oracles_and_reproducible_from_a_seed(monkeypatch):
    seen = spy_on_masks(monkeypatch)
    torch.manual_seed(0)
    options = dict(peepholes=True, zoneout_c=0.3, zoneout_h=0.4, recurrent_dropout=0.25)
    model = lstmlab.LSTM(3, H, dtype=torch.float64, **options)
    x = torch.randn(T, B, 3, dtype=torch.float64)
    torch.manual_seed(7)
    first = model(x)[0]
    torch.manual_seed(7)
    assert torch.equal(model(x)[0], first)  # the same seed draws the same masks
    assert not torch.equal(model(x)[0], first)  # the next draw differs
    zoneout, dropout = seen[0]["zoneout"], seen[0]["dropout"]
    assert zoneout.shape == (T, B, 2, H) and dropout.shape == (B, H)
    assert set(dropout.unique().tolist()) <= {0.0, 1 / 0.75}
    gx = input_projection_naive(x, model.weight_ih_l0, model.bias_ih_l0 + model.bias_hh_l0)
    zeros = torch.zeros(B, H, dtype=torch.float64)
    expected, _, _ = lstm_layer_naive(
        gx, zeros, zeros, model.weight_hh_l0, variant=model.variant,
        peephole=model.weight_peephole_l0, zoneout=zoneout, dropout=dropout,
    )  # fmt: skip
    assert rel_err(first, expected) <= TOL


def test_zoneout_and_recurrent_dropout_are_identity_in_eval_mode(monkeypatch):
    seen = spy_on_masks(monkeypatch)
    torch.manual_seed(0)
    masked = lstmlab.LSTM(3, H, peepholes=True, zoneout_c=0.5, zoneout_h=0.5, recurrent_dropout=0.5).eval()
    plain = lstmlab.LSTM(3, H, peepholes=True).eval()
    plain.load_state_dict(masked.state_dict())
    x = torch.randn(T, B, 3)
    assert torch.equal(masked(x)[0], plain(x)[0])
    assert seen[0] == {"zoneout": None, "dropout": None}


def test_zoneout_keeps_about_the_asked_fraction_of_units():
    torch.manual_seed(0)
    model = lstmlab.LSTM(2, 64, zoneout_h=0.3)
    with torch.no_grad():
        out, _ = model(torch.randn(40, 8, 2))
    kept = (out[1:] == out[:-1]).double().mean().item()  # h_t = h_{t−1} exactly where zoned out
    assert 0.25 < kept < 0.35


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"cifg": True, "input_gate": False}, ValueError, "cifg=True couples .* got input_gate=False"),
        ({"cifg": True, "forget_gate": False}, ValueError, "got forget_gate=False"),
        ({"zoneout_c": 1.0}, ValueError, r"zoneout_c must be in \[0, 1\), got 1.0"),
        ({"recurrent_dropout": -0.1}, ValueError, r"recurrent_dropout must be in \[0, 1\)"),
        ({"peepholes": 1}, TypeError, "peepholes must be a bool, got 1"),
        ({"zoneout_h": 0.1, "proj_size": 2}, ValueError, "zoneout_h .* cannot be combined with proj_size"),
        (
            {"peephole": True},
            TypeError,
            "unexpected keyword argument.*'peephole'; the cell-variant options are",
        ),
    ],
)
def test_combinations_that_make_no_sense_fail_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        lstmlab.LSTM(3, H, **options)


def test_lstm_cell_variant_is_one_step_of_the_layer():
    torch.manual_seed(0)
    cell = lstmlab.LSTMCell(3, H, peepholes=True, layer_norm=True, dtype=torch.float64).eval()
    layer = lstmlab.LSTM(3, H, peepholes=True, layer_norm=True, dtype=torch.float64).eval()
    layer.load_state_dict({f"{name}_l0": value for name, value in cell.state_dict().items()})
    x, h0, c0 = (torch.randn(B, n, dtype=torch.float64) for n in (3, H, H))
    h1, c1 = cell(x, (h0, c0))
    _, (h_n, c_n) = layer(x.unsqueeze(0), (h0.unsqueeze(0), c0.unsqueeze(0)))
    assert torch.equal(h1, h_n[0]) and torch.equal(c1, c_n[0])
    assert "weight_peephole" in cell.state_dict()
    with pytest.raises(TypeError, match="recurrent_dropout"):
        lstmlab.LSTMCell(3, H, recurrent_dropout=0.1)


# ---- torch.compile and the op contract ----


def test_opcheck_the_layer_op_with_a_variant():
    """Schema, fake tensors, autograd registration and AOT dispatch of both ops with a variant
    (packed steps and every optional tensor: the widest case)."""
    variant, *probabilities = LAYER_CASES["everything"]
    leaves, masks, flags = layer_inputs(variant, *probabilities, device="cpu")
    sizes = torch.tensor([3, 3, 2, 2, 1])
    args = (leaves["gx"], None, None, leaves["h0"], leaves["c0"], leaves["w_hh"], None, sizes, "reference",
            flags, leaves["peephole"], leaves["ln_hh"], leaves["ln_c"], *masks.values(), True)  # fmt: skip
    torch.library.opcheck(layer.lstm_layer_fwd, args)
    out = layer.LayerOutputs(*layer.lstm_layer_fwd(*args))
    d_hs, d_out, d_cn = torch.randn_like(out.hs), torch.randn_like(out.out_packed), torch.randn_like(out.c_n)
    bwd_args = (d_hs, d_out, d_cn, out.hs, out.cs, out.gates, out.h_raw, out.c_new, out.ln_saved,
                leaves["gx"], None, leaves["w_hh"], None, sizes, "reference", flags, leaves["peephole"],
                leaves["ln_hh"], leaves["ln_c"], masks["zoneout"], masks["dropout"], [True] * 8)  # fmt: skip
    detached = tuple(a.detach() if torch.is_tensor(a) else a for a in bwd_args)
    torch.library.opcheck(layer.lstm_layer_bwd, detached)


def test_fullgraph_compile_of_a_variant_matches_eager():
    torch.manual_seed(0)
    model = lstmlab.LSTM(3, H, bidirectional=True, peepholes=True, layer_norm=True, zoneout_h=0.3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(T, B, 3)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(3)
        expected = model(x)[0]
        torch.manual_seed(3)  # the same masks: drawn by the same torch ops, compiled or not
        actual = compiled(x)[0]
        assert rel_err(actual, expected) <= 1e-6, mode
        grads = torch.autograd.grad(actual.square().sum(), list(model.parameters()))
        torch.manual_seed(3)
        expected_grads = torch.autograd.grad(model(x)[0].square().sum(), list(model.parameters()))
        for a, e in zip(grads, expected_grads, strict=True):
            assert rel_err(a, e) <= 1e-6, mode


@pytest.mark.parametrize(
    "backend", ["reference", "cpu", pytest.param("triton_step", marks=needs_triton),
                pytest.param("triton_persistent", marks=needs_triton)],
)  # fmt: skip
def test_without_a_backward_nothing_is_kept_and_the_outputs_are_the_same(backend):
    """Under no_grad the op keeps nothing for a backward (save=False), and computes the same outputs."""
    case = "all_but_layer_norm"
    variant, zoneout_c, zoneout_h, dropout_p = LAYER_CASES[case]
    leaves, masks, flags = layer_inputs(variant, zoneout_c, zoneout_h, dropout_p, device_for(backend))
    expected = ours(flags, leaves, masks, backend, [3, 3, 2, 2, 1])
    detached = {k: v.detach() for k, v in leaves.items()}
    with torch.no_grad():
        actual = ours(flags, detached, masks, backend, [3, 3, 2, 2, 1])
        args = (detached["gx"], None, None, detached["h0"], detached["c0"], detached["w_hh"], None,
                torch.tensor([3, 3, 2, 2, 1]), backend, flags, detached["peephole"], None, None,
                *masks.values(), False)  # fmt: skip
        kept = layer.LayerOutputs(*layer.lstm_layer_fwd(*args))
    for a, e in zip(actual, expected, strict=True):
        assert rel_err(a, e) <= TOL  # the same arithmetic (a GPU kernel may keep c in registers instead)
    assert all(t.numel() == 0 for t in kept[3:])  # cs, gates, h_raw, c_new, ln_saved
