"""Typed configuration schemas for the experiment runner.

The dataclasses below are the single source of truth for what a run can be configured with and
for every default. They are registered in Hydra's ConfigStore under ``schema/...``; the YAML
files in ``conf/`` only select a schema and hold a preset's deviations from it
(``tests/test_config.py`` checks that no YAML restates a default). A key that is not declared here
fails at composition (``Key 'lr' not in 'TrainerConfig'``), an enum field fails with the allowed
values, and :func:`validate` checks ranges; :func:`check_runnable` adds what depends on the
machine (CUDA, Triton). The runner calls both before any data or run folder is made.

This module imports nothing from Hydra at import time: the ConfigStore registration lives in
:func:`register_configs`, which only the runner calls.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from lstmlab.backends import BACKENDS, resolve_backend
from lstmlab.kernels.variants import CellVariant
from lstmlab.runner.build import LSTMLAB_KEYS, VARIANT_KEYS, cell_variant
from lstmlab.runner.models import MODEL_KINDS
from lstmlab.runner.tasks import TASKS


class _StrEnum(str, Enum):
    """An enum whose str() is its value, so ``str(cfg.trainer.device) == "cpu"``."""

    def __str__(self) -> str:
        return self.value


# The library's own lists, so a model kind or backend added there is accepted here too.
ModelKind = _StrEnum("ModelKind", [(kind, kind) for kind in MODEL_KINDS])
Backend = _StrEnum("Backend", [(name, name) for name in BACKENDS])


class OptimName(_StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Schedule(_StrEnum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class Device(_StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(_StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # torch.compile's modes


class LoggerKind(_StrEnum):
    none = "none"
    jsonl = "jsonl"
    wandb = "wandb"


def with_cell_variant_fields(cls: type) -> type:
    """Give a config class, before ``@dataclass``, one field per option of the cell variant:
    CellVariant's name, type and default, so the variant is spelled out once (kernels/variants.py)
    and a new option is a config key, typed and checked at composition, without an edit here."""
    for option in dataclasses.fields(CellVariant):
        cls.__annotations__[option.name] = option.type  # "bool" / "float", resolved as ours are
        setattr(cls, option.name, option.default)
    return cls


@dataclass
@with_cell_variant_fields
class ModelConfig:
    """Every model kind takes every key, so one command line can sweep all four kinds. The keys
    from ``backend`` on are lstmlab.LSTM's own (``LSTMLAB_KEYS``); a torch model ignores them, and
    the runner logs one note for each one set away from its default for a torch model.

    After ``chrono_t_max`` come the cell variant's keys, added by :func:`with_cell_variant_fields`
    from lstmlab.kernels.variants.CellVariant with its types and defaults (all off: torch.nn.LSTM's
    cell): ``peepholes``, ``cifg``, ``input_gate``, ..., ``recurrent_dropout``. CellVariant's
    docstring says what each does; ``conf/variant/`` sets Greff et al.'s variants by name."""

    kind: ModelKind = MISSING
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0  # between layers; with one layer the module warns that it does nothing
    backend: Backend = Backend.auto  # the backend that ran is summary.json's "backend"
    forget_bias: float = 0.0  # added to the forget-gate bias at init
    chrono_t_max: float | None = None  # chrono init (Tallec & Ollivier 2018): dependencies up to ~T


@dataclass
class TaskConfig:
    """Options shared by every task. Data is generated from ``seed``; nothing is downloaded."""

    name: str = MISSING
    seq_len: int = 50
    train_size: int | None = None  # None: a fresh batch every step (an endless stream)
    val_size: int = 1000
    test_size: int = 1000


@dataclass
class AddingTaskConfig(TaskConfig):
    name: str = "adding"


@dataclass
class CopyTaskConfig(TaskConfig):
    name: str = "copy"
    seq_len: int = 20  # T: the number of blanks between the symbols and the delimiter, plus one
    n_symbols: int = 8
    copy_len: int = 10


# ---- memory tasks: generated data, exact trivial baselines and optima in lstmlab.runner.tasks.


