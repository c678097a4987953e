"""The comparison report: from a multirun's run directories to report.md and report.png."""

import json
import subprocess
import sys

import pytest

from lstmlab.analysis.report import main, plot_curves, summarize, write_report


def fake_run(model: str, seed: int, mse: float, ms: float = 2.0) -> dict:
    return {
        "model": model,
        "backend": "native",
        "task": "adding",
        "metric": "mse",
        "higher_is_better": False,
        "parameters": 1234,
        "time_per_step_s": ms / 1e3,
        "final": {"test": {"mse": mse, "acc": 0.5}},
        "baseline": {"mse": 1 / 6, "acc": 0.0784},
        "overrides": [f"model={model}", f"seed={seed}", "trainer.steps=5"],
        "curve": [{"step": 5, "val/mse": mse}],
    }


def test_summarize_averages_over_seeds_only():
    runs = [fake_run("torch_gru", s, mse) for s, mse in enumerate([1.0, 2.0, 3.0])]
    runs.append(fake_run("torch_rnn", 0, 0.25))
    table = summarize(runs).splitlines()
    assert len(table) == 4  # header, rule, one row per model
    assert table[2].startswith("| torch_gru (adding) | native | mse ↓ 2 ± 1 | 0.5 ±")
    assert table[2].endswith("| 1,234 | 2 ± 0 | 3 |")
    assert "| mse 0.1667, acc 0.0784 |" in table[2]
    assert table[3].startswith("| torch_rnn (adding) | native | mse ↓ 0.25 | 0.5 |")


def test_summarize_keeps_swept_options_apart():
    runs = [fake_run("torch_gru", 0, 1.0), fake_run("torch_gru", 0, 2.0)]
    runs[1]["overrides"].append("model.hidden_size=8")
    rows = summarize(runs).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| torch_gru (adding)",
        "| torch_gru (adding) model.hidden_size=8",
    ]


def test_rows_come_in_the_fixed_model_order_whatever_the_run_order():
    runs = [fake_run(m, 0, 1.0) for m in ("my_cell", "torch_rnn", "torch_gru", "lstmlab", "torch_lstm")]
    rows = summarize(runs).splitlines()[2:]
    models = [row.split(" (")[0].removeprefix("| ") for row in rows]
    assert models == ["lstmlab", "torch_lstm", "torch_gru", "torch_rnn", "my_cell"]


def accuracy_run(model: str, acc: float) -> dict:
    run = fake_run(model, 0, 0.0)
    run.update(task="digits", metric="acc", higher_is_better=True, baseline={"acc": 0.1})
    run["final"] = {"test": {"acc": acc}}
    return run


def test_an_accuracy_task_has_no_second_accuracy_column():
    lines = summarize([accuracy_run("torch_gru", 0.9), accuracy_run("lstmlab", 0.8)]).splitlines()
    assert lines[0] == "| model | backend | test metric | baseline | parameters | ms/step | seeds |"
    assert lines[2].startswith("| lstmlab (digits) | native | acc ↑ 0.8 | acc 0.1 | 1,234 |")
    assert "test acc" in summarize([fake_run("torch_gru", 0, 1.0)]).splitlines()[0]  # mse: kept


def test_plot_legend_is_outside_and_the_baseline_lies_beneath_the_curves(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    saved = {}
    monkeypatch.setattr(plt, "close", lambda fig: saved.setdefault("fig", fig))
    runs = [fake_run(m, 0, 1 / 6) for m in ("torch_rnn", "lstmlab")]  # a curve on the baseline
    plot_curves(runs, tmp_path / "report.png")
    (ax,) = saved["fig"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["lstmlab (adding)", "torch_rnn (adding)", "trivial baseline (0.167)"]
    baseline = lines.pop("trivial baseline (0.167)")
    assert all(baseline.get_zorder() < line.get_zorder() for line in lines.values())
    box = ax.get_legend().get_window_extent()
    assert box.x0 >= ax.get_window_extent().x1  # right of the axes: it covers no curve
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_an_empty_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no summary\.json under"):
        write_report(tmp_path)


@pytest.mark.parametrize("odyssey", [[], ["--odyssey"]])
@pytest.mark.parametrize(
    ("folder", "says"), [("missing", "is not a folder"), ("empty", "no run there has finished")]
)
def test_a_missing_or_empty_folder_is_one_line_and_exit_2(folder, says, odyssey, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / folder), *odyssey])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"lstmlab-report: {tmp_path / folder}" if folder == "missing" else "lstmlab-report: no "
    )
    assert says in err and err.count("\n") == 1


