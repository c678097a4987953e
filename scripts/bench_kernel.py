"""Benchmark the fused LSTM gate step alone: Triton against eager PyTorch and torch.compile.

``lstmlab.kernels.gates_forward`` / ``gates_backward`` with backend="triton_step", the same functions
with backend="reference" (eager PyTorch) and ``torch.compile`` of the reference. Each is checked
first against ``torch.nn.LSTM`` in float64 (a one-step LSTM whose W_ih is the identity and W_hh
zero computes exactly the gate step on ``pre``); a failing row is FAILED and not timed.

Achieved bandwidth = bytes of every input read once plus every output written once, divided by
the median time; it is compared with a large ``tensor.copy_`` timed in the same run.

    python scripts/bench_kernel.py --quick
    python scripts/bench_kernel.py --batch 64 4096 --hidden 1024 --dtypes bf16
"""

# B: batch  H: hidden  G = 4H: stacked gates (i, f, g, o)

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Norm-wise max relative error against float64 (benchlib.max_rel_err); h and dpre are rounded to
# the input dtype on store, gates and c stay fp32.
TOLERANCE = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 3e-2}
PASSES = ("fwd", "bwd")
OUT_FILES = ("results_kernel.csv", "results_kernel.md")  # what an earlier run left in its folder
IMPLS = ("eager", "triton", "torch.compile")  # eager first: the ratio baseline

MATRIX = {
    "cuda": {
        "batch": [16, 64, 256, 1024, 4096],
        "hidden": [256, 768, 1024],
        "dtypes": ["fp32", "fp16", "bf16"],
        "copy_mib": 1024,
    },
    "cuda-quick": {"batch": [16, 4096], "hidden": [1024], "dtypes": ["fp32", "bf16"], "copy_mib": 1024},
    "cpu": {"batch": [64, 1024], "hidden": [256], "dtypes": ["fp32"], "copy_mib": 256},
    "cpu-quick": {"batch": [16], "hidden": [64], "dtypes": ["fp32"], "copy_mib": 64},
}

COLUMNS = [
    "device",
    "impl",
    "batch",
    "hidden",
    "dtype",
    "pass",
    "status",
    "max_rel_err",
    "tol",
    "first_call_ms",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "bytes",
    "gb_per_s",
    "pct_of_copy_bw",
    "ratio_vs_eager",
    "note",
]


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 reference


