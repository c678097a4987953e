"""The persistent kernels' cell variants (kernels/triton_persistent.py, ``flags``) against the naive
layer differentiated by autograd: forward states and every gradient for each of Greff et al.'s
variants, zoneout on c and h, recurrent dropout and all of them at once; layer norm's refusal; the
launchers' argument checks.

On a GPU the kernels run as one launch with grid barriers; without one, through Triton's interpreter,
one launch per step. Every buffer the launchers allocate starts as NaN (and so does c_new, which the
test allocates), so an element the kernels never write fails.

B: batch  T: time  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

import math

import pytest
import torch
from _utils import rel_err

tp = pytest.importorskip("lstmlab.kernels.triton_persistent")
from lstmlab.kernels.naive import lstm_cell_naive  # noqa: E402
from lstmlab.kernels.variants import (  # noqa: E402
    CIFG,
    GREFF_VARIANTS,
    LAYER_NORM,
    NO_FORGET_GATE,
    NO_INPUT_GATE,
    NO_OUTPUT_GATE,
    PEEPHOLES,
    RECURRENT_DROPOUT,
    ZONEOUT_C,
    ZONEOUT_H,
    CellVariant,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, B, H = 6, 5, 13
DECREASING = [5, 5, 3, 3, 2, 1]
# one program, one batch chunk: the interpreter's fastest; SMALL: 4 programs of 4 units (the last
# one 1 unit wide), the batch in 2 chunks of 4 rows
ONE = tp.Config(units=16, num_warps=4, block_b=8)
SMALL = tp.Config(units=4, num_warps=4, block_b=4)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
MASKS = ZONEOUT_C | ZONEOUT_H | RECURRENT_DROPOUT
# the cell, and the mask bits that the layer adds in training
CASES = {name: (CellVariant.greff(name), 0) for name in GREFF_VARIANTS}
CASES |= {
    "zoneout_c": (CellVariant(), ZONEOUT_C),
    "zoneout_h": (CellVariant(), ZONEOUT_H),
    "dropout": (CellVariant(), RECURRENT_DROPOUT),
}
# every bit but LAYER_NORM, in the two combinations CellVariant allows (CIFG needs both gates): each
# with peepholes and every mask, one with CIFG and the output gate, one without any gate
ALL = CellVariant(peepholes=True, cifg=True, input_activation=False, output_activation=False)
ALL_REMOVED = CellVariant(
    peepholes=True,
    input_gate=False,
    forget_gate=False,
    output_gate=False,
    input_activation=False,
    output_activation=False,
)
CASES |= {"all": (ALL, MASKS), "all_removed": (ALL_REMOVED, MASKS)}


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element they never write fails."""
    monkeypatch.setattr(
        tp, "empty", lambda *shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
    )


