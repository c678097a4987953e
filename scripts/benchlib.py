"""Shared pieces of the benchmark scripts: machine header, timing, error metric, output files.

Imported by ``bench_layer.py`` and ``bench_kernel.py`` (both put this folder on ``sys.path``
when run as scripts; the tests do the same).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from lstmlab.analysis.plots import line_style, readable_log_axis

REPO_ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.5, 0.2, 0.8)


# ---------------------------------------------------------------------------------------------
# Command line shared by both scripts


def common_parser(
    description: str,
    *,
    dtypes: Sequence[str],
    passes: Sequence[str],
    impls: Sequence[str],
    min_run_time: float,
) -> argparse.ArgumentParser:
    """The options every benchmark takes; a script adds its own and calls :func:`apply_preset`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help=f"cpu or cuda (default here: {default_device})")
    p.add_argument("--quick", action="store_true", help="small preset (GPU: fits 3 min on one H100)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes B (default: the device's preset)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes H (default: the device's preset)")
    p.add_argument("--dtypes", nargs="+", choices=list(dtypes), help="dtypes (default: the device's preset)")
    p.add_argument(
        "--passes", nargs="+", choices=passes, default=list(passes), help="passes to time (default: all)"
    )
    p.add_argument(
        "--impls",
        nargs="+",
        choices=impls,
        default=list(impls),
        help="implementations to time (default: all)",
    )
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (GPU)")
    p.add_argument("--min-run-time", type=float, default=min_run_time, help="seconds per row (CPU)")
    p.add_argument("--time-budget-s", type=float, help="start no new config after this many seconds")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--out",
        type=Path,
        help="results folder (default: bench-results/<device>-<date>/, or a new -2, -3, ... beside it\n"
        "when that one holds an earlier run). A given --out that holds results is refused",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results an --out folder holds")
    return p


def claim_out_dir(requested: Path | None, default: Path, files: Sequence[str], overwrite: bool) -> Path:
    """The folder this run writes ``files`` into, never one whose earlier results it would replace
    silently: an explicit folder holding any of ``files`` raises :class:`OutDirTaken` (unless
    ``overwrite``), the default one gives way to ``<default>-2``, ``-3``, ... and says so."""
    if requested is not None:
        held = [f for f in files if (requested / f).exists()]
        if held and not overwrite:
            raise OutDirTaken(
                f"{requested} holds an earlier run's {', '.join(held)}: pass --overwrite to replace "
                "them, or choose another --out"
            )
        if held:
            print(f"--overwrite: replacing {', '.join(held)} in {requested}")
        requested.mkdir(parents=True, exist_ok=True)
        return requested
    out, n = default, 1
    while any((out / f).exists() for f in files):
        n += 1
        out = default.with_name(f"{default.name}-{n}")
    if n > 1:
        print(f"{default} holds an earlier run's results: writing to {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


class OutDirTaken(FileExistsError):
    """The results folder holds an earlier run's results (see :func:`claim_out_dir`)."""


def apply_preset(args: argparse.Namespace, matrix: dict[str, dict[str, object]]) -> torch.device:
    """Fills every option left unset from the device's preset (``--quick``: the small one)."""
    device = torch.device(args.device)
    for key, value in matrix[device.type + ("-quick" if args.quick else "")].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and device.type == "cuda":
        args.warmup_ms, args.rep_ms = min(args.warmup_ms, 10.0), min(args.rep_ms, 50.0)
    return device


# ---------------------------------------------------------------------------------------------
# Machine and versions


def _run(cmd: Sequence[str]) -> str | None:
    """Stdout of a short command, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> str:
    """Short commit of the working tree, marked when it has uncommitted changes."""
    sha = _run(["git", "rev-parse", "--short", "HEAD"])
    if sha is None:
        return "unknown (no git metadata, or no commit yet: uncommitted working tree)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    if not dirty:
        return sha
    paths = [line.split(maxsplit=1)[-1] for line in dirty.splitlines()]
    shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
    return f"{sha} + uncommitted changes to {shown}"


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()}"


def device_slug(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; CPUs get a ``cpu-`` prefix."""
    name = device_name(device).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def default_out_dir(device: torch.device) -> Path:
    """``bench-results/<device>-<date>/`` in the working directory (ignored by git): a run never
    writes into the checkout's ``docs/``; results worth keeping are copied there by hand."""
    date = datetime.date.today().isoformat()
    return Path("bench-results") / f"{device_slug(device)}-{date}"


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Silences what the profiler's C++ side (Kineto) prints straight to file descriptor 2 (one
    ``USDT: ... profiler_start`` line per start and stop); Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def environment(device: torch.device) -> dict[str, str]:
    """Everything a reader needs to reproduce or discount a number, in print order."""
    import triton  # the GPU image and the CPU CI both have it

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env |= {
            "gpu_sms": str(props.multi_processor_count),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": f"{props.total_memory / 2**30:.1f}",
            "driver": driver.splitlines()[0] if driver else "unknown (nvidia-smi unavailable)",
            "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()),
        }
    else:
        env |= {
            "cpu_model": cpu_model(),
            "cpu_count": str(os.cpu_count()),
            "torch_threads": str(torch.get_num_threads()),
            "load_avg_1_5_15": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "load_warning": load_warning(),
            "cudnn": "n/a (CPU run)",
        }
    return env


