"""The persistent kernels on a GPU, one change at a time: the grid barrier alone, then forward and
backward ablations of kernels/triton_persistent.py, each checked against kernels/naive.py in float64
before it is timed, all in one process.

    python scripts/persistent_bench.py --out DIR                 # about 1 minute on an H100 or H200
    python scripts/persistent_bench.py --out DIR --dry-run       # list the rows, run nothing
    TRITON_INTERPRET=1 python scripts/persistent_bench.py --out DIR --device cpu --batch 5 --hidden 13 \
        --seq 4 --check-seq 4 --barrier-steps 3       # CPU smoke test: every code path, timings meaningless

Writes DIR/persistent_bench.md (the tables, with card, versions and commit) and DIR/persistent_bench.json.
Recurrence only (gx given, input projection not included): the layer-level comparison with cuDNN is
scripts/bench_layer.py. Every barrier spins at most --spin-limit polls, so a grid that is not
co-resident fails in about a second (PersistentKernelTimeout) instead of hanging.

B: batch  T: time  H: hidden size  G = 4H: stacked gates  P: programs
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing
from lstmlab.kernels import triton_persistent as tp

REPO = Path(__file__).resolve().parents[1]


def environment(device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "commit": os.environ.get("LSTMLAB_COMMIT") or _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "device": props.name,
            "sms": props.multi_processor_count,
            "memory_gib": props.total_memory >> 30,
        }
    else:
        env["device"] = platform.processor() or "cpu"
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def bench_ms(fn, warmup_ms: float, rep_ms: float, device: torch.device) -> float:
    """Median ms of fn with CUDA events (triton.testing.do_bench); on CPU one call's wall time."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


# --- the barrier alone --------------------------------------------------------------------------


@triton.jit
def barrier_kernel(p_sync, n_steps, n_sync, spin_limit, ACQUIRE_LOAD: tl.constexpr):
    aborted = tl.program_id(0) < 0
    for t in range(0, n_steps):
        aborted = tp._grid_barrier(p_sync, t + 1, n_sync, spin_limit, aborted, ACQUIRE_LOAD)


def barrier_rows(args, device, emit) -> None:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = sorted({p for p in (48, 96, 128, 132) if p <= sms} | {sms})
    else:  # the interpreter runs programs one after another: one program, atomic polls
        programs = [1]
    for P in programs:
        for acquire in (False, True) if device.type == "cuda" else (False,):
            for warps in (4, 8):
                sync = torch.zeros(2, dtype=torch.int32, device=device)
                steps = args.barrier_steps

                def run(sync=sync, steps=steps, P=P, acquire=acquire, warps=warps):
                    sync.zero_()
                    barrier_kernel[(P,)](
                        sync, steps, P, args.spin_limit, ACQUIRE_LOAD=acquire, num_warps=warps
                    )

                run()
                exact = int(sync[0]) == steps * P and int(sync[1]) == 0
                ms = bench_ms(run, args.warmup_ms, args.rep_ms, device) if exact else float("nan")
                emit({"programs": P, "poll": "ld.acquire" if acquire else "atomic", "warps": warps,
                             "us_per_step": 1000 * ms / steps, "count_exact": exact})  # fmt: skip


# --- forward and backward ablations ---------------------------------------------------------------


