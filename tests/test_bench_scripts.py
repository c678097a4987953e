"""Smoke tests of the benchmark scripts at tiny sizes on the CPU: files, columns, finite timings,
and a deliberately broken implementation reported FAILED instead of timed."""

from __future__ import annotations

import csv
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lstmlab.kernels import gemm

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_kernel  # noqa: E402
import bench_layer  # noqa: E402
import benchlib  # noqa: E402
import profile_layer  # noqa: E402
import runner_compare  # noqa: E402

TINY_LAYER = ["--device", "cpu", "--batch", "2", "--hidden", "8", "--seq", "3"]
TINY_LAYER += ["--min-run-time", "0.01", "--threads", "1"]
TINY_KERNEL = ["--device", "cpu", "--batch", "4", "--hidden", "8", "--copy-mib", "1"]
TINY_KERNEL += ["--min-run-time", "0.01", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts' --threads sets torch's global thread count; give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def assert_timed(row: dict[str, str]) -> None:
    med, p20, p80 = (float(row[k]) for k in ("median_ms", "p20_ms", "p80_ms"))
    assert all(math.isfinite(v) and v > 0 for v in (med, p20, p80)), row
    assert p20 <= med <= p80, row
    assert float(row["max_rel_err"]) <= float(row["tol"]), row


def assert_failed_untimed(row: dict[str, str]) -> None:
    assert row["status"] == "FAILED", row
    assert row["median_ms"] == "" and row["p20_ms"] == "" and row["p80_ms"] == "", row
    assert "correctness check failed" in row["note"], row


def test_bench_layer_smoke(tmp_path: Path, capsys) -> None:
    argv = [*TINY_LAYER, "--inject-fault", "torch.nn.GRU", "lstmlab.lstm_layer[reference/auto]"]
    assert bench_layer.main([*argv, "--out", str(tmp_path)]) == 0
    console = capsys.readouterr().out
    loop_line = next(line for line in console.splitlines() if line.strip().startswith("LSTMCell-loop"))
    assert "÷ torch.nn.LSTM " in loop_line  # the ratio to the baseline, on the console too

    header, rows = read_rows(tmp_path / "results.csv")
    assert header == ["device", *bench_layer.COLUMNS]
    assert (tmp_path / "results.md").read_text().count("FAILED") >= 4
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "time_fp32_fwd.png",
        "time_fp32_fwd_bwd.png",
    ]
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    for pass_ in ("fwd", "fwd+bwd"):
        by_impl = {r["impl"]: r for r in rows if r["pass"] == pass_}
        gpu_only = {"torch.nn.LSTM-fp16"}  # cuDNN in fp16: a GPU row
        assert sorted(by_impl) == sorted(set(bench_layer.IMPLS) - gpu_only)
        lstm_rows = [r["backend"] for r in rows if r["pass"] == pass_ and r["impl"] == "lstmlab.LSTM"]
        assert lstm_rows == ["cpu/auto", "reference/auto"]  # a row per CPU backend: last_backend/GEMM engine
        assert by_impl["lstmlab.lstm_layer"]["input_proj"] == "excluded"
        for impl in ("torch.nn.LSTM", "LSTMCell-loop", "lstmlab.LSTM"):
            assert_timed(by_impl[impl])
        baseline = by_impl["torch.nn.LSTM"]
        assert baseline["backend"] in ("aten", "onednn")
        assert baseline["kernels"], "the profiled ops of the baseline are recorded"
        assert float(baseline["ratio_vs_baseline"]) == 1.0
        loop = by_impl["LSTMCell-loop"]
        ratio = float(loop["median_ms"]) / float(baseline["median_ms"])
        assert float(loop["ratio_vs_baseline"]) == pytest.approx(ratio, rel=1e-3)
        assert_failed_untimed(by_impl["torch.nn.GRU"])
        assert_failed_untimed(by_impl["lstmlab.lstm_layer"])


