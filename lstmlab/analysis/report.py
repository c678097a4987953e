"""Compare the runs of a sweep: ``lstmlab-report <sweep dir>`` writes ``report.md`` (each model's
final test metric as mean ± std over seeds, its parameters and time per step, the task's trivial
baseline) and ``report.png`` (validation learning curves, one line per model).

``lstmlab-report --odyssey <sweep dir>`` reports an ``experiment=odyssey`` sweep instead, as
Greff et al. 2017's Figure 3 (:mod:`lstmlab.analysis.odyssey`).

Hydra calls :class:`ReportCallback` at the end of every multirun, so a sweep reports itself
(``experiment=odyssey`` names :class:`OdysseyReportCallback` instead).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lstmlab.analysis.plots import line_style, readable_log_axis
from lstmlab.runner.loggers import finished_runs

log = logging.getLogger("lstmlab.analysis.report")


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """Name each run by its model, plus the overrides that vary across the sweep (not the seed):
    runs that differ only in seed share a label and are averaged."""
    keyed = [
        [o for o in r.get("overrides", []) if not o.startswith("seed=") and o != f"model={r['model']}"]
        for r in runs
    ]  # a model preset that is not just its kind (model=lstmlab_chrono) names its own row
    common = set.intersection(*(set(k) for k in keyed)) if keyed else set()
    labels = []
    for run, overrides in zip(runs, keyed, strict=True):
        extra = [o for o in overrides if o not in common]
        labels.append(" ".join([f"{run['model']} ({run['task']})", *extra]))
    return labels


MODEL_ORDER = ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn")  # rows and lines in this order


def _grouped(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs by label (seeds of one setting together), in ``MODEL_ORDER``, then by label."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for label, run in zip(_labels(runs), runs, strict=True):
        groups[label].append(run)

    def rank(item: tuple[str, list[dict[str, Any]]]) -> tuple[int, str]:
        model = item[1][0]["model"]
        return (MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER), item[0])

    return dict(sorted(groups.items(), key=rank))


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def summarize(runs: list[dict[str, Any]]) -> str:
    """The comparison table, as Markdown. The "test acc" column is left out when every row's
    metric is accuracy already."""
    groups = _grouped(runs)
    acc_column = any(g[0]["metric"] != "acc" and "acc" in g[0]["final"]["test"] for g in groups.values())
    head = ["model", "backend", "test metric", *(["test acc"] if acc_column else []), "baseline"]
    head += ["parameters", "ms/step", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, group in groups.items():
        first = group[0]
        metric = first["metric"]
        arrow = "↑" if first["higher_is_better"] else "↓"
        values = [r["final"]["test"][metric] for r in group]
        accs = [r["final"]["test"]["acc"] for r in group if "acc" in r["final"]["test"]]
        base = first["baseline"]
        base_acc = f", acc {base['acc']:.3g}" if "acc" in base and metric != "acc" else ""
        ms = [1e3 * r["time_per_step_s"] for r in group if r.get("time_per_step_s")]
        cells = [label, ", ".join(sorted({str(r["backend"]) for r in group}))]
        cells.append(f"{metric} {arrow} {_mean_std(values)}")
        if acc_column:
            cells.append(_mean_std(accs) if accs and metric != "acc" else "-")
        cells += [f"{metric} {base[metric]:.4g}{base_acc}", f"{first['parameters']:,}"]
        cells += [_mean_std(ms) if ms else "-", str(len(group))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Validation metric against step, one line per label (mean over seeds), in ``MODEL_ORDER``;
    the trivial baseline thin and beneath the curves, the legend right of the plot.

    Every curve has its own dashes and open marker, and each is drawn thinner than the one before,
    so a curve that lies exactly on an earlier one leaves it visible; a run with a single
    evaluation is still a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _grouped(runs)
    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        drawn, values = 0, []
        for label, group in groups.items():
            if group[0]["task"] != task or not group[0]["curve"]:
                continue
            key = "val/" + group[0]["metric"]
            per_step: dict[int, list[float]] = defaultdict(list)
            for run in group:
                for row in run["curve"]:
                    if math.isfinite(row[key]):
                        per_step[row["step"]].append(row[key])
            steps = sorted(per_step)
            ax.plot(
                steps,
                [statistics.mean(per_step[s]) for s in steps],
                label=label,
                markevery=max(1, len(steps) // 10),  # about ten markers on a long curve
                **line_style(drawn),
            )
            values += [statistics.mean(per_step[s]) for s in steps]
            drawn += 1
        first = next(r for r in runs if r["task"] == task)
        metric = first["metric"]
        base = first["baseline"][metric]
        ax.axhline(base, color="0.6", ls=":", lw=1, label=f"trivial baseline ({base:.3g})", zorder=1)
        ax.set(xlabel="step", ylabel=f"validation {metric}", title=task, yscale="log")
        positive = [v for v in [*values, base] if v > 0]
        if positive:
            readable_log_axis(ax.yaxis, min(positive), max(positive))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_report(sweep_dir: str | Path) -> str:
    """Write ``report.md`` and ``report.png`` into ``sweep_dir``; return the Markdown table."""
    sweep_dir = Path(sweep_dir)
    runs = finished_runs(sweep_dir)
    table = summarize(runs)
    head = f"# lstmlab comparison: {len(runs)} runs in {sweep_dir}\n\n"
    common = sorted(set.intersection(*(set(r.get("overrides", [])) for r in runs)))
    if common:  # what every row shares, and so no label shows
        head += f"Every run: `{' '.join(common)}`.\n\n"
    notes = (
        "\nTest metric: mean ± std over seeds (↓ lower is better, ↑ higher is better), on the "
        "held-out test split after the last step. Baseline: the trivial solution's score. "
        "ms/step: training steps only, without evaluation and without each run's first step (under "
        "trainer.compile it compiles: summary.json's compile_s; else one-time costs: warmup_s).\n"
    )
    for task, means in sorted({(r["task"], r.get("acc_means")) for r in runs if r.get("acc_means")}):
        notes += f"Test acc on {task}: {means}.\n"
    notes += "\n![learning curves](report.png)\n"
    (sweep_dir / "report.md").write_text(head + table + notes)
    plot_curves(runs, sweep_dir / "report.png")
    return table


class ReportCallback(Callback):
    """Hydra callback (see conf/config.yaml): report a multirun when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        replacing = _replacing(sweep_dir)
        table = write_report(sweep_dir)
        print(f"\n{table}\n{_wrote(sweep_dir, replacing)}")


