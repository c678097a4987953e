"""The interface every task implements, and the registry that names them.

Dimension legend: N examples (a batch or a whole split), T time steps, D input features,
V input vocabulary, O outputs per prediction.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import torch
from torch import Tensor


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any labels, e.g. ``derive_seed(seed, "train", step)``: streams that
    never collide, and a batch that depends only on its labels (so resuming is exact)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Task:
    """A supervised sequence task with generated data.

    A subclass sets the class attributes, takes its options as keyword arguments and implements
    :meth:`sample`, :meth:`loss`, :meth:`metrics` and :meth:`baseline`. Register it with
    :func:`register` and give it a ``conf/task/<name>.yaml`` (and a schema in lstmlab.runner.config).

    Attributes:
        name: the registry name.
        metric: the key of :meth:`metrics` that ranks models (e.g. ``"mse"``).
        higher_is_better: whether a larger ``metric`` is better.
        input_size: D, features per step for continuous inputs, or None for token inputs.
        vocab_size: V, the token vocabulary for token inputs, or None.
        output_size: O, outputs per prediction.
        per_step: True if the model predicts at every step (outputs ``(N, T, O)``), False if it
            predicts once from the last step (outputs ``(N, O)``).
        acc_means: what the ``"acc"`` metric counts, in a few words, where the task's metric is
            another one (printed beside "test acc" by the runner and the report), else None.
        fixed_splits: True for a fixed data set (see ``lstmlab.runner.tasks.dataset``): the runner takes
            its train/val/test sets from :meth:`split` instead of sampling them from the seed.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    fixed_splits: ClassVar[bool] = False
    acc_means: ClassVar[str | None] = None
    input_size: int | None = None
    vocab_size: int | None = None
    output_size: int
    per_step: bool

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    @property
    def total_len(self) -> int:
        """Length of an input sequence (what tokens/s counts)."""
        return self.seq_len

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` examples ``(x, y)`` drawn with ``generator`` (on the CPU)."""
        raise NotImplementedError

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The fixed ``"train"``, ``"val"`` or ``"test"`` set of a data set task."""
        raise NotImplementedError(f"task {self.name!r} generates its data; it has no fixed splits")

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The scalar training loss (mean over the batch) of model outputs ``out``."""
        raise NotImplementedError

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        """Evaluation metrics, including ``self.metric``, as means over the examples."""
        raise NotImplementedError

    def baseline(self) -> dict[str, float]:
        """The same metrics for the trivial solution, reported next to every result."""
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to :func:`make_task` under ``cls.name``."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, **options: object) -> Task:
    """Build the task called ``name`` with its options (e.g. ``seq_len=50``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)
