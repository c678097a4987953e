"""Greff et al. 2017 ("LSTM: A Search Space Odyssey"), Figure 3, for our runs.

``lstmlab-report --odyssey SWEEP_DIR [--out DIR]`` reads the runs of ``lstmlab-train
experiment=odyssey`` (cell variant x task x learning rate x seed) and writes into ``--out`` (the
sweep directory unless given):

- ``odyssey_report.md``: per task, each variant at the learning rate whose validation metric,
  averaged over seeds, is best for that variant; its test metric per seed and as mean ± sd; the
  difference from the vanilla cell V (at V's own best learning rate) and the p-value of Welch's
  t-test on the per-seed test metrics, marked where p < 0.05. Then the validation metric of
  every variant at every learning rate, and how much of its spread the learning rate and the
  variant explain (a main-effect variance decomposition of the full grid: Greff et al.'s
  functional ANOVA, which on a full grid with equal weights is this), and how much of it the
  seeds alone would make.
- ``odyssey.png``: one panel per task, a dot per seed, mean ± sd, V's mean as a line, the
  significantly different variants in colour.
- ``odyssey.json``: every number of the two.

Everything is read from the runs' ``summary.json`` files: nothing about the setup is assumed.
Like the library, this module never imports Hydra.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from lstmlab.kernels.variants import GREFF_VARIANTS
from lstmlab.runner.loggers import finished_runs

REFERENCE = "V"
ALPHA = 0.05
FILES = ("odyssey_report.md", "odyssey.png", "odyssey.json")


def variant_label(run: dict[str, Any]) -> str:
    """Greff et al.'s name for the run's cell (``summary.json``'s ``variant``), else its changed
    options (``layer_norm``), else the model kind for a torch model."""
    variant = run.get("variant")
    if not variant:
        return str(run["model"])
    if variant["name"]:
        return variant["name"]
    return " ".join(f"{k}={v}" for k, v in variant["changed"].items())


def _order(label: str) -> tuple[int, str]:
    names = list(GREFF_VARIANTS)
    return (names.index(label) if label in names else len(names), label)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances), or None where it is undefined:
    fewer than two values on a side, or no spread on either side."""
    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return None
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # one side without spread (all seeds at 100%) is fine for Welch
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def _sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def variance_shares(grid: dict[str, dict[float, float]]) -> dict[str, float] | None:
    """Shares of the variance of ``grid[variant][lr]`` (mean validation metric) explained by the
    variant's main effect, the learning rate's, and their interaction. None unless the grid is
    full (every variant at every learning rate) and not constant."""
    variants, lrs = list(grid), sorted({lr for row in grid.values() for lr in row})
    if len(variants) < 2 or len(lrs) < 2 or any(set(row) != set(lrs) for row in grid.values()):
        return None
    cells = [grid[v][lr] for v in variants for lr in lrs]
    if not all(math.isfinite(c) for c in cells):
        return None
    grand = statistics.mean(cells)
    total = sum((c - grand) ** 2 for c in cells)
    if total == 0:
        return None
    ss_variant = len(lrs) * sum((statistics.mean(grid[v].values()) - grand) ** 2 for v in variants)
    ss_lr = len(variants) * sum((statistics.mean(grid[v][lr] for v in variants) - grand) ** 2 for lr in lrs)
    return {
        "variant": ss_variant / total,
        "lr": ss_lr / total,
        "interaction": max(0.0, 1.0 - (ss_variant + ss_lr) / total),
    }


def seed_noise_share(cells: list[list[float]]) -> float | None:
    """How much of the variance between cell means (mean validation metric of one variant at one
    learning rate) the seeds alone would make: the mean within-cell variance over seeds divided by
    the number of seeds, over the variance of the cell means. Near or above 1: the grid's pattern
    is within seed noise."""
    spread = [statistics.variance(c) / len(c) for c in cells if len(c) > 1]
    means = [statistics.mean(c) for c in cells if c]
    if not spread or len(means) < 2 or not all(math.isfinite(m) for m in means):
        return None
    between = statistics.pvariance(means)
    return statistics.mean(spread) / between if between > 0 else None


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of the report, from the runs (``lstmlab.runner.loggers.collect_runs``), by task."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_task[run["task"]].append(run)
    tasks = {}
    for task, task_runs in sorted(by_task.items()):
        first = task_runs[0]
        metric, higher = first["metric"], first["higher_is_better"]
        best = max if higher else min
        cells: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for run in task_runs:
            cells[variant_label(run)][float(run["config"]["optim"]["lr"])].append(run)
        grid: dict[str, dict[float, float]] = {}
        rows: dict[str, dict[str, Any]] = {}
        for label in sorted(cells, key=_order):
            by_lr = cells[label]
            grid[label] = {
                lr: statistics.mean(r["final"]["val"][metric] for r in group) for lr, group in by_lr.items()
            }
            finite = {lr: v for lr, v in grid[label].items() if math.isfinite(v)}
            lr = best(sorted(finite), key=lambda x: finite[x]) if finite else min(by_lr)
            chosen = sorted(by_lr[lr], key=lambda r: r["seed"])
            test = [r["final"]["test"][metric] for r in chosen]
            rows[label] = {
                "lr": lr,
                "seeds": [r["seed"] for r in chosen],
                "val": [r["final"]["val"][metric] for r in chosen],
                "test": test,
                "test_mean": statistics.mean(test),
                "test_sd": _sd(test),
                "runs_per_lr": {str(k): len(v) for k, v in sorted(by_lr.items())},
            }
        reference = rows.get(REFERENCE)
        for label, row in rows.items():
            row["diff"] = row["p"] = row["better"] = None
            row["significant"] = False
            if reference is None or label == REFERENCE:
                continue
            row["diff"] = row["test_mean"] - reference["test_mean"]
            row["p"] = welch_p(row["test"], reference["test"])
            row["significant"] = row["p"] is not None and row["p"] < ALPHA
            row["better"] = (row["diff"] > 0) == higher if row["diff"] else None  # None: equal means
        tasks[task] = {
            "metric": metric,
            "higher_is_better": higher,
            "baseline": first["baseline"][metric],
            "variants": rows,
            "val_grid": {v: {str(lr): m for lr, m in sorted(g.items())} for v, g in grid.items()},
            "variance_shares": variance_shares(grid),
            "seed_noise_share": seed_noise_share(
                [[r["final"]["val"][metric] for r in g] for by_lr in cells.values() for g in by_lr.values()]
            ),
            "setup": _setup(task_runs),
        }
    return {"runs": len(runs), "alpha": ALPHA, "reference": REFERENCE, "tasks": tasks}


def _values(runs: list[dict[str, Any]], get: Any) -> list[Any]:
    return sorted({get(r) for r in runs}, key=lambda v: (v is None, str(v) if v is None else v))


def _setup(runs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """What the runs of one task share or vary, read from their summaries."""
    cfg = lambda section, key: lambda r: r["config"][section][key]  # noqa: E731
    return {
        "seeds": _values(runs, lambda r: r["seed"]),
        "lrs": _values(runs, cfg("optim", "lr")),
        "optimizer": _values(runs, cfg("optim", "name")),
        "schedule": _values(runs, cfg("optim", "schedule")),
        "steps": _values(runs, lambda r: r["steps"]),
        "batch_size": _values(runs, lambda r: r["batch_size"]),
        "hidden_size": _values(runs, cfg("model", "hidden_size")),
        "input_len": _values(runs, lambda r: r["input_len"]),
        "parameters": _values(runs, lambda r: r["parameters"]),
        "backend": _values(runs, lambda r: str(r["backend"])),
        "device": _values(runs, lambda r: r["device"]),
        "torch": _values(runs, lambda r: r["torch"]),
        "wall_s_total": [round(sum(r["wall_s"] for r in runs), 1)],
    }


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else f"{v:{spec}}"


def _join(values: list[Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        return f"{v:,}" if isinstance(v, int) and v >= 10000 else str(v)

    return ", ".join(one(v) for v in values)


def markdown(result: dict[str, Any], source: str) -> str:
    """The report as Markdown: a header read from the runs, then two tables per task."""
    lines = [
        f"# LSTM variants against V (Greff et al. 2017, Figure 3): {result['runs']} runs in {source}",
        "",
        "Per task and variant, the learning rate with the best validation metric (mean over seeds) "
        "is chosen; its test metric is shown per seed and as mean ± sd. *vs V*: the difference of "
        f"means from V at V's own chosen learning rate; *p*: Welch's t-test on the per-seed test "
        f"metrics (two-sided); **bold**: p < {result['alpha']:g}. p is `-` where it is undefined "
        "(fewer than two seeds, or no spread on either side).",
    ]
    for task, t in result["tasks"].items():
        arrow = "higher is better" if t["higher_is_better"] else "lower is better"
        s = t["setup"]
        lines += [
            "",
            f"## {task}: test {t['metric']} ({arrow}; trivial baseline {t['baseline']:.4g})",
            "",
            f"Runs: {sum(sum(r['runs_per_lr'].values()) for r in t['variants'].values())}; seeds "
            f"{_join(s['seeds'])}; learning rates {_join(s['lrs'])} ({_join(s['optimizer'])}, "
            f"{_join(s['schedule'])} schedule); {_join(s['steps'])} steps of batch "
            f"{_join(s['batch_size'])}; hidden {_join(s['hidden_size'])}; {_join(s['input_len'])} "
            f"steps per sequence; {_join(s['parameters'])} parameters; backend {_join(s['backend'])}; "
            f"{_join(s['device'])}; torch {_join(s['torch'])}; {s['wall_s_total'][0]:.0f} s of run "
            "wall time in all.",
            "",
            f"| variant | lr | test {t['metric']} mean ± sd | per seed | vs V | p |",
            "|---|---|---|---|---|---|",
        ]
        for label, row in t["variants"].items():
            mean_sd = f"{row['test_mean']:.4g} ± {_fmt(row['test_sd'], '.2g')}"
            per_seed = ", ".join(f"{v:.4g}" for v in row["test"])
            diff, p = _fmt(row["diff"], "+.3g"), _fmt(row["p"], ".2g")
            if row["significant"]:
                diff, p = f"**{diff} ({'better' if row['better'] else 'worse'})**", f"**{p}**"
            if label == result["reference"]:
                diff = p = "(reference)"
            lines.append(f"| {label} | {row['lr']:g} | {mean_sd} | {per_seed} | {diff} | {p} |")
        lrs = sorted({float(lr) for g in t["val_grid"].values() for lr in g})
        lines += [
            "",
            f"Validation {t['metric']}, mean over seeds, at every learning rate (the chosen one bold):",
            "",
            "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---" * (len(lrs) + 1) + "|",
        ]
        for label, g in t["val_grid"].items():
            chosen = t["variants"][label]["lr"]
            cells = [
                ("**{:.4g}**" if lr == chosen else "{:.4g}").format(g[str(lr)]) if str(lr) in g else "-"
                for lr in lrs
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        shares, noise = t["variance_shares"], t["seed_noise_share"]
        if shares:
            lines += [
                "",
                f"Of the variance of that table, the learning rate explains {shares['lr']:.0%}, the "
                f"variant {shares['variant']:.0%}, their interaction {shares['interaction']:.0%}"
                + (
                    f"; the seeds alone would make {noise:.0%} of it (mean variance over seeds of a "
                    "cell, divided by the number of seeds)."
                    if noise is not None
                    else "."
                ),
            ]
    return "\n".join(lines) + "\n\n![test metric per variant](odyssey.png)\n"


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Greff et al.'s Figure 3 layout: per task, the variants along x, a dot per seed, mean ± sd;
    V's mean dashed; variants significantly different from V in red, marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"].items())
    cols = min(len(tasks), 2)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, (task, t) in zip(axes.flat, tasks, strict=False):
        labels = list(t["variants"])
        for x, label in enumerate(labels):
            row = t["variants"][label]
            color = "black" if label == result["reference"] else "tab:blue"
            color = "tab:red" if row["significant"] else color
            n = len(row["test"])
            offsets = [0.18 * (i - (n - 1) / 2) / max(1, n - 1) for i in range(n)]
            ax.scatter([x + o for o in offsets], row["test"], s=14, color=color, alpha=0.6, zorder=3)
            sd = row["test_sd"] or 0.0
            ax.errorbar(x + 0.3, row["test_mean"], yerr=sd, fmt="_", ms=10, color=color, capsize=3, zorder=4)
            if row["significant"]:
                ax.annotate("*", (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                            color="tab:red", fontsize=14)  # fmt: skip
        ref = t["variants"].get(result["reference"])
        if ref is not None:
            ax.axhline(ref["test_mean"], color="0.4", ls="--", lw=1, zorder=1)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        arrow = "↑" if t["higher_is_better"] else "↓"
        ax.set_title(f"{task}: test {t['metric']} {arrow}", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", color="0.9", zorder=0)
    fig.suptitle(
        f"each variant at its best learning rate (validation); dots: seeds; bars: mean ± sd; dashed: "
        f"V's mean; red *: Welch p < {result['alpha']:g} against V",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_odyssey_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> str:
    """Write ``FILES`` into ``out_dir`` (default: ``sweep_dir``); return the Markdown."""
    sweep_dir = Path(sweep_dir)
    runs = finished_runs(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    result = analyse(runs)
    text = markdown(result, str(sweep_dir))
    md, png, js = (out / name for name in FILES)
    md.write_text(text)
    js.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png)
    return text
