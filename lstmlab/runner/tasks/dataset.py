"""Tasks on fixed data sets: the data ships inside an installed package and is never downloaded.

A :class:`DatasetTask` loads its train/validation/test splits once (``_load``); the runner takes
them from :meth:`DatasetTask.split` instead of sampling them from the seed, and the seed only
orders the training batches and initialises the model. The loaders import their optional
packages (``pip install lstmlab[data]``) when called, so ``import lstmlab.runner.tasks`` never needs them.

Dimension legend: N examples, T time steps, D input features, C classes.
"""

from __future__ import annotations

import hashlib
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import Task

SPLITS = ("train", "val", "test")


def array_digest(a: np.ndarray | Tensor, decimals: int = 6) -> str:
    """The sha256 of an array rounded to ``decimals`` places (robust to last-bit differences in
    floating point between machines), with its shape: what the loading tests pin."""
    a = np.asarray(a.numpy() if isinstance(a, Tensor) else a)
    if a.dtype.kind == "f":
        a = np.round(a.astype(np.float64), decimals)
    h = hashlib.sha256(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class DatasetTask(Task):
    """A task whose examples are a fixed data set, split once into train, val and test.

    Subclasses implement :meth:`_load`, returning ``{"train": (x, y), "val": ..., "test": ...}``.
    :meth:`sample` draws training examples with replacement, so the generated-task interface
    still holds.
    """

    fixed_splits: ClassVar[bool] = True

    def __init__(self, seq_len: int) -> None:
        super().__init__(seq_len)
        self._splits: dict[str, tuple[Tensor, Tensor]] | None = None

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
        if self._splits is None:
            self._splits = self._load()
        return self._splits[name]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.split("train")
        idx = torch.randint(0, len(x), (n,), generator=generator)
        return x[idx], y[idx]


class ClassificationTask(DatasetTask):
    """One label per sequence, predicted from the last step: cross-entropy, accuracy. The trivial
    baseline predicts the training split's class frequencies, whatever the input."""

    metric = "acc"
    higher_is_better = True
    per_step = False

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.float(), y)

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        return {
            "acc": (out.argmax(-1) == y).float().mean().item(),
            "ce": F.cross_entropy(out.float(), y).item(),
        }

    def baseline(self) -> dict[str, float]:
        prior = torch.bincount(self.split("train")[1], minlength=self.output_size).double()
        prior /= prior.sum()  # (C,)
        y = self.split("test")[1]
        return {
            "acc": (y == prior.argmax()).double().mean().item(),
            "ce": -prior[y].log().mean().item() if (prior[y] > 0).all() else math.inf,
        }


def split_indices(n: int, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """A fixed random partition of ``range(n)`` into sorted train/val/test index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val), round(n * test)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {k: np.sort(v) for k, v in parts.items()}
