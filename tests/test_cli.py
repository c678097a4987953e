"""The console scripts as a newcomer meets them: one-line errors that list the valid choices, and
a library-only install that names the extra to install instead of a traceback."""

import subprocess
import sys
import textwrap

import pytest

from lstmlab.runner.train import preflight


@pytest.mark.parametrize(
    ("override", "choices"),
    [
        ("task=nonexistent", "the choices for task are adding, charlm, copy, digits"),
        ("model=lstm", "the choices for model are lstmlab, lstmlab_chrono, lstmlab_forget1, torch_gru"),
        ("variant=XYZ", "the choices for variant are CIFG, LN, NFG"),
    ],
)
def test_an_unknown_group_choice_lists_the_choices(override, choices):
    (problem,) = preflight([override])
    assert problem.startswith(f"{override} does not exist; ")
    assert choices in problem and "\n" not in problem


def test_an_unknown_task_is_one_line_and_exit_2():
    cmd = [sys.executable, "-m", "lstmlab.runner.train", "task=nonexistent"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lstmlab-train: task=nonexistent does not exist; the choices for task are ")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize(("command", "argv"), [("train", ["--help"]), ("report", ["somewhere"])])
def test_without_the_runner_extra_a_command_names_the_extra(command, argv):
    """`pip install lstmlab` without [runner]: Hydra (and matplotlib) cannot be imported."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["hydra"] = sys.modules["omegaconf"] = sys.modules["matplotlib"] = None
        sys.argv = ["lstmlab-{command}", *{argv!r}]
        from lstmlab.runner.cli import {command}
        {command}()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"lstmlab-{command}: needs the runner extra (no module ")
    assert proc.stderr.endswith("pip install 'lstmlab[runner]'\n") and proc.stderr.count("\n") == 1


def test_sample_needs_no_runner_extra_and_a_wrong_folder_is_one_line(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["hydra"] = sys.modules["omegaconf"] = sys.modules["matplotlib"] = None
        sys.argv = ["lstmlab-sample", {str(tmp_path)!r}]
        from lstmlab.runner.cli import sample
        sample()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"lstmlab-sample: {tmp_path} holds no checkpoints/last.pt: give a finished charlm run\n"
    )


def test_the_entry_points_go_through_the_guard():
    from pathlib import Path

    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "lstmlab-train": "lstmlab.runner.cli:train",
        "lstmlab-report": "lstmlab.runner.cli:report",
        "lstmlab-sample": "lstmlab.runner.cli:sample",
    }


def test_the_forecast_report_on_a_folder_without_runs_is_one_line(tmp_path, capsys):
    from lstmlab.analysis import forecast_report

    with pytest.raises(SystemExit) as exit_:
        forecast_report.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"forecast_report: no finished forecast run under {tmp_path}\n"
