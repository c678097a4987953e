"""Where an LSTM layer's time goes: torch.profiler over a few training steps (forward+backward).

    python scripts/profile_layer.py --impl lstmlab --batch 64 --hidden 256 --seq 100
    python scripts/profile_layer.py --impl torch --batch 64 --hidden 256 --seq 100

Prints the top ops by self time (CPU, or CUDA on a GPU) and writes the table to ``--out`` when
given (and a Chrome trace with ``--trace``).
"""

# T: time  B: batch  H: hidden  (input size = H)

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchlib
import torch
from lstmlab.kernels import CPU_GEMM_ENGINES, cpu_gemm_engine
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument(
        "--impl", choices=["lstmlab", "torch"], default="lstmlab", help="lstmlab.LSTM or torch.nn.LSTM"
    )
    p.add_argument("--backend", default="reference", help="lstmlab backend")
    p.add_argument("--cpu-gemm", choices=CPU_GEMM_ENGINES, default="auto", help="lstmlab CPU GEMMs")
    p.add_argument("--batch", type=int, default=64, help="batch size B")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H (= input size)")
    p.add_argument("--seq", type=int, default=100, help="sequence length T")
    p.add_argument("--steps", type=int, default=5, help="profiled forward+backward calls")
    p.add_argument("--top", type=int, default=15, help="ops in the printed table")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="folder for profile_<impl>.txt")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace (large)")
    p.add_argument("--overwrite", action="store_true", help="replace the files an earlier run left in --out")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import lstmlab

    args = parse_args(argv)
    if args.out:  # checked before profiling, so a refusal costs nothing
        files = [f"profile_{args.impl}.txt", *([f"trace_{args.impl}.json"] if args.trace else [])]
        try:
            benchlib.claim_out_dir(args.out, args.out, files, args.overwrite)
        except benchlib.OutDirTaken as err:
            print(f"profile_layer: {err}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    H = args.hidden
    if args.impl == "lstmlab":
        model = lstmlab.LSTM(H, H, device=device, backend=args.backend)
    else:
        model = nn.LSTM(H, H, device=device)
    x = torch.randn(args.seq, args.batch, H, device=device, requires_grad=True)  # (T, B, H)
    gout = torch.randn(args.seq, args.batch, H, device=device)

    def step() -> None:
        x.grad = None
        model.zero_grad(set_to_none=True)
        out, _ = model(x)
        out.backward(gout)

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with cpu_gemm_engine(args.cpu_gemm):
        for _ in range(2):  # warm-up
            step()
        with benchlib.quiet_profiler(), profile(activities=activities) as prof:
            for _ in range(args.steps):
                with record_function("train_step"):
                    step()
            if device.type == "cuda":
                torch.cuda.synchronize()

    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.top)
    name = "torch.nn.LSTM"
    if args.impl == "lstmlab":
        name = f"lstmlab.LSTM (backend {model.last_backend}, CPU GEMMs {args.cpu_gemm})"
    header = (
        f"{name} "
        f"B{args.batch} H{H} T{args.seq}, {args.steps} fwd+bwd steps, "
        f"{torch.get_num_threads()} threads, device {device}\n"
    )
    print(header + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_{args.impl}.txt").write_text(header + table + "\n")
        if args.trace:
            prof.export_chrome_trace(str(args.out / f"trace_{args.impl}.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