def test_every_curve_is_visible_even_a_single_evaluation(tmp_path, monkeypatch):
    """lstmlab and torch_lstm from the same weights draw the same curve; a short run has one point."""
    import matplotlib.pyplot as plt

    saved = {}
    monkeypatch.setattr(plt, "close", lambda fig: saved.setdefault("fig", fig))
    runs = [fake_run(m, 0, 0.05) for m in ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn")]
    plot_curves(runs, tmp_path / "report.png")  # one evaluation each, two of them identical
    (ax,) = saved["fig"].axes
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("trivial")]
    assert len(curves) == 4 and all(len(line.get_xdata()) == 1 for line in curves)
    assert all(line.get_marker() not in ("", "None", None) for line in curves)  # a point is drawn
    styles = {(str(line.get_linestyle()), line.get_marker()) for line in curves}
    assert len(styles) == 4  # distinct dashes and markers
    widths = [line.get_linewidth() for line in curves]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4  # the later, thinner, on top
    assert [line.get_zorder() for line in curves] == sorted(line.get_zorder() for line in curves)
    saved["fig"].canvas.draw()
    labels = [t.get_text() for t in ax.yaxis.get_ticklabels() if t.get_text()]
    assert labels and all(label.replace(".", "").isdigit() for label in labels), labels  # "0.05", not 5e-2


def test_the_report_says_what_test_acc_counts_and_that_it_replaced_an_earlier_one(tmp_path, capsys):
    run = fake_run("torch_gru", 0, 0.5)
    run["acc_means"] = "share of sums within 0.04 of the target"
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text(json.dumps({k: v for k, v in run.items() if k != "curve"}))
    main([str(tmp_path)])
    assert (
        "Test acc on adding: share of sums within 0.04 of the target." in (tmp_path / "report.md").read_text()
    )
    assert capsys.readouterr().out.endswith("report.png\n")
    main([str(tmp_path)])
    assert capsys.readouterr().out.endswith("report.png (replacing the earlier report)\n")


def test_the_readme_multirun_reports_four_models_over_three_seeds(tmp_path, capsys):
    """`lstmlab-train -m model=... seed=0,1,2`, at smoke size; the sweep reports itself."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lstmlab.runner.train", "-m"]
    cmd += ["model=lstmlab,torch_lstm,torch_gru,torch_rnn", "seed=0,1,2"]
    cmd += ["experiment=smoke", "trainer.num_threads=1", "trainer.steps=10", "trainer.device=cpu"]
    cmd += [f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert sorted((s["model"], s["seed"]) for s in summaries) == sorted(
        (m, s) for m in ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn") for s in (0, 1, 2)
    )
    report = (sweep / "report.md").read_text()
    assert (
        "Every run: `experiment=smoke trainer.device=cpu trainer.num_threads=1 trainer.steps=10`." in report
    )
    for model in ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {model} ("))
        assert " ± " in row and row.endswith("| 3 |")
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lstmlab (adding) | cpu |" in proc.stdout  # the table on the console

    rows = [
        line.split(" (")[0] for line in report.splitlines() if line.startswith("| ") and " (adding)" in line
    ]
    assert rows == ["| lstmlab", "| torch_lstm", "| torch_gru", "| torch_rnn"]

    (sweep / "report.md").unlink()
    main([str(sweep)])  # lstmlab-report <sweep dir> rewrites it
    assert (sweep / "report.md").read_text() == report
    out = capsys.readouterr().out
    assert "| torch_rnn (adding) |" in out
    assert out.endswith(f"wrote {sweep / 'report.md'} and {sweep / 'report.png'}\n")