def test_bench_layer_bidirectional_rows_are_checked_and_timed(tmp_path: Path) -> None:
    """--bidirectional: every model has both directions (D2 in the shape, a directions column),
    each checked against float64 on the bidirectional output [T, B, 2H] and timed; the LSTMCell
    loop and the bare layer function, one direction each, are left out."""
    argv = [*TINY_LAYER, "--passes", "fwd+bwd", "--layers", "2", "--bidirectional", "--backends", "reference"]
    assert bench_layer.main([*argv, "--out", str(tmp_path)]) == 0
    _, rows = read_rows(tmp_path / "results.csv")
    by_impl = {r["impl"]: r for r in rows}
    assert sorted(by_impl) == ["lstmlab.LSTM", "torch.nn.GRU", "torch.nn.LSTM"]
    assert {(r["layers"], r["directions"]) for r in rows} == {("2", "2")}
    for row in rows:
        assert_timed(row)
    assert "L2 B2 H8 I8 T3 D2" in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(gemm.onednn_unavailable_reason() is not None, reason="oneDNN GEMM unavailable")
def test_bench_layer_one_row_per_cpu_gemm_engine(tmp_path: Path) -> None:
    argv = [*TINY_LAYER, "--passes", "fwd+bwd", "--impls", "torch.nn.LSTM", "lstmlab.LSTM"]
    argv += ["lstmlab.lstm_layer", "--cpu-gemm", "blas", "onednn", "--backends", "reference"]
    argv += ["--out", str(tmp_path)]  # the GEMM engines matter to the reference backend's loop
    assert bench_layer.main(argv) == 0
    _, rows = read_rows(tmp_path / "results.csv")
    assert sorted((r["impl"], r["backend"]) for r in rows if r["impl"] != "torch.nn.LSTM") == [
        ("lstmlab.LSTM", "reference/blas"),
        ("lstmlab.LSTM", "reference/onednn"),
        ("lstmlab.lstm_layer", "reference/blas"),
        ("lstmlab.lstm_layer", "reference/onednn"),
    ]
    for r in rows:
        assert_timed(r)


def test_bench_layer_variant_rows_are_checked_and_compared_with_vanilla(tmp_path: Path) -> None:
    """A variant row is checked against the same module in float64 (masks from one seed) and gets
    its ÷ vanilla ratio; a fault injected into one variant row fails that row only."""
    argv = [*TINY_LAYER, "--passes", "fwd+bwd", "--impls", "lstmlab.LSTM", "--variants", "vanilla", "V"]
    argv += ["LN", "zoneout", "recurrent_dropout", "--inject-fault", "lstmlab.LSTM+LN[reference/auto]"]
    argv += ["--check-seq", "2"]  # a prefix of the 3 steps: still fails the injected fault
    assert bench_layer.main([*argv, "--out", str(tmp_path)]) == 0
    _, rows = read_rows(tmp_path / "results.csv")
    by_variant = {r["variant"]: r for r in rows}
    assert sorted(by_variant) == ["LN", "V", "recurrent_dropout", "vanilla", "zoneout"]
    assert_failed_untimed(by_variant["LN"])
    for name in ("V", "zoneout", "recurrent_dropout"):
        row = by_variant[name]
        assert_timed(row)
        assert row["reference"] == "lstmlab.LSTM reference backend fp64"
        ratio = float(row["median_ms"]) / float(by_variant["vanilla"]["median_ms"])
        assert float(row["ratio_vs_vanilla"]) == pytest.approx(ratio, rel=1e-3)
    assert by_variant["vanilla"]["ratio_vs_vanilla"] == ""
    assert "| variant |" in (tmp_path / "results.md").read_text()


def test_bench_layer_two_layers_and_tokens(tmp_path: Path) -> None:
    argv = [*TINY_LAYER, "--layers", "2", "--passes", "fwd", "--impls", "torch.nn.LSTM"]
    argv += ["LSTMCell-loop", "lstmlab.LSTM", "lstmlab.lstm_layer", "--backends", "cpu"]
    argv += ["--out", str(tmp_path)]
    assert bench_layer.main(argv) == 0
    _, rows = read_rows(tmp_path / "results.csv")
    # lstm_layer excludes the input projection of one layer only: no row for two layers.
    assert sorted(r["impl"] for r in rows) == ["LSTMCell-loop", "lstmlab.LSTM", "torch.nn.LSTM"]
    for r in rows:
        assert_timed(r)
        assert r["layers"] == "2"
        tokens = 2 * 3 / (float(r["median_ms"]) * 1e-3)
        assert float(r["tokens_per_s"]) == pytest.approx(tokens, rel=1e-3)
        assert float(r["us_per_step"]) == pytest.approx(float(r["median_ms"]) * 1e3 / 3, rel=1e-3)