def make_inputs(T: int, B: int, H: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    k = 1 / H**0.5
    return {
        "gx": (torch.randn(T, B, 4 * H, generator=g) * 0.5).to(device, dtype),
        "h0": (torch.randn(B, H, generator=g) * 0.5).to(device, dtype),
        "c0": torch.randn(B, H, generator=g).to(device, torch.float32),
        "w_hh": ((torch.rand(4 * H, H, generator=g) * 2 - 1) * k).to(device, dtype),
    }


def reference(inputs: dict, d_hs: torch.Tensor, d_cn: torch.Tensor):
    """hs and (d_gx, d_h0, d_c0) from kernels/naive.py in float64, differentiated by autograd."""
    from lstmlab.kernels.naive import lstm_layer_naive

    leaves = {k: inputs[k].double().requires_grad_() for k in ("gx", "h0", "c0")}
    out, _, c_n = lstm_layer_naive(leaves["gx"], leaves["h0"], leaves["c0"], inputs["w_hh"].double())
    hs = torch.cat([leaves["h0"][None], out])
    loss = (d_hs.double() * hs).sum() + (d_cn.double() * c_n).sum()
    return hs.detach(), torch.autograd.grad(loss, [leaves["gx"], leaves["h0"], leaves["c0"]])


# One change at a time from the kernels as they were before the second generation (8 warps on every
# dot, atomic polls, gates and c always stored, c/h/gx read from memory each step, the backward's 4H
# contraction in one warp-duplicated dot), then all of them. The forward kernel itself is the second
# generation's (batch on the dot's N side, K in 128-column chunks, split arrive/wait) in every row;
# so is the backward's split barrier with one chunk, but in the row that turns it off.
# fwd: (config, ACQUIRE_LOAD, save, REGISTER_STATE: c, own h and gx_{t+1} in registers with one tile)
def forward_ablations(B: int, H: int, dtype: torch.dtype) -> dict:
    new = tp.pick_config(B, H, dtype, backward=False)
    old = tp.Config(units=new.units, num_warps=8, block_b=new.block_b)
    # the other unit count: U = 8 (M = 32, mma.sync; 2 warps, which Triton keeps off M) where pick_config
    # takes U = 16 (wgmma), else U = 16 on 4 warps (M = 64, wgmma; spills 96 bytes at B64 H768, triton 3.9)
    other_units = (
        tp.Config(units=8, num_warps=2, block_b=new.block_b)
        if new.units == 16
        else tp.Config(units=16, num_warps=4, block_b=new.block_b)
    )
    return {
        "before (8 warps, atomic poll, gates and c stored, state from memory)": (old, False, True, False),
        "warps from the tile (pick_config)": (new, False, True, False),
        "ld.acquire poll": (old, True, True, False),
        "save=False (no gates, c in a ring)": (old, False, False, False),
        "c, h, gx_{t+1} in registers (one tile only)": (old, False, True, True),
        "all of the above": (new, True, False, True),
        "all but save (what training runs)": (new, True, True, True),
        f"U = {other_units.units}, {other_units.num_warps} warps, all but save": (
            other_units,
            True,
            True,
            True,
        ),
        # K chunks of 256 columns instead of 128 (fewer, longer dots; more registers)
        "K chunks of 256, all but save": (replace(new, block_k=256), True, True, True),
        # each K chunk in 4 slices, a 3-D dot summed over them (B <= 16 only)
        "split-K x4 per K chunk (B <= 16), all but save": (replace(new, split_k=4), True, True, True),
    }


def backward_ablations(B: int, H: int, dtype: torch.dtype) -> dict:
    """bwd: (config, ACQUIRE_LOAD, REGISTER_STATE: ∂L/∂h, ∂L/∂c in registers and the saved gates and c
    loaded before the barrier, with one chunk[, BWD_SPLIT_BARRIER: with one chunk, arrive once ∂L/∂pre_t
    is stored and wait at step t − 1 after those loads; default on]). The first rows are the first
    generation's changes from the kernel before them; then the second generation (pick_config: 16
    units, the batch on the dot's N side in one tile up to 128 rows, 4H in unpadded chunks), against
    the first, one change at a time."""
    new = tp.pick_config(B, H, dtype, backward=True)
    old = tp.Config(units=8, num_warps=8, block_b=16, split_k=1)
    first = tp.Config(units=8, num_warps=8, block_b=16, split_k=8)  # 4H padded to a power of two
    n_k = tp.bwd_chunks(H, new)[1]
    rows = {
        "before (8 warps on one [16, 8] tile, atomic poll, state from memory)": (old, False, False),
        "split-K, one slice per warp (1st gen)": (first, False, False),
        "ld.acquire poll": (old, True, False),
        "state in registers, inputs before the barrier (one chunk only)": (old, False, True),
        "1st gen: all of the above": (first, True, True),
        # second generation
        "2nd gen (pick_config): 16 units, batch on N, 4H in unpadded chunks": (new, True, True),
        # right after it: a run cut at its time limit loses the rows at the end first
        "2nd gen, split barrier off (arrive and wait at once)": (new, True, True, False),
        "2nd gen, 8 units (M = 8 padded to 16, twice the programs)": (replace(new, units=8), True, True),
        "2nd gen, every chunk's load issued first": (replace(new, k_ahead=n_k - 1), True, True),
        "2nd gen, one chunk's load ahead": (replace(new, k_ahead=1), True, True),
        "2nd gen, 4H as one chunk padded to a power of two": (replace(new, block_k=0), True, True),
        "2nd gen, state from memory": (new, True, False),
        "2nd gen, 4H split in 8 slices (one per warp)": (replace(new, split_k=8), True, True),
    }
    # every chunk in registers at once only fits a 16-row tile; the padded 4H only where it fits on chip
    return {
        name: spec
        for name, spec in rows.items()
        if (spec[0].k_ahead < n_k - 1 or new.block_b <= 16)
        and tp.config_problem(B, H, dtype, spec[0], True) is None
    }


def runnable(cfg, pass_: str, B: int, H: int, T: int, dtype: str, name: str, emit) -> bool:
    """Whether an ablation row's configuration can run this shape; if not (split-K of a 16-column K
    chunk, at the CPU smoke test's H), a row that says why instead of ending the part."""
    try:
        tp._check_split_k(cfg, H, backward=pass_ == "bwd")
    except ValueError as e:
        shape = {"pass": pass_, "B": B, "H": H, "T": T, "dtype": dtype}
        emit(shape | {"change": name, "status": f"not run: {e}"})
        return False
    return True


def ablation_rows(args, device, emit) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for B in args.batch:
        H, T = args.hidden, args.seq
        check = make_inputs(args.check_seq, B, H, dtype, device, seed=1)
        g = torch.Generator().manual_seed(2)
        d_hs_check = torch.randn(args.check_seq + 1, B, H, generator=g).to(device, dtype)
        d_cn_check = torch.randn(B, H, generator=g).to(device)
        ref_hs, ref_grads = reference(
            {k: v.cpu() for k, v in check.items()}, d_hs_check.cpu(), d_cn_check.cpu()
        )
        timed = make_inputs(T, B, H, dtype, device)
        d_hs = torch.randn(T + 1, B, H, device=device, dtype=dtype)
        d_cn = torch.randn(B, H, device=device)
        _, cs_saved, gates_saved = tp.persistent_forward(**timed, spin_limit=args.spin_limit)
        seen = set()
        for name, spec in forward_ablations(B, H, dtype).items():
            cfg, acquire, save, registers = spec
            registers &= cfg.block_b >= B  # several chunks: no registers across steps
            if cfg.split_k > 1 and cfg.block_b != 16:
                continue
            if not runnable(cfg, "fwd", B, H, T, args.dtype, name, emit):
                continue
            if (cfg, acquire, save, registers) in seen:  # e.g. at B > 16 pick_config already runs 8 warps
                continue
            seen.add((cfg, acquire, save, registers))
            tp.ACQUIRE_LOAD, tp.REGISTER_STATE = acquire, registers
            hs, _, _ = tp.persistent_forward(**check, config=cfg, spin_limit=args.spin_limit, save=save)
            err = rel_err(hs, ref_hs)
            ok = err < args.rtol
            ms = float("nan")
            if ok:
                run = functools.partial(
                    tp.persistent_forward, **timed, config=cfg, spin_limit=args.spin_limit, save=save
                )
                ms = bench_ms(run, args.warmup_ms, args.rep_ms, device)
            emit({"pass": "fwd", "B": B, "H": H, "T": T, "dtype": args.dtype, "change": name,
                         "units": cfg.units, "warps": cfg.num_warps, "block_k": tp.fwd_block_k(H, cfg),
                         "rel_err": err, "ok": ok, "ms": ms,
                         "us_per_step": 1000 * ms / T})  # fmt: skip
        _, cs_check, gates_check = tp.persistent_forward(**check, spin_limit=args.spin_limit)
        seen = set()
        for name, (cfg, acquire, registers, *split) in backward_ablations(B, H, dtype).items():
            registers &= cfg.block_b >= B
            split = (split or [True])[0] and registers  # the split needs the state in registers
            if (cfg, acquire, registers, split) in seen:
                continue
            seen.add((cfg, acquire, registers, split))
            if not runnable(cfg, "bwd", B, H, T, args.dtype, name, emit):
                continue
            tp.ACQUIRE_LOAD, tp.REGISTER_STATE, tp.BWD_SPLIT_BARRIER = acquire, registers, split
            grads = tp.persistent_backward(
                d_hs_check,
                d_cn_check,
                gates_check,
                cs_check,
                check["w_hh"],
                config=cfg,
                spin_limit=args.spin_limit,
            )
            err = max(rel_err(a, e) for a, e in zip(grads, ref_grads, strict=True))
            ok = err < args.rtol
            ms = float("nan")
            if ok:
                run = functools.partial(
                    tp.persistent_backward, d_hs, d_cn, gates_saved, cs_saved, timed["w_hh"], config=cfg,
                    spin_limit=args.spin_limit,
                )  # fmt: skip
                ms = bench_ms(run, args.warmup_ms, args.rep_ms, device)
            emit({"pass": "bwd", "B": B, "H": H, "T": T, "dtype": args.dtype, "change": name,
                         "warps": cfg.num_warps, "rel_err": err, "ok": ok, "ms": ms,
                         "us_per_step": 1000 * ms / T})  # fmt: skip
        tp.ACQUIRE_LOAD, tp.REGISTER_STATE, tp.BWD_SPLIT_BARRIER = True, True, True


def direction_rows(args, device, emit) -> None:
    """Both directions of a bidirectional layer (the vanilla cell) as one launch each way (grid
    (P, 2), every tensor stacked on a leading [2]: what lstmlab.LSTM runs where the SMs hold both
    grids) against two launches one after the other, at the first --batch; each direction checked
    against kernels/naive.py in float64 first."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    B, H, T = args.batch[0], args.hidden, args.seq
    shape = {"B": B, "H": H, "T": T, "dtype": args.dtype}
    reason = tp.persistent_unavailable_reason(B, H, dtype, device, directions=2)
    if reason is not None:
        emit(shape | {"launches": "one for both directions", "status": f"not available: {reason}"})
        return
    g = torch.Generator().manual_seed(2)
    check = [make_inputs(args.check_seq, B, H, dtype, device, seed=seed) for seed in (1, 3)]
    d_hs = [torch.randn(args.check_seq + 1, B, H, generator=g).to(device, dtype) for _ in check]
    d_cn = [torch.randn(B, H, generator=g).to(device) for _ in check]
    refs = [
        reference({k: v.cpu() for k, v in c.items()}, d.cpu(), dc.cpu())
        for c, d, dc in zip(check, d_hs, d_cn, strict=True)
    ]
    both = {k: torch.stack([c[k] for c in check]) for k in check[0]}  # [2, ...]
    hs, cs, gates = tp.persistent_forward(**both, spin_limit=args.spin_limit)
    grads = tp.persistent_backward(
        torch.stack(d_hs), torch.stack(d_cn), gates, cs, both["w_hh"], spin_limit=args.spin_limit
    )
    err_fwd = max(rel_err(hs[d], refs[d][0]) for d in (0, 1))
    err_bwd = max(rel_err(got[d], want) for d in (0, 1) for got, want in zip(grads, refs[d][1], strict=True))

    timed = [make_inputs(T, B, H, dtype, device, seed=seed) for seed in (0, 4)]
    timed_both = {k: torch.stack([t[k] for t in timed]) for k in timed[0]}
    saved = [tp.persistent_forward(**t, spin_limit=args.spin_limit) for t in timed]
    _, cs_both, gates_both = tp.persistent_forward(**timed_both, spin_limit=args.spin_limit)
    d_hs_t = torch.randn(2, T + 1, B, H, device=device, dtype=dtype)
    d_cn_t = torch.randn(2, B, H, device=device)

    def programs(backward: bool, directions: int) -> int:  # a grid of both directions: half the SMs each
        sms = tp._sms_per_direction(device, directions)
        return tp.pick_config(B, H, dtype, backward=backward, sms=sms).programs(H)

    runs = {
        ("fwd", "one for both directions", 2 * programs(False, 2), err_fwd): lambda: tp.persistent_forward(
            **timed_both, spin_limit=args.spin_limit
        ),
        ("fwd", "two, one after the other", programs(False, 1), err_fwd): lambda: [
            tp.persistent_forward(**t, spin_limit=args.spin_limit) for t in timed
        ],
        ("bwd", "one for both directions", 2 * programs(True, 2), err_bwd): lambda: tp.persistent_backward(
            d_hs_t, d_cn_t, gates_both, cs_both, timed_both["w_hh"], spin_limit=args.spin_limit
        ),
        ("bwd", "two, one after the other", programs(True, 1), err_bwd): lambda: [
            tp.persistent_backward(d_hs_t[d], d_cn_t[d], saved[d][2], saved[d][1], timed[d]["w_hh"],
                                   spin_limit=args.spin_limit)
            for d in (0, 1)
        ],
    }  # fmt: skip
    for (pass_, launches, programs, err), run in runs.items():
        ok = err < args.rtol
        ms = bench_ms(run, args.warmup_ms, args.rep_ms, device) if ok else float("nan")
        emit({"pass": pass_, **shape, "launches": launches, "programs per launch": programs, "rel_err": err,
              "ok": ok, "ms": ms, "us_per_step": 1000 * ms / T})  # fmt: skip


def host_check_rows(args, device, emit) -> None:
    """What reading the timeout flag after every call (the old behaviour, SYNC_CHECK) costs a layer call."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for T in (64, args.seq):
        timed = make_inputs(T, 16, args.hidden, dtype, device)
        for sync_check in (True, False):
            tp.SYNC_CHECK = sync_check
            ms = bench_ms(
                lambda timed=timed: tp.persistent_forward(**timed, save=False),
                args.warmup_ms,
                args.rep_ms,
                device,
            )
            read = "every call (sync)" if sync_check else "lazy"
            emit({"B": 16, "H": args.hidden, "T": T, "flag read": read, "ms": ms})
    tp.SYNC_CHECK = False
    tp.raise_pending_timeouts(wait=True)


def markdown(env: dict, sections: dict[str, list[dict]]) -> str:
    lines = ["# Persistent kernels, one change at a time", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    for title, rows in sections.items():
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(not run)", ""]
            continue
        keys = list(rows[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1")
    parser.add_argument("--parts", nargs="+", default=["barrier", "ablations", "host", "directions"],
                        choices=["barrier", "ablations", "host", "directions"])  # fmt: skip
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--check-seq", type=int, default=32, help="steps checked against float64")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--rtol", type=float, default=5e-2, help="norm-wise relative error allowed")
    parser.add_argument("--barrier-steps", type=int, default=2000)
    parser.add_argument("--spin-limit", type=int, default=1 << 20, help="barrier polls before a timeout")
    parser.add_argument("--warmup-ms", type=float, default=10)
    parser.add_argument("--rep-ms", type=float, default=50)
    parser.add_argument("--dry-run", action="store_true", help="list the rows and exit (no GPU needed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        for B in args.batch:
            for name, spec in forward_ablations(B, args.hidden, dtype).items():
                print("fwd", B, args.hidden, args.seq, name, spec)
            for name, spec in backward_ablations(B, args.hidden, dtype).items():
                print("bwd", B, args.hidden, args.seq, name, spec)
        for pass_ in ("fwd", "bwd"):
            print(pass_, args.batch[0], args.hidden, args.seq, "both directions: one launch, then two")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: use --dry-run, or --device cpu under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if device.type == "cpu" and not tp.TRITON_INTERPRET:
        print("--device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print(json.dumps(env), flush=True)
    sections: dict[str, list[dict]] = {}
    failed: list[str] = []

    def write() -> None:  # after every row: a step stopped at its time limit keeps what it measured
        (args.out / "persistent_bench.json").write_text(
            json.dumps({"env": env, "sections": sections}, indent=1)
        )
        (args.out / "persistent_bench.md").write_text(markdown(env, sections) + "\n".join(failed) + "\n")

    runs = {
        "barrier": ("Grid barrier alone (µs per step)", barrier_rows),
        "ablations": ("Forward and backward, recurrence only", ablation_rows),
        "host": ("Host: the timeout flag read per call or lazily (layer call, save=False)", host_check_rows),
        "directions": ("Both directions of a bidirectional layer: one launch or two", direction_rows),
    }
    for part in args.parts:
        title, fn = runs[part]
        rows = sections[title] = []

        def emit(row: dict, rows=rows) -> None:
            rows.append(row)
            print(json.dumps(row), flush=True)
            write()

        try:
            fn(args, device, emit)
        except Exception as e:  # one part failing must not lose the others' rows
            failed.append(f"{part}: {type(e).__name__}: {e}")
            print(failed[-1], file=sys.stderr, flush=True)
        write()
    print(markdown(env, sections))
    return 1 if failed or any(not r.get("ok", True) for rows in sections.values() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
