"""MNIST-1D (Greydanus & Kobak 2024): 10 digit templates turned into 40-step 1-D signals by
padding, translation, scaling, shear and correlated noise. Made here by the ``mnist1d`` package's
own generator with its default arguments (5,000 examples, seed 42, the package's 4,000/1,000
train/test split), never by its download function; the templates ship inside the package.

The last ``val_fraction`` of the generator's training examples are held out for validation
(default 400), so models train on 3,600. Published reference (Greydanus & Kobak 2024, Table 1,
trained on all 4,000): GRU 91% test accuracy.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
from torch import Tensor

from lstmlab.runner.tasks.base import register
from lstmlab.runner.tasks.dataset import ClassificationTask

SEQ_LEN = 40


def generate_mnist1d() -> dict[str, np.ndarray]:
    """``{"x": (4000, 40), "y": (4000,), "x_test": (1000, 40), "y_test": (1000,)}`` from the
    package's generator. It seeds numpy's and Python's global RNGs; their states are restored."""
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: data[k] for k in ("x", "y", "x_test", "y_test")}


@functools.cache
def _generated_once() -> dict[str, np.ndarray]:
    """:func:`generate_mnist1d` once per process: it takes 7-15 s on a CPU, and a sweep builds
    the task again for every run. Callers get copies."""
    return generate_mnist1d()


@register
class MNIST1DTask(ClassificationTask):
    name = "mnist1d"
    input_size = 1
    output_size = 10

    def __init__(self, seq_len: int = SEQ_LEN, val_fraction: float = 0.1) -> None:
        if seq_len != SEQ_LEN:
            raise ValueError(f"mnist1d: sequences have {SEQ_LEN} steps, got seq_len={seq_len}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"mnist1d: val_fraction must be in (0, 1), got {val_fraction}")
        super().__init__(seq_len)
        self.val_fraction = val_fraction

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        data = {k: v.copy() for k, v in _generated_once().items()}
        x = torch.from_numpy(data["x"]).float().unsqueeze(-1)  # (4000, 40, 1)
        y = torch.from_numpy(data["y"]).long()
        n_train = len(y) - round(len(y) * self.val_fraction)
        x_test = torch.from_numpy(data["x_test"]).float().unsqueeze(-1)  # (1000, 40, 1)
        return {
            "train": (x[:n_train], y[:n_train]),
            "val": (x[n_train:], y[n_train:]),
            "test": (x_test, torch.from_numpy(data["y_test"]).long()),
        }