def test_bench_layer_cpu_skips_triton_with_reason(tmp_path: Path, capsys) -> None:
    argv = [*TINY_LAYER, "--passes", "fwd", "--impls", "lstmlab.LSTM", "--out", str(tmp_path)]
    assert bench_layer.main(argv) == 0
    skipped = "'triton_persistent', 'triton_step' skipped on CPU"
    assert skipped in capsys.readouterr().out
    _, rows = read_rows(tmp_path / "results.csv")
    assert [r["backend"] for r in rows] == ["cpu/auto", "reference/auto"]
    assert skipped in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    ("mode", "dtype", "hidden", "batch", "layers", "forward", "expected"),
    [
        ("LSTM", torch.float16, 128, 16, 1, True, "PERSIST_STATIC_SMALL_H"),
        ("LSTM", torch.float16, 192, 16, 1, False, "STANDARD"),  # bwd small-H needs H <= 128
        ("LSTM", torch.float16, 256, 16, 1, True, "PERSIST_STATIC"),
        ("LSTM", torch.float16, 1024, 64, 1, False, "PERSIST_STATIC"),
        ("LSTM", torch.float16, 256, 256, 1, True, "STANDARD"),  # batch > 128
        ("LSTM", torch.float16, 256, 1, 1, True, "STANDARD"),  # batch not a multiple of 8
        ("LSTM", torch.float16, 256, 16, 2, True, "STANDARD"),  # two layers
        ("GRU", torch.float16, 256, 16, 1, True, "STANDARD"),  # GRU never persistent
        ("LSTM", torch.bfloat16, 256, 16, 1, True, "STANDARD"),  # fp16 only
        ("LSTM", torch.float32, 768, 16, 1, True, "STANDARD"),
        ("LSTM", torch.float32, 128, 16, 1, True, "PERSIST_STATIC_SMALL_H"),
    ],
)
def test_cudnn_expected_path_on_hopper(mode, dtype, hidden, batch, layers, forward, expected):
    h100 = SimpleNamespace(major=9, minor=0, multi_processor_count=132)
    cfg = bench_layer.Config(layers, batch, hidden, hidden, 256, "fp16", "fwd")
    assert bench_layer.cudnn_expected_path(mode, cfg, dtype, forward, h100) == expected


def test_bench_kernel_smoke(tmp_path: Path) -> None:
    assert bench_kernel.main([*TINY_KERNEL, "--impls", "eager", "--out", str(tmp_path)]) == 0
    header, rows = read_rows(tmp_path / "results_kernel.csv")
    assert header == bench_kernel.COLUMNS
    assert [(r["impl"], r["pass"]) for r in rows] == [("eager", "fwd"), ("eager", "bwd")]
    for r in rows:
        assert_timed(r)
        assert r["status"] == "ok"
        assert float(r["gb_per_s"]) > 0 and float(r["pct_of_copy_bw"]) > 0
    # fwd: pre [4, 32] + c_prev [4, 8] read, gates [4, 32] + c [4, 8] + h [4, 8] written, fp32
    assert int(rows[0]["bytes"]) == 4 * 4 * (32 + 8 + 32 + 8 + 8)
    # bwd: dh, dc, gates, c, c_prev read, dpre, dc_prev written
    assert int(rows[1]["bytes"]) == 4 * 4 * (8 + 8 + 32 + 8 + 8 + 32 + 8)
    assert "copy_bandwidth" in (tmp_path / "results_kernel.md").read_text()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "kernel_bw_fp32_bwd.png",
        "kernel_bw_fp32_fwd.png",
    ]


def test_bench_kernel_broken_implementation_is_not_timed(tmp_path: Path) -> None:
    argv = [*TINY_KERNEL, "--impls", "eager", "--inject-fault", "eager", "--out", str(tmp_path)]
    assert bench_kernel.main(argv) == 0
    _, rows = read_rows(tmp_path / "results_kernel.csv")
    assert len(rows) == 2
    for r in rows:
        assert_failed_untimed(r)


