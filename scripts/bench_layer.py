"""Benchmark a whole LSTM layer: lstmlab against torch.nn.LSTM (cuDNN), torch.nn.GRU and a loop.

Every implementation is first checked against ``torch.nn.LSTM`` in float64 on the same weights
(the GRU against ``torch.nn.GRU`` in float64); a row whose check fails is marked FAILED and is
not timed. All baselines are timed in the same process and the same run.

    python scripts/bench_layer.py --quick                 # GPU preset, about 3 minutes on an H100
    python scripts/bench_layer.py                         # full default matrix of the device
    python scripts/bench_layer.py --batch 16 64 --hidden 128 256 --seq 100 --passes fwd+bwd
    python scripts/bench_layer.py --quick --bidirectional   # both directions (cuDNN: no persistent algorithm)

Writes ``results.csv``, ``results.md`` and ``time_<dtype>_<pass>.png`` under ``--out``
(default ``bench-results/<device-slug>-<YYYY-MM-DD>/`` in the working directory, ignored by git).
"""

# T: time  B: batch  I: input size  H: hidden  L: layers  G = 4H: stacked gates (i, f, g, o)

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from lstmlab.kernels import gemm
from lstmlab.kernels.gemm import CPU_GEMM_ENGINES
from lstmlab.kernels.variants import GREFF_VARIANTS

from lstmlab.runner import allocator

DTYPES: dict[str, tuple[torch.dtype, bool]] = {  # label -> (dtype, TF32 allowed)
    "fp32": (torch.float32, False),
    "fp32-tf32": (torch.float32, True),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
}
# Norm-wise max relative error (benchlib.max_rel_err) allowed against float64, outputs and
# gradients. Loose enough for rounding accumulated over 1024 steps, far below the O(1) error of
# a wrong gate order, a missing bias or a dropped timestep.
TOLERANCE = {"fp32": 1e-3, "fp32-tf32": 5e-2, "fp16": 5e-2, "bf16": 1e-1}
PASSES = ("fwd", "fwd+bwd")
BASELINE = "torch.nn.LSTM"
OUT_FILES = ("results.csv", "results.md")  # what an earlier run left in its folder (and its PNGs)
# the ratios printed beside each time on the console, as in results.md
CONSOLE_RATIOS = (("ratio_vs_baseline", f"÷ {BASELINE}"), ("ratio_vs_vanilla", "÷ vanilla"))
# "torch.nn.LSTM-fp16": cuDNN in fp16 whatever the row's dtype, the only dtype in which PyTorch picks
# cuDNN's persistent algorithm, the bar for lstmlab's persistent kernels (GPU rows not in fp16)
IMPLS = (
    "torch.nn.LSTM",
    "torch.nn.LSTM-fp16",
    "torch.nn.GRU",
    "LSTMCell-loop",
    "lstmlab.LSTM",
    "lstmlab.lstm_layer",
)
LSTMLAB_BACKENDS = ("triton_persistent", "triton_step", "cpu", "reference", "triton")

MATRIX = {
    "cuda": {
        "batch": [1, 8, 16, 64, 256],
        "hidden": [128, 256, 512, 768, 1024],
        "seq": [64, 256, 1024],
        "dtypes": ["fp32", "fp32-tf32", "fp16", "bf16"],
    },
    "cuda-quick": {  # covers the persistent kernels' targets: B16 H768 T1024 and B64 H768 T256
        "batch": [16, 64],
        "hidden": [768],
        "seq": [256, 1024],
        "dtypes": ["bf16", "fp16", "fp32"],
    },
    "cpu": {"batch": [16, 64], "hidden": [128, 256], "seq": [100], "dtypes": ["fp32"]},
    "cpu-quick": {"batch": [8], "hidden": [64], "seq": [32], "dtypes": ["fp32"]},
}

# cell variants for --variants (kernels/variants.py): Greff et al.'s eight, layer norm and the masks
VARIANTS: dict[str, dict[str, object]] = {"vanilla": {}}
VARIANTS |= {name: dict(options) for name, options in GREFF_VARIANTS.items() if options}
VARIANTS |= {
    "LN": {"layer_norm": True},
    "zoneout": {"zoneout_c": 0.1, "zoneout_h": 0.1},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
}

COLUMNS = [
    "impl",
    "backend",
    "variant",
    "input_proj",
    "cudnn_path",
    "layers",
    "directions",
    "batch",
    "hidden",
    "input_size",
    "seq_len",
    "dtype",
    "pass",
    "status",
    "max_rel_err",
    "tol",
    "reference",
    "first_call_ms",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "us_per_step",
    "tokens_per_s",
    "peak_mem_mib",
    "ratio_vs_baseline",
    "ratio_vs_vanilla",
    "ratio_vs_cudnn_fp16",
    "kernels",
    "note",
]


@dataclass(frozen=True)
class Config:
    layers: int
    batch: int
    hidden: int
    input_size: int
    seq_len: int
    dtype: str
    pass_: str
    bidirectional: bool = False

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def shape(self) -> str:
        both = " D2" if self.bidirectional else ""  # D: directions
        return f"L{self.layers} B{self.batch} H{self.hidden} I{self.input_size} T{self.seq_len}{both}"


