"""The fused CPU LSTM kernel (`cpu_lstm.cpp`): one layer and direction over a whole sequence, forward
and backward, in one C++ time loop.

Per step the C++ loop runs one product and the gate math, split over threads by blocks of hidden
units. With more than one block, one OpenMP team runs the whole loop and a step's region ends at a
barrier (a fork and join per region and step cost more, T times a call). The product is our own
micro-kernel: a tile of 6 batch rows (2 with AVX2) × 4 vectors of gate columns (i, f, g, o of one
panel of units) held in vector registers over the whole contraction, with the weights packed by
panels once per call (each block packs its own, by L × L transposes); the gate math
(``at::vec::Vectorized``) reads it from an L1 tile, two rows side by side so that their chains of
exponentials overlap. Given the layer's input and W_ih, the forward
takes [x_t | h_{t−1}]·[W_ih | W_hh]ᵀ + b per step (no [T, B, 4H] input projection is written or
read), and the backward takes ∂pre_t·[W_ih | W_hh] (∂x with ∂h) and accumulates
∂W += ∂pre_tᵀ·[x_t | h_{t−1} ⊙ m] step by step, so nothing is left for GEMMs after the loop but
the projection's and the bias's (Σ ∂pre). With a projection (proj_size) h = h_raw·W_hrᵀ is ATen's
oneDNN micro-kernel (``at::native::cpublas::brgemm``, fp32) or ``at::mm_out`` (fp64). Given gx
instead, the contract is that of ``triton_persistent.persistent_forward`` / ``persistent_backward``,
plus the projection.

Build: just in time, on first use, with ``torch.utils.cpp_extension.load`` into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), one library per source hash,
torch version and vector ISA, loaded straight from the cache afterwards (no compiler needed then).
Measured on the project's 2-core AMD EPYC (Zen 4, torch 2.13, g++ 13) while three other engineers'
jobs shared the two cores (load 4.5–5.6): 17–24 s for the first build, 0.14 s for a cached load.
The source includes only the ATen headers it uses and registers its ops with ``TORCH_LIBRARY``
(no pybind11): a ten-line ``load_inline`` that includes ``torch/extension.h`` took 60 s there.

Why JIT and not at install (AOT, a ``CppExtension`` in setup.py): the README's setup is
``pip install -e .``, which builds no C++ today; AOT would need torch importable at build time (no
build isolation) and add the build to every install, also for GPU users who never run this kernel;
and a wheel built on one machine fixes the vector ISA for every machine that installs it. Built
where it runs, the kernel takes the ISA that ATen itself dispatches to there
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or the portable DEFAULT build), with
explicit ``-m`` flags rather than ``-march=native``: the ISA is part of the library's name, so a
cache shared between machines (an NFS home) never hands a library to a CPU without its instructions.

Where it cannot be built (no compiler, no ninja, a compiler error), :func:`unavailable_reason` says
why, with the compiler's own message, and never raises; :func:`sequence_forward` and
:func:`sequence_backward` raise with that reason.

T: time  B: batch  H: hidden size  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
acc: fp32 for fp32 inputs, fp64 for fp64 (the only dtypes the kernel takes, so acc is the dtype)
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from . import variants

SOURCE = Path(__file__).with_name("cpu_lstm.cpp")
SUPPORTED_DTYPES = (torch.float32, torch.float64)
# every bit of variants.py but LAYER_NORM
SUPPORTED_FLAGS = functools.reduce(int.__or__, variants.FLAG_NAMES) & ~variants.LAYER_NORM
# the compiler flags of each at::vec implementation (ATen defines CPU_CAPABILITY_* the same way for
# its own kernels); AVX512 as ATen's own AVX512 kernels are built
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}
# at::parallel_for is a header template: without -fopenmp its `#pragma omp parallel` compiles to
# nothing and every block runs on the calling thread. The library then uses the libgomp.so.1 that
# torch has loaded already (same soname).
OPENMP_FLAGS = ["-fopenmp"] if torch.backends.openmp.is_available() else []
# what the first build says it will take, from the measurements in the module docstring
BUILD_SECONDS = "20–40 s"
# Set by tests: every buffer the kernel allocates starts as NaN, so an element it forgets to write fails.
POISON_OUTPUTS = False

_lock = threading.Lock()
_load_error: str | None = None  # why the library could not be built or loaded; None: not tried or loaded
_loaded = False


def vector_isa() -> str:
    """The at::vec implementation to compile: the one ATen dispatches to on this CPU, if we know its flags."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "AVX512"
    return capability if capability in ISA_FLAGS else "DEFAULT"