@pytest.mark.slow
def test_bench_kernel_torch_compile_row(tmp_path: Path) -> None:
    """torch.compile needs a C compiler on the CPU: timed when one exists, else FAILED with the
    reason; never a crash of the whole run."""
    argv = [*TINY_KERNEL, "--passes", "fwd", "--impls", "eager", "torch.compile"]
    assert bench_kernel.main([*argv, "--out", str(tmp_path)]) == 0
    _, rows = read_rows(tmp_path / "results_kernel.csv")
    row = next(r for r in rows if r["impl"] == "torch.compile")
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("g++"):
        assert row["status"] == "ok", row
        assert_timed(row)
    else:
        assert row["status"] == "FAILED" and row["note"], row


def test_bench_layer_time_budget_stops_before_the_next_config(tmp_path: Path) -> None:
    argv = [*TINY_LAYER, "--time-budget-s", "0", "--out", str(tmp_path)]
    assert bench_layer.main(argv) == 0
    _, rows = read_rows(tmp_path / "results.csv")
    assert rows == []
    assert "Time budget spent: 2 of 2 configs not run" in (tmp_path / "results.md").read_text()


def run_gpu_check_failing(out: Path, **env: str) -> str:
    """scripts/gpu_check.sh with an interpreter that fails (`false`) and no install, into ``out``:
    asserts exit code 1 and returns summary.log."""
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "PYTHON": "false", "GPU_CHECK_SKIP_INSTALL": "1", **env}
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), str(out)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    return (out / "summary.log").read_text()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_gpu_check_runs_every_step_and_fails_at_the_end(tmp_path: Path) -> None:
    """A broken interpreter fails every step; each is logged, none stops the next, exit is 1."""
    summary = run_gpu_check_failing(tmp_path)
    steps = ["environment", "install", "pytest_cuda", "pytest_kernels", "bench_layer", "bench_kernel"]
    for step in steps:
        assert f"=== [{step}] rc=1" in summary
        assert (tmp_path / f"{step}.log").exists()
    assert "FAILED steps: " + " ".join(f"{s}(rc=1)" for s in steps) in summary


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_gpu_check_persistent_plan_runs_every_step_within_8_minutes(tmp_path: Path) -> None:
    """The prepared run (plan persistent): every step runs and is logged even when all fail, the
    runner comparison's outcome is in the summary, and the steps' limits add up to at most 8 minutes."""
    import re

    summary = run_gpu_check_failing(tmp_path, GPU_CHECK_PLAN="persistent")
    steps = ["pytest_cuda", "pytest_persistent", "pytest_variant_persistent", "persistent_bench"]
    steps += ["sweep_bf16", "sweep_fp16", "sweep_fp32", "variants", "runner_compare"]
    for step in steps:
        assert f"=== [{step}] rc=1" in summary
    assert "=== runner comparison: no result" in summary
    script = (SCRIPTS / "gpu_check.sh").read_text()
    branch = script[
        script.index('if [ "$PLAN" = "persistent" ]; then\n    # rc 5') : script.index("else\n    # rc 5")
    ]
    limits = {name: int(limit) for name, limit in re.findall(r"step (\w+) (\d+) ", branch)}
    assert list(limits) == steps
    setup = [
        int(x)
        for x in re.search(
            r'if \[ "\$PLAN" = "persistent" \]; then SETUP_LIMITS=\((\d+) (\d+)\)', script
        ).groups()
    ]
    collect = int(re.search(r"timeout (\d+) \"\$PY\" -m pytest --collect-only", script)[1])
    assert sum(setup) + collect + sum(limits.values()) <= 8 * 60


def fake_runner_summaries(sweep: Path, ms: dict[tuple[str, str], float]) -> None:
    for i, ((precision, model), per_step) in enumerate(ms.items()):
        run = sweep / str(i)
        run.mkdir(parents=True)
        summary = {
            "precision": precision,
            "config": {"model": {"kind": model}},
            "steps": 100,
            "device": "GPU X",
        }
        summary |= {
            "backend": "triton_persistent" if model == "lstmlab" else "cudnn",
            "time_per_step_s": per_step,
        }
        (run / "summary.json").write_text(__import__("json").dumps(summary))


