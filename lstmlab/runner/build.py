"""Config -> objects, in one place: the task, the model, the optimizer and its schedule.

``lstmlab.runner.train``, ``lstmlab.analysis.sample``, ``lstmlab.analysis.probes`` users and every
report build through these functions, from a composed config (``DictConfig``) or from the plain
dict a run saved in ``summary.json`` and its checkpoint. Which config keys belong to the runner
rather than to the task, and which model keys only lstmlab.LSTM takes, is defined here once. This
module imports neither Hydra nor OmegaConf, so reports can use it without them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lstmlab.kernels.variants import GREFF_VARIANTS, CellVariant
from lstmlab.runner.models import SequenceModel
from lstmlab.runner.tasks import Task, make_task

CKPT_NAME = "checkpoints/last.pt"
# Which config keys are whose, defined here once (lstmlab.runner.config's schemas declare them):
VARIANT_KEYS = tuple(f.name for f in dataclasses.fields(CellVariant))  # peepholes ... recurrent_dropout
LSTMLAB_KEYS = ("backend", "forget_bias", "chrono_t_max", *VARIANT_KEYS)  # lstmlab.LSTM's own model keys
RUNNER_TASK_KEYS = ("train_size", "val_size", "test_size")  # the runner's, not the task's


def _plain(value: Any) -> Any:
    """Enum config values (``ModelKind.lstmlab``) as the plain strings the library takes."""
    return value.value if hasattr(value, "value") else value


def task_options(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The task's constructor keywords: its config without the runner's split sizes."""
    return {k: _plain(task_cfg[k]) for k in task_cfg if k not in RUNNER_TASK_KEYS}


def build_task(task_cfg: Mapping[str, Any]) -> Task:
    return make_task(**task_options(task_cfg))


def model_options(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`SequenceModel` keywords from a model config; lstmlab.LSTM's own keys only for it."""
    kind = str(_plain(model_cfg["kind"]))
    keys = ["hidden_size", "num_layers", "bidirectional", "dropout"]
    if kind == "lstmlab":
        keys += [k for k in LSTMLAB_KEYS if k in model_cfg]
    return {"kind": kind, **{k: _plain(model_cfg[k]) for k in keys}}


def cell_variant(model_cfg: Mapping[str, Any]) -> CellVariant:
    """The cell variant a model config asks for (a key it lacks, as in a run saved before variants
    existed, is the vanilla cell's). Raises ``ValueError`` for an impossible combination."""
    return CellVariant(**{k: _plain(model_cfg[k]) for k in VARIANT_KEYS if k in model_cfg})


def greff_name(variant: CellVariant) -> str | None:
    """Greff et al.'s name for ``variant`` (``"V"``, ``"NP"``, ``"CIFG"``, ...), or None."""
    return next((name for name, opts in GREFF_VARIANTS.items() if CellVariant(**opts) == variant), None)


def build_model(model_cfg: Mapping[str, Any], task: Task) -> SequenceModel:
    """The model for ``task``: its input layer and head sized by the task."""
    options = model_options(model_cfg)
    return SequenceModel(
        options.pop("kind"),
        task.output_size,
        input_size=task.input_size,
        vocab_size=task.vocab_size,
        per_step=task.per_step,
        **options,
    )


def build_optimizer(
    optim_cfg: Mapping[str, Any], params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    name, lr, wd = str(_plain(optim_cfg["name"])), optim_cfg["lr"], optim_cfg["weight_decay"]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim_cfg["momentum"], weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


class LRFactor:
    """Linear warm-up, then constant, cosine to 0 or linear to 0: a factor on ``optim.lr``.
    A class, not a closure, so that its settings are visible and it pickles."""

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int) -> None:
        self.schedule, self.warmup, self.total = schedule, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.schedule == "cosine":
            return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())
        if self.schedule == "linear":
            return 1.0 - progress
        return 1.0


def build_scheduler(
    optim_cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    factor = LRFactor(str(_plain(optim_cfg["schedule"])), optim_cfg["warmup_steps"], total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rebuild(cfg: Mapping[str, Any], run_dir: str | Path | None = None) -> tuple[SequenceModel, Task]:
    """A run's model and task from its saved config: at initialisation (the runner seeds torch
    with ``cfg["seed"]`` and builds the model first, so this draws the same weights), or, given
    ``run_dir``, with the weights of its last checkpoint. The model is on the CPU."""
    task = build_task(cfg["task"])
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], task)
    if run_dir is not None:
        state = torch.load(Path(run_dir) / CKPT_NAME, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    return model, task


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config a run was trained with, from its checkpoint."""
    state = torch.load(Path(run_dir) / CKPT_NAME, map_location="cpu", weights_only=True)
    return state["config"]
