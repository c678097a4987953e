"""The adding problem (Hochreiter & Schmidhuber 1997; the variant of Le et al. 2015).

Input ``(N, T, 2)``: channel 0 holds values ~ U[0, 1], channel 1 a marker with exactly two
ones, one in each half of the sequence. Target ``(N,)``: the sum of the two marked values.
Predicting 1 always gives MSE Var(U1 + U2) = 1/6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import Task, register

TOLERANCE = 0.04  # an answer counts as correct when |error| < TOLERANCE


@register
class AddingTask(Task):
    name = "adding"
    metric = "mse"
    higher_is_better = False
    input_size = 2
    output_size = 1
    per_step = False
    acc_means = f"share of sums within {TOLERANCE} of the target"

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        T, half = self.seq_len, self.seq_len // 2
        values = torch.rand(n, T, generator=generator)  # (N, T)
        first = torch.randint(0, half, (n,), generator=generator)
        second = torch.randint(half, T, (n,), generator=generator)
        marker = torch.zeros(n, T)
        rows = torch.arange(n)
        marker[rows, first] = 1.0
        marker[rows, second] = 1.0
        x = torch.stack([values, marker], dim=-1)  # (N, T, 2)
        y = values[rows, first] + values[rows, second]  # (N,)
        return x, y

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out.squeeze(-1).float(), y)

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        err = out.squeeze(-1).float() - y
        return {
            "mse": err.square().mean().item(),
            "acc": (err.abs() < TOLERANCE).float().mean().item(),
        }

    def baseline(self) -> dict[str, float]:
        # Predict 1: the error is U1 + U2 - 1, triangular on [-1, 1] with density 1 - |e|.
        return {"mse": 1 / 6, "acc": 1 - (1 - TOLERANCE) ** 2}
