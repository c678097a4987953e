"""scikit-learn's bundled 8×8 handwritten digits (1,797 images; UCI optdigits test set) read as
a sequence: 8 rows of 8 pixels (``seq_len=8``) or 64 single pixels (``seq_len=64``). A fast
smoke test on real data. Pixels are scaled from 0..16 to 0..1.

Splits: a fixed random partition (numpy seed 0) into 70% train, 10% val, 20% test.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lstmlab.runner.tasks.base import register
from lstmlab.runner.tasks.dataset import ClassificationTask, split_indices


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float64 in 0..16, labels (1797,) int)`` from the bundled CSV."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@register
class DigitsTask(ClassificationTask):
    name = "digits"
    output_size = 10

    def __init__(self, seq_len: int = 8) -> None:
        if seq_len not in (8, 64):
            raise ValueError(f"digits: seq_len must be 8 (rows) or 64 (pixels), got {seq_len}")
        super().__init__(seq_len)
        self.input_size = 64 // seq_len

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        images, labels = load_digits_arrays()
        x = torch.from_numpy(images / 16.0).float().reshape(-1, self.seq_len, self.input_size)  # (N, T, D)
        y = torch.from_numpy(labels).long()  # (N,)
        parts = split_indices(len(y), val=0.1, test=0.2, seed=0)
        return {k: (x[idx], y[idx]) for k, idx in parts.items()}
