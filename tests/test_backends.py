"""Backend choice: one rule for `auto`, loud failure for impossible explicit requests."""

import functools
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from lstmlab.kernels import backends, variants

import lstmlab


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_reference_is_always_available():
    assert lstmlab.resolve_backend("reference", "cpu") == "reference"
    assert lstmlab.resolve_backend("reference", "cuda") == "reference"


def test_auto_is_the_fused_cpu_kernel_on_cpu_even_with_the_interpreter():
    assert lstmlab.resolve_backend("auto", "cpu") == "cpu"
    assert lstmlab.resolve_backend("auto", "cpu", flags=variants.LAYER_NORM) == "reference"  # not in C++


def test_without_the_cpu_kernel_auto_falls_back_once_with_the_reason_and_an_explicit_request_raises(
    monkeypatch,
):
    monkeypatch.setattr(backends, "cpu_kernel_reason", lambda *args: "g++ not found (no compiler)")
    backends._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"'reference' backend on the CPU: g\+\+ not found"):
        assert lstmlab.resolve_backend("auto", "cpu", 4, 8) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the same reason does not warn again
        assert lstmlab.resolve_backend("auto", "cpu", 4, 8) == "reference"
    with pytest.raises(RuntimeError, match=r"backend='cpu' was requested but g\+\+ not found"):
        lstmlab.resolve_backend("cpu", "cpu", 4, 8)


def fake_persistent_check(monkeypatch, reason):
    """Answers the persistent kernels' shape check without a GPU."""
    monkeypatch.setattr(backends, "HAS_TRITON", True)
    monkeypatch.setattr(backends, "persistent_unavailable_reason", lambda *args: reason)


@pytest.mark.parametrize("requested", ["auto", "triton"])
def test_triton_on_cuda_is_persistent_where_the_shape_qualifies(monkeypatch, requested):
    fake_persistent_check(monkeypatch, None)
    assert lstmlab.resolve_backend(requested, "cuda", 16, 768, torch.bfloat16) == "triton_persistent"
    # a cell has one step: nothing to persist
    assert lstmlab.resolve_backend(requested, "cuda", 16, 768, single_step=True) == "triton_step"
    fake_persistent_check(monkeypatch, "too large")
    assert lstmlab.resolve_backend(requested, "cuda", 16, 4096, torch.bfloat16) == "triton_step"
    monkeypatch.setattr(backends, "HAS_TRITON", False)
    if requested == "auto":
        assert lstmlab.resolve_backend("auto", "cuda") == "reference"


@pytest.mark.parametrize("backed", [True, False], ids=["dynamic", "unbacked"])
def test_a_symbolic_batch_is_never_guarded_on(monkeypatch, backed):
    """Seen on an H200: export with a dynamic batch failed (the check's B ≤ 16 narrowed the range)
    and packed input under fullgraph compile could not guard on its unbacked batch. A symbolic
    batch asks both chunk classes and adds no guard."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    asked = []
    monkeypatch.setattr(backends, "HAS_TRITON", True)
    monkeypatch.setattr(backends, "persistent_unavailable_reason", lambda b, *rest: asked.append(b))
    env = ShapeEnv()
    if backed:
        batch = env.create_symintnode(env.create_symbol(24, source=ConstantSource("batch")), hint=24)
    else:
        batch = env.create_unbacked_symint()
    assert lstmlab.resolve_backend("triton", "cuda", batch, 768, torch.bfloat16) == "triton_persistent"
    assert asked == [16, 32]
    assert not env.guards
    asked.clear()
    lstmlab.resolve_backend("triton", "cuda", 24, 768, torch.bfloat16)
    assert asked == [24]


@pytest.mark.parametrize("mark", ["dynamic", "unbacked"])
def test_a_batch_traced_by_dynamo_is_never_guarded_on(monkeypatch, mark):
    """Seen on an H200: Dynamo does not show a symbolic batch as a torch.SymInt, and fullgraph
    compile of packed input (an unbacked batch) failed on the check's B ≤ 16. Under tracing both
    chunk classes are asked: the persistent kernels only if both can run."""
    monkeypatch.setattr(backends, "HAS_TRITON", True)

    def compiled_choice(reason):
        monkeypatch.setattr(
            backends, "persistent_unavailable_reason", torch.compiler.assume_constant_result(reason)
        )

        def choose(x):
            backend = lstmlab.resolve_backend("triton", "cuda", x.shape[0], 768, torch.bfloat16)
            return x * (2 if backend == "triton_persistent" else 3)

        torch._dynamo.reset()
        x = torch.ones(8)
        if mark == "dynamic":
            torch._dynamo.mark_dynamic(x, 0)
        else:
            torch._dynamo.decorators.mark_unbacked(x, 0)
        return torch.compile(choose, backend="eager", fullgraph=True)(x)[0].item()

    assert compiled_choice(lambda *args: None) == 2  # persistent
    assert compiled_choice(lambda b, *rest: None if b <= 16 else "too large") == 3  # per step


def test_proj_size_stays_on_the_per_step_kernels(monkeypatch):
    monkeypatch.setattr(backends, "HAS_TRITON", True)
    assert backends.persistent_unavailable_reason(16, 64, torch.float32, torch.device("cuda"), 8) == (
        "they have no projection (proj_size > 0 runs on the per-step kernels)"
    )


def test_explicit_persistent_that_cannot_run_raises_with_the_reason(monkeypatch):
    fake_persistent_check(monkeypatch, "the tiles need 300 KiB")
    with pytest.raises(RuntimeError, match=r"backend='triton_persistent' was requested but .*300 KiB"):
        lstmlab.resolve_backend("triton_persistent", "cuda", 16, 4096)
    assert lstmlab.resolve_backend("triton_step", "cuda", 16, 4096) == "triton_step"


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(backends, "HAS_TRITON", False)
    for requested in ("triton", "triton_step", "triton_persistent"):
        with pytest.raises(RuntimeError, match=f"backend='{requested}' was requested but the triton package"):
            lstmlab.resolve_backend(requested, "cuda")
    model = lstmlab.LSTM(2, 3, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' was requested"):
        model(torch.randn(3, 1, 2))
    assert model.last_backend is None  # nothing ran


def test_explicit_triton_on_cpu_without_interpreter_raises():
    result = run_python(
        """
        import torch, lstmlab
        try:
            lstmlab.LSTM(2, 3, backend="triton")(torch.randn(3, 1, 2))
        except RuntimeError as e:
            print("RAISED", e)
        """
    )
    assert result.returncode == 0, result.stderr
    assert (
        "RAISED backend='triton' was requested but the Triton kernels need CUDA tensors, got cpu"
        in result.stdout
    )


def test_unknown_backend_name():
    with pytest.raises(
        ValueError,
        match=r"backend must be one of \('auto', 'triton', 'triton_step', 'triton_persistent', "
        r"'cpu', 'reference'\), got 'tpu'",
    ):
        lstmlab.resolve_backend("tpu", "cpu")


def test_import_works_without_triton_and_says_so():
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, lstmlab, lstmlab.kernels
        assert lstmlab.kernels.HAS_TRITON is False
        out, _ = lstmlab.LSTM(2, 3)(torch.randn(4, 1, 2))
        print("OK", lstmlab.resolve_backend("auto", "cpu"), tuple(out.shape))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "OK cpu (4, 1, 3)" in result.stdout


LIBRARY_MODULES = [
    "lstmlab", "lstmlab.kernels", "lstmlab.modules", "lstmlab.backends", "lstmlab.runner",
    "lstmlab.runner.models", "lstmlab.runner.tasks", "lstmlab.runner.loggers", "lstmlab.analysis",
    "lstmlab.analysis.probes", "lstmlab.analysis.memory_report", "lstmlab.analysis.odyssey",
]  # fmt: skip


def test_library_never_imports_hydra():
    result = run_python(
        f"""
        import sys
        import {", ".join(LIBRARY_MODULES)}
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf")))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


