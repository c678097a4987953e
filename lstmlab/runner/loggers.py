"""Where a run's metrics go: nowhere (``none``), ``metrics.jsonl`` (``jsonl``), or
``metrics.jsonl`` plus Weights & Biases (``wandb``, offline unless told otherwise).

Only rank 0 of a run makes a logger. ``summary.json`` is written by the runner in every case.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class NullLogger:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class JsonlLogger(NullLogger):
    """Appends one JSON object per evaluation to ``out_dir/metrics.jsonl``.

    On resume from step ``resume_step``, rows logged after that step (by the run that was
    killed) are dropped first, so the file reads as if the run had never stopped.
    """

    def __init__(self, out_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh file

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class WandbLogger(JsonlLogger):
    """Also logs the resolved config, every row and the summary to wandb.

    ``mode`` is wandb's ("offline", "online", "disabled"); ``WANDB_MODE`` overrides it.
    """

    def __init__(
        self,
        out_dir: Path,
        config: dict[str, Any],
        *,
        project: str,
        entity: str | None,
        mode: str,
        tags: list[str],
        name: str,
        resume_step: int | None = None,
    ) -> None:
        super().__init__(out_dir, resume_step)
        import wandb

        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            tags=tags,
            config=config,
            dir=str(out_dir),
            mode=os.environ.get("WANDB_MODE", mode),
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, row: dict[str, Any]) -> None:
        super().log(row)
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(flatten(summary))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished run under ``sweep_dir``: its summary plus ``curve`` (metrics.jsonl rows)
    and ``dir``. Reports read sweeps through this; it needs no Hydra."""
    runs = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        run = json.loads(path.read_text())
        metrics = path.with_name("metrics.jsonl")
        run["curve"] = read_jsonl(metrics) if metrics.exists() else []
        run["dir"] = str(path.parent)
        runs.append(run)
    return runs


def finished_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """:func:`collect_runs`, or FileNotFoundError saying why there is none: no such folder, or no
    run in it has finished (the reports print the reason as one line)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder: give a sweep's folder (multirun/DATE/TIME)")
    runs = collect_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(
            f"no summary.json under {sweep_dir}: no run there has finished (a run writes it when it ends)"
        )
    return runs


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"val": {"mse": 1}}`` -> ``{"val/mse": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