@dataclass
class TemporalOrderTaskConfig(TaskConfig):
    name: str = "temporal_order"
    seq_len: int = 110  # the longest sequence; 110 gives the paper's windows (others scale them)
    n_relevant: int = 2  # 2: experiment 6a, 4 classes; 3: experiment 6b, 8 classes


@dataclass
class ReberTaskConfig(TaskConfig):
    name: str = "reber"
    seq_len: int = 60  # embedded Reber strings are cut here (longer ones are rare)


@dataclass
class HMMTaggingTaskConfig(TaskConfig):
    name: str = "hmm_tagging"
    seq_len: int = 40
    resolve_distance: int = 4  # steps from an ambiguous word to the token that resolves it
    p_ambiguous: float = 0.2
    noise: float = 0.05  # the resolving token names the wrong branch with this probability


# ---- end of memory tasks


# ---- data set tasks: fixed splits from installed packages, see lstmlab.runner.tasks.dataset.
# train_size, val_size and test_size do not apply to them: the data set fixes its splits.


@dataclass
class MNIST1DTaskConfig(TaskConfig):
    name: str = "mnist1d"
    seq_len: int = 40
    val_fraction: float = 0.1  # of the generator's 4,000 training examples


@dataclass
class DigitsTaskConfig(TaskConfig):
    name: str = "digits"
    seq_len: int = 8  # 8 rows of 8 pixels, or 64 pixels one at a time


@dataclass
class ForecastTaskConfig(TaskConfig):
    name: str = "forecast"
    series: str = "sunspots"  # sunspots | co2 | nile (statsmodels.datasets)
    seq_len: int = 33  # context: the observations the network sees before each origin
    horizon: int | None = None  # longest lead; None: the series' season


@dataclass
class CharLMTaskConfig(TaskConfig):
    name: str = "charlm"
    seq_len: int = 128  # characters per training sequence
    max_train_chars: int | None = None  # None: the whole training split
    eval_chars: int = 65536  # characters of the val and test splits that are scored


# ---- end of data set tasks


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    steps: int = 1000
    epochs: int | None = None  # needs task.train_size; then steps = epochs * (train_size // batch)
    batch_size: int = 64
    grad_clip: float | None = 1.0
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    log_interval: int = 50
    eval_interval: int = 200
    ckpt_interval: int = 500
    eval_batch_size: int = 500
    resume: bool = False  # continue from <run dir>/checkpoints/last.pt
    overwrite: bool = False  # replace a finished or partial run in the run directory
    # torch.set_num_threads. One by default: the runner's models are small, and torch's default
    # (a thread per core) made ms/step 80x slower when other work shared the cores. null: torch's.
    num_threads: int | None = 1
    compile: str = "none"  # none | default | reduce-overhead | max-autotune: torch.compile's mode


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.jsonl
    project: str = "lstmlab"
    entity: str | None = None
    mode: str = "offline"  # wandb mode; the WANDB_MODE environment variable takes precedence
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    name: str = "${model.kind}-${task.name}-s${seed}"


# (ConfigStore group, name, schema): YAML files pick one in their defaults list, e.g.
# conf/model/lstmlab.yaml starts with `defaults: [/schema/model/base@_here_]`.
SCHEMAS: list[tuple[str, str, type]] = [
    ("schema", "config", Config),
    ("schema/model", "base", ModelConfig),
    ("schema/task", "adding", AddingTaskConfig),
    ("schema/task", "copy", CopyTaskConfig),
    ("schema/task", "temporal_order", TemporalOrderTaskConfig),  # memory tasks
    ("schema/task", "reber", ReberTaskConfig),
    ("schema/task", "hmm_tagging", HMMTaggingTaskConfig),
    ("schema/task", "mnist1d", MNIST1DTaskConfig),
    ("schema/task", "digits", DigitsTaskConfig),
    ("schema/task", "forecast", ForecastTaskConfig),
    ("schema/task", "charlm", CharLMTaskConfig),
]


