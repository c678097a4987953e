"""The LSTM-vs-ARIMA table: ``python -m lstmlab.analysis.forecast_report <sweep dir>``.

Reads the ``forecast`` runs of a sweep (``conf/experiment/forecast.yaml``), rebuilds each series'
task from the runs' own config, computes the classical baselines (``lstmlab.runner.tasks.forecast``) on
exactly the test windows the networks were scored on, and writes ``forecast.md`` (one table per
series, networks as mean ± std over seeds, and which method wins by how much) and
``forecast.png`` (test MASE of every method, per series). Needs ``lstmlab[data]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from lstmlab.runner.build import build_task
from lstmlab.runner.loggers import collect_runs
from lstmlab.runner.tasks.forecast import ForecastTask, classical_results

COLUMNS = ("mase_h1", "mase", "smape", "rmse")
HEADER = (
    "| method | MASE h=1 ↓ | MASE 1..H ↓ | sMAPE % 1..H ↓ | RMSE 1..H ↓ | seeds |\n|---|---|---|---|---|---|"
)
MODEL_NAMES = {
    "lstmlab": "LSTM (lstmlab)",
    "torch_lstm": "LSTM (torch)",
    "torch_gru": "GRU",
    "torch_rnn": "RNN",
}


def _with_rmse(metrics: dict[str, float]) -> dict[str, float]:
    return {**metrics, "rmse": math.sqrt(metrics["mse"])}


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def forecast_tables(sweep_dir: str | Path) -> tuple[str, dict[str, dict[str, float]]]:
    """The Markdown tables, and each series' mean test MASE (1..H) per method, for the plot."""
    runs = [r for r in collect_runs(sweep_dir) if r["task"] == "forecast"]
    if not runs:
        raise FileNotFoundError(f"no finished forecast run under {sweep_dir}")
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_series[run["config"]["task"]["series"]].append(run)
    parts, mase = [], {}
    for series, group in by_series.items():
        task = build_task(group[0]["config"]["task"])  # the runs' own task, as train() built it
        assert isinstance(task, ForecastTask)
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        order = list(MODEL_NAMES)  # networks in the comparison's fixed order, then the classical
        for run in sorted(
            group, key=lambda r: (order.index(r["model"]) if r["model"] in order else 4, r["seed"])
        ):
            rows[MODEL_NAMES.get(run["model"], run["model"])].append(_with_rmse(run["final"]["test"]))
        classical = classical_results(task)
        for name, result in classical.items():
            rows[name].append(_with_rmse(result))
        mase[series] = {name: statistics.mean(r["mase"] for r in rs) for name, rs in rows.items()}
        lines = [
            f"### {series}: H = {task.horizon}, period m = {task.period}, context {task.seq_len}, "
            f"{len(task.origins('test'))} test origins\n",
            HEADER,
        ]
        for name, rs in rows.items():
            cells = " | ".join(_cell([r[c] for r in rs]) for c in COLUMNS)
            lines.append(f"| {name} | {cells} | {len(rs) if name not in classical else '-'} |")
        nets = {n: v for n, v in mase[series].items() if n not in classical}
        best_net, best_cls = (
            min(nets, key=nets.get),
            min((n for n in mase[series] if n in classical), key=mase[series].get),
        )
        a, b = nets[best_net], mase[series][best_cls]
        winner, loser, ratio = (best_net, best_cls, b / a) if a < b else (best_cls, best_net, a / b)
        lines.append(
            f"\nWinner on MASE 1..H: **{winner}**, {ratio:.2f}× lower than the best "
            f"{'classical method' if winner == best_net else 'network'} ({loser}, "
            f"{min(a, b):.3g} vs {max(a, b):.3g}).\n\nClassical models: "
            + "; ".join(
                f"{n} ({', '.join(f'{k} {v}' for k, v in r['info'].items())})" for n, r in classical.items()
            )
            + "\n"
        )
        parts.append("\n".join(lines))
    return "\n".join(parts), mase


def plot_mase(mase: dict[str, dict[str, float]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mase), figsize=(4.5 * len(mase), 3.5), squeeze=False)
    for ax, (series, values) in zip(axes[0], mase.items(), strict=True):
        names = list(values)
        ax.bar(range(len(names)), [values[n] for n in names], color="C0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set(title=series, ylabel="test MASE, leads 1..H (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_forecast_report(sweep_dir: str | Path) -> str:
    sweep_dir = Path(sweep_dir)
    tables, mase = forecast_tables(sweep_dir)
    (sweep_dir / "forecast.md").write_text(tables + "\n![test MASE](forecast.png)\n")
    plot_mase(mase, sweep_dir / "forecast.png")
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lstmlab.analysis.forecast_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", help="a multirun directory of forecast runs")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    replacing = (sweep_dir / "forecast.md").exists()  # rebuilt from the runs, which stay untouched
    try:
        print(write_forecast_report(sweep_dir), end="")
    except FileNotFoundError as err:
        print(f"forecast_report: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    note = " (replacing the earlier report)" if replacing else ""
    print(f"wrote {sweep_dir / 'forecast.md'} and {sweep_dir / 'forecast.png'}{note}")


if __name__ == "__main__":
    main()
