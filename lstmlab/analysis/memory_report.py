"""Turn the issue-4 sweeps into the tables and plots under ``docs/results/``.

``python -m lstmlab.analysis.memory_report {grad_retention,bidirectional,horizon} SWEEP_DIR [--out DIR]``
reads the runs of ``lstmlab-train experiment=<preset>`` and writes ``<preset>.md``, ``<preset>.png``
and ``<preset>.json`` (every number in the table) into ``--out``, each stamped with the command,
date, commit and machine. It never imports Hydra: it reads ``summary.json``, ``metrics.jsonl`` and
checkpoints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from lstmlab.analysis.probes import N_EXAMPLES, decades_per_step, grad_norm_curve
from lstmlab.runner import build
from lstmlab.runner.loggers import finished_runs
from lstmlab.runner.models import SequenceModel
from lstmlab.runner.tasks import derive_seed

LENGTHS = [1, 10, 50, 100, 200, 400]
# Bai, Kolter & Koltun 2018, Table 1 (their runs, not ours): adding T=600 test MSE; copy T=1000
# loss, where all three recurrent models stay at the baseline.
BAI_2018 = {
    "adding": {"T": 600, "torch_lstm": "0.164", "torch_gru": "5.3e-5", "torch_rnn": "0.177"},
    "copy": {"T": 1000, "torch_lstm": "≈ baseline", "torch_gru": "≈ baseline", "torch_rnn": "≈ baseline"},
}


def stamp(command: str) -> str:
    """Where a table came from: the command, the date, the commit and the machine."""
    root = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln]
        cpu = f"{len(names)}-core {names[0]}" if names else cpu
    return (
        f"Command: `{command}`  \n"
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit "
        f"{commit.strip()}{' with uncommitted changes' if dirty.strip() else ''}; "
        f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s) for this report.\n"
    )


def label(cfg: dict[str, Any], chrono_per_task: bool = False) -> str:
    """A row name from a run's model config: kind, init variant, direction. With
    ``chrono_per_task``, chrono for the task's own length reads "T_max=T": across a sweep over T
    it is one init, so one row."""
    m = cfg["model"]
    name = {
        "lstmlab": "lstmlab.LSTM",
        "torch_lstm": "torch.nn.LSTM",
        "torch_gru": "GRU",
        "torch_rnn": "RNN (tanh)",
    }[m["kind"]]
    if m.get("forget_bias"):
        name += f", forget bias {m['forget_bias']:g}"
    if m.get("chrono_t_max"):
        same = chrono_per_task and m["chrono_t_max"] == cfg["task"]["seq_len"]
        name += ", chrono T_max=T" if same else f", chrono T_max={m['chrono_t_max']:g}"
    return ("Bi-" + name) if m.get("bidirectional") else name


def _order(name: str) -> tuple[int, str]:
    """Rows in the order of the argument: RNN, GRU, the two LSTMs, then the LSTM inits."""
    kinds = ["RNN", "GRU", "torch.nn.LSTM", "lstmlab.LSTM"]
    return next(i for i, k in enumerate(kinds) if k in name), name


def rebuild(cfg: dict[str, Any], trained_dir: str | None) -> SequenceModel:
    """The run's model at initialisation, or after training (see :func:`lstmlab.runner.build.rebuild`)."""
    return build.rebuild(cfg, trained_dir)[0]


def _values(runs: list[dict[str, Any]], *path: str) -> str:
    """What the runs hold at ``path`` (``"config", "model", "hidden_size"``), e.g. "64", or
    "0.003, 0.01" when they differ."""
    found = set()
    for run in runs:
        for key in path:
            run = run[key]
        found.add(run)
    return ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in sorted(found, key=str))


def _seeds(runs: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"


def _backends(runs: list[dict[str, Any]]) -> str:
    """The sentence on what lstmlab.LSTM ran, from the runs' summaries."""
    used = sorted({str(r["backend"]) for r in runs if r["model"] == "lstmlab"})
    return f" lstmlab.LSTM ran its {' and '.join(used)} backend." if used else ""


def _ms(values: list[float], fmt: str = ".3g") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.2g}"


def _geo(values: list[float]) -> float:
    """Geometric mean (norms span a hundred decades; 0 if any is 0)."""
    if min(values) <= 0:
        return 0.0
    return 10 ** statistics.mean(math.log10(v) for v in values)