def _library_name(isa: str) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([torch.__version__, sys.version, *ISA_FLAGS[isa], *OPENMP_FLAGS]).encode())
    return f"lstmlab_cpu_lstm_{isa.lower()}_{digest.hexdigest()[:12]}"


def _build_directory(name: str) -> Path:
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / name


def _load() -> None:
    """Builds the library if its cache entry is missing, then loads it into torch.ops.lstmlab_cpu."""
    global _loaded
    from torch.utils import cpp_extension

    isa = vector_isa()
    name = _library_name(isa)
    directory = _build_directory(name)
    library = directory / f"{name}.so"
    if not library.exists():
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX to one)")
        print(
            f"lstmlab: compiling the fused CPU LSTM kernel ({SOURCE.name}, {isa}) into {directory}, "
            f"once; this takes about {BUILD_SECONDS}",
            file=sys.stderr,
            flush=True,
        )
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        cpp_extension.load(
            name,
            [str(SOURCE)],
            extra_cflags=["-O3", *ISA_FLAGS[isa], *OPENMP_FLAGS],
            extra_ldflags=OPENMP_FLAGS,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
        print(f"lstmlab: built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    else:
        torch.ops.load_library(str(library))
    bits = list(torch.ops.lstmlab_cpu.flag_bits())
    expected = list(variants.FLAG_NAMES)
    if bits != expected:
        raise RuntimeError(
            f"{SOURCE.name} has flag bits {bits}, variants.py {expected}: rebuild from one source"
        )
    _loaded = True


def load_error() -> str | None:
    """None once the library is loaded (building it on first call), else why it cannot be, with the
    compiler's message. The outcome is kept for the process: a failed build is not retried."""
    global _load_error
    with _lock:
        if _loaded or _load_error is not None:
            return _load_error
        try:
            _load()
        except Exception as exc:  # kept, with its message, as the reason this backend is unavailable
            _load_error = f"the fused CPU kernel could not be built or loaded: {type(exc).__name__}: {exc}"
        return _load_error


def unavailable_reason(
    B: int, H: int, dtype: torch.dtype, device: torch.device | str = "cpu", flags: int = 0, proj_size: int = 0
) -> str | None:
    """None if the fused CPU kernel can run this layer, else a one-line reason (never raises).

    It takes fp32 and fp64 CPU tensors and every variant bit but LAYER_NORM; zoneout on h only
    without a projection (z^h mixes h_{t−1} [B, P] with h̃ [B, H]). The first call that passes
    those checks builds the library (see the module docstring); a failed build is a reason too.
    """
    if torch.device(device).type != "cpu":
        return f"the fused CPU kernel runs on CPU tensors, not {torch.device(device).type}"
    if dtype not in SUPPORTED_DTYPES:
        return f"the fused CPU kernel takes {[str(d) for d in SUPPORTED_DTYPES]}, not {dtype} (no bf16 build)"
    if B < 0 or H < 1:
        return f"the fused CPU kernel needs B ≥ 0 and H ≥ 1, got B={B}, H={H}"
    problem = _flags_problem(flags, proj_size)
    if problem is not None:
        return problem
    return load_error()


def _flags_problem(flags: int, proj_size: int) -> str | None:
    if isinstance(flags, bool) or not isinstance(flags, int) or flags < 0:
        return f"flags must be a non-negative int (variants.py's bits), got {flags!r}"
    if flags & variants.LAYER_NORM:
        return (
            "layer norm is not in the fused CPU kernel: it normalises the recurrent product and the "
            "cell at every step; it runs on the 'reference' backend"
        )
    if flags & ~SUPPORTED_FLAGS:
        return f"flags has bits {flags & ~SUPPORTED_FLAGS:#x} that variants.py does not define"
    if proj_size and flags & variants.ZONEOUT_H:
        return "zoneout on h needs h_{t−1} and h̃ of one size: it is not defined with a projection (proj_size)"
    return None


def _check_available(
    B: int, H: int, dtype: torch.dtype, device: torch.device, flags: int, proj_size: int
) -> None:
    reason = unavailable_reason(B, H, dtype, device, flags, proj_size)
    if reason is not None:
        raise RuntimeError(f"the fused CPU kernel cannot run B={B}, H={H}, {dtype}: {reason}")


def _check_shape(name: str, t: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
    if t is None:
        raise ValueError(f"{name} is None: pass {name} {list(shape)}")
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype) or t.device.type != "cpu":
        want = f"{list(shape)}" + (f" {dtype}" if dtype is not None else "")
        raise ValueError(f"{name} must be {want} on cpu, got {list(t.shape)} {t.dtype} on {t.device}")


# the variant tensors and the flag bits that call for each
VARIANT_TENSORS = {
    "peephole": variants.PEEPHOLES,
    "zoneout": variants.ZONEOUT_C | variants.ZONEOUT_H,
    "dropout": variants.RECURRENT_DROPOUT,
}


def _check_variant(flags: int, tensors: dict, T: int, B: int, H: int, P: int, dtype: torch.dtype) -> None:
    """Each variant tensor is given iff its flag is set, with its shape and dtype; else ValueError."""
    shapes = {
        "peephole": ((3, H), dtype),
        "zoneout": ((T, B, 2, H), torch.uint8),
        "dropout": ((B, P), dtype),
    }
    for name, t in tensors.items():
        bits = VARIANT_TENSORS[name]
        wanted = " or ".join(variants.flag_names(bits))
        if t is None and flags & bits:
            raise ValueError(f"flags ask for {wanted}, which needs {name} {list(shapes[name][0])}; got None")
        if t is not None and not flags & bits:
            raise ValueError(f"{name} was given but flags ({flags}) do not ask for {wanted}")
        if t is not None:
            _check_shape(name, t, *shapes[name])


def _check_batch_sizes(batch_sizes: Tensor | None, T: int) -> None:
    if batch_sizes is not None and (
        batch_sizes.dtype != torch.int64
        or tuple(batch_sizes.shape) != (T,)
        or batch_sizes.device.type != "cpu"
    ):
        raise ValueError(
            f"batch_sizes must be None or int64 [{T}] on cpu, got {list(batch_sizes.shape)} "
            f"{batch_sizes.dtype} on {batch_sizes.device}"
        )


def _check_layer(
    T: int,
    B: int,
    G: int,
    P: int,
    dtype: torch.dtype,
    device: torch.device,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    flags: int,
    variant: dict,
) -> None:
    """The checks both directions share: the kernel can run the layer, and its weights, batch sizes
    and variant tensors have their shapes and dtypes."""
    H = G // 4
    _check_available(B, H, dtype, device, flags, 0 if w_hr is None else P)
    _check_shape("w_hh", w_hh, (G, P), dtype)
    if w_hr is not None:
        _check_shape("w_hr", w_hr, (P, H), dtype)
    _check_batch_sizes(batch_sizes, T)
    _check_variant(flags, variant, T, B, H, P, dtype)


def sequence_forward(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    *,
    flags: int = 0,
    peephole: Tensor | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
    save: bool = True,
    w_ih: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""All T steps of one LSTM layer and direction (the cell of ``flags``, variants.py) on the CPU.

    Args:
        gx: [T, B, 4H] input projection incl. biases (fp32 or fp64); with ``w_ih``, the input x
            [T, B, I] itself, and each step's product takes [x_t | h_{t−1}]·[W_ih | W_hh]ᵀ + b in
            one pass (no [T, B, 4H] buffer is written or read).
        h0: [B, P] and c0: [B, H] initial states (cast to the dtype of gx).
        w_hh: [4H, P] recurrent weights, dtype of gx.
        w_hr: [P, H] projection weights (proj_size), dtype of gx, or None (P = H).
        batch_sizes: None, or int64 CPU [T]: at step k only rows b < batch_sizes[k] advance, the
            others carry h and c (packed sequences, in either order).
        flags: variants.py's bits (``CellVariant.flags`` plus the mask bits), all but LAYER_NORM.
        peephole: [3, H] dtype of gx (p_i, p_f, p_o), iff PEEPHOLES.
        zoneout: [T, B, 2, H] uint8 (z^c, z^h; 1 keeps the previous value), iff ZONEOUT_C or ZONEOUT_H.
        dropout: [B, P] dtype of gx (0 or 1/(1 − p)), iff RECURRENT_DROPOUT: multiplies h_{t−1}
            before the recurrent GEMM.
        save: False for inference: gates, h_raw and c_new are not kept (returned as [0]).
        w_ih: [4H, I] input weights, dtype of x, or None (``gx`` is the projection already).
        bias: [4H] b_ih + b_hh, dtype of x, or None; only with ``w_ih``.

    Returns:
        hs [T + 1, B, P] (hs[0] = h0, hs[k + 1] = h after step k), cs [T + 1, B, H] (cs[0] = c0, c
        after zoneout), gates [T, B, 4H] (i, f, g, o as the cell used them; 0 in rows that did not
        advance), h_raw [T, B, H] (o ⊙ tanh(c̃) before the projection, 0 in rows that did not
        advance; [0] without w_hr), c_new [T, B, H] (c̃ before zoneout, 0 in rows that did not
        advance; [0] without ZONEOUT_C). All in the dtype of gx.

    Example:
        >>> T, B, H = 5, 3, 8
        >>> gx, z = torch.randn(T, B, 4 * H), torch.zeros(B, H)
        >>> hs, cs, gates, h_raw, c_new = sequence_forward(gx, z, z, torch.randn(4 * H, H), None, None)
        >>> hs.shape
        torch.Size([6, 3, 8])
    """
    if w_ih is None and (gx.dim() != 3 or gx.shape[-1] % 4):
        raise ValueError(f"gx must be [T, B, 4H], got shape {tuple(gx.shape)}")
    if w_ih is not None and (gx.dim() != 3 or w_ih.dim() != 2):
        raise ValueError(
            f"with w_ih, x must be [T, B, I] and w_ih [4H, I], got {tuple(gx.shape)}, {tuple(w_ih.shape)}"
        )
    T, B = gx.shape[:2]
    G = gx.shape[2] if w_ih is None else w_ih.shape[0]
    H = G // 4
    P = H if w_hr is None else w_hr.shape[0]
    dtype = gx.dtype
    variant = {"peephole": peephole, "zoneout": zoneout, "dropout": dropout}
    _check_layer(T, B, G, P, dtype, gx.device, w_hh, w_hr, batch_sizes, flags, variant)
    if w_ih is not None:
        _check_shape("w_ih", w_ih, (G, gx.shape[2]), dtype)
    if bias is not None:
        if w_ih is None:
            raise ValueError("bias goes with w_ih (the fused input projection): gx includes the biases")
        _check_shape("bias", bias, (G,), dtype)
    _check_shape("h0", h0, (B, P), None)
    _check_shape("c0", c0, (B, H), None)
    hs, cs, gates, h_raw, c_new = torch.ops.lstmlab_cpu.sequence_forward(
        gx,
        w_ih,
        bias,
        h0,
        c0,
        w_hh,
        w_hr,
        batch_sizes,
        flags,
        peephole,
        zoneout,
        dropout,
        save,
        POISON_OUTPUTS,
    )
    return hs, cs, gates, h_raw, c_new


def sequence_backward(
    d_hs: Tensor,
    d_cn: Tensor,
    gates: Tensor,
    cs: Tensor,
    h_raw: Tensor,
    c_new: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    *,
    flags: int = 0,
    peephole: Tensor | None = None,
    zoneout: Tensor | None = None,
    dropout: Tensor | None = None,
    w_ih: Tensor | None = None,
    x: Tensor | None = None,
    hs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The reverse recurrence of :func:`sequence_forward`.

    Args:
        d_hs: [T + 1, B, P] dtype of gx: d_hs[k] = ∂L/∂hs[k] from outside the recurrence (the
            output gradient of step k − 1; d_hs[T] includes ∂L/∂h_n; packed output gradients
            already folded in where rows advanced).
        d_cn: [B, H] ∂L/∂c_n (cast to the dtype of d_hs).
        gates, cs, h_raw, c_new: as :func:`sequence_forward` returned them (with save=True); h_raw
            is not read (∂W_hr = Σ d_hpᵀ·h_raw is the caller's).
        w_hh, w_hr, batch_sizes, flags, peephole, zoneout, dropout: those of the forward.
        w_ih: [4H, I] input weights, or None. Given, each step's product is
            ∂pre_k·[W_ih | W_hh] and ∂x comes back too (no GEMM over all steps after the loop).
            Leave it out when ∂x is not wanted: the product is then ∂pre_k·W_hh alone.
        x: [T, B, I] the layer's input (only with hs) and hs: [T + 1, B, P] the forward's h, or
            None. With hs, ∂W = Σ_k ∂pre_kᵀ·[x_k | h_{k−1} ⊙ m] is accumulated step by step inside
            the loop and comes back as d_w [4H, I + P] (I = 0 without x), with d_b = Σ ∂pre [4H].
            ∂W_ih needs x, not w_ih.

    Returns:
        d_pre [T, B, 4H] (∂L/∂gx; 0 in rows that did not advance and for a removed gate), d_h0
        [B, P], d_c0 [B, H], d_hp [T, B, P] (∂L/∂h_t after the projection, 0 in rows that did not
        advance; [0] without w_hr), d_x [T, B, I] (∂pre·W_ih; [0] without w_ih), d_w [4H, I + P]
        (∂W_ih | ∂W_hh; [0] without hs), d_b [4H] (Σ ∂pre; [0] without hs), all in the dtype of
        d_hs. Left to the caller: ∂W_hh = Σ_t d_pre_tᵀ·(hs[t] ⊙ m) without hs,
        ∂W_hr = Σ_t d_hp_tᵀ·h_raw_t, and the peepholes'
        Σ ∂a_i ⊙ c_{t−1}, Σ ∂a_f ⊙ c_{t−1}, Σ ∂a_o ⊙ c̃ (c̃ = c_new, or cs[1:] without ZONEOUT_C).

    Example:
        >>> T, B, H = 5, 3, 8
        >>> gx, z, w_hh = torch.randn(T, B, 4 * H), torch.zeros(B, H), torch.randn(4 * H, H)
        >>> hs, cs, gates, h_raw, c_new = sequence_forward(gx, z, z, w_hh, None, None)
        >>> d_pre, d_h0, d_c0, d_hp, d_x, d_w, d_b = sequence_backward(torch.randn_like(hs), z, gates, cs,
        ...                                                            h_raw, c_new, w_hh, None, None, hs=hs)
        >>> d_w.shape
        torch.Size([32, 8])
    """
    if gates.dim() != 3 or gates.shape[-1] % 4:
        raise ValueError(f"gates must be [T, B, 4H], got shape {tuple(gates.shape)}")
    T, B, G = gates.shape
    H = G // 4
    P = H if w_hr is None else w_hr.shape[0]
    dtype = d_hs.dtype
    variant = {"peephole": peephole, "zoneout": zoneout, "dropout": dropout}
    _check_layer(T, B, G, P, dtype, d_hs.device, w_hh, w_hr, batch_sizes, flags, variant)
    _check_shape("d_hs", d_hs, (T + 1, B, P), dtype)
    _check_shape("d_cn", d_cn, (B, H), None)
    _check_shape("gates", gates, (T, B, G), dtype)
    _check_shape("cs", cs, (T + 1, B, H), dtype)
    if flags & variants.ZONEOUT_C:
        _check_shape("c_new", c_new, (T, B, H), dtype)
    if w_ih is not None:
        _check_shape("w_ih", w_ih, (G, w_ih.shape[-1] if w_ih.dim() == 2 else -1), dtype)
    if x is not None and hs is None:
        raise ValueError("x goes with hs (∂W_ih in the loop needs both); got x without hs")
    if x is not None:
        _check_shape("x", x, (T, B, x.shape[-1] if w_ih is None else w_ih.shape[1]), dtype)
    if hs is not None:
        _check_shape("hs", hs, (T + 1, B, P), dtype)
    d_pre, d_h0, d_c0, d_hp, d_x, d_w, d_b = torch.ops.lstmlab_cpu.sequence_backward(
        d_hs, d_cn.to(dtype), gates, cs, c_new, w_hh, w_ih, w_hr, x, hs, batch_sizes, flags, peephole,
        zoneout, dropout, POISON_OUTPUTS,
    )  # fmt: skip
    return d_pre, d_h0, d_c0, d_hp, d_x, d_w, d_b


__all__ = ["load_error", "sequence_backward", "sequence_forward", "unavailable_reason", "vector_isa"]
