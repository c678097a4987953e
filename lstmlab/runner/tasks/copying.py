"""Copying memory (Arjovsky, Shah & Bengio 2016).

Tokens: 0 blank, 1..S symbols, S + 1 the delimiter (S = n_symbols). The input ``(N, T + 2L)``
is L symbols drawn uniformly, T - 1 blanks, the delimiter and L blanks (L = copy_len); the
target is blanks for T + L steps, then the L symbols. The loss is cross-entropy over every
step. Outputting blanks and then uniform guesses over the symbols scores
L ln S / (T + 2L) nats per step and recalls 1/S of the symbols.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import Task, register


@register
class CopyTask(Task):
    name = "copy"
    metric = "ce"
    higher_is_better = False
    per_step = True
    acc_means = "share of the copied symbols recalled"

    def __init__(self, seq_len: int, n_symbols: int = 8, copy_len: int = 10) -> None:
        super().__init__(seq_len)
        self.n_symbols = n_symbols
        self.copy_len = copy_len
        self.vocab_size = n_symbols + 2  # blank, symbols, delimiter
        self.output_size = n_symbols + 1  # blank, symbols: the delimiter is never a target

    @property
    def total_len(self) -> int:
        return self.seq_len + 2 * self.copy_len

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        T, L, S = self.seq_len, self.copy_len, self.n_symbols
        symbols = torch.randint(1, S + 1, (n, L), generator=generator)  # (N, L)
        x = torch.zeros(n, T + 2 * L, dtype=torch.long)
        x[:, :L] = symbols
        x[:, T + L - 1] = S + 1  # the delimiter: "now repeat them"
        y = torch.zeros(n, T + 2 * L, dtype=torch.long)
        y[:, T + L :] = symbols
        return x, y  # (N, T + 2L), (N, T + 2L)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.flatten(0, 1).float(), y.flatten())

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        L = self.copy_len
        recalled = out[:, -L:].argmax(-1) == y[:, -L:]  # (N, L)
        return {"ce": self.loss(out, y).item(), "acc": recalled.float().mean().item()}

    def baseline(self) -> dict[str, float]:
        L, S = self.copy_len, self.n_symbols
        return {"ce": L * math.log(S) / self.total_len, "acc": 1 / S}