def _legend_outside(ax: Any, handles: list | None = None, labels: list | None = None) -> None:
    """The legend right of the plot, where it covers no curve (save with bbox_inches="tight")."""
    args = (handles, labels) if handles is not None else ()
    ax.legend(*args, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- experiment 1: gradient retention


def grad_retention(runs: list[dict[str, Any]], out: Path, command: str) -> str:
    """Measure every run's curve at init and after training, then write the table and plot."""
    curves: dict[str, dict[str, list[dict[int, float]]]] = defaultdict(lambda: defaultdict(list))
    finals: dict[str, list[float]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r["config"]["seed"], r["model"])):
        cfg = run["config"]
        name = label(cfg)
        curves[name]["init"].append(grad_norm_curve(rebuild(cfg, None), LENGTHS, N_EXAMPLES))
        curves[name]["trained"].append(grad_norm_curve(rebuild(cfg, run["dir"]), LENGTHS, N_EXAMPLES))
        finals[name].append(run["final"]["test"]["mse"])
        if cfg["model"]["kind"] == "lstmlab" and cfg["model"]["chrono_t_max"]:
            long = json.loads(json.dumps(cfg))  # chrono for the longest T measured, init only
            long["model"]["chrono_t_max"] = max(LENGTHS)
            curves[label(long) + " (init only)"]["init"].append(
                grad_norm_curve(rebuild(long, None), LENGTHS, N_EXAMPLES)
            )
    # lstmlab.LSTM and torch.nn.LSTM draw the same weights for the same seed: equal curves.
    for a, b in zip(curves["lstmlab.LSTM"]["init"], curves["torch.nn.LSTM"]["init"], strict=True):
        for T in LENGTHS:
            if not math.isclose(a[T], b[T], rel_tol=1e-9):
                raise RuntimeError(f"lstmlab.LSTM and torch.nn.LSTM differ at init, T={T}: {a[T]} vs {b[T]}")
    curves = dict(sorted(curves.items(), key=lambda item: _order(item[0])))
    header = "| model | when | " + " | ".join(f"T={T}" for T in LENGTHS) + " | decades/step | test MSE |"
    lines = [header, "|---" * (len(LENGTHS) + 4) + "|"]
    raw: dict[str, Any] = {}
    for name, phases in curves.items():
        for phase, per_seed in phases.items():
            cells = [f"{_geo([c[T] for c in per_seed]):.3g}" for T in LENGTHS]
            slopes = [decades_per_step(c) for c in per_seed]
            mse = _ms(finals[name]) if phase == "trained" else "-"
            lines.append(f"| {name} | {phase} | {' | '.join(cells)} | {_ms(slopes, '.4f')} | {mse} |")
            raw[f"{name} / {phase}"] = {"curves": per_seed, "decades_per_step": slopes}
    table = "\n".join(lines) + "\n"
    (out / "grad_retention.json").write_text(json.dumps(raw, indent=1) + "\n")
    trained_on = (
        f"{_values(runs, 'steps')} steps on {runs[0]['task']} T={_values(runs, 'config', 'task', 'seq_len')}"
    )
    _plot_grad_retention(curves, trained_on, out / "grad_retention.png")

    doc = (
        "# Gradient retention: ||∂ℓ/∂(h₀, c₀)|| against T\n\n" + stamp(command) + "\n"
        "ℓ = (ŷ − y)², the squared error of the last-step prediction on an adding-problem example "
        "of length T (T = 1: one step holding both markers); the gradient with respect to the "
        "(zero) initial state, h₀ and c₀ stacked for the LSTMs, in float64; the root mean square "
        f"over {N_EXAMPLES} fixed examples, then the geometric mean over {_seeds(runs)}. "
        "decades/step: the least-squares slope of log₁₀ norm against T over all "
        f"{len(LENGTHS)} T, negated (mean ± std over seeds). Hidden size "
        f"{_values(runs, 'config', 'model', 'hidden_size')}, "
        f"{_values(runs, 'config', 'model', 'num_layers')} layer(s). 'trained': after "
        f"{trained_on} ({_values(runs, 'config', 'optim', 'name')}, lr "
        f"{_values(runs, 'config', 'optim', 'lr')}, batch {_values(runs, 'batch_size')}); "
        f"test MSE after training (trivial baseline {_values(runs, 'baseline', 'mse')})."
        f"{_backends(runs)} The init rows of lstmlab.LSTM and torch.nn.LSTM are checked equal "
        "(relative 1e-9) before the table is written.\n\n" + table + "\n![](grad_retention.png)\n"
    )
    (out / "grad_retention.md").write_text(doc)
    return table