H100 = {
    "sms": 132,
    "regs_per_sm": 65536,
    "threads_per_sm": 2048,
    "smem_per_sm": 233472,
    "smem_per_block": 232448,
}


@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_fp32_training_on_cuda_runs_persistent_where_its_kernels_compile(monkeypatch, tf32):
    """What the runner's fp32 training on a GPU gets from `auto` (the compare preset's layer: B 64,
    H 64): the persistent kernels, decided by their own check on the device's facts (here an H100's
    limits and the compiler's report, faked), and the per-step ones where a kernel spills, as
    fp32's forward did on triton 3.6 before it had its own configuration. The TF32 setting is part of
    the check's cache key: flipping it compiles and asks again."""
    tp = pytest.importorskip("lstmlab.kernels.triton_persistent")
    monkeypatch.setattr(backends, "HAS_TRITON", True)
    monkeypatch.setattr(tp, "TRITON_INTERPRET", False)
    monkeypatch.setattr(tp, "_device_limits", lambda device: H100)
    monkeypatch.setattr(tp.torch.backends.cudnn.rnn, "fp32_precision", "tf32" if tf32 else "ieee")
    # the real check's argument lists and configurations, on CPU tensors; the cache is this test's own
    real = tp._cuda_unavailable_reason.__wrapped__
    check = functools.lru_cache(
        lambda B, H, dtype, device, *rest: real(B, H, dtype, torch.device("cpu"), *rest)
    )
    monkeypatch.setattr(tp, "_cuda_unavailable_reason", check)
    asked, spills = [], {}

    def compile_problem(kernel, args, meta, programs, device):  # what a GPU's driver would report
        asked.append((kernel.__name__, meta["DOT_PRECISION"], meta["SPLIT_K"]))
        n = spills.get(kernel.__name__, 0)
        return f"{kernel.__name__} spills {n} registers" if n else None

    monkeypatch.setattr(tp, "_compile_problem", compile_problem)
    cuda = torch.device("cuda", 0)
    assert lstmlab.resolve_backend("auto", cuda, 64, 64, torch.float32) == "triton_persistent"
    precision = "tf32" if tf32 else "ieee"
    fwd_split = 1 if tf32 else 4  # the FMA forward splits its K chunk (64 columns at H = 64) in 4
    # TF32's backward puts the batch on N (not split at B = 64); the FMA one splits 4H in 8 slices
    bwd_split = 1 if tf32 else 8
    assert asked == [
        ("lstm_persistent_fwd_kernel", precision, fwd_split),
        ("lstm_persistent_bwd_kernel", precision, bwd_split),
    ]
    spills["lstm_persistent_fwd_kernel"] = 38776
    assert lstmlab.resolve_backend("auto", cuda, 64, 128, torch.float32) == "triton_step"
    with pytest.raises(RuntimeError, match="lstm_persistent_fwd_kernel spills 38776 registers"):
        lstmlab.resolve_backend("triton_persistent", cuda, 64, 128, torch.float32)
    del spills["lstm_persistent_fwd_kernel"]
    assert lstmlab.resolve_backend("auto", cuda, 64, 64, torch.float32) == "triton_persistent"  # cached
    monkeypatch.setattr(tp.torch.backends.cudnn.rnn, "fp32_precision", "ieee" if tf32 else "tf32")
    asked.clear()
    assert lstmlab.resolve_backend("auto", cuda, 64, 64, torch.float32) == "triton_persistent"
    assert [a[1] for a in asked] == ["ieee" if tf32 else "tf32"] * 2  # the other setting, compiled anew