def _replacing(sweep_dir: Path) -> bool:
    return (sweep_dir / "report.md").exists()


def _wrote(sweep_dir: Path, replacing: bool) -> str:
    """Say what was written, and that an earlier report was replaced (it is rebuilt from the
    runs, which are never touched)."""
    note = " (replacing the earlier report)" if replacing else ""
    return f"wrote {sweep_dir / 'report.md'} and {sweep_dir / 'report.png'}{note}"


class OdysseyReportCallback(Callback):
    """Hydra callback for ``experiment=odyssey``: the variant report when the multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lstmlab.analysis.odyssey import FILES, write_odyssey_report

        sweep_dir = Path(config.hydra.sweep.dir)
        print(f"\n{write_odyssey_report(sweep_dir)}\nwrote {', '.join(str(sweep_dir / f) for f in FILES)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lstmlab-report",
        description=__doc__.split("\n\n")[0],
        epilog="With --odyssey: per task, each cell variant at the learning rate with the best mean "
        "validation metric, its test metric per seed and mean ± sd against the vanilla cell V, "
        "Welch's t-test (p < 0.05 marked), and the validation metric of every variant at every "
        "learning rate (see lstmlab/analysis/odyssey.py).",
    )
    parser.add_argument("sweep_dir", help="a multirun directory (searched for summary.json)")
    parser.add_argument(
        "--odyssey",
        action="store_true",
        help="the sweep is an experiment=odyssey grid (variant x task x lr x seed): write "
        "odyssey_report.md, odyssey.png and odyssey.json instead of report.md and report.png",
    )
    parser.add_argument("--out", help="with --odyssey: the folder to write into (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    if args.out and not args.odyssey:
        parser.error("--out applies to --odyssey only")
    try:
        if args.odyssey:
            from lstmlab.analysis.odyssey import FILES, write_odyssey_report

            out = Path(args.out or args.sweep_dir)
            replacing = any((out / f).exists() for f in FILES)
            print(write_odyssey_report(args.sweep_dir, out), end="")
            note = " (replacing the earlier ones)" if replacing else ""
            print(f"wrote {', '.join(str(out / f) for f in FILES)}{note}")
            return
        sweep_dir = Path(args.sweep_dir)
        replacing = _replacing(sweep_dir)
        print(write_report(sweep_dir), end="")
        print(_wrote(sweep_dir, replacing))
    except FileNotFoundError as err:  # a wrong or unfinished folder: one line, not a traceback
        print(f"lstmlab-report: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