def _seq_len(run: dict[str, Any]) -> int:
    return run["config"]["task"]["seq_len"]


def _plot_grad_retention(
    curves: dict[str, dict[str, list[dict[int, float]]]], trained_on: str, path: Path
) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, phase in zip(axes, ("init", "trained"), strict=True):
        for i, (name, phases) in enumerate(curves.items()):
            for j, c in enumerate(phases.get(phase, [])):
                ax.plot(
                    LENGTHS,
                    [max(c[T], 1e-300) for T in LENGTHS],
                    marker="o",
                    ms=3,
                    color=f"C{i}",
                    alpha=0.8,
                    ls="--" if "torch.nn" in name else "-",
                    label=name if j == 0 else None,
                )
        title = "at initialisation" if phase == "init" else f"after {trained_on}"
        ax.set(xlabel="T (steps between h0, c0 and the loss)", yscale="log", title=title)
    axes[0].set_ylabel(f"RMS over {N_EXAMPLES} examples of ||dℓ/d(h0, c0)||")
    _legend_outside(axes[-1], *axes[0].get_legend_handles_labels())
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---- experiment 3: bidirectional tagging


def bidirectional(runs: list[dict[str, Any]], out: Path, command: str) -> str:
    by_cell: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    bounds: dict[int, list[dict[str, float]]] = defaultdict(list)
    seen: set[tuple[int, int]] = set()
    for run in runs:
        cfg = run["config"]
        d = cfg["task"]["resolve_distance"]
        by_cell[(d, label(cfg))].append(run)
        if (d, cfg["seed"]) not in seen:  # the bounds on the very test set train() scored
            seen.add((d, cfg["seed"]))
            task = build.build_task(cfg["task"])
            gen = torch.Generator().manual_seed(derive_seed(cfg["seed"], "test"))
            words, _ = task.sample(cfg["task"]["test_size"], gen)
            bounds[d].append(task.bayes_accuracy(words))
    distances = sorted(bounds)
    names = sorted({n for _, n in by_cell}, key=lambda n: (n.replace("Bi-", ""), n.startswith("Bi-")))
    tables = []
    raw: dict[str, Any] = {"bounds": bounds, "runs": {}}
    for key, title in (("acc", "all positions"), ("acc_ambiguous", "X0/X1 positions only")):
        head = "| model | " + " | ".join(f"d={d}" for d in distances) + " |"
        lines = [f"Test accuracy, {title}:\n", head, "|---" * (len(distances) + 1) + "|"]
        for bound in ("filter", "smooth"):
            cells = [f"{statistics.mean(b[f'{bound}_{key}'] for b in bounds[d]):.4f}" for d in distances]
            what = "left-to-right (filtering)" if bound == "filter" else "whole sequence (smoothing)"
            lines.append(f"| Bayes bound, {what} | {' | '.join(cells)} |")
        for name in names:
            cells = [_ms([r["final"]["test"][key] for r in by_cell[(d, name)]], ".4f") for d in distances]
            lines.append(f"| {name} | {' | '.join(cells)} |")
            raw["runs"][name] = {d: [r["final"]["test"] for r in by_cell[(d, name)]] for d in distances}
        base = runs[0]["baseline"][key]
        lines.append(f"| trivial: always O | {' | '.join(f'{base:.4f}' for _ in distances)} |")
        tables.append("\n".join(lines) + "\n")
    (out / "bidirectional.json").write_text(json.dumps(raw, indent=1) + "\n")

    _plot_bidirectional(by_cell, bounds, distances, names, out / "bidirectional.png")

    first = runs[0]["config"]
    doc = (
        "# Bidirectional tagging: hmm_tagging against the two Bayes bounds\n\n" + stamp(command) + "\n"
        f"hmm_tagging, T={_values(runs, 'config', 'task', 'seq_len')}, "
        f"p_ambiguous={first['task']['p_ambiguous']}, "
        f"noise={first['task']['noise']}; hidden size "
        f"{_values(runs, 'config', 'model', 'hidden_size')} per direction, "
        f"{_values(runs, 'config', 'model', 'num_layers')} layer(s), "
        f"{_values(runs, 'steps')} {first['optim']['name']} steps (lr {first['optim']['lr']}) of "
        f"batch {_values(runs, 'batch_size')}; mean ± std over {_seeds(runs)} on each seed's "
        f"{_values(runs, 'config', 'task', 'test_size')}-sequence test set. "
        "The Bayes bounds are the expected accuracies of argmax p(tag_t | x_1..t) and argmax "
        "p(tag_t | x_1..T) on the same test sets (exact forward filtering / forward-backward), "
        f"averaged over the seeds.{_backends(runs)}\n\n" + "\n".join(tables) + "\n![](bidirectional.png)\n"
    )
    (out / "bidirectional.md").write_text(doc)
    return "\n".join(tables)


