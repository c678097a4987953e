"""The cell variants' per-step Triton kernels against the oracle: one step, forward and every gradient.

`triton_gates.variant_gates_forward_into` / `variant_gates_backward_into` against
`naive.lstm_cell_naive` differentiated by autograd in float64. The kernels' ∂L/∂r_t (the raw
recurrent product, before layer norm) is the gradient of `naive.lstm_step_naive`, the same step
from r_t on. Every tensor is a view with a row stride inside
a larger NaN-filled buffer with spare rows (as the layer's packed steps pass them): the outputs
must come back finite and everything around them NaN. Triton runs through its CPU interpreter
without a GPU (conftest).
"""

import pytest
import torch
from _utils import device_for, rel_err
from lstmlab.kernels import HAS_TRITON, naive
from lstmlab.kernels.variants import (
    CIFG,
    GREFF_VARIANTS,
    LAYER_NORM,
    NO_FORGET_GATE,
    PEEPHOLES,
    RECURRENT_DROPOUT,
    ZONEOUT_C,
    ZONEOUT_H,
    CellVariant,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    from lstmlab.kernels import triton_gates as tg

DEVICE = device_for("triton_step")
VARIANTS = {name: CellVariant.greff(name) for name in GREFF_VARIANTS} | {
    "layer_norm": CellVariant(layer_norm=True),
    "zoneout_c": CellVariant(zoneout_c=0.5),
    "zoneout_h": CellVariant(zoneout_h=0.5),
    "combined": CellVariant(peepholes=True, cifg=True, layer_norm=True, zoneout_c=0.3, zoneout_h=0.3),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def step_flags(variant: CellVariant) -> int:
    """The flags the layer passes in training: the variant's bits plus those of the masks it draws."""
    return variant.flags | ZONEOUT_C * (variant.zoneout_c > 0) | ZONEOUT_H * (variant.zoneout_h > 0)


def inside(t: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """t copied into a view with a row stride in a larger buffer of fill, with spare rows and columns."""
    if t.dim() == 1:
        buffer = torch.full((t.shape[0] + 3,), fill, dtype=t.dtype, device=DEVICE)
        return buffer[2 : 2 + t.shape[0]].copy_(t)
    n, *middle, width = t.shape
    buffer = torch.full((n + 2, *middle, width + 3), fill, dtype=t.dtype, device=DEVICE)
    return buffer[1 : 1 + n, ..., 2 : 2 + width].copy_(t)


def poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return inside(torch.full(shape, float("nan"), dtype=dtype))


def assert_written_exactly(view: torch.Tensor) -> None:
    """Every element of the view written (finite), nothing around it in its buffer (still NaN)."""
    assert torch.isfinite(view).all(), view
    around = view._base.clone()
    around.as_strided(view.shape, view.stride(), view.storage_offset()).zero_()
    assert around.isnan().sum() == around.numel() - view.numel()


def make_step(n: int, H: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random inputs of one step, in float64 but each representable in the dtype it is passed in."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, scale=1.0, shift=0.0, to=dtype):
        return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(to).double()

    return {
        "gx": rand(n, 4 * H),
        "h_prev": rand(n, H),
        "c_prev": rand(n, H, to=acc),
        "w_hh": rand(4 * H, H, scale=H**-0.5),
        "peephole": rand(3, H, scale=0.5, to=acc),
        "ln_hh": rand(4 * H, scale=0.3, shift=1.0, to=acc),
        "ln_c": torch.stack([rand(H, scale=0.3, shift=1.0, to=acc), rand(H, scale=0.3, to=acc)]),
        "zoneout": torch.randint(0, 2, (n, 2, H), generator=g, dtype=torch.uint8),
        "dh": rand(n, H, to=acc),
        "dc": rand(n, H, to=acc),
    }


def oracle(variant: CellVariant, flags: int, s: dict) -> tuple[dict, dict, torch.Tensor]:
    """Forward outputs, autograd gradients of naive.lstm_cell_naive, and ∂L/∂r_t from lstm_step_naive."""
    leaves = {k: s[k].clone().requires_grad_() for k in ("gx", "h_prev", "c_prev", "w_hh", "peephole")}
    leaves["ln_hh"] = s["ln_hh"].clone().requires_grad_()
    leaves["gamma_c"], leaves["beta_c"] = (t.clone().requires_grad_() for t in s["ln_c"])
    z = s["zoneout"].double()
    z_c = z[:, 0] * bool(flags & ZONEOUT_C)  # the kernel is given both masks and must ignore an unused one
    z_h = z[:, 1] * bool(flags & ZONEOUT_H)
    zoneout = torch.stack([z_c, z_h], dim=1) if flags & (ZONEOUT_C | ZONEOUT_H) else None
    ln_c = (leaves["gamma_c"], leaves["beta_c"])
    h, c = naive.lstm_cell_naive(
        leaves["gx"], leaves["h_prev"], leaves["c_prev"], leaves["w_hh"], variant=variant,
        peephole=leaves["peephole"], ln_hh=leaves["ln_hh"], ln_c=ln_c, zoneout=zoneout,
    )  # fmt: skip
    loss = (h * s["dh"]).sum() + (c * s["dc"]).sum()
    grads = dict(
        zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), strict=True)
    )

    r = (s["h_prev"] @ s["w_hh"].T).requires_grad_()
    split = naive.lstm_step_naive(
        s["gx"], r, s["h_prev"], s["c_prev"], variant=variant, peephole=s["peephole"], ln_hh=s["ln_hh"],
        ln_c=tuple(s["ln_c"]), zoneout=torch.stack([z_c, z_h], dim=1),
    )  # fmt: skip
    assert rel_err(split["h"], h) < 1e-14 and rel_err(split["c"], c) < 1e-14  # the split is the same step
    (d_r,) = torch.autograd.grad((split["h"] * s["dh"]).sum() + (split["c"] * s["dc"]).sum(), r)
    return {k: v.detach() for k, v in split.items()}, grads, d_r


def run_kernels(flags: int, s: dict, dtype: torch.dtype, alias: bool) -> dict:
    """Both launchers on strided views in NaN-filled buffers. alias: dc_prev is dc, dh_prev is dh."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, H = s["c_prev"].shape
    ln, z_c, z_h = bool(flags & LAYER_NORM), bool(flags & ZONEOUT_C), bool(flags & ZONEOUT_H)
    r = s["h_prev"] @ s["w_hh"].T

    def given(on, t, to=acc):
        return inside(t.to(to)) if on else None

    out = {
        "gates": poisoned(n, 4 * H, dtype=acc),
        "c": poisoned(n, H, dtype=acc),
        "h": poisoned(n, H, dtype=dtype),
        "c_new": poisoned(n, H, dtype=acc) if z_c else None,
        "ln_saved": poisoned(n, 4 * H + 3, dtype=acc) if ln else None,
    }
    c_prev, peephole = inside(s["c_prev"].to(acc)), given(flags & PEEPHOLES, s["peephole"])
    ln_hh, ln_c = given(ln, s["ln_hh"]), given(ln, s["ln_c"])
    zoneout = inside(s["zoneout"], fill=7) if z_c or z_h else None
    tg.variant_gates_forward_into(
        flags, inside((s["gx"] if ln else s["gx"] + r).to(dtype)), given(ln, r, dtype), c_prev,
        given(z_h, s["h_prev"], dtype), peephole, ln_hh, ln_c, zoneout,
        out["gates"], out["c"], out["h"], out["c_new"], out["ln_saved"],
    )  # fmt: skip

    dh, dc = inside(s["dh"].to(acc)), inside(s["dc"].to(acc))
    out |= {
        "d_pre": poisoned(n, 4 * H, dtype=dtype),
        "d_rec": poisoned(n, 4 * H, dtype=dtype) if ln else None,
        "dc_prev": dc if alias else poisoned(n, H, dtype=acc),
        "dh_prev": (dh if alias else poisoned(n, H, dtype=acc)) if z_h else None,
        "d_ln_c": poisoned(n, 2, H, dtype=acc) if ln else None,
    }
    c_tilde = out["c_new"] if z_c else out["c"]
    tg.variant_gates_backward_into(
        flags, dh, dc, out["gates"], c_prev, c_tilde, out["ln_saved"], peephole, ln_hh, ln_c, zoneout,
        out["d_pre"], out["d_rec"], out["dc_prev"], out["dh_prev"], out["d_ln_c"],
    )  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def check_step(variant: CellVariant, n: int, H: int, dtype: torch.dtype, alias: bool = False) -> None:
    flags = step_flags(variant)
    s = make_step(n, H, dtype)
    want, grads, d_r = oracle(variant, flags, s)
    got = run_kernels(flags, s, dtype, alias)
    for t in got.values():  # an aliased dc_prev / dh_prev holds dc / dh: finite, and NaN around it
        assert_written_exactly(t)
    got = {k: v.double().cpu() for k, v in got.items()}
    tol = TOLERANCE[dtype]
    d_raw = got.get("d_rec", got["d_pre"])  # ∂L/∂r_t, the recurrent GEMM's output gradient

    # as the layer forms them: ∂h_{t−1} and ∂W_hh through the GEMM, the parameters' sums over rows
    c_prev, c_new = s["c_prev"], got.get("c_new", got["c"])
    da_i, da_f, _, da_o = got["d_pre"].chunk(4, dim=-1)
    compare = {
        "gates": (got["gates"], want["gates"]),
        "c": (got["c"], want["c"]),
        "h": (got["h"], want["h"]),
        "c_new": (c_new, want["c_new"]),
        "d_pre = ∂gx": (got["d_pre"], grads["gx"]),
        "∂r": (d_raw, d_r),
        "dc_prev": (got["dc_prev"], grads["c_prev"]),
        "∂h_prev": (d_raw @ s["w_hh"] + got.get("dh_prev", 0), grads["h_prev"]),
        "∂W_hh": (d_raw.T @ s["h_prev"], grads["w_hh"]),
    }
    if variant.peepholes:
        d_peephole = torch.stack([(da_i * c_prev).sum(0), (da_f * c_prev).sum(0), (da_o * c_new).sum(0)])
        compare["∂peephole"] = (d_peephole, grads["peephole"])
    if variant.layer_norm:
        compare["ln_saved"] = (got["ln_saved"], want["ln_saved"])
        compare["∂γ_hh"] = ((got["d_pre"] * got["ln_saved"][:, : 4 * H]).sum(0), grads["ln_hh"])
        compare["∂γ_c"] = (got["d_ln_c"][:, 0].sum(0), grads["gamma_c"])
        compare["∂β_c"] = (got["d_ln_c"][:, 1].sum(0), grads["beta_c"])
    errors = {name: rel_err(a, e) for name, (a, e) in compare.items()}
    assert all(err <= tol for err in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_step_matches_oracle(name, dtype):
    """n = 3 rows of a taller buffer, H = 5 (one masked block of 8); dc_prev/dh_prev alias dc/dh
    for the zoneout cases, as the layer passes them."""
    variant = VARIANTS[name]
    check_step(variant, n=3, H=5, dtype=dtype, alias=bool(step_flags(variant) & (ZONEOUT_C | ZONEOUT_H)))


@pytest.mark.parametrize("name", ["combined", "V"])
def test_rows_longer_than_one_block(name):
    """H = 300 with blocks of 256: layer norm's programs loop over the row, the others span two."""
    check_step(VARIANTS[name], n=2, H=300, dtype=torch.float64)


@pytest.mark.parametrize("name", ["combined", "V"])
def test_bf16_input_runs_in_fp32_and_is_cast_on_store(name):
    """pre, rec, h_prev, h, d_pre and d_rec in bf16; the cell state and the math in fp32."""
    check_step(VARIANTS[name], n=3, H=5, dtype=torch.bfloat16, alias=name == "combined")


@pytest.mark.parametrize("flags", [0, RECURRENT_DROPOUT])
def test_flags_without_step_bits_run_the_vanilla_kernels(flags):
    """Recurrent dropout acts before the step; with no other bit the step is today's kernels, bit for bit."""
    s = make_step(2, 5, torch.float32)
    pre = (s["gx"] + s["h_prev"] @ s["w_hh"].T).float().to(DEVICE)
    c_prev, dh, dc = (s[k].float().to(DEVICE) for k in ("c_prev", "dh", "dc"))
    want = [
        torch.empty(2, 20, device=DEVICE),
        torch.empty(2, 5, device=DEVICE),
        torch.empty(2, 5, device=DEVICE),
    ]
    got = [torch.empty_like(t) for t in want]
    tg.gates_forward_into(pre, c_prev, *want)
    tg.variant_gates_forward_into(flags, pre, None, c_prev, None, None, None, None, None, *got, None, None)
    grads_want = [torch.empty(2, 20, device=DEVICE), torch.empty(2, 5, device=DEVICE)]
    grads_got = [torch.empty_like(t) for t in grads_want]
    tg.gates_backward_into(dh, dc, want[0], want[1], c_prev, *grads_want)
    tg.variant_gates_backward_into(
        flags,
        dh,
        dc,
        got[0],
        c_prev,
        got[1],
        None,
        None,
        None,
        None,
        None,
        grads_got[0],
        None,
        grads_got[1],
        None,
        None,
    )
    for a, b in zip(got + grads_got, want + grads_want, strict=True):
        assert torch.equal(a, b)


def _forward_args(flags: int, H: int = 4, n: int = 2, **changes) -> dict:
    """Valid forward arguments for flags (zeros), then changes."""
    f32 = {"dtype": torch.float32, "device": DEVICE}
    ln, z_c, z_h = flags & LAYER_NORM, flags & ZONEOUT_C, flags & ZONEOUT_H
    args = {
        "flags": flags,
        "pre": torch.zeros(n, 4 * H, **f32),
        "rec": torch.zeros(n, 4 * H, **f32) if ln else None,
        "c_prev": torch.zeros(n, H, **f32),
        "h_prev": torch.zeros(n, H, **f32) if z_h else None,
        "peephole": torch.zeros(3, H, **f32) if flags & PEEPHOLES else None,
        "ln_hh": torch.ones(4 * H, **f32) if ln else None,
        "ln_c": torch.ones(2, H, **f32) if ln else None,
        "zoneout": torch.zeros(n, 2, H, dtype=torch.uint8, device=DEVICE) if z_c or z_h else None,
        "gates": torch.empty(n, 4 * H, **f32),
        "c": torch.empty(n, H, **f32),
        "h": torch.empty(n, H, **f32),
        "c_new": torch.empty(n, H, **f32) if z_c else None,
        "ln_saved": torch.empty(n, 4 * H + 3, **f32) if ln else None,
    }
    return args | changes


def _backward_args(flags: int, H: int = 4, n: int = 2, **changes) -> dict:
    f32 = {"dtype": torch.float32, "device": DEVICE}
    fwd = _forward_args(flags, H, n)
    ln = flags & LAYER_NORM
    args = {
        "flags": flags,
        "dh": torch.zeros(n, H, **f32),
        "dc": torch.zeros(n, H, **f32),
        "gates": fwd["gates"].zero_(),
        "c_prev": fwd["c_prev"],
        "c_new": fwd["c"].zero_(),
        "ln_saved": fwd["ln_saved"],
        "peephole": fwd["peephole"],
        "ln_hh": fwd["ln_hh"],
        "ln_c": fwd["ln_c"],
        "zoneout": fwd["zoneout"],
        "d_pre": torch.empty(n, 4 * H, **f32),
        "d_rec": torch.empty(n, 4 * H, **f32) if ln else None,
        "dc_prev": torch.empty(n, H, **f32),
        "dh_prev": torch.empty(n, H, **f32) if flags & ZONEOUT_H else None,
        "d_ln_c": torch.empty(n, 2, H, **f32) if ln else None,
    }
    return args | changes


def test_valid_error_test_arguments_run():
    """The error cases below change one argument of these: unchanged, they are accepted."""
    for flags in (PEEPHOLES | LAYER_NORM | ZONEOUT_C | ZONEOUT_H, CIFG | ZONEOUT_H):
        tg.variant_gates_forward_into(**_forward_args(flags))
        tg.variant_gates_backward_into(**_backward_args(flags))


def zeros(*shape: int, dtype: torch.dtype = torch.float32):
    return lambda: torch.zeros(*shape, dtype=dtype, device=DEVICE)


ERRORS = [
    ("forward", LAYER_NORM, {"rec": None}, r"rec is required with layer norm, got None"),
    ("forward", ZONEOUT_H, {"h_prev": None}, r"h_prev is required with zoneout on h"),
    ("forward", ZONEOUT_C, {"c_new": None}, r"c_new is required with zoneout on c"),
    ("forward", ZONEOUT_H, {"zoneout": None}, r"zoneout is required with zoneout on h"),
    ("forward", 0, {"peephole": zeros(3, 4)}, r"peephole was given, but only peepholes uses it"),
    ("forward", PEEPHOLES, {"c_new": zeros(2, 4)}, r"c_new was given, but only zoneout on c uses it"),
    ("forward", PEEPHOLES, {"peephole": zeros(2, 4)}, r"peephole must be torch.float32 of shape \(3, 4\)"),
    ("forward", ZONEOUT_C, {"zoneout": zeros(2, 2, 4)}, r"zoneout must be torch.uint8"),
    ("forward", 0, {"pre": lambda: zeros(2, 16, 2)()[:, :, 0]}, r"pre needs unit stride"),
    ("forward", CIFG | NO_FORGET_GATE, {}, r"cifg couples f = 1 − i and needs both gates"),
    ("forward", 1 << 11, {}, r"flags must be a combination of the bits"),
    ("backward", LAYER_NORM, {"d_rec": None}, r"d_rec is required with layer norm"),
    ("backward", LAYER_NORM, {"ln_saved": None}, r"ln_saved is required with layer norm"),
    ("backward", 0, {"dh_prev": zeros(2, 4)}, r"dh_prev was given, but only zoneout on h uses it"),
    ("backward", PEEPHOLES, {"d_ln_c": zeros(2, 2, 4)}, r"d_ln_c was given, but only layer norm uses it"),
    ("backward", ZONEOUT_C, {"dc": zeros(2, 5)}, r"dc must be torch.float32 of shape \(2, 4\)"),
]


@pytest.mark.parametrize(("direction", "flags", "change", "message"), ERRORS)
def test_bad_arguments_raise_a_value_error_naming_them(direction, flags, change, message):
    change = {k: None if v is None else v() for k, v in change.items()}
    make, launch = (
        (_forward_args, tg.variant_gates_forward_into)
        if direction == "forward"
        else (_backward_args, tg.variant_gates_backward_into)
    )
    with pytest.raises(ValueError, match=message):
        launch(**make(flags, **change))


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lstmlab.kernels import triton_gates as tg, variants as v

IO = {"p_pre", "p_rec", "p_h_prev", "p_h", "p_dpre", "p_drec"}  # the input's dtype; masks uint8; rest fp32
every_switch = v.STRUCTURE_BITS & ~v.CIFG | v.ZONEOUT_C | v.ZONEOUT_H
combined = v.PEEPHOLES | v.CIFG | v.LAYER_NORM | v.ZONEOUT_C | v.ZONEOUT_H
for flags in (every_switch, combined):
    for kernel in (tg.lstm_variant_fwd_kernel, tg.lstm_variant_bwd_kernel):
        const = {"BLOCK_H": 256, "FLAGS": tg._kernel_flags(flags)}
        const |= {"EPS": v.LN_EPS} if "EPS" in kernel.arg_names else {}
        names = [n for n in kernel.arg_names if n not in const]
        types = ["*bf16" if n in IO else "*u8" if n == "p_z" else "*fp32" if n[:2] == "p_" else "i32"
                 for n in names]
        signature = dict(zip(names, types)) | dict.fromkeys(const, "constexpr")
        src = ASTSource(fn=kernel, signature=signature, constexprs=const)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in compiled.asm["ptx"], kernel
        print("compiled", kernel.__name__, v.flag_names(flags))
"""


@pytest.mark.slow
def test_variant_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels' Python; Triton's real compiler (down to sm_90 PTX) also
    checks types and the constexpr branches: the layer-norm path and the blockwise path with every
    other switch on, bf16 input."""
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