def make_inputs(batch: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Inputs as lstm_layer hands them to the gate step: pre and dh in the input dtype, the cell
    state and the saved gates in fp32 (lstmlab keeps them in the accumulation dtype)."""
    from lstmlab.kernels import accumulation_dtype, gates_forward

    acc = accumulation_dtype(dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dt: torch.dtype) -> Tensor:
        return (2 * torch.randn(*shape, generator=gen)).to(device, dt)

    pre = randn(batch, 4 * hidden, dt=dtype)  # [B, 4H], std 2 reaches the saturated ends
    c_prev = randn(batch, hidden, dt=acc)  # [B, H]
    dh = randn(batch, hidden, dt=dtype)  # [B, H]
    dc = randn(batch, hidden, dt=acc)  # [B, H]
    gates, c, _ = gates_forward(pre, c_prev, backend="reference")  # what backward is handed
    return {"pre": pre, "c_prev": c_prev, "dh": dh, "dc": dc, "gates": gates, "c": c}


def lstm_reference(inp: dict) -> dict[str, Tensor]:
    """gates, c, h, dpre, dc_prev in float64 from torch.nn.LSTM (one step, W_ih = I, W_hh = 0)."""
    pre = inp["pre"].double()
    G = pre.shape[1]
    H = G // 4
    lstm = nn.LSTM(G, H, device=pre.device, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.eye(G, dtype=torch.float64))
        lstm.weight_hh_l0.zero_()
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
    x = pre[None].requires_grad_()  # [1, B, 4H]
    c0 = inp["c_prev"].double()[None].requires_grad_()  # [1, B, H]
    h0 = torch.zeros_like(c0)
    _, (h_n, c_n) = lstm(x, (h0, c0))
    torch.autograd.backward([h_n, c_n], [inp["dh"].double()[None], inp["dc"].double()[None]])
    i, f, g, o = pre.split(H, dim=1)
    gates = torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=1)
    return {
        "gates": gates,
        "c": c_n[0].detach(),
        "h": h_n[0].detach(),
        "dpre": x.grad[0],
        "dc_prev": c0.grad[0],
    }


# ---------------------------------------------------------------------------------------------
# Implementations


def make_fns(impl: str) -> tuple[Callable[..., tuple[Tensor, ...]], Callable[..., tuple[Tensor, ...]]]:
    """(forward, backward) callables of one implementation."""
    from lstmlab.kernels import gates_backward, gates_forward

    if impl == "triton":
        return (
            functools.partial(gates_forward, backend="triton_step"),
            functools.partial(gates_backward, backend="triton_step"),
        )
    fwd = functools.partial(gates_forward, backend="reference")
    bwd = functools.partial(gates_backward, backend="reference")
    if impl == "eager":
        return fwd, bwd
    if impl == "torch.compile":
        return torch.compile(fwd), torch.compile(bwd)
    raise ValueError(f"unknown implementation {impl!r}")


def moved_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_one(
    impl: str,
    fns: tuple[Callable, Callable],
    inp: dict,
    ref: dict,
    pass_: str,
    dtype_label: str,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, object]:
    row: dict[str, object] = {"impl": impl, "tol": TOLERANCE[dtype_label]}
    if pass_ == "fwd":

        def fn() -> tuple[Tensor, ...]:
            return fns[0](inp["pre"], inp["c_prev"])

        names, reads = ("gates", "c", "h"), [inp["pre"], inp["c_prev"]]
    else:

        def fn() -> tuple[Tensor, ...]:
            return fns[1](inp["dh"], inp["dc"], inp["gates"], inp["c"], inp["c_prev"])

        names = ("dpre", "dc_prev")
        reads = [inp[k] for k in ("dh", "dc", "gates", "c", "c_prev")]

    t0 = time.perf_counter()
    outs = list(fn())  # the first call compiles (Triton JIT, torch.compile)
    benchlib.sync(device)
    row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    if impl in args.inject_fault:
        outs[0] = outs[0] + 1.0
    err = benchlib.max_rel_err(outs, [ref[k] for k in names])
    row["max_rel_err"] = err
    if not err <= TOLERANCE[dtype_label]:
        row["status"] = "FAILED"
        row["note"] = f"correctness check failed: err {err:.3g} > tol {TOLERANCE[dtype_label]}"
        if impl in args.inject_fault:
            row["note"] += " (fault injected by --inject-fault)"
        return row

    med, p20, p80 = benchlib.time_fn(
        fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, min_run_time_s=args.min_run_time
    )
    nbytes = moved_bytes(reads + outs)
    row |= {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "bytes": nbytes}
    row["gb_per_s"] = nbytes / (med * 1e-3) / 1e9
    row["status"] = "ok"
    return row


def copy_bandwidth(device: torch.device, mib: int, args: argparse.Namespace) -> float:
    """GB/s of ``dst.copy_(src)`` on ``mib`` MiB, counting the read and the write."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    med, _, _ = benchlib.time_fn(
        lambda: dst.copy_(src),
        device,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        min_run_time_s=args.min_run_time,
    )
    return 2 * src.numel() * src.element_size() / (med * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# Driver


def make_parser() -> argparse.ArgumentParser:
    p = benchlib.common_parser(__doc__, dtypes=DTYPES, passes=PASSES, impls=IMPLS, min_run_time=0.5)
    p.add_argument(
        "--copy-mib", type=int, help="size of the copy_ bandwidth probe in MiB (default: the preset's)"
    )
    p.add_argument(
        "--inject-fault",
        nargs="+",
        default=[],
        choices=IMPLS,
        help="harness self-test: add 1.0 to this implementation's first output; its row must read FAILED",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    benchlib.apply_preset(args, MATRIX)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out_dir = benchlib.claim_out_dir(
            args.out, benchlib.default_out_dir(device), OUT_FILES, args.overwrite
        )
    except benchlib.OutDirTaken as err:
        print(f"bench_kernel: {err}", file=sys.stderr)
        return 2
    env = benchlib.environment(device)

    notes = []
    impls = [i for i in IMPLS if i in args.impls]
    if device.type != "cuda" and "triton" in impls:
        impls.remove("triton")
        reason = (
            "Triton gate kernels skipped on CPU: they run there only under TRITON_INTERPRET=1, "
            "an interpreter whose timings mean nothing"
        )
        print(reason)
        notes.append(reason + ".")

    copy_gbps = copy_bandwidth(device, args.copy_mib, args)
    env["copy_bandwidth"] = f"{copy_gbps:.1f} GB/s (copy_ of {args.copy_mib} MiB fp32, read + write)"
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    fns: dict[str, tuple[Callable, Callable] | Exception] = {}
    for impl in impls:
        try:
            fns[impl] = make_fns(impl)
        except Exception as exc:  # becomes a FAILED row for every config
            fns[impl] = exc

    writer = benchlib.CsvWriter(out_dir / "results_kernel.csv", COLUMNS)
    rows: list[dict[str, object]] = []
    cfgs = list(itertools.product(args.dtypes, args.hidden, args.batch))
    t_start = time.monotonic()
    for n, (dt, hidden, batch) in enumerate(cfgs):
        if args.time_budget_s is not None and time.monotonic() - t_start >= args.time_budget_s:
            notes.append(f"Time budget spent: {len(cfgs) - n} of {len(cfgs)} shapes not run.")
            print(notes[-1])
            break
        print(f"[{n + 1}/{len(cfgs)}] B{batch} H{hidden} {dt}", flush=True)
        inp = make_inputs(batch, hidden, DTYPES[dt], device)
        ref = lstm_reference(inp)
        for pass_ in args.passes:
            eager_ms = math.nan
            for impl in impls:
                base = {"device": str(device), "batch": batch, "hidden": hidden, "dtype": dt}
                row = base | {"pass": pass_, "impl": impl, "shape": f"B{batch} H{hidden}"}
                f = fns[impl]
                if isinstance(f, Exception):
                    row |= {"status": "FAILED", "note": benchlib.describe_exception(f)}
                else:
                    try:
                        row |= bench_one(impl, f, inp, ref, pass_, dt, device, args)
                    except Exception as exc:  # e.g. torch.compile without a C compiler
                        row |= {"status": "FAILED", "note": benchlib.describe_exception(exc)}
                if row.get("status") == "ok":
                    row["pct_of_copy_bw"] = 100 * float(row["gb_per_s"]) / copy_gbps
                    if impl == "eager":
                        eager_ms = float(row["median_ms"])
                    row["ratio_vs_eager"] = float(row["median_ms"]) / eager_ms
                benchlib.print_row(row, (("ratio_vs_eager", "÷ eager"),))
                writer.write(row)
                rows.append(row)
        del inp, ref
        benchlib.free_memory(device)
    writer.close()
    env["load_avg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    notes = md_notes(device) + notes
    no_plots = benchlib.plotting_unavailable()
    if no_plots:
        print(f"WARNING: {no_plots}", file=sys.stderr)
        notes.append(no_plots + ".")
    benchlib.write_markdown(
        out_dir / "results_kernel.md", "lstmlab gate-kernel benchmark", env, rows, notes, MD_COLUMNS
    )
    plots = (
        [] if no_plots else benchlib.write_plots(out_dir, plot_figures(rows, args, copy_gbps, env["device"]))
    )
    print(f"wrote {out_dir / 'results_kernel.csv'}, {out_dir / 'results_kernel.md'}, {len(plots)} plots")
    return 0


def md_notes(device: torch.device) -> list[str]:
    timer = (
        "`triton.testing.do_bench` (CUDA events, warm-up, L2 flushed before each call)"
        if device.type == "cuda"
        else "`torch.utils.benchmark.Timer.blocked_autorange` with all torch threads"
    )
    return [
        f"Times: median [20 %, 80 %] in ms from {timer}; the first call (Triton JIT, "
        "torch.compile) is timed separately as `first ms`.",
        "Each call includes the wrapper's output allocation (`torch.empty`), the same for every "
        "implementation.",
        "Bytes counted: every input read once and every output written once, at their real "
        "dtypes. fwd reads pre [B, 4H] (input dtype) and c_prev [B, H] (fp32), writes gates "
        "[B, 4H] (fp32), c [B, H] (fp32) and h [B, H] (input dtype). bwd reads dh [B, H] (input "
        "dtype), dc, gates, c, c_prev (fp32), writes dpre [B, 4H] (input dtype) and dc_prev "
        "[B, H] (fp32). Intermediates an implementation spills are not counted, so GB/s is an "
        "effective bandwidth.",
        "`% copy` = GB/s over the `copy_` bandwidth measured in the same run (bytes read + written).",
        "`err` = max over outputs of max|y - y_ref| / max|y_ref| against a one-step float64 "
        "`torch.nn.LSTM` (W_ih = I, W_hh = 0, biases 0) and its autograd; above `tol` the row is "
        "FAILED and not timed.",
        "`ratio` = median / median of eager (backend='reference') on the same shape and pass.",
    ]


MD_COLUMNS = [  # (header, row key) of results_kernel.md
    ("impl", "impl"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("pass", "pass"),
    ("status", "status"),
    ("median ms", "median_ms"),
    ("p20 ms", "p20_ms"),
    ("p80 ms", "p80_ms"),
    ("bytes", "bytes"),
    ("GB/s", "gb_per_s"),
    ("% copy", "pct_of_copy_bw"),
    ("ratio", "ratio_vs_eager"),
    ("err", "max_rel_err"),
    ("first ms", "first_call_ms"),
    ("note", "note"),
]


def plot_figures(
    rows: list[dict[str, object]], args: argparse.Namespace, copy_gbps: float, device_name: str
) -> dict[str, tuple[str, list[benchlib.Panel]]]:
    """Per (dtype, pass): achieved GB/s vs batch at the largest hidden, copy_ as a line."""
    h_fix = max(args.hidden)
    figures = {}
    for dt, pass_ in itertools.product(args.dtypes, args.passes):
        sel = [
            r
            for r in rows
            if r.get("status") == "ok" and r["dtype"] == dt and r["pass"] == pass_ and r["hidden"] == h_fix
        ]
        if not sel:
            continue
        lines = {impl: [(r["batch"], r["gb_per_s"]) for r in sel if r["impl"] == impl] for impl in IMPLS}
        panel = benchlib.Panel(
            {impl: pts for impl, pts in lines.items() if pts},
            "batch",
            "achieved GB/s",
            f"gates {pass_} {dt}, H = {h_fix}",
            hline=(copy_gbps, "tensor.copy_"),
        )
        figures[f"kernel_bw_{dt}_{pass_}.png"] = (device_name, [panel])
    return figures


if __name__ == "__main__":
    sys.exit(main())