def _plot_bidirectional(
    by_cell: dict[tuple[int, str], list[dict[str, Any]]],
    bounds: dict[int, list[dict[str, float]]],
    distances: list[int],
    names: list[str],
    path: Path,
) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key in zip(axes, ("acc", "acc_ambiguous"), strict=True):
        for bound, style in (("filter", ":"), ("smooth", "--")):
            ax.plot(
                distances,
                [statistics.mean(b[f"{bound}_{key}"] for b in bounds[d]) for d in distances],
                color="k",
                ls=style,
                label=f"Bayes {bound}",
            )
        for i, name in enumerate(names):
            means = [statistics.mean(r["final"]["test"][key] for r in by_cell[(d, name)]) for d in distances]
            ax.plot(
                distances,
                means,
                marker="o",
                color=f"C{i}",
                label=name,
                ls="-" if name.startswith("Bi-") else "-.",
            )
        ax.set(
            xlabel="resolve_distance d",
            ylabel=f"test {key}",
            xscale="log",
            xticks=distances,
            xticklabels=[str(d) for d in distances],
        )
    _legend_outside(axes[-1], *axes[0].get_legend_handles_labels())
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---- experiment 2: memory horizon

SOLVED = {"adding": ("mse", lambda v: v < 0.01), "copy": ("acc", lambda v: v > 0.99)}


def horizon(runs: list[dict[str, Any]], out: Path, command: str) -> str:
    """One table per task (rows: models, columns: T) and a plot of test metric against T."""
    by_cell: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_cell[(run["task"], _seq_len(run), label(run["config"], chrono_per_task=True))].append(run)
    raw: dict[str, Any] = {}
    tables = [_horizon_table(task, by_cell, raw) for task in sorted({t for t, _, _ in by_cell})]
    (out / "memory_horizon.json").write_text(json.dumps(raw, indent=1) + "\n")
    _plot_horizon(by_cell, out / "memory_horizon.png")
    doc = (
        "# Memory horizon: adding and copy against T\n\n" + stamp(command) + "\n"
        f"Hidden size {_values(runs, 'config', 'model', 'hidden_size')}, "
        f"{_values(runs, 'config', 'model', 'num_layers')} layer(s), a fixed budget of "
        f"{_values(runs, 'steps')} {_values(runs, 'config', 'optim', 'name')} "
        f"steps (lr {_values(runs, 'config', 'optim', 'lr')}) of batch "
        f"{_values(runs, 'batch_size')} per cell, {_seeds(runs)}; test metric on "
        f"{_values(runs, 'config', 'task', 'test_size')} held-out sequences.{_backends(runs)} "
        "A cell reads 'mean ± std · seeds solved / seeds · first evaluation step at which a seed "
        "was solved (validation)'. The Bai et al. column is their published number (Table 1, "
        "longer T, far longer training), for orientation, not a run of ours.\n\n"
        + "\n".join(tables)
        + "\n![](memory_horizon.png)\n"
    )
    (out / "memory_horizon.md").write_text(doc)
    return "\n".join(tables)


