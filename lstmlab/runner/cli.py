"""The console scripts (``[project.scripts]``): ``lstmlab-train``, ``lstmlab-report``, ``lstmlab-sample``.

They import their module only when called, so that a library-only install (``pip install lstmlab``,
without the runner extra) gets one line naming the extra instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib
import sys

# The runner extra's packages (pyproject.toml), by import name.
RUNNER_EXTRA = ("hydra", "omegaconf", "matplotlib", "scipy", "wandb")


def _run(prog: str, module: str) -> None:
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in RUNNER_EXTRA:
            raise
        print(f"{prog}: needs the runner extra (no module {err.name!r}): pip install 'lstmlab[runner]'",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None
    main()


def train() -> None:
    _run("lstmlab-train", "lstmlab.runner.train")


def report() -> None:
    _run("lstmlab-report", "lstmlab.analysis.report")


def sample() -> None:
    _run("lstmlab-sample", "lstmlab.analysis.sample")