@dataclass
class Impl:
    """One implementation on one config.

    ``prepare`` turns the input x [T, B, I] into what ``forward`` takes (x itself, or the
    precomputed gx [T, B, 4H] for rows that exclude the input projection) and stays connected
    to x in autograd so the check can compare dx. ``forward`` returns (out, h_n[, c_n]).
    """

    name: str
    input_proj: str
    forward: Callable[[Tensor], tuple[Tensor, ...]]
    params: list[Tensor]
    w_hh: Tensor  # layer-0 recurrent weight, whose gradient is checked
    backend: Callable[[], str]
    prepare: Callable[[Tensor], Tensor] = lambda x: x
    tol_dtype: str | None = None  # the dtype whose tolerance applies, if not the row's
    reference: str = "torch.nn.LSTM fp64"
    note: str = ""
    modules: list[nn.Module] = field(default_factory=list)
    cpu_gemm: str | None = None  # lstmlab's CPU GEMM engine for this row (kernels/gemm.py)
    variant: str = "vanilla"  # the lstmlab cell variant (VARIANTS)
    # the float64 twin that checks a variant row (torch.nn.LSTM has no variants): the same module
    # on the reference backend, itself tested against kernels/naive.py
    reference_module: nn.Module | None = None

    def engine(self) -> contextlib.AbstractContextManager:
        """The context every call of this implementation (checked or timed) runs in."""
        if self.cpu_gemm is None:
            return contextlib.nullcontext()
        return gemm.cpu_gemm_engine(self.cpu_gemm)


# ---------------------------------------------------------------------------------------------
# cuDNN algorithm, as PyTorch's get_algo (aten/src/ATen/native/cudnn/RNN.cpp) would pick it


def cudnn_expected_path(mode: str, cfg: Config, dtype: torch.dtype, forward: bool, props) -> str:
    """PERSIST_STATIC_SMALL_H / PERSIST_STATIC / STANDARD for an unpacked, unidirectional RNN
    without projection, following PyTorch's heuristic (cuDNN >= 8.2.1). ``props`` is
    ``torch.cuda.get_device_properties`` (major, minor, multi_processor_count)."""
    small_h = cfg.hidden <= (192 if forward else 128)
    if dtype != torch.float64 and props.major >= 6 and small_h:
        return "PERSIST_STATIC_SMALL_H"
    if dtype == torch.float16:
        common = (
            cfg.layers == 1 and cfg.hidden <= 1024 and cfg.hidden % 128 == 0 and cfg.input_size % 128 == 0
        )
        if props.major == 7 and props.minor != 5:
            b, t = cfg.batch, cfg.seq_len
            dev_ok = ((b % 16 == 0 and b not in (80, 112)) or b == 8) and (
                (t >= 40 and b <= 128) or (t >= 20 and b <= 96) or (t >= 10 and b <= 32)
            )
        elif props.major >= 8 and props.multi_processor_count >= 98 and props.minor != 6:
            dev_ok = mode == "LSTM" and cfg.batch % 8 == 0 and cfg.batch <= 128
        else:
            dev_ok = False
        if common and dev_ok:
            return "PERSIST_STATIC"
    return "STANDARD"