def load_warning() -> str:
    """Other processes on the cores make torch's OpenMP threads stall (ms per parallel op)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5:
        return f"BUSY: 1-min load {load:.2f} on {cores} cores before this run; CPU times are suspect"
    return "none (machine idle before the run)"


# ---------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_run_time_s: float = 1.0,
    grad_to_none: list[torch.Tensor] | None = None,
) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) in ms of steady-state calls of ``fn``.

    CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed before each call).
    CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with all of torch's threads (the
    Timer defaults to one thread); quantiles are taken over its measured blocks.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        return float(med), float(p20), float(p80)

    from torch.utils.benchmark import Timer

    def call() -> None:
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        fn()

    timer = Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time_s)
    times = torch.tensor(m.times, dtype=torch.float64) * 1e3
    med, p20, p80 = torch.quantile(times, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return med, p20, p80


def time_interleaved(
    calls: list[tuple[Callable[[], object], list[torch.Tensor] | None]],
    *,
    min_run_time_s: float = 1.0,
    rounds: int = 15,
    clock: Callable[[], float] | None = None,
) -> list[tuple[float, float, float]]:
    """(median, 20 %, 80 %) in ms per call for each ``(fn, grad_to_none)``, measured in
    ``rounds`` round-robin blocks (CPU) on ``clock`` (default ``time.perf_counter``; e.g.
    ``time.process_time`` for this process's CPU time).

    Each round runs every function for about ``min_run_time_s / rounds / len(calls)`` seconds,
    one after the other, so a burst of load from other processes hits them all rather than
    whichever happened to be timed at that moment. Round r starts at function r mod n, so each
    takes each place in the round equally often (over a multiple of n rounds): a block's time
    depends on what ran before it (the caches, the heap), and a fixed order charged that to the
    same function every round.
    Quantiles are over the per-round averages.
    """
    import time

    clock = clock or time.perf_counter

    def run(fn: Callable[[], object], grads: list[torch.Tensor] | None, n: int) -> float:
        t0 = clock()
        for _ in range(n):
            for t in grads or []:
                t.grad = None
            fn()
        return (clock() - t0) / n

    block_s = min_run_time_s / rounds / max(len(calls), 1)
    per_call = [run(fn, grads, 1) for fn, grads in calls]  # warm-up and first estimate
    counts = [max(1, round(block_s / max(t, 1e-9))) for t in per_call]
    samples: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        for j in range(len(calls)):
            k = (r + j) % len(calls)
            fn, grads = calls[k]
            samples[k].append(run(fn, grads, counts[k]) * 1e3)
    qs = torch.tensor(QUANTILES, dtype=torch.float64)
    out = []
    for times in samples:
        med, p20, p80 = torch.quantile(torch.tensor(times, dtype=torch.float64), qs).tolist()
        out.append((med, p20, p80))
    return out


def peak_memory_mib(
    fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor] | None = None
) -> float:
    """Peak memory allocated by one call above what was allocated before it (CUDA only),
    gradients reset first so that they count as new allocations.

    The CPU allocator keeps no peak statistic, so CPU rows report NaN.
    """
    if device.type != "cuda":
        return math.nan
    for t in grad_to_none or []:
        t.grad = None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def top_ops(fn: Callable[[], object], device: torch.device, n: int = 3) -> str:
    """What one call of ``fn`` actually ran: the ``n`` CUDA kernels with the most GPU time, or on
    the CPU the ``n`` ops with the most self CPU time (e.g. ``aten::mkldnn_rnn_layer``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with quiet_profiler(), profile(activities=activities) as prof:
        fn()
        sync(device)
    totals: dict[str, float] = {}
    if device.type == "cuda":
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                totals[evt.name] = totals.get(evt.name, 0.0) + evt.time_range.elapsed_us()
    else:
        for avg in prof.key_averages():
            totals[avg.key] = avg.self_cpu_time_total
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return "; ".join(name[:80] for name, _ in ranked)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Correctness


def max_rel_err(outputs: Iterable[torch.Tensor], refs: Iterable[torch.Tensor]) -> float:
    """max over tensor pairs of  max|out - ref| / max|ref|  (norm-wise, robust to ref ≈ 0)."""
    worst = 0.0
    for out, ref in zip(outputs, refs, strict=True):
        out64, ref64 = out.detach().double().reshape(-1), ref.detach().double().reshape(-1)
        if out64.shape != ref64.shape:
            raise ValueError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
        if not torch.isfinite(out64).all():
            return math.inf
        scale = ref64.abs().max().clamp_min(1e-30)
        worst = max(worst, ((out64 - ref64).abs().max() / scale).item())
    return worst


def describe_exception(exc: BaseException) -> str:
    """One line for the FAILED row; the full traceback goes to stderr."""
    traceback.print_exception(exc, file=sys.stderr)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:200]


# ---------------------------------------------------------------------------------------------
# Output


class CsvWriter:
    """Appends one row at a time and flushes, so a run killed by a time-out keeps its rows."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        self._fh = path.open("w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.columns)
        self._writer.writeheader()
        self._fh.flush()

    def write(self, row: dict[str, object]) -> None:
        self._writer.writerow({k: fmt_cell(row.get(k, ""), digits=6) for k in self.columns})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def fmt_cell(value: object, digits: int = 4) -> str:
    """Floats to ``digits`` significant digits (CSV 6, Markdown 4); NaN as an empty cell."""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.{digits}g}"
        return f"{value:.{digits - 1}e}"
    return str(value)


def plotting_unavailable() -> str | None:
    """Why no PNG can be drawn here (a bare GPU image may lack matplotlib), or None."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "PNG plots not written: matplotlib is not installed (pip install matplotlib)"
    return None


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` = (header, key) pairs; ``key`` may name a row key or a callable's output."""
    lines = [
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = [fmt_cell(row.get(key, "")).replace("|", "/") for _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(
    path: Path,
    title: str,
    env: dict[str, str],
    rows: Sequence[dict[str, object]],
    notes: Sequence[str],
    columns: Sequence[tuple[str, str]],
) -> None:
    """``results*.md``: the title, the machine table, the notes, then one table row per result."""
    path.write_text(markdown_header(title, env, notes) + "\n" + markdown_table(rows, columns) + "\n")


def markdown_header(title: str, env: dict[str, str], notes: Sequence[str]) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines.append("")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def print_row(row: dict[str, object], ratios: Sequence[tuple[str, str]] = ()) -> None:
    """One console line per row; ``ratios`` = (row key, label) of the ratios to show beside the
    time, e.g. ``("ratio_vs_baseline", "÷ torch.nn.LSTM")``."""
    if row.get("status") == "ok":
        msg = (
            f"{row['median_ms']:.4g} ms [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}]"
            f"  err {row['max_rel_err']:.2e}"
        )
        for key, name in ratios:
            if row.get(key):
                msg += f"  {name} {row[key]:.3g}"
    else:
        msg = f"{row.get('status')}: {row.get('note', '')}"
    label = " ".join(
        str(row[k]) for k in ("impl", "backend", "pass", "dtype", "shape") if k in row and row[k] != ""
    )
    if row.get("variant", "vanilla") != "vanilla":
        label = label.replace(str(row["impl"]), f"{row['impl']}+{row['variant']}", 1)
    print(f"  {label:70s} {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Plots


@dataclasses.dataclass
class Panel:
    """One log-log plot: ``lines`` = label -> [(x, y), ...], drawn in the given order."""

    lines: dict[str, list[tuple[float, float]]]
    xlabel: str
    ylabel: str
    title: str
    hline: tuple[float, str] | None = None  # (y, label): a reference level, e.g. copy_ bandwidth


def write_plots(out_dir: Path, figures: dict[str, tuple[str, list[Panel]]]) -> list[Path]:
    """``figures`` = file name -> (title, panels side by side); returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, (title, panels) in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        same_lines = all(list(p.lines) == list(panels[0].lines) for p in panels)
        for n, (ax, panel) in enumerate(zip(axes[0], panels, strict=True)):
            draw_panel(ax, panel, legend=not same_lines or n == len(panels) - 1)  # one legend if one set
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def draw_panel(ax, panel: Panel, legend: bool = True) -> None:
    """Each line its own dashes and open marker, thinner than the one before it; log axes
    labelled at values a reader can read off (see :func:`readable_log_axis`)."""
    from matplotlib.ticker import NullLocator

    xs, ys = [], []
    for n, (label, pts) in enumerate(panel.lines.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **line_style(n))
        xs += [p[0] for p in pts]
        ys += [p[1] for p in pts]
    if panel.hline is not None:
        ax.axhline(panel.hline[0], color="gray", linestyle="--", label=panel.hline[1], zorder=1)
        ys.append(panel.hline[0])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if xs:
        ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        ax.xaxis.set_minor_locator(NullLocator())  # the data's own x values, and nothing between
    if ys:
        readable_log_axis(ax.yaxis, min(ys), max(ys))
    ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel, title=panel.title)
    ax.grid(True, which="major", alpha=0.3)
    if panel.lines and legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