def make_inputs(variant: CellVariant, flags: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """The layer's inputs and the variant's tensors (on DEVICE), each given iff its flag is set."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = 1 / math.sqrt(H)
    inputs = {
        "gx": torch.randn(T, B, 4 * H, generator=g, dtype=torch.float64),
        "h0": torch.randn(B, H, generator=g, dtype=torch.float64) * 0.5,
        "c0": torch.randn(B, H, generator=g, dtype=torch.float64),
        "w_hh": (torch.rand(4 * H, H, generator=g, dtype=torch.float64) * 2 - 1) * scale * 2,
    }
    inputs = {k: v.to(DEVICE, dtype) for k, v in inputs.items()}
    inputs["flags"] = flags = variant.flags | flags
    if flags & PEEPHOLES:
        inputs["peephole"] = torch.randn(3, H, generator=g, dtype=torch.float64).to(DEVICE, acc)
    if flags & (ZONEOUT_C | ZONEOUT_H):  # a channel whose flag is off holds noise the kernels must ignore
        inputs["zoneout"] = (torch.rand(T, B, 2, H, generator=g) < 0.3).to(DEVICE, torch.uint8)
    if flags & RECURRENT_DROPOUT:
        keep = torch.rand(B, H, generator=g) >= 0.25
        inputs["dropout"] = (keep / 0.75).to(DEVICE, dtype)
    return inputs


def naive_run(inputs: dict, variant: CellVariant, sizes: list[int] | None):
    """hs [T + 1, B, H], cs [T + 1, B, H] (carried rows copied) and c̃ [T, B, H] (c_{t−1} in rows that
    did not advance), from the naive cell in fp64, differentiable in gx, h0, c0."""
    flags = inputs["flags"]
    peephole, zoneout, dropout = (inputs.get(k) for k in ("peephole", "zoneout", "dropout"))
    peephole = None if peephole is None else peephole.cpu().double()
    dropout = None if dropout is None else dropout.cpu().double()
    if zoneout is not None:  # the channels that flags switch on
        zoneout = zoneout.cpu() * torch.tensor([bool(flags & ZONEOUT_C), bool(flags & ZONEOUT_H)])[:, None]
    w_hh = inputs["w_hh"].cpu().double()
    gx, h, c = (inputs[k] for k in ("gx", "h0", "c0"))
    hs, cs, c_new = [h], [c], []
    for k in range(T):
        n = B if sizes is None else sizes[k]
        cell = dict(variant=variant, peephole=peephole, dropout=None if dropout is None else dropout[:n])
        h_next, c_next = lstm_cell_naive(gx[k, :n], h[:n], c[:n], w_hh, **cell)  # before zoneout
        c_new.append(torch.cat([c_next, c[n:]]))
        if zoneout is not None:
            h_next, c_next = lstm_cell_naive(gx[k, :n], h[:n], c[:n], w_hh, zoneout=zoneout[k, :n], **cell)
        h, c = torch.cat([h_next, h[n:]]), torch.cat([c_next, c[n:]])
        hs.append(h)
        cs.append(c)
    return torch.stack(hs), torch.stack(cs), torch.stack(c_new)


def run_forward(inputs: dict, sizes: list[int] | None, config: tp.Config):
    c_new = None
    if inputs["flags"] & ZONEOUT_C:
        acc = torch.float64 if inputs["gx"].dtype == torch.float64 else torch.float32
        c_new = torch.full((T, B, H), math.nan, dtype=acc, device=DEVICE)
    sizes_t = None if sizes is None else torch.tensor(sizes)
    hs, cs, gates = tp.persistent_forward(**inputs, batch_sizes=sizes_t, c_new=c_new, config=config)
    return hs, cs, gates, c_new


def check_variant(
    variant: CellVariant,
    flags: int,
    dtype: torch.dtype,
    sizes,
    config: tp.Config,
    bwd_config: tp.Config | None = None,
) -> None:
    """The forward with config, the backward with bwd_config (default: config), against autograd."""
    rtol = RTOL[dtype]
    inputs = make_inputs(variant, flags, dtype)
    flags = inputs["flags"]
    hs, cs, gates, c_new = run_forward(inputs, sizes, config)

    leaves = {k: inputs[k].cpu().double().requires_grad_() for k in ("gx", "h0", "c0")}
    expected_hs, expected_cs, expected_c_new = naive_run(inputs | leaves, variant, sizes)
    assert rel_err(hs, expected_hs) < rtol
    assert rel_err(cs, expected_cs) < rtol
    if c_new is not None:
        assert rel_err(c_new, expected_c_new) < rtol
    assert torch.isfinite(gates).all()  # rows that did not advance too
    i, f, _, o = gates.cpu().double().chunk(4, dim=-1)
    for bit, gate in ((NO_INPUT_GATE, i), (NO_OUTPUT_GATE, o), (NO_FORGET_GATE * (not flags & CIFG), f)):
        if flags & bit:  # a removed gate is stored as 1
            assert (gate == 1).all()
    if flags & CIFG:
        assert rel_err(f, 1 - i) < rtol

    gen = torch.Generator().manual_seed(1)
    d_hs = torch.randn(T + 1, B, H, generator=gen, dtype=torch.float64)  # every step, and h0 itself
    d_cn = torch.randn(B, H, generator=gen, dtype=torch.float64)
    loss = (d_hs * expected_hs).sum() + (d_cn * expected_cs[-1]).sum()
    expected = torch.autograd.grad(loss, [leaves["gx"], leaves["h0"], leaves["c0"]])

    variant_tensors = {k: inputs[k] for k in ("flags", "peephole", "zoneout", "dropout") if k in inputs}
    d_pre, d_h0, d_c0 = tp.persistent_backward(
        d_hs.to(DEVICE, dtype),
        d_cn.to(DEVICE, cs.dtype),
        gates,
        cs,
        inputs["w_hh"],
        None if sizes is None else torch.tensor(sizes),
        c_new=c_new,
        config=bwd_config or config,
        **variant_tensors,
    )
    for name, actual, exp in zip(("d_pre", "d_h0", "d_c0"), (d_pre, d_h0, d_c0), expected, strict=True):
        assert rel_err(actual, exp) < rtol, name
    for k in range(T):  # exactly 0 where a row did not advance
        n = B if sizes is None else sizes[k]
        assert (d_pre[k, n:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_variant_matches_autograd(case, dtype):
    """Each variant on a packed batch (decreasing sizes): rows that stop carry h and c and ignore
    their masks."""
    variant, flags = CASES[case]
    _skip_unless_available(dtype, variant.flags | flags)
    check_variant(variant, flags, dtype, DECREASING, ONE)


@pytest.mark.parametrize("sizes", [None, [1, 2, 2, 4, 5, 5]], ids=["full", "increasing"])
@pytest.mark.parametrize("case", ["all", "all_removed"])
def test_variants_with_several_programs_and_batch_chunks(case, sizes):
    variant, flags = CASES[case]
    _skip_unless_available(torch.float64, variant.flags | flags)
    check_variant(variant, flags, torch.float64, sizes, SMALL)


# the second-generation backward: the batch on the dot's N side, 4H (52) in 4 chunks of 16
BATCH_N = tp.Config(units=4, num_warps=4, block_b=8, block_k=16, batch_n=True, k_ahead=1)


@pytest.mark.parametrize("case", ["all", "all_removed", "zoneout_h", "dropout"])
def test_variants_backward_with_the_batch_on_n(case):
    variant, flags = CASES[case]
    _skip_unless_available(torch.float64, variant.flags | flags)
    check_variant(variant, flags, torch.float64, DECREASING, SMALL, bwd_config=BATCH_N)


def test_all_variants_in_fp32_with_several_programs():
    variant, flags = CASES["all"]
    _skip_unless_available(torch.float32, variant.flags | flags)
    check_variant(variant, flags, torch.float32, DECREASING, SMALL)


@pytest.mark.parametrize("case", ["all", "all_removed"])
def test_forward_without_save_gives_the_same_states(case):
    """save=False with every variant: hs, c_T and c̃ as with save=True, no gates."""
    variant, flags = CASES[case]
    _skip_unless_available(torch.float32, variant.flags | flags)
    inputs = make_inputs(variant, flags, torch.float32)
    sizes = torch.tensor(DECREASING)
    c_new = [torch.full((T, B, H), math.nan, device=DEVICE) for _ in range(2)]
    hs, cs, _ = tp.persistent_forward(**inputs, batch_sizes=sizes, c_new=c_new[0], config=SMALL)
    hs_unsaved, c_n, gates = tp.persistent_forward(
        **inputs, batch_sizes=sizes, c_new=c_new[1], config=SMALL, save=False
    )
    assert gates is None and c_n.shape == (1, B, H)
    assert torch.equal(hs_unsaved, hs) and torch.equal(c_n[0], cs[-1]) and torch.equal(c_new[1], c_new[0])


@pytest.mark.parametrize("block_b", [4, 8], ids=["chunks", "one_chunk"])
def test_one_launch_with_barriers_matches_per_step_launches(block_b):
    """The barrier path with every variant: on CPU with one program (in two batch chunks), on a GPU
    with several. The dropout ring's two slots alternate across the steps of one launch."""
    variant, flags = CASES["all"]
    _skip_unless_available(torch.float32, variant.flags | flags)
    # block_b = 8 ≥ B: one chunk, whose c, own h and next gx stay in registers across the steps of a
    # launch; per-step launches read them back from memory
    units = 4 if DEVICE.type == "cuda" else 16
    config = tp.Config(units=units, num_warps=4, block_b=block_b)
    spin_limit = 1 << 20 if DEVICE.type == "cuda" else 4
    inputs = make_inputs(variant, flags, torch.float32)
    c_new = [torch.zeros(T, B, H, device=DEVICE) for _ in range(2)]
    sizes = torch.tensor(DECREASING)
    launches = [dict(single_launch=False), dict(single_launch=True, spin_limit=spin_limit)]
    outputs = [
        tp.persistent_forward(**inputs, batch_sizes=sizes, c_new=c, config=config, **launch)
        for c, launch in zip(c_new, launches, strict=True)
    ]
    for a, b in zip((*outputs[0], c_new[0]), (*outputs[1], c_new[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    _, cs, gates = outputs[0]
    d_hs, d_cn = torch.randn(T + 1, B, H, device=DEVICE), torch.randn(B, H, device=DEVICE)
    variant_tensors = {k: inputs[k] for k in ("flags", "peephole", "zoneout", "dropout")}
    grads = [
        tp.persistent_backward(
            d_hs,
            d_cn,
            gates,
            cs,
            inputs["w_hh"],
            sizes,
            c_new=c_new[0],
            config=config,
            **variant_tensors,
            **launch,
        )
        for launch in launches
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _skip_unless_available(dtype: torch.dtype, flags: int) -> None:
    reason = tp.persistent_unavailable_reason(B, H, dtype, DEVICE, flags)
    if reason is not None:
        pytest.skip(reason)


def test_layer_norm_is_refused():
    """Layer norm needs a grid-wide reduction per step: the layer runs it on the per-step kernels."""
    for flags in (LAYER_NORM, LAYER_NORM | PEEPHOLES | ZONEOUT_C):
        reason = tp.persistent_unavailable_reason(B, H, torch.float32, DEVICE, flags)
        assert reason == tp.LAYER_NORM_REASON and "per-step" in reason
    inputs = make_inputs(CellVariant(), 0, torch.float32)
    del inputs["flags"]
    with pytest.raises(ValueError, match=r"^layer norm is not in the persistent kernels"):
        tp.persistent_forward(**inputs, flags=LAYER_NORM, config=ONE)
    hs, cs, gates = tp.persistent_forward(**inputs, config=ONE)
    with pytest.raises(ValueError, match=r"^layer norm is not in the persistent kernels"):
        tp.persistent_backward(hs, cs[-1], gates, cs, inputs["w_hh"], flags=LAYER_NORM, config=ONE)


def test_unavailable_reason_reads_the_flags():
    assert "bits 0x800" in tp.persistent_unavailable_reason(B, H, torch.float32, DEVICE, 1 << 11)
    assert "non-negative int" in tp.persistent_unavailable_reason(B, H, torch.float32, DEVICE, -1)
    if DEVICE.type == "cpu":  # the interpreter takes every variant
        assert tp.persistent_unavailable_reason(B, H, torch.float32, DEVICE, tp.PERSISTENT_FLAGS) is None


def test_launchers_check_the_variant_tensors():
    """Each tensor is given iff its flag is set, with its shape, dtype and device; the error names
    both the flag and the tensor."""
    inputs = make_inputs(ALL, MASKS, torch.float32)
    c_new = torch.zeros(T, B, H, device=DEVICE)
    forward = dict(inputs, c_new=c_new, config=ONE)
    hs, cs, gates = tp.persistent_forward(**forward)
    errors = [
        (dict(peephole=None), r"flags has PEEPHOLES but peephole is None"),
        (dict(c_new=None), r"flags has ZONEOUT_C but c_new is None"),
        (dict(zoneout=None), r"flags has ZONEOUT_C and ZONEOUT_H but zoneout is None"),
        (
            dict(flags=inputs["flags"] & ~RECURRENT_DROPOUT),
            r"dropout is given but flags has no RECURRENT_DROPOUT",
        ),
        (dict(flags=inputs["flags"] & ~PEEPHOLES), r"peephole is given but flags has no PEEPHOLES"),
        (dict(flags=inputs["flags"] & ~ZONEOUT_C), r"c_new is given but flags has no ZONEOUT_C"),
        (
            dict(dropout=inputs["dropout"].double()),
            r"dropout must be \[5, 13\] torch.float32 .*torch.float64",
        ),
        (dict(zoneout=inputs["zoneout"].bool()), r"zoneout must be \[6, 5, 2, 13\] torch.uint8"),
        (dict(peephole=inputs["peephole"][:2]), r"peephole must be \[3, 13\] torch.float32 .*got \[2, 13\]"),
        (dict(flags=inputs["flags"] | 1 << 12), r"flags has bits 0x1000 that variants.py does not define"),
    ]
    for change, message in errors:
        with pytest.raises(ValueError, match=message):
            tp.persistent_forward(**(forward | change))
    with pytest.raises(ValueError, match=r"c_new is an output: it must be contiguous"):
        tp.persistent_forward(**(forward | dict(c_new=torch.zeros(T, H, B, device=DEVICE).transpose(1, 2))))

    backward = {k: v for k, v in forward.items() if k not in ("gx", "h0", "c0", "w_hh")}
    d_hs, d_cn = torch.zeros_like(hs), torch.zeros_like(cs[-1])
    for change, message in errors:
        with pytest.raises(ValueError, match=message):
            tp.persistent_backward(d_hs, d_cn, gates, cs, inputs["w_hh"], **(backward | change))
    vanilla = make_inputs(CellVariant(), 0, torch.float32)
    with pytest.raises(ValueError, match=r"zoneout is given but flags has no ZONEOUT_C or ZONEOUT_H"):
        tp.persistent_forward(**vanilla, zoneout=inputs["zoneout"], config=ONE)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"]
)
def test_all_variants_in_low_precision(dtype, rtol, monkeypatch):
    """16-bit h, W_hh and dropout mask, fp32 cell (measured: 7e-3 in bf16, 3e-4 in fp16)."""
    variant, flags = CASES["all"]
    _skip_unless_available(dtype, variant.flags | flags)
    monkeypatch.setitem(RTOL, dtype, rtol)
    check_variant(variant, flags, dtype, DECREASING, SMALL)