def cudnn_path_label(mode: str, cfg: Config, device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    if cfg.bidirectional:  # cudnn_expected_path models one direction; the kernels column says what ran
        return "not modelled for a bidirectional RNN (PERSIST_STATIC needs one direction; see kernels)"
    dtype = DTYPES[cfg.dtype][0]
    props = torch.cuda.get_device_properties(device)
    label = f"fwd {cudnn_expected_path(mode, cfg, dtype, True, props)}"
    if cfg.pass_ == "fwd+bwd":
        label += f", bwd {cudnn_expected_path(mode, cfg, dtype, False, props)}"
    label += " (expected path per PyTorch's heuristic"
    if dtype == torch.bfloat16:
        label += "; bf16 may not reach cuDNN at all, see kernels"
    return label + ")"


# ---------------------------------------------------------------------------------------------
# Implementations


class LSTMCellLoop(nn.Module):
    """The "vanilla PyTorch" LSTM: a Python loop over time of ``nn.LSTMCell`` per layer."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.cells = nn.ModuleList()
        for k in range(lstm.num_layers):
            in_size = lstm.input_size if k == 0 else lstm.hidden_size
            cell = nn.LSTMCell(in_size, lstm.hidden_size, device=lstm.weight_hh_l0.device)
            with torch.no_grad():
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, name).copy_(getattr(lstm, f"{name}_l{k}"))
            self.cells.append(cell)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h_n, c_n = [], []
        for cell in self.cells:
            h = c = x.new_zeros(x.shape[1], cell.hidden_size)
            outs = []
            for x_t in x:  # (B, I)
                h, c = cell(x_t, (h, c))
                outs.append(h)
            x = torch.stack(outs)  # (T, B, H)
            h_n.append(h)
            c_n.append(c)
        return x, torch.stack(h_n), torch.stack(c_n)


def with_engine(backend: str, engine: str | None) -> str:
    """Backend column of an lstmlab row: ``reference/auto`` on CPU, where the GEMM engine counts."""
    return backend if engine is None else f"{backend}/{engine}"


def lstm_forward(module: nn.Module) -> Callable[[Tensor], tuple[Tensor, ...]]:
    def fwd(x: Tensor) -> tuple[Tensor, ...]:
        out, (h_n, c_n) = module(x)
        return out, h_n, c_n

    return fwd


def gru_forward(module: nn.Module) -> Callable[[Tensor], tuple[Tensor, ...]]:
    def fwd(x: Tensor) -> tuple[Tensor, ...]:
        out, h_n = module(x)
        return out, h_n

    return fwd


def lstmlab_row(
    cfg: Config,
    device: torch.device,
    master: nn.LSTM,
    dtype: torch.dtype,
    backend: str,
    engine: str | None,
    variant: str,
) -> tuple[str, Impl | Unavailable | Exception]:
    """(label, Impl) of lstmlab.LSTM with one backend, CPU GEMM engine and cell variant, loaded with
    the master weights (a variant's own parameters keep their initial values)."""
    import lstmlab

    tag = with_engine(backend, engine)
    label = f"lstmlab.LSTM[{tag}]" if variant == "vanilla" else f"lstmlab.LSTM+{variant}[{tag}]"
    try:
        torch.manual_seed(0)
        options = VARIANTS[variant]
        model = lstmlab.LSTM(
            cfg.input_size, cfg.hidden, cfg.layers, device=device, backend=backend,
            bidirectional=cfg.bidirectional, **options,
        )  # fmt: skip
        model.load_state_dict(master.state_dict(), strict=variant == "vanilla")
        model.train(cfg.pass_ == "fwd+bwd")  # the masks (zoneout, dropout) exist in training only
        try:  # an explicit path that cannot run this variant is a fact, not a failure
            lstmlab.resolve_backend(backend, device, cfg.batch, cfg.hidden, dtype, flags=model.kernel_flags())
        except RuntimeError as exc:
            return label, Unavailable(str(exc))
        reference = None
        if variant != "vanilla":
            reference = copy.deepcopy(model).double()
            reference.backend = "reference"
        model = model.to(dtype)
    except Exception as exc:  # recorded as a FAILED row by the caller
        return label, exc
    return label, Impl(
        "lstmlab.LSTM",
        "included",
        lstm_forward(model),
        list(model.parameters()),
        model.weight_hh_l0,
        lambda: with_engine(str(model.last_backend), engine),
        modules=[model],
        cpu_gemm=engine,
        variant=variant,
        reference_module=reference,
        reference="torch.nn.LSTM fp64" if reference is None else "lstmlab.LSTM reference backend fp64",
    )


@dataclass
class Unavailable:
    """A requested lstmlab path that cannot run the config (e.g. the persistent kernels on a shape
    whose tiles do not fit on chip): the row reads 'unavailable' with the reason, and is not timed."""

    reason: str


def build_impls(
    cfg: Config,
    device: torch.device,
    backends: list[str],
    wanted: set[str],
    cpu_gemms: list[str],
    variants: Sequence[str] = ("vanilla",),
) -> Iterator[tuple[str, Impl | Unavailable | Exception]]:
    """Yields (label, Impl) in timing order, baseline first; a construction error is yielded
    in place of the Impl so it becomes a FAILED row. On CPU each lstmlab row is repeated for
    every GEMM engine in ``cpu_gemms``."""
    dtype = DTYPES[cfg.dtype][0]
    torch.manual_seed(0)
    master = nn.LSTM(  # every LSTM's weights
        cfg.input_size, cfg.hidden, cfg.layers, device=device, bidirectional=cfg.bidirectional
    )

    torch_rows = {
        "torch.nn.LSTM": torch_lstm_impl,
        "torch.nn.LSTM-fp16": torch_lstm_fp16_impl,
        "torch.nn.GRU": torch_gru_impl,
        "LSTMCell-loop": cell_loop_impl,
    }
    for name, make in torch_rows.items():
        if name in wanted:
            impl = make(cfg, device, master, dtype)
            if impl is not None:
                yield name, impl
    engines: list[str | None] = list(cpu_gemms) if device.type == "cpu" else [None]
    for backend, engine in itertools.product(backends, engines):
        yield from lstmlab_rows(cfg, device, master, dtype, backend, engine, wanted, variants)


def torch_lstm_impl(cfg: Config, device: torch.device, master: nn.LSTM, dtype: torch.dtype) -> Impl:
    """The baseline: torch.nn.LSTM (cuDNN on a GPU, aten or oneDNN on the CPU)."""
    m = copy.deepcopy(master).to(dtype)
    return Impl(
        "torch.nn.LSTM",
        "included",
        lstm_forward(m),
        list(m.parameters()),
        m.weight_hh_l0,
        lambda: "cudnn" if device.type == "cuda" else "aten",
        note="cuDNN cannot exclude the input projection" if device.type == "cuda" else "",
        modules=[m],
    )


def torch_lstm_fp16_impl(
    cfg: Config, device: torch.device, master: nn.LSTM, dtype: torch.dtype
) -> Impl | None:
    """cuDNN in fp16 beside a row of another dtype (GPU only): the persistent kernels' bar."""
    if device.type != "cuda" or dtype == torch.float16:
        return None
    m16 = copy.deepcopy(master).half()
    return Impl(
        "torch.nn.LSTM-fp16",
        "included",
        lstm_forward(m16),
        list(m16.parameters()),
        m16.weight_hh_l0,
        lambda: "cudnn",
        prepare=lambda x: x.half(),
        note="cuDNN in fp16 (its persistent algorithm where PyTorch allows it); input cast untimed",
        modules=[m16],
        tol_dtype="fp16",
    )


def torch_gru_impl(cfg: Config, device: torch.device, master: nn.LSTM, dtype: torch.dtype) -> Impl:
    """torch.nn.GRU of the same sizes: another function, checked against itself in float64."""
    torch.manual_seed(1)
    gru = nn.GRU(cfg.input_size, cfg.hidden, cfg.layers, device=device, bidirectional=cfg.bidirectional)
    gru = gru.to(dtype)
    return Impl(
        "torch.nn.GRU",
        "included",
        gru_forward(gru),
        list(gru.parameters()),
        gru.weight_hh_l0,
        lambda: "cudnn" if device.type == "cuda" else "aten",
        reference="torch.nn.GRU fp64 (a GRU is not an LSTM)",
        note="GRU cell: 3 gates, not the same function",
        modules=[gru],
    )


def cell_loop_impl(cfg: Config, device: torch.device, master: nn.LSTM, dtype: torch.dtype) -> Impl | None:
    """The "vanilla PyTorch" LSTM: a Python loop over nn.LSTMCell (one direction only)."""
    if cfg.bidirectional:
        print("  LSTMCell-loop: skipped, it runs one direction")
        return None
    loop = LSTMCellLoop(master).to(dtype)
    return Impl(
        "LSTMCell-loop",
        "included",
        loop.forward,
        list(loop.parameters()),
        loop.cells[0].weight_hh,
        lambda: "eager",
        note="Python loop over nn.LSTMCell",
        modules=[loop],
    )


def lstmlab_rows(
    cfg: Config,
    device: torch.device,
    master: nn.LSTM,
    dtype: torch.dtype,
    backend: str,
    engine: str | None,
    wanted: set[str],
    variants: Sequence[str],
) -> Iterator[tuple[str, Impl | Unavailable | Exception]]:
    """lstmlab's rows for one backend and CPU GEMM engine: the module (one per cell variant) and
    the bare layer function; both 'unavailable' where the backend cannot run the shape."""
    import lstmlab

    tag = with_engine(backend, engine)
    try:  # an explicit path that cannot run this shape is a fact about the shape, not a failure
        lstmlab.resolve_backend(backend, device, cfg.batch, cfg.hidden, dtype)
    except RuntimeError as exc:
        for impl in ("lstmlab.LSTM", "lstmlab.lstm_layer"):
            if impl in wanted:
                yield f"{impl}[{tag}]", Unavailable(str(exc))
        return
    if "lstmlab.LSTM" in wanted:
        for variant in variants:
            yield lstmlab_row(cfg, device, master, dtype, backend, engine, variant)
    if "lstmlab.lstm_layer" in wanted:
        label = f"lstmlab.lstm_layer[{tag}]"
        if cfg.layers != 1 or cfg.bidirectional:
            print(f"  {label}: skipped, excluding the input projection needs --layers 1, one direction")
            return
        try:
            yield label, lstm_layer_impl(cfg, device, master, dtype, backend, engine)
        except Exception as exc:  # recorded as a FAILED row by the caller
            yield label, exc


def lstm_layer_impl(
    cfg: Config, device: torch.device, master: nn.LSTM, dtype: torch.dtype, backend: str, engine: str | None
) -> Impl:
    """lstmlab.kernels.lstm_layer on a precomputed gx: the recurrence without the input projection."""
    from lstmlab.kernels import lstm_layer

    import lstmlab

    # the functions take an implementation: 'triton' is resolved as the modules do
    layer_backend = lstmlab.resolve_backend(backend, device, cfg.batch, cfg.hidden, dtype)
    w = copy.deepcopy(master).to(dtype)  # holds W_ih, W_hh, biases for the kernel call
    h0 = torch.zeros(cfg.batch, cfg.hidden, device=device, dtype=dtype)
    c0 = torch.zeros_like(h0)

    def project(x: Tensor) -> Tensor:
        return nn.functional.linear(x, w.weight_ih_l0, w.bias_ih_l0 + w.bias_hh_l0)  # (T, B, 4H)

    def run_layer(gx: Tensor) -> tuple[Tensor, ...]:
        return lstm_layer(gx, h0, c0, w.weight_hh_l0, backend=layer_backend)

    return Impl(
        "lstmlab.lstm_layer",
        "excluded",
        run_layer,
        [w.weight_hh_l0],
        w.weight_hh_l0,
        lambda: with_engine(layer_backend, engine),
        prepare=project,
        note="gx = x W_ih^T + b precomputed outside the timed region",
        modules=[w],
        cpu_gemm=engine,
    )


# ---------------------------------------------------------------------------------------------
# Check, then time


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_outputs(
    impl: Impl, cfg: Config, x: Tensor, gout: Tensor, backward: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """(outputs, gradients) of the float64 reference on the same (already rounded) weights."""
    if impl.name == "torch.nn.GRU":
        ref = copy.deepcopy(impl.modules[0]).double()
        forward = gru_forward(ref)
    elif impl.reference_module is not None:
        ref = impl.reference_module
        ref.train(backward)
        forward = lstm_forward(ref)
    else:
        ref = nn.LSTM(
            cfg.input_size, cfg.hidden, cfg.layers, device=x.device, dtype=torch.float64,
            bidirectional=cfg.bidirectional,
        )  # fmt: skip
        ref.load_state_dict(reference_state(impl), strict=True)
        forward = lstm_forward(ref)
    with tf32(False):
        x64 = x.detach().double().requires_grad_(backward)
        torch.manual_seed(0)  # the checked call draws the same masks (zoneout, dropout)
        outs = forward(x64)
        grads: list[Tensor] = []
        if backward:
            outs[0].backward(gout.double())
            grads = [x64.grad, ref.weight_hh_l0.grad]
    return [o.detach() for o in outs], grads


def reference_state(impl: Impl) -> dict[str, Tensor]:
    """torch.nn.LSTM state dict (float64) of the weights ``impl`` actually computes with."""
    module = impl.modules[0]
    if isinstance(module, LSTMCellLoop):
        state = {}
        for k, cell in enumerate(module.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                state[f"{name}_l{k}"] = getattr(cell, name)
    else:
        state = {k: v for k, v in module.state_dict().items() if k.split("_l")[0] in _LSTM_KEYS}
    return {k: v.detach().double() for k, v in state.items()}


_LSTM_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def check(
    impl: Impl, cfg: Config, x: Tensor, gout: Tensor, fault: bool, device: torch.device
) -> tuple[float, float]:
    """Max relative error of outputs (and dx, dW_hh for fwd+bwd) against float64, and the wall
    time in ms of this first call of the implementation (JIT / compile / cuDNN set-up)."""
    backward = cfg.pass_ == "fwd+bwd"
    ref_outs, ref_grads = reference_outputs(impl, cfg, x, gout, backward)
    for m in impl.modules:
        m.train(backward)
    xr = x.detach().clone().requires_grad_(backward)
    impl.w_hh.grad = None
    benchlib.sync(device)
    t0 = time.perf_counter()
    with impl.engine():
        torch.manual_seed(0)  # the reference drew its masks from this seed
        outs = list(impl.forward(impl.prepare(xr)))
        if fault:
            outs[0] = outs[0] + 1.0
        grads: list[Tensor] = []
        if backward:
            outs[0].backward(gout)
            grads = [xr.grad, impl.w_hh.grad]
    benchlib.sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    mine, refs = [*outs, *grads], [*ref_outs, *ref_grads]
    refs = [r.reshape(m.shape) for r, m in zip(refs, mine, strict=True)]
    return benchlib.max_rel_err(mine, refs), first_ms


def check_one(
    label: str,
    impl: Impl,
    cfg: Config,
    device: torch.device,
    args: argparse.Namespace,
    x: Tensor,
    gout: Tensor,
) -> tuple[dict[str, object], Callable[[], None] | None, list[Tensor] | None]:
    """Checks one implementation; returns its row and, when the check passed, the timed call
    and the tensors whose gradients it resets."""
    backward = cfg.pass_ == "fwd+bwd"
    row: dict[str, object] = {
        "impl": impl.name,
        "input_proj": impl.input_proj,
        "reference": impl.reference,
        "note": impl.note,
        "tol": TOLERANCE[impl.tol_dtype or cfg.dtype],
    }
    fault = impl.name in args.inject_fault or label in args.inject_fault
    steps = args.check_seq or cfg.seq_len  # a prefix: chaotic cells part from float64 over long T
    err, row["first_call_ms"] = check(impl, cfg, x[:steps], gout[:steps], fault, device)
    row["backend"] = impl.backend()  # last_backend is known once a forward has run
    row["max_rel_err"] = err
    if not err <= row["tol"]:
        row["status"] = "FAILED"
        row["note"] = f"correctness check failed: err {err:.3g} > tol {row['tol']}"
        if fault:
            row["note"] += " (fault injected by --inject-fault)"
        return row, None, None

    # Timed input: x itself, or gx precomputed outside the timed region.
    with torch.no_grad():
        inp = impl.prepare(x).detach()
    inp.requires_grad_(backward)
    for m in impl.modules:
        m.train(backward)

    if backward:

        def fn() -> None:
            with impl.engine():
                impl.forward(inp)[0].backward(gout)

        grad_to_none = [inp, *impl.params]
    else:

        def fn() -> None:
            with torch.no_grad(), impl.engine():
                impl.forward(inp)

        grad_to_none = None

    return row, fn, grad_to_none


def time_rows(
    timed: list[tuple[dict[str, object], Callable[[], None], list[Tensor] | None]],
    cfg: Config,
    device: torch.device,
    args: argparse.Namespace,
) -> None:
    """Times every checked implementation of one config and fills its row.

    CUDA: one ``do_bench`` per implementation. CPU: interleaved blocks (benchlib.time_interleaved)
    so that load from other processes on a shared machine falls on every implementation alike.
    """
    if device.type == "cuda":
        results = [
            benchlib.time_fn(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, grad_to_none=grads)
            for _, fn, grads in timed
        ]
    else:
        results = benchlib.time_interleaved(
            [(fn, grads) for _, fn, grads in timed], min_run_time_s=args.min_run_time * len(timed)
        )
    for (row, fn, grads), (med, p20, p80) in zip(timed, results, strict=True):
        row |= {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "status": "ok"}
        row["us_per_step"] = med * 1e3 / cfg.seq_len
        row["tokens_per_s"] = cfg.batch * cfg.seq_len / (med * 1e-3)
        row["peak_mem_mib"] = benchlib.peak_memory_mib(fn, device, grads)
        if row["impl"] in ("torch.nn.LSTM", "torch.nn.GRU"):
            row["kernels"] = benchlib.top_ops(fn, device)
            if device.type == "cpu" and "mkldnn_rnn" in str(row["kernels"]):
                row["backend"] = "onednn"  # torch's CPU LSTM dispatches to oneDNN's fused RNN


# ---------------------------------------------------------------------------------------------
# Driver


def make_parser() -> argparse.ArgumentParser:
    p = benchlib.common_parser(__doc__, dtypes=DTYPES, passes=PASSES, impls=IMPLS, min_run_time=1.0)
    p.add_argument("--seq", type=int, nargs="+", help="sequence lengths T (default: the device's preset)")
    p.add_argument("--input-size", type=int, help="input size I (default: equal to the hidden size)")
    p.add_argument("--layers", type=int, nargs="+", default=[1], help="numbers of layers L (default: 1)")
    p.add_argument(
        "--bidirectional",
        action="store_true",
        help="every model bidirectional (shape D2; the LSTMCell loop and the bare layer rows are left out)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=LSTMLAB_BACKENDS,
        help="lstmlab backends, one row each (default: the persistent kernels, the per-step ones, the C++\n"
        "CPU kernel (cpu) and the reference; 'triton' lets lstmlab choose between the first two)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["vanilla"],
        choices=list(VARIANTS),
        help="lstmlab.LSTM cell variants, one row each per backend (kernels/variants.py); a variant\n"
        "row's ÷ vanilla compares it with the vanilla row of the same backend",
    )
    p.add_argument(
        "--check-seq",
        type=int,
        help="check correctness on the first N steps only (default: all). Some cell variants are\n"
        "chaotic at their initialisation (layer norm, no forget gate): bf16 and even fp32 runs part\n"
        "from float64 over hundreds of steps whatever the implementation, so a long check says\n"
        "nothing about the code. Timing always runs the full --seq.",
    )
    p.add_argument(
        "--cpu-gemm",
        nargs="+",
        default=["auto"],
        choices=CPU_GEMM_ENGINES,
        help="CPU only: lstmlab's GEMM engines, one row each (see lstmlab/kernels/gemm.py)",
    )
    p.add_argument(
        "--inject-fault",
        nargs="+",
        default=[],
        metavar="IMPL",
        help="harness self-test: add 1.0 to this implementation's output (e.g. torch.nn.GRU,\n"
        "lstmlab.LSTM[reference]) so its check fails and the row must read FAILED",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = make_parser()
    args = p.parse_args(argv)
    device = benchlib.apply_preset(args, MATRIX)
    if device.type != "cuda" and "fp32-tf32" in args.dtypes:
        p.error("fp32-tf32 needs a CUDA device")
    return args


def lstmlab_backends(args: argparse.Namespace, device: torch.device) -> tuple[list[str], str]:
    """Backends to run on this device, and a printed reason for those left out."""
    wanted = args.backends or ["triton_persistent", "triton_step", "cpu", "reference"]
    if device.type == "cuda":
        return [b for b in wanted if b != "cpu"], ""
    reason = ""
    skipped = [b for b in wanted if b.startswith("triton")]
    if skipped:
        reason = (
            f"lstmlab backend {', '.join(repr(b) for b in skipped)} skipped on CPU: Triton runs there "
            "only under TRITON_INTERPRET=1, an interpreter whose timings mean nothing"
        )
        print(reason)
    return [b for b in wanted if not b.startswith("triton")], reason


def configs(args: argparse.Namespace) -> list[Config]:
    return [
        Config(layers, b, h, args.input_size or h, t, dt, ps, args.bidirectional)
        for dt, ps, layers, t, h, b in itertools.product(
            args.dtypes, args.passes, args.layers, args.seq, args.hidden, args.batch
        )
    ]


def main(argv: list[str] | None = None, allocator_note: str = "this process's, unchanged") -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out_dir = benchlib.claim_out_dir(
            args.out, benchlib.default_out_dir(device), OUT_FILES, args.overwrite
        )
    except benchlib.OutDirTaken as err:
        print(f"bench_layer: {err}", file=sys.stderr)
        return 2
    env = benchlib.environment(device)
    env["allocator"] = allocator_note
    backends, skip_reason = lstmlab_backends(args, device)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    writer = benchlib.CsvWriter(out_dir / "results.csv", ["device", *COLUMNS])
    rows: list[dict[str, object]] = []
    cfgs = configs(args)
    t_start = time.monotonic()
    stopped_at = None
    for n, cfg in enumerate(cfgs):
        if args.time_budget_s is not None and time.monotonic() - t_start >= args.time_budget_s:
            stopped_at = n
            print(f"time budget of {args.time_budget_s:.0f} s spent: {len(cfgs) - n} configs not run")
            break
        print(f"[{n + 1}/{len(cfgs)}] {cfg.shape} {cfg.dtype} {cfg.pass_}", flush=True)
        rows += run_config(cfg, device, backends, args, writer)
    writer.close()
    env["load_avg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    notes = md_notes(device, skip_reason, stopped_at, len(cfgs))
    no_plots = benchlib.plotting_unavailable()
    if no_plots:
        print(f"WARNING: {no_plots}", file=sys.stderr)
        notes.append(no_plots + ".")
    benchlib.write_markdown(out_dir / "results.md", "lstmlab layer benchmark", env, rows, notes, MD_COLUMNS)
    plots = [] if no_plots else benchlib.write_plots(out_dir, plot_figures(rows, args, env["device"]))
    print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'results.md'}, {len(plots)} plots")
    return 0


def run_config(
    cfg: Config,
    device: torch.device,
    backends: list[str],
    args: argparse.Namespace,
    writer: benchlib.CsvWriter,
) -> list[dict[str, object]]:
    dtype, allow_tf32 = DTYPES[cfg.dtype]
    rows = []
    base = {
        "device": str(device),
        "layers": cfg.layers,
        "directions": cfg.directions,
        "batch": cfg.batch,
        "hidden": cfg.hidden,
        "input_size": cfg.input_size,
        "seq_len": cfg.seq_len,
        "dtype": cfg.dtype,
        "pass": cfg.pass_,
        "shape": cfg.shape,
    }
    with tf32(allow_tf32):
        gen = torch.Generator(device="cpu").manual_seed(1234)
        x = torch.randn(cfg.seq_len, cfg.batch, cfg.input_size, generator=gen)
        gout = torch.randn(cfg.seq_len, cfg.batch, cfg.directions * cfg.hidden, generator=gen)
        x, gout = x.to(device, dtype), gout.to(device, dtype)
        timed = []
        impls = build_impls(cfg, device, backends, set(args.impls), args.cpu_gemm, args.variants)
        for label, impl in impls:
            name, _, backend = label.partition("[")
            name, _, variant = name.partition("+")
            row = dict(base) | {"impl": name, "backend": backend.rstrip("]"), "variant": variant or "vanilla"}
            if isinstance(impl, Unavailable):
                row |= {"status": "unavailable", "note": impl.reason}
            elif isinstance(impl, Exception):
                row |= {"status": "FAILED", "note": benchlib.describe_exception(impl)}
            else:
                if impl.name in ("torch.nn.LSTM", "torch.nn.GRU"):
                    mode = "LSTM" if impl.name == "torch.nn.LSTM" else "GRU"
                    row["cudnn_path"] = cudnn_path_label(mode, cfg, device)
                try:
                    checked, fn, grads = check_one(label, impl, cfg, device, args, x, gout)
                    row |= checked
                    if fn is not None:
                        timed.append((row, fn, grads))
                except Exception as exc:  # one broken implementation must not end the run
                    row |= {"status": "FAILED", "note": benchlib.describe_exception(exc)}
            rows.append(row)
        try:
            time_rows(timed, cfg, device, args)
        except Exception as exc:  # e.g. out of memory while timing: the config's rows fail
            note = benchlib.describe_exception(exc)
            for row, _, _ in timed:
                row |= {"status": "FAILED", "note": f"timing failed: {note}"}
        del timed
        benchlib.free_memory(device)
    baseline = [r for r in rows if r["impl"] == BASELINE and r.get("status") == "ok"]
    fp16_name = BASELINE if cfg.dtype == "fp16" else "torch.nn.LSTM-fp16"
    cudnn_fp16 = [r for r in rows if r["impl"] == fp16_name and r.get("status") == "ok"]
    vanilla = {
        r["backend"]: r
        for r in rows
        if r["impl"] == "lstmlab.LSTM" and r["variant"] == "vanilla" and r.get("status") == "ok"
    }
    for row in rows:
        if baseline and row.get("status") == "ok":
            row["ratio_vs_baseline"] = float(row["median_ms"]) / float(baseline[0]["median_ms"])
        same_path = vanilla.get(row.get("backend"))
        if row.get("variant", "vanilla") != "vanilla" and same_path is not None and row.get("status") == "ok":
            row["ratio_vs_vanilla"] = float(row["median_ms"]) / float(same_path["median_ms"])
        if cudnn_fp16 and device.type == "cuda" and row.get("status") == "ok":
            row["ratio_vs_cudnn_fp16"] = float(row["median_ms"]) / float(cudnn_fp16[0]["median_ms"])
        benchlib.print_row(row, CONSOLE_RATIOS)
        writer.write(row)
    return rows


def md_notes(device: torch.device, skip_reason: str, stopped_at: int | None, n_cfgs: int) -> list[str]:
    baseline = (
        "cuDNN `torch.nn.LSTM`"
        if device.type == "cuda"
        else "`torch.nn.LSTM` (on CPU oneDNN's fused LSTM when `kernels` shows aten::mkldnn_rnn_layer)"
    )
    timer = (
        "`triton.testing.do_bench` (CUDA events, warm-up, L2 flushed before each call)"
        if device.type == "cuda"
        else f"interleaved timing with {torch.get_num_threads()} torch thread(s): 15 round-robin "
        "blocks per config (each implementation once per round, so load from other processes "
        "hits all alike); median and quantiles over the rounds"
    )
    notes = [
        f"Times: median [20 %, 80 %] in ms from {timer}. `first ms` = wall time of the "
        "implementation's first call (the correctness check: forward, and backward for "
        "fwd+bwd); Triton JIT and cuDNN set-up show there, once per process and dtype.",
        "`fwd` = inference forward under `torch.no_grad()`, modules in eval mode; `fwd+bwd` = "
        "forward plus `out.backward(grad)`, input requiring grad, grads reset each call.",
        f"`ratio` = median / median of {baseline} on the same shape, dtype and pass (> 1: "
        "slower than the baseline); `÷ cuDNN fp16` (GPU) = median / median of cuDNN in fp16 on the "
        "same shape and pass (`torch.nn.LSTM-fp16` rows), the dtype of cuDNN's persistent algorithm.",
        "`err` = max over outputs (out, h_n, c_n; for fwd+bwd also dx and dW_hh of layer 0) of "
        "max|y - y_ref| / max|y_ref|, against the float64 reference on the same weights; a row "
        "above `tol` is FAILED and not timed (a cell `variant` row is checked against the same module "
        "on the reference backend in float64, masks drawn from the same seed; `÷ vanilla` = its median "
        "/ the vanilla lstmlab.LSTM row's of the same backend); a requested lstmlab path that cannot "
        "run the shape (e.g. "
        "the persistent kernels where their tiles spill) reads `unavailable`, with the reason.",
        "`input proj excluded` rows call `lstmlab.kernels.lstm_layer` on a precomputed gx; "
        "cuDNN cannot exclude the input projection, so the baseline always includes it.",
        "`cudnn path`: the algorithm PyTorch's heuristic (aten/src/ATen/native/cudnn/RNN.cpp, "
        "get_algo) is expected to pick, not observed; `kernels` lists what the profiler saw in "
        "one call of the torch baselines (top CUDA kernels by GPU time; on CPU top ops by self "
        "time, e.g. `aten::mkldnn_rnn_layer` = oneDNN's fused LSTM).",
        "µs/step = median / T; tokens/s = B·T / median; peak MiB = CUDA memory allocated "
        "above the pre-call level during one call (not measured on CPU).",
    ]
    if device.type == "cpu":
        notes.append(
            "lstmlab `backend` on CPU reads `<backend>/<GEMM engine>` (`--cpu-gemm`): `blas` = every "
            f"product in torch.mm (MKL in PyPI wheels), `auto` = products of ≥ {gemm.ONEDNN_MIN_MACS} "
            f"multiply-adds and ≥ {gemm.ONEDNN_MIN_ROWS} rows in oneDNN, `onednn` = all of them "
            "(lstmlab/kernels/gemm.py)."
        )
    if skip_reason:
        notes.append(skip_reason + ".")
    if stopped_at is not None:
        notes.append(f"Time budget spent: {n_cfgs - stopped_at} of {n_cfgs} configs not run.")
    return notes


MD_COLUMNS = [  # (header, row key) of results.md
    ("impl", "impl"),
    ("backend", "backend"),
    ("variant", "variant"),
    ("input proj", "input_proj"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("pass", "pass"),
    ("status", "status"),
    ("median ms", "median_ms"),
    ("p20 ms", "p20_ms"),
    ("p80 ms", "p80_ms"),
    ("µs/step", "us_per_step"),
    ("tokens/s", "tokens_per_s"),
    ("ratio", "ratio_vs_baseline"),
    ("÷ vanilla", "ratio_vs_vanilla"),
    ("÷ cuDNN fp16", "ratio_vs_cudnn_fp16"),
    ("err", "max_rel_err"),
    ("peak MiB", "peak_mem_mib"),
    ("first ms", "first_call_ms"),
    ("cudnn path", "cudnn_path"),
    ("kernels", "kernels"),
    ("note", "note"),
]


def plot_figures(
    rows: list[dict[str, object]], args: argparse.Namespace, device_name: str
) -> dict[str, tuple[str, list[benchlib.Panel]]]:
    """Per (dtype, pass): median time vs batch and vs hidden, one line per implementation."""
    ok = [r for r in rows if r.get("status") == "ok"]
    t_fix = max(args.seq)
    h_fix = sorted(args.hidden)[len(args.hidden) // 2]
    b_fix = 16 if 16 in args.batch else sorted(args.batch)[len(args.batch) // 2]
    l_fix = args.layers[0]
    figures = {}
    for dt, ps in itertools.product(args.dtypes, args.passes):
        sel = [r for r in ok if r["dtype"] == dt and r["pass"] == ps and r["layers"] == l_fix]
        sel = [r for r in sel if r["seq_len"] == t_fix]
        if not sel:
            continue
        panels = []
        for x_key, fixed_key, fixed in (("batch", "hidden", h_fix), ("hidden", "batch", b_fix)):
            lines: dict[str, list[tuple[float, float]]] = {}
            for r in sel:
                if r[fixed_key] == fixed:
                    lines.setdefault(plot_label(r), []).append((r[x_key], r["median_ms"]))
            title = f"{fixed_key} = {fixed}, T = {t_fix}, L = {l_fix}"
            title += ", bidirectional" if args.bidirectional else ""
            panels.append(benchlib.Panel(dict(sorted(lines.items())), x_key, "median time (ms)", title))
        figures[f"time_{dt}_{ps.replace('+', '_')}.png"] = (f"{device_name}, {dt}, {ps}", panels)
    return figures


def plot_label(row: dict[str, object]) -> str:
    label = f"{row['impl']} [{row['backend']}]"
    if row.get("variant", "vanilla") != "vanilla":
        label = f"{row['impl']}+{row['variant']} [{row['backend']}]"
    if row["input_proj"] == "excluded":
        label += " (no input proj)"
    return label


if __name__ == "__main__":
    # lstmlab-train's heap policy (lstmlab/runner/allocator.py), before anything is allocated: with
    # glibc's defaults CPU rows time page faults as well as the implementations
    sys.exit(main(allocator_note=allocator.keep_freed_memory()))