def _section_keys() -> dict[str, set[str]]:
    """Every key a section can take, over all the schemas of its group."""
    keys: dict[str, set[str]] = {f.name: set() for f in fields(Config)}
    for group, _, node in SCHEMAS:
        if group.startswith("schema/"):
            keys[group.removeprefix("schema/")] |= {f.name for f in fields(node)}
    for name, node in (("optim", OptimConfig), ("trainer", TrainerConfig), ("logger", LoggerConfig)):
        keys[name] = {f.name for f in fields(node)}
    return keys


# Config groups that fill no section of their own: presets (package _global_) and the cell
# variants (package model), chosen on the command line as ``experiment=odyssey variant=CIFG``.
GROUPS_WITHOUT_SECTION = ("experiment", "variant")


def unknown_override_keys(overrides: list[str]) -> list[str]:
    """One message per command-line override whose key no schema declares, naming the keys that
    section takes (Hydra would name the key only). Group choices (``model=torch_gru``),
    ``hydra.*``, flags and explicit additions (``+key=…``, ``~key``) are left to Hydra."""
    sections = _section_keys()
    top_level = sorted({*sections, *GROUPS_WITHOUT_SECTION, "hydra"})
    problems = []
    for arg in overrides:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if "/" in key or "@" in key or key.startswith("hydra."):
            continue
        section, _, rest = key.partition(".")
        if section not in sections and section not in top_level:
            problems.append(f"unknown key {key!r}: the top-level keys are {', '.join(top_level)}")
            continue
        leaf = rest.split(".", 1)[0]
        if rest and sections.get(section) and leaf not in sections[section]:
            hint = [f"{s}.{leaf}" for s, names in sections.items() if leaf in names]
            hint += [f"{section}.{m}" for m in difflib.get_close_matches(leaf, sections[section], n=1)]
            problems.append(
                f"unknown key {key!r}: {section} takes {', '.join(sorted(sections[section]))}"
                + (f" (did you mean {' or '.join(hint)}?)" if hint else "")
            )
    return problems


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (only the runner calls this)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config ``lstmlab-train OVERRIDES...`` would run, for notebooks and tests.

    Hydra's ``hydra.*`` node is left out, so a preset's sweep (``hydra.mode=MULTIRUN``) does not
    apply: this is always one run. Example: ``train(compose(["model=torch_gru"]), "out/")``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module("lstmlab.conf", version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def ignored_model_keys(model_cfg: DictConfig) -> list[str]:
    """lstmlab.LSTM's own keys set away from their defaults for a torch model, which ignores them
    (so that ``model.forget_bias=1.0`` can apply to lstmlab in a sweep over all four kinds)."""
    if str(model_cfg.kind) == "lstmlab":
        return []
    defaults = ModelConfig()
    return [f"model.{k}={model_cfg[k]}" for k in LSTMLAB_KEYS if model_cfg[k] != getattr(defaults, k)]


class ConfigError(ValueError):
    """A configuration value is out of its allowed range."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check value ranges that types alone cannot express; raise :class:`ConfigError`."""
    m, t, o, tr = cfg.model, cfg.task, cfg.optim, cfg.trainer
    _check(m.hidden_size > 0, "model.hidden_size", m.hidden_size, "a positive integer")
    _check(m.num_layers > 0, "model.num_layers", m.num_layers, "a positive integer")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "a float in [0, 1)")
    if m.chrono_t_max is not None:  # lstmlab.LSTM draws log U[1, chrono_t_max - 1]
        _check(m.chrono_t_max > 2, "model.chrono_t_max", m.chrono_t_max, "null or a number > 2")
        _check(
            m.forget_bias == 0,
            "model.forget_bias",
            m.forget_bias,
            "0 when model.chrono_t_max is set (both set the forget-gate bias)",
        )
    _check_variant(m)
    _check(t.seq_len > 1, "task.seq_len", t.seq_len, "an integer > 1")
    _check(t.val_size > 0, "task.val_size", t.val_size, "a positive integer")
    _check(t.test_size > 0, "task.test_size", t.test_size, "a positive integer")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a finite number > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    _check(tr.steps > 0, "trainer.steps", tr.steps, "a positive integer")
    _check(tr.batch_size > 0, "trainer.batch_size", tr.batch_size, "a positive integer")
    _check(tr.eval_batch_size > 0, "trainer.eval_batch_size", tr.eval_batch_size, "an int > 0")
    for key in ("log_interval", "eval_interval", "ckpt_interval"):
        _check(tr[key] > 0, f"trainer.{key}", tr[key], "a positive integer")
    if tr.grad_clip is not None:
        _check(tr.grad_clip > 0, "trainer.grad_clip", tr.grad_clip, "null or a number > 0")
    if tr.num_threads is not None:
        _check(tr.num_threads > 0, "trainer.num_threads", tr.num_threads, "null or a positive integer")
    _check(tr.compile in COMPILE_MODES, "trainer.compile", tr.compile, " | ".join(COMPILE_MODES))
    _check(
        not (tr.resume and tr.overwrite), "trainer.overwrite", tr.overwrite, "false when trainer.resume=true"
    )
    if t.train_size is not None:
        _check(
            t.train_size >= tr.batch_size,
            "task.train_size",
            t.train_size,
            f"null or an integer >= trainer.batch_size ({tr.batch_size})",
        )
    if tr.epochs is not None:
        _check(tr.epochs > 0, "trainer.epochs", tr.epochs, "null or a positive integer")
        _check(
            t.train_size is not None,
            "trainer.epochs",
            tr.epochs,
            "null unless task.train_size is set (an endless stream has no epochs)",
        )