def test_runner_compare_tables_give_lstmlab_over_torch_lstm(tmp_path: Path) -> None:
    ms = {("fp32", "lstmlab"): 0.002, ("fp32", "torch_lstm"): 0.004, ("bf16", "lstmlab"): 0.003}
    ms[("bf16", "torch_lstm")] = 0.002
    fake_runner_summaries(tmp_path / "runner_multirun", ms)
    rows = runner_compare.collect(tmp_path / "runner_multirun")
    assert [(r["precision"], r["model"]) for r in rows] == list(ms)
    assert [(r["precision"], round(r["ratio"], 3)) for r in runner_compare.ratios(rows)] == [
        ("fp32", 0.5),
        ("bf16", 1.5),
    ]
    runner_compare.write_tables(tmp_path, rows, "# header")
    table = (tmp_path / "runner_compare.md").read_text()
    assert "| fp32 | 2.000 | 4.000 | 0.50× | triton_persistent |" in table
    assert "| bf16 | 3.000 | 2.000 | 1.50× | triton_persistent |" in table
    _, csv_rows = read_rows(tmp_path / "runner_compare.csv")
    assert len(csv_rows) == 4


def test_runner_compare_without_hydra_records_the_skip(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(runner_compare, "missing_modules", lambda: ["hydra", "omegaconf"])
    assert runner_compare.main(["--out", str(tmp_path), "--device", "cpu"]) == 0
    reason = "SKIPPED: the runner needs hydra, omegaconf, not importable here (carry wheels in .whl)"
    assert (tmp_path / "runner_compare.md").read_text() == reason + "\n"
    assert not (tmp_path / "runner_multirun").exists()


def test_runner_compare_runs_the_preset_on_the_cpu(tmp_path: Path) -> None:
    """The real sweep, 2 steps per run: the overrides compose and every run lands in the table (the
    reference backend: no C++ kernel to build on a fresh machine)."""
    pytest.importorskip("hydra")
    argv = ["--out", str(tmp_path), "--device", "cpu", "--steps", "2", "--precisions", "fp32"]
    assert runner_compare.main([*argv, "--override", "model.backend=reference"]) == 0
    rows = runner_compare.collect(tmp_path / "runner_multirun")
    assert sorted(r["model"] for r in rows) == ["lstmlab", "torch_lstm"]
    assert all(r["steps"] == 2 and r["ms_per_step"] > 0 for r in rows)
    assert {r["model"]: r["backend"] for r in rows}["lstmlab"] == "reference"
    assert "complete" in (tmp_path / "runner_compare.md").read_text().splitlines()[0]


def test_profile_layer_names_lstmlab_ops(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--batch", "2", "--hidden", "8", "--seq", "3", "--steps", "1"]
    assert profile_layer.main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile_lstmlab.txt").read_text()
    assert text.startswith(
        "lstmlab.LSTM (backend reference, CPU GEMMs auto) B2 H8 T3, 1 fwd+bwd steps, 1 threads"
    )
    assert "lstmlab::lstm_layer_fwd" in text and "lstmlab::lstm_layer_bwd" in text
    assert not list(tmp_path.glob("trace_*.json"))
    assert profile_layer.main([*argv, "--out", str(tmp_path)]) == 2  # the same file again: refused
    assert (tmp_path / "profile_lstmlab.txt").read_text() == text


@pytest.mark.cuda
def test_bench_layer_on_gpu(tmp_path: Path) -> None:
    """The GPU-only paths: do_bench timing, triton backend rows, cuDNN path, kernels, peak memory."""
    argv = ["--device", "cuda", "--batch", "8", "--hidden", "128", "--seq", "16"]
    argv += ["--dtypes", "fp32", "fp16", "--warmup-ms", "2", "--rep-ms", "10", "--out", str(tmp_path)]
    assert bench_layer.main(argv) == 0
    _, rows = read_rows(tmp_path / "results.csv")
    # passes × (fp32: LSTM, LSTM-fp16, GRU, loop, 3 backends × (LSTM, lstm_layer); fp16: no LSTM-fp16)
    assert len(rows) == 2 * (10 + 9)
    for r in rows:
        if r["status"] == "unavailable":  # the persistent kernels refuse a config (fp32 on triton 3.6)
            assert r["backend"] == "triton_persistent" and r["dtype"] == "fp32", r
            assert "cannot run" in r["note"] and not r["median_ms"], r
            continue
        assert r["status"] == "ok", r
        assert_timed(r)
        assert float(r["peak_mem_mib"]) >= 0
        assert float(r["ratio_vs_cudnn_fp16"]) > 0
    assert any(r["status"] == "ok" for r in rows if r["backend"] == "triton_persistent")
    for backend in ("triton_persistent", "triton_step"):
        assert len([r for r in rows if r["impl"] == "lstmlab.LSTM" and r["backend"] == backend]) == 4
    baseline = [r for r in rows if r["impl"] == "torch.nn.LSTM"]
    assert all(r["cudnn_path"].startswith("fwd PERSIST_STATIC_SMALL_H") for r in baseline)
    assert all(r["kernels"] for r in baseline)


@pytest.mark.cuda
def test_bench_kernel_on_gpu(tmp_path: Path) -> None:
    argv = ["--device", "cuda", "--batch", "16", "--hidden", "256", "--dtypes", "bf16"]
    argv += ["--impls", "eager", "triton", "--copy-mib", "64", "--rep-ms", "10", "--out", str(tmp_path)]
    assert bench_kernel.main(argv) == 0
    _, rows = read_rows(tmp_path / "results_kernel.csv")
    assert [(r["impl"], r["pass"]) for r in rows] == [
        ("eager", "fwd"),
        ("triton", "fwd"),
        ("eager", "bwd"),
        ("triton", "bwd"),
    ]
    for r in rows:
        assert_timed(r)
        assert float(r["gb_per_s"]) > 0


def test_bench_layer_writes_outside_docs_by_default_and_prints_no_profiler_noise(tmp_path: Path, monkeypatch):
    """Without --out, results go to ./bench-results/ (git ignores it), never into the checkout's
    docs/; the profiler's native start/stop lines (USDT) are not printed."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_layer.py"
    argv = ["--device", "cpu", "--threads", "1", "--batch", "2", "--hidden", "8", "--seq", "3"]
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out_dir,) = (tmp_path / "bench-results").iterdir()
    assert (out_dir / "results.csv").exists()
    assert "USDT" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [bench_layer, bench_kernel, profile_layer])
def test_every_option_has_help(script) -> None:
    parser = script.make_parser()
    bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert bare == []


def test_bench_layer_never_overwrites_an_earlier_run_silently(tmp_path: Path, capsys) -> None:
    argv = [*TINY_LAYER, "--passes", "fwd", "--impls", "torch.nn.LSTM", "--out", str(tmp_path)]
    assert bench_layer.main(argv) == 0
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert bench_layer.main(argv) == 2  # the same --out again: refused, one line, nothing touched
    err = capsys.readouterr().err
    assert err.startswith(
        f"bench_layer: {tmp_path} holds an earlier run's results.csv, results.md: pass --overwrite"
    )
    assert err.count("\n") == 1
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert bench_layer.main([*argv, "--overwrite"]) == 0
    assert "--overwrite: replacing results.csv, results.md in" in capsys.readouterr().out


def test_the_default_folder_gives_way_to_a_new_one_and_says_so(tmp_path: Path, capsys) -> None:
    default = tmp_path / "cpu-2026-12-06"
    default.mkdir()
    (default / "results.csv").write_text("earlier")
    (tmp_path / "cpu-2026-12-06-2").mkdir()
    (tmp_path / "cpu-2026-12-06-2" / "results.md").write_text("earlier")
    out = benchlib.claim_out_dir(None, default, bench_layer.OUT_FILES, overwrite=False)
    assert out == tmp_path / "cpu-2026-12-06-3" and out.is_dir()
    assert capsys.readouterr().out == f"{default} holds an earlier run's results: writing to {out}\n"
    assert (default / "results.csv").read_text() == "earlier"


def test_interleaved_rounds_rotate_which_function_runs_first() -> None:
    """A block's time depends on what ran before it: round r starts at function r mod n, so no
    function is always timed right after the same one."""
    order: list[str] = []
    calls = [(lambda name=name: order.append(name), None) for name in "abc"]
    times = benchlib.time_interleaved(calls, min_run_time_s=0.0, rounds=6)
    assert len(times) == 3 and all(med >= 0 for med, _, _ in times)
    # one warm-up call each, then one call per block (min_run_time_s = 0: one call a block)
    rounds = ["".join(order[3 + 3 * r : 6 + 3 * r]) for r in range(6)]
    assert order[:3] == list("abc")
    assert rounds == ["abc", "bca", "cab", "abc", "bca", "cab"]


@pytest.mark.parametrize(("lo", "hi", "at_least"), [(28.0, 45.0, 4), (0.08, 300.0, 6)])
def test_a_log_time_axis_is_labelled_at_readable_values(lo, hi, at_least) -> None:
    """A narrow range (28-45 ms) was labelled at 30 and 40 only; now about six round values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    panel = benchlib.Panel({"a": [(16, lo), (64, hi)], "b": [(16, lo), (64, hi)]}, "batch", "ms", "t")
    benchlib.draw_panel(ax, panel)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.yaxis.get_ticklabels() if lo <= t.get_position()[1] <= hi]
    plt.close(fig)
    assert len([s for s in labels if s]) >= at_least, labels
    assert all("10^" not in s and "times" not in s for s in labels)  # plain numbers
    assert [t.get_text() for t in ax.xaxis.get_ticklabels()] == ["16", "64"]
    lines = ax.get_lines()
    assert (
        len({(str(line.get_linestyle()), line.get_marker()) for line in lines}) == 2
    )  # coinciding, both seen


def test_bench_cpu_kernel_smoke(tmp_path: Path, capsys) -> None:
    """The CPU kernel's benchmark checks every implementation, times every row and plots the ratios."""
    import bench_cpu_kernel

    plot = tmp_path / "ratios.png"
    argv = ["--batch", "2", "--input-size", "5", "--hidden", "8", "--seq", "3", "--threads", "1"]
    bench_cpu_kernel.main([*argv, "--min-run-time", "0.05", "--clock", "cpu", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "check cpu_kernel: max rel err" in out and "check reference: max rel err" in out
    table = [line for line in out.splitlines() if line.startswith("| 1 | 2 | 5 | 8 | 3 |")]  # threads B I H T
    assert [line.split(" | ")[5] for line in table] == ["fwd", "fwd+bwd"]
    for line in table:
        ratios = [float(cell) for cell in line.split(" | ")[8:13:2]]  # the three "×" columns
        assert ratios[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios), line
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a smoke test under the interpreter")
def test_persistent_bench_runs_every_part_under_the_interpreter(tmp_path: Path) -> None:
    """persistent_bench.py, the prepared GPU run's kernel step, at its documented CPU smoke size: every
    part writes rows, each row that runs is checked against float64 first, a row the tiny shape
    cannot take says so instead of ending the part; the directions part times one launch for both
    directions and two launches, forward and backward."""
    pytest.importorskip("triton")
    import json

    import persistent_bench

    argv = ["--out", str(tmp_path), "--device", "cpu", "--batch", "5", "--hidden", "13", "--seq", "4"]
    assert persistent_bench.main([*argv, "--check-seq", "4", "--barrier-steps", "3"]) == 0
    sections = json.loads((tmp_path / "persistent_bench.json").read_text())["sections"]
    assert len(sections) == 4 and all(sections.values()), sections.keys()
    ran = [row for rows in sections.values() for row in rows if "ok" in row]
    assert ran and all(row["ok"] and row["rel_err"] < 5e-2 for row in ran)
    (directions,) = (rows for title, rows in sections.items() if title.startswith("Both directions"))
    one, two = "one for both directions", "two, one after the other"
    assert [(r["pass"], r["launches"], r["programs per launch"]) for r in directions] == [
        ("fwd", one, 2), ("fwd", two, 1), ("bwd", one, 2), ("bwd", two, 1)
    ]  # fmt: skip
    assert all(r["ms"] > 0 for r in directions)
