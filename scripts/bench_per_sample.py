"""Per-sample gradients of lstmlab.LSTM (torch.func.vmap(grad) over functional_call) against one
ordinary forward + backward of the same batch on each backend asked for (the per-sample path is the
same whatever the backend: torch.func runs the layer in functional ops), timed interleaved in one
process.

    python scripts/bench_per_sample.py                 # the default grid, one thread
    python scripts/bench_per_sample.py --threads 2 --batch 16 64 --hidden 64 128

The per-sample gradients are checked against a loop of single-sample backwards before any timing.
Prints a markdown table with the machine, versions, commit and load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch
from torch.func import functional_call, grad, vmap

import lstmlab


def per_sample(model: lstmlab.LSTM):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x, y):  # one sample: x [T, I], y [H]
        out, _ = functional_call(model, params, (x.unsqueeze(1),))
        return (out[-1, 0] - y).square().sum()

    per_sample_grad = vmap(grad(loss), in_dims=(None, 0, 0))
    return lambda x, y: per_sample_grad(params, x, y)


def ordinary(model: lstmlab.LSTM):
    def run(x, y):  # the whole batch at once: x [B, T, I]
        out, _ = model(x.transpose(0, 1))
        return torch.autograd.grad((out[-1] - y).square().sum(), list(model.parameters()))

    return run


def check(model: lstmlab.LSTM, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative error of the per-sample gradients against single-sample backwards."""
    batched, worst = per_sample(model)(x, y), 0.0
    for b in range(x.shape[0]):
        out, _ = model(x[b].unsqueeze(1))
        grads = torch.autograd.grad((out[-1, 0] - y[b]).square().sum(), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads, strict=True):
            worst = max(worst, ((batched[name][b] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item())
    return worst


def timed(fn, x, y, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, y)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="batch sizes B")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 128], help="hidden sizes H")
    parser.add_argument("--seq", type=int, default=50, help="sequence length T")
    parser.add_argument("--input", type=int, default=8, help="input size I")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each, interleaved")
    parser.add_argument(
        "--backends", nargs="+", default=["reference", "cpu"], help="backends of the ordinary backward"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    print(f"# per-sample gradients, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"torch {torch.__version__}, commit {commit.strip() or '?'}, load {os.getloadavg()[0]:.2f}")
    columns = " | ".join(f"ordinary on {b} ms | ratio to it" for b in args.backends)
    print(f"\n| B | H | T | check (max rel err) | per-sample ms | {columns} |")
    print("|---" * (5 + 2 * len(args.backends)) + "|")
    for B in args.batch:
        for H in args.hidden:
            models = []
            for backend in args.backends:  # the same weights on every backend
                torch.manual_seed(0)
                models.append(lstmlab.LSTM(args.input, H, backend=backend))
            x, y = torch.randn(B, args.seq, args.input), torch.randn(B, H)
            error = check(models[0], x, y)
            fns = [per_sample(models[0]), *(ordinary(m) for m in models)]
            times = [[] for _ in fns]
            for fn in fns:
                fn(x, y)  # warm-up
            for _ in range(args.repeats):  # interleaved: a load change hits all
                for fn, t in zip(fns, times, strict=True):
                    t += timed(fn, x, y, 1)
            ms = [statistics.median(t) * 1e3 for t in times]
            cells = " | ".join(f"{m:.1f} | {ms[0] / m:.2f}" for m in ms[1:])
            print(f"| {B} | {H} | {args.seq} | {error:.1e} | {ms[0]:.1f} | {cells} |")
    print(f"\nload after: {os.getloadavg()[0]:.2f} (medians of {args.repeats} interleaved runs)")


if __name__ == "__main__":
    main()
