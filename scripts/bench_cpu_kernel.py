"""Benchmark one LSTM layer on the CPU: the fused C++ kernel against torch.nn.LSTM (oneDNN) and the
reference backend, interleaved in one process.

Every row times the whole layer, x [T, B, I] -> out [T, B, H], as ``lstmlab.LSTM`` runs it: the
layer's op (``lstm_layer_from_input``) on the ``cpu`` backend, whose forward takes the input
projection inside each step's product, and whose backward runs ∂x and ∂W as GEMMs after the loop
(``gemm.mm`` / ``gemm.mm_tn``); ``fwd`` is inference under ``torch.no_grad()`` (nothing saved).
Each implementation is first checked against ``torch.nn.LSTM`` in fp64 on the same weights
(outputs and every gradient).

    python scripts/bench_cpu_kernel.py          # B 16 64, H 64 128 256, T 100, 1 and 2 threads
    python scripts/bench_cpu_kernel.py --batch 16 --hidden 64 --threads 1 --min-run-time 1
    python scripts/bench_cpu_kernel.py --threads 1 --clock cpu --plot ratios.png

Prints a markdown table with the machine's header (commit, CPU, torch, load before and after).
"""

# T: time  B: batch  I: input size  H: hidden  G = 4H: stacked gates (i, f, g, o)

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from lstmlab.kernels import cpu_kernel, gemm, lstm_layer_from_input, variants

from lstmlab.runner import allocator

IMPLS = ("torch.nn.LSTM", "cpu_kernel", "reference")


def make_impl(name: str, lstm: nn.LSTM, flags: int = 0, peephole: Tensor | None = None):
    """fn(x, h0, c0) -> (out, h_n, c_n) with the weights of ``lstm`` (one layer, no projection)."""
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    if name == "torch.nn.LSTM":

        def fn(x, h0, c0):
            out, (h_n, c_n) = lstm(x, (h0[None], c0[None]))
            return out, h_n[0], c_n[0]

    elif name == "cpu_kernel":

        def fn(x, h0, c0):  # the layer's op on the cpu backend, as lstmlab.LSTM runs it
            bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
            return lstm_layer_from_input(
                x, w_ih, bias, h0, c0, w_hh, backend="cpu", flags=flags, peephole=peephole
            )

    elif name == "reference":

        def fn(x, h0, c0):
            bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
            return lstm_layer_from_input(x, w_ih, bias, h0, c0, w_hh, backend="reference")

    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    return fn


def check(name: str, T: int, B: int, H: int) -> float:
    """Max relative error of every output and gradient against torch.nn.LSTM, in fp64."""
    torch.manual_seed(0)
    lstm = nn.LSTM(H, H, dtype=torch.float64)
    x = torch.randn(T, B, H, dtype=torch.float64, requires_grad=True)
    h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    results = []
    for impl in ("torch.nn.LSTM", name):
        x.grad = None
        lstm.zero_grad()
        outs = make_impl(impl, lstm)(x, h0, c0)
        sum((o * (k + 1)).sum() for k, o in enumerate(outs)).backward()
        grads = [x.grad, lstm.weight_ih_l0.grad, lstm.weight_hh_l0.grad, lstm.bias_ih_l0.grad]
        results.append([t.detach().clone() for t in (*outs, *grads)])
    return benchlib.max_rel_err(results[1], results[0])


def plot(rows: list[dict], impls: list[str], path: Path) -> None:
    """Each row's time ÷ torch.nn.LSTM as bars, one per implementation, the parity line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [name for name in impls if name != "torch.nn.LSTM"]
    labels = [f"{r['threads']}t B{r['B']} H{r['H']}\n{r['pass']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) * len(others)), 4.2))
    width = 0.8 / max(1, len(others))
    for n, name in enumerate(others):
        xs = [i + (n - (len(others) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [float(r[f"{name} ×"]) for r in rows], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, label="torch.nn.LSTM (oneDNN)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("time ÷ torch.nn.LSTM (lower is faster)")
    ax.set_title(f"one LSTM layer on the CPU, T = {rows[0]['T']}, {rows[0]['clock']} clock")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, allocator_note: str = "this process's, unchanged") -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seq", type=int, default=100)
    p.add_argument("--input-size", type=int, help="the layer's input width; default: the hidden size")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--variant", choices=["vanilla", "peepholes"], default="vanilla")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per row, all impls together")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (time.process_time), which other processes on the cores do "
        "not inflate; meaningful for one thread only (idle OpenMP workers spin)",
    )
    p.add_argument("--plot", type=Path, help="also write the ratios to torch.nn.LSTM as a bar chart (PNG)")
    args = p.parse_args(argv)

    reason = cpu_kernel.load_error()
    if reason is not None:
        raise SystemExit(reason)
    env = benchlib.environment(torch.device("cpu"))
    env["allocator"] = allocator_note
    env["vector_isa"] = torch.ops.lstmlab_cpu.vec_isa()
    env["cpu_gemm"] = gemm.describe_cpu_gemm()
    for name in args.impls:
        if name != "torch.nn.LSTM":
            err = check(name, 7, 3, 12)
            print(f"check {name}: max rel err against torch.nn.LSTM in fp64 {err:.1e}")
            if err > 1e-9:
                raise SystemExit(f"{name} does not compute torch.nn.LSTM's function (rel err {err:.1e})")

    flags = variants.PEEPHOLES if args.variant == "peepholes" else 0
    rows = []
    for threads, B, H, passes in itertools.product(args.threads, args.batch, args.hidden, args.passes):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        I = args.input_size or H
        lstm = nn.LSTM(I, H)
        peephole = torch.randn(3, H) * 0.1 if flags else None
        x = torch.randn(args.seq, B, I, requires_grad=passes == "fwd+bwd")
        h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
        calls = []
        for name in args.impls:
            f = make_impl(name, lstm, flags if name == "cpu_kernel" else 0, peephole)
            if passes == "fwd":

                def call(f=f, x=x, h0=h0, c0=c0):
                    with torch.no_grad():
                        f(x, h0, c0)

                calls.append((call, None))
            else:

                def call(f=f, x=x, h0=h0, c0=c0):
                    out, _, _ = f(x, h0, c0)
                    out.sum().backward()

                calls.append((call, [x, *lstm.parameters()]))
        times = benchlib.time_interleaved(
            calls,
            min_run_time_s=args.min_run_time,
            clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        )
        base = times[0][0]
        row = {"threads": threads, "B": B, "I": I, "H": H, "T": args.seq, "pass": passes, "clock": args.clock}
        for name, (med, p20, _) in zip(args.impls, times, strict=True):
            row[f"{name} ms"] = f"{med:.2f} ({p20:.2f})"
            row[f"{name} ×"] = f"{med / base:.2f}"
        row["load"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print(row, flush=True)
        rows.append(row)
    env["load_avg_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print()
    for k, v in env.items():
        print(f"- {k}: {v}")
    print()
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.plot:
        plot(rows, args.impls, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    # lstmlab-train's heap policy, set before anything is allocated: with glibc's defaults the heap
    # is trimmed after every call here (one call's buffers add up to more than twice the largest),
    # and both implementations then time their page faults, up to 2× at B64 H64 (2026-12-07)
    main(allocator_note=allocator.keep_freed_memory())