def _horizon_table(task: str, by_cell: dict[tuple[str, int, str], list[dict[str, Any]]], raw: dict) -> str:
    lengths = sorted({T for t, T, _ in by_cell if t == task})
    names = sorted({n for t, _, n in by_cell if t == task}, key=_order)
    metric, solved = SOLVED[task]
    any_run = next(group[0] for (t, _, _), group in by_cell.items() if t == task)
    chance = f" · mean recall accuracy (chance {any_run['baseline'].get('acc', math.nan):.3g})"
    lines = [
        f"**{task}**: test {any_run['metric']} (mean ± std over seeds){chance if task == 'copy' else ''}"
        f" · seeds solved ({metric} {'< 0.01' if task == 'adding' else '> 0.99'}) · first eval step solved\n",
        "| model | "
        + " | ".join(f"T={T}" for T in lengths)
        + f" | Bai et al. 2018, T={BAI_2018[task]['T']} |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for name in names:
        cells = []
        for T in lengths:
            group = by_cell[(task, T, name)]
            values = [r["final"]["test"][r["metric"]] for r in group]
            n_ok = sum(solved(r["final"]["test"][metric]) for r in group)
            first_ok = [
                next((row["step"] for row in r["curve"] if solved(row[f"val/{metric}"])), None) for r in group
            ]
            reached = [s for s in first_ok if s is not None]
            when = f" · step {min(reached)}" if reached else ""
            acc = f" · acc {statistics.mean(r['final']['test']['acc'] for r in group):.3f}"
            cells.append(f"{_ms(values)}{acc if task == 'copy' else ''} · {n_ok}/{len(group)}{when}")
            raw[f"{task} / {name} / T={T}"] = {
                "test": [r["final"]["test"] for r in group],
                "first_solved_step": first_ok,
            }
        kind = {
            "torch.nn.LSTM": "torch_lstm",
            "lstmlab.LSTM": "torch_lstm",
            "GRU": "torch_gru",
            "RNN (tanh)": "torch_rnn",
        }
        lines.append(f"| {name} | {' | '.join(cells)} | {BAI_2018[task].get(kind.get(name), '-')} |")
    base = [f"{_baseline(by_cell, task, T):.3g}" for T in lengths]
    lines.append(f"| trivial baseline | {' | '.join(base)} | |")
    return "\n".join(lines) + "\n"


def _baseline(by_cell: dict[tuple[str, int, str], list[dict[str, Any]]], task: str, T: int) -> float:
    """The trivial baseline the runs of ``task`` at length ``T`` recorded in their summaries."""
    run = next(group[0] for (t, length, _), group in by_cell.items() if (t, length) == (task, T))
    return run["baseline"][run["metric"]]


def _plot_horizon(by_cell: dict[tuple[str, int, str], list[dict[str, Any]]], path: Path) -> None:
    """Test metric against T, one line per model and seed; the baseline drawn beneath."""
    plt = _plt()
    tasks = sorted({t for t, _, _ in by_cell})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lengths = sorted({T for t, T, _ in by_cell if t == task})
        names = sorted({n for t, _, n in by_cell if t == task}, key=_order)
        for i, name in enumerate(names):
            runs = [r for T in lengths for r in by_cell.get((task, T, name), [])]
            for j, seed in enumerate(sorted({r["seed"] for r in runs})):
                points = sorted(
                    (_seq_len(r), r["final"]["test"][r["metric"]]) for r in runs if r["seed"] == seed
                )
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    ms=3,
                    color=f"C{i}",
                    alpha=0.7,
                    label=name if j == 0 else None,
                    zorder=3,
                )
        base = [_baseline(by_cell, task, T) for T in lengths]
        ax.plot(lengths, base, color="0.6", ls=":", lw=1, label="trivial baseline", zorder=1)
        ax.set(xlabel="T", ylabel=f"test {SOLVED[task][0] if task == 'adding' else 'loss'}", title=task)
        ax.set(xscale="log", yscale="log")
    _legend_outside(axes[0][-1], *axes[0][0].get_legend_handles_labels())
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


EXPERIMENTS = {"grad_retention": grad_retention, "bidirectional": bidirectional, "horizon": horizon}
OUT_NAMES = {
    "grad_retention": "grad_retention",
    "bidirectional": "bidirectional",
    "horizon": "memory_horizon",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lstmlab.analysis.memory_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS), help="which sweep this is")
    parser.add_argument("sweep_dir", help="the sweep's folder (searched for summary.json)")
    parser.add_argument("--out", default="docs/results", help="where the table, plot and json go")
    parser.add_argument("--command", default=None, help="the command to record (default: this one)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files --out already holds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    name = OUT_NAMES[args.experiment]
    held = [f"{name}.{ext}" for ext in ("md", "png", "json") if (out / f"{name}.{ext}").exists()]
    try:
        if held and not args.overwrite:  # the default --out is the committed docs/results
            raise FileExistsError(
                f"{out} holds {', '.join(held)}: pass --overwrite to replace them, or another --out"
            )
        runs = finished_runs(args.sweep_dir)
    except (FileExistsError, FileNotFoundError) as err:
        print(f"memory_report: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    command = args.command or "python -m lstmlab.analysis.memory_report " + " ".join(sys.argv[1:])
    print(EXPERIMENTS[args.experiment](runs, out, command), end="")


if __name__ == "__main__":
    main()