def _check_variant(m: DictConfig) -> None:
    """The cell variant's own check (lstmlab.kernels.variants.CellVariant), for every model kind:
    a combination that cannot be a cell is an error even where a torch model would ignore it."""
    try:
        cell_variant(m)
    except (TypeError, ValueError) as err:
        defaults = ModelConfig()
        chosen = " ".join(
            f"model.{k}={str(m[k]).lower() if isinstance(m[k], bool) else m[k]}"
            for k in VARIANT_KEYS
            if m[k] != getattr(defaults, k)
        )
        raise ConfigError(f"the cell variant {chosen} is not allowed: {err}") from None


def run_device(requested: str, local_rank: int = 0) -> torch.device:
    """The device ``trainer.device`` means on this machine (``auto``: CUDA when visible)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        _check(
            torch.cuda.is_available(), "trainer.device", requested, "auto or cpu: no CUDA device is visible"
        )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_runnable(cfg: DictConfig, world_size: int = 1, local_rank: int = 0) -> torch.device:
    """:func:`validate`, then what depends on this machine: the device, the precision and an
    explicit Triton backend (lstmlab.backends decides, as the module would). Returns the device."""
    validate(cfg)
    tr, m, t = cfg.trainer, cfg.model, cfg.task
    device = run_device(str(tr.device), local_rank)
    precision = str(tr.precision)
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision={precision!r} needs a GPU: this run is on the CPU, which trains in fp32 "
            f"(choices: fp32 here; {', '.join(p.value for p in Precision)} with trainer.device=cuda)"
        )
    _check(
        tr.batch_size % world_size == 0,
        "trainer.batch_size",
        tr.batch_size,
        f"a multiple of the {world_size} torchrun processes",
    )
    task = TASKS.get(t.name)
    if task is not None and task.fixed_splits:
        _check(
            t.train_size is None, "task.train_size", t.train_size, f"null: task {t.name!r} has fixed splits"
        )
    if str(m.kind) == "lstmlab" and str(m.backend) not in ("auto", "reference"):
        # The module's own rule, for the training batch each process sees: an explicit Triton
        # backend that cannot run here fails now, not after the data is built.
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        try:
            resolve_backend(str(m.backend), device, tr.batch_size // world_size, m.hidden_size, dtype)
        except RuntimeError as err:
            raise ConfigError(f"model.backend={str(m.backend)!r} is not allowed here: {err}") from None
    return device


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain dicts, lists, strings and numbers (enums become strings)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
