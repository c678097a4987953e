"""Turn the issue-4 sweeps into the tables and plots under ``docs/results/``.

``python -m lstmlab.memory_report {grad_retention,bidirectional,horizon} SWEEP_DIR [--out DIR]``
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

from lstmlab.loggers import collect_runs
from lstmlab.models import SequenceModel
from lstmlab.probes import decades_per_step, grad_norm_curve
from lstmlab.tasks import derive_seed, make_task

LENGTHS = [1, 10, 50, 100, 200, 400]
RUNNER_KEYS = {"train_size", "val_size", "test_size"}
# Bai, Kolter & Koltun 2018, Table 1 (their runs, not ours): adding T=600 test MSE; copy T=1000
# loss, where all three recurrent models stay at the baseline.
BAI_2018 = {
    "adding": {"T": 600, "torch_lstm": "0.164", "torch_gru": "5.3e-5", "torch_rnn": "0.177"},
    "copy": {"T": 1000, "torch_lstm": "≈ baseline", "torch_gru": "≈ baseline", "torch_rnn": "≈ baseline"},
}


def stamp(command: str) -> str:
    """Where a table came from: the command, the date, the commit and the machine."""
    root = Path(__file__).resolve().parents[1]
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
    """The run's model at initialisation (train() seeds torch and builds it first, so the same
    seed and keywords draw the same weights), or after training from its last checkpoint."""
    m = cfg["model"]
    task = make_task(**{k: v for k, v in cfg["task"].items() if k not in RUNNER_KEYS})
    extra = {}
    if m["kind"] == "lstmlab":
        extra = {k: m[k] for k in ("backend", "forget_bias", "chrono_t_max")}
    torch.manual_seed(cfg["seed"])
    model = SequenceModel(
        m["kind"],
        task.output_size,
        input_size=task.input_size,
        vocab_size=task.vocab_size,
        per_step=task.per_step,
        hidden_size=m["hidden_size"],
        num_layers=m["num_layers"],
        bidirectional=m["bidirectional"],
        dropout=m["dropout"],
        **extra,
    )
    if trained_dir is not None:
        state = torch.load(Path(trained_dir) / "checkpoints" / "last.pt", weights_only=True)
        model.load_state_dict(state["model"])
    return model


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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- experiment 1: gradient retention


def grad_retention(runs: list[dict[str, Any]], out: Path, command: str) -> str:
    curves: dict[str, dict[str, list[dict[int, float]]]] = defaultdict(lambda: defaultdict(list))
    finals: dict[str, list[float]] = defaultdict(list)
    steps = {r["steps"] for r in runs}
    for run in sorted(runs, key=lambda r: (r["config"]["seed"], r["model"])):
        cfg = run["config"]
        name = label(cfg)
        curves[name]["init"].append(grad_norm_curve(rebuild(cfg, None), LENGTHS))
        curves[name]["trained"].append(grad_norm_curve(rebuild(cfg, run["dir"]), LENGTHS))
        finals[name].append(run["final"]["test"]["mse"])
        if cfg["model"]["kind"] == "lstmlab" and not cfg["model"]["chrono_t_max"]:
            continue
        if cfg["model"]["kind"] == "lstmlab":  # chrono for the longest T measured, init only
            long = json.loads(json.dumps(cfg))
            long["model"]["chrono_t_max"] = max(LENGTHS)
            curves[label(long) + " (init only)"]["init"].append(grad_norm_curve(rebuild(long, None), LENGTHS))
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

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, phase in zip(axes, ("init", "trained"), strict=True):
        for i, (name, phases) in enumerate(curves.items()):
            if phase not in phases:
                continue
            for j, c in enumerate(phases[phase]):
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
        title = (
            "at initialisation"
            if phase == "init"
            else f"after {', '.join(map(str, steps))} steps on adding T=50"
        )
        ax.set(xlabel="T (steps between h0, c0 and the loss)", yscale="log", title=title)
    axes[0].set_ylabel("RMS over 256 examples of ||dℓ/d(h0, c0)||")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grad_retention.png", dpi=100)
    plt.close(fig)

    doc = (
        "# Gradient retention: ||∂ℓ/∂(h₀, c₀)|| against T\n\n" + stamp(command) + "\n"
        "ℓ = (ŷ − y)², the squared error of the last-step prediction on an adding-problem example "
        "of length T (T = 1: one step holding both markers); the gradient with respect to the "
        "(zero) initial state, h₀ and c₀ stacked for the LSTMs, in float64; the root mean square "
        "over 256 fixed examples, then the geometric mean over 3 seeds (0, 1, 2). decades/step: "
        "the least-squares slope of log₁₀ norm against T over all six T, negated (mean ± std over "
        f"seeds). Hidden size {runs[0]['config']['model']['hidden_size']}, one layer. 'trained': "
        f"after {', '.join(map(str, steps))} Adam steps (lr {runs[0]['config']['optim']['lr']}) "
        "on adding T=50, batch 64; test MSE after training (baseline 1/6). lstmlab.LSTM ran its "
        "reference backend. The init rows of lstmlab.LSTM and torch.nn.LSTM are checked equal "
        "(relative 1e-9) before the table is written.\n\n" + table + "\n![](grad_retention.png)\n"
    )
    (out / "grad_retention.md").write_text(doc)
    return table


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
            task = make_task(**{k: v for k, v in cfg["task"].items() if k not in RUNNER_KEYS})
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
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bidirectional.png", dpi=100)
    plt.close(fig)

    first = runs[0]["config"]
    doc = (
        "# Bidirectional tagging: hmm_tagging against the two Bayes bounds\n\n" + stamp(command) + "\n"
        f"hmm_tagging, T={first['task']['seq_len']}, p_ambiguous={first['task']['p_ambiguous']}, "
        f"noise={first['task']['noise']}; hidden size {first['model']['hidden_size']} per direction, "
        f"one layer, {runs[0]['steps']} Adam steps (lr {first['optim']['lr']}) of batch "
        f"{runs[0]['batch_size']}; mean ± std over 3 seeds on each seed's 1000-sequence test set. "
        "The Bayes bounds are the expected accuracies of argmax p(tag_t | x_1..t) and argmax "
        "p(tag_t | x_1..T) on the same test sets (exact forward filtering / forward-backward), "
        "averaged over the seeds. lstmlab.LSTM ran its reference backend.\n\n"
        + "\n".join(tables)
        + "\n![](bidirectional.png)\n"
    )
    (out / "bidirectional.md").write_text(doc)
    return "\n".join(tables)


# ---- experiment 2: memory horizon

SOLVED = {"adding": ("mse", lambda v: v < 0.01), "copy": ("acc", lambda v: v > 0.99)}


def horizon(runs: list[dict[str, Any]], out: Path, command: str) -> str:
    by_cell: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        cfg = run["config"]
        by_cell[(run["task"], cfg["task"]["seq_len"], label(cfg, chrono_per_task=True))].append(run)
    tables = []
    raw: dict[str, Any] = {}
    for task in sorted({t for t, _, _ in by_cell}):
        lengths = sorted({T for t, T, _ in by_cell if t == task})
        names = sorted({n for t, _, n in by_cell if t == task}, key=_order)
        metric, solved = SOLVED[task]
        any_run = next(r for r in runs if r["task"] == task)
        head = (
            "| model | "
            + " | ".join(f"T={T}" for T in lengths)
            + f" | Bai et al. 2018, T={BAI_2018[task]['T']} |"
        )
        lines = [
            f"**{task}**: test {any_run['metric']} (mean ± std over seeds)"
            f"{' · mean recall accuracy (chance 0.125)' if task == 'copy' else ''} · seeds solved "
            f"({metric} {'< 0.01' if task == 'adding' else '> 0.99'}) · first eval step solved\n",
            head,
            "|---" * (len(lengths) + 2) + "|",
        ]
        for name in names:
            cells = []
            for T in lengths:
                group = by_cell[(task, T, name)]
                values = [r["final"]["test"][r["metric"]] for r in group]
                n_ok = sum(solved(r["final"]["test"][metric]) for r in group)
                first_ok = [
                    next((row["step"] for row in r["curve"] if solved(row[f"val/{metric}"])), None)
                    for r in group
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
            }.get(name)
            lines.append(
                f"| {name} | {' | '.join(cells)} | {BAI_2018[task].get(kind, '-') if kind else '-'} |"
            )
        base = [f"{make_task(task, seq_len=T).baseline()[any_run['metric']]:.3g}" for T in lengths]
        lines.append(f"| trivial baseline | {' | '.join(base)} | |")
        tables.append("\n".join(lines) + "\n")
    (out / "memory_horizon.json").write_text(json.dumps(raw, indent=1) + "\n")

    plt = _plt()
    tasks = sorted({t for t, _, _ in by_cell})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lengths = sorted({T for t, T, _ in by_cell if t == task})
        for i, name in enumerate(sorted({n for t, _, n in by_cell if t == task})):
            for j in range(3):
                ys = [
                    by_cell[(task, T, name)][j]["final"]["test"]
                    for T in lengths
                    if len(by_cell[(task, T, name)]) > j
                ]
                key = next(r for r in runs if r["task"] == task)["metric"]
                ax.plot(
                    lengths[: len(ys)],
                    [y[key] for y in ys],
                    marker="o",
                    ms=3,
                    color=f"C{i}",
                    alpha=0.7,
                    label=name if j == 0 else None,
                )
        ax.plot(
            lengths, [make_task(task, seq_len=T).baseline()[key] for T in lengths], "k--", label="baseline"
        )
        ax.set(xlabel="T", ylabel=f"test {key}", xscale="log", yscale="log", title=task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory_horizon.png", dpi=100)
    plt.close(fig)

    first = runs[0]
    doc = (
        "# Memory horizon: adding and copy against T\n\n" + stamp(command) + "\n"
        f"Hidden size {first['config']['model']['hidden_size']}, one layer, a fixed budget of "
        f"{first['steps']} Adam steps (lr {first['config']['optim']['lr']}) of batch "
        f"{first['batch_size']} per cell; test metric on 1000 held-out sequences. A cell reads "
        "'mean ± std · seeds solved / seeds · first evaluation step at which a seed was solved "
        "(validation)'. The Bai et al. column is their published number (Table 1, longer T, "
        "far longer training), for orientation, not a run of ours.\n\n"
        + "\n".join(tables)
        + "\n![](memory_horizon.png)\n"
    )
    (out / "memory_horizon.md").write_text(doc)
    return "\n".join(tables)


EXPERIMENTS = {"grad_retention": grad_retention, "bidirectional": bidirectional, "horizon": horizon}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lstmlab.memory_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("sweep_dir")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--command", default=None, help="the command to record (default: this one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = collect_runs(args.sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no summary.json under {args.sweep_dir}: no run there has finished")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = args.command or "python -m lstmlab.memory_report " + " ".join(sys.argv[1:])
    print(EXPERIMENTS[args.experiment](runs, out, command), end="")


if __name__ == "__main__":
    main()
