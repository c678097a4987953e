"""Temporal order (Hochreiter & Schmidhuber 1997, experiment 6a/6b).

A sequence over {a, b, c, d, B, E, X, Y} starts with B, ends with E and is a, b, c or d
everywhere else, except at ``n_relevant`` positions that hold X or Y. The class is the order of
those symbols: XX, XY, YX, YY for two (4 classes), XXX ... YYY for three (8 classes). In the
paper the length is drawn from 100..110 and, with 1-based positions, t1 ~ U{10..20},
t2 ~ U{50..60} (6a) or t1 ~ U{10..20}, t2 ~ U{33..43}, t3 ~ U{66..76} (6b). The target is given
at the end, so the model classifies from its last step.

With ``seq_len`` = 110 (the default) those are exactly the paper's numbers; another ``seq_len``
scales every window and the minimum length by ``seq_len / 110``. Sequences shorter than
``seq_len`` are left-padded with token 0, so every E sits at the last step. The classes are
balanced, so the trivial answer scores 1 / n_classes and cross-entropy ln(n_classes).

Tokens: 0 pad, 1..4 a..d (distractors), 5 B, 6 E, 7 X, 8 Y.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import Task, register

PAD, B, E, X, Y = 0, 5, 6, 7, 8
PAPER_LEN = 110
# 0-based windows (inclusive) of the relevant symbols, and the shortest length, in the paper.
PAPER_WINDOWS = {2: [(9, 19), (49, 59)], 3: [(9, 19), (32, 42), (65, 75)]}
PAPER_MIN_LEN = 100


@register
class TemporalOrderTask(Task):
    name = "temporal_order"
    metric = "acc"
    higher_is_better = True
    vocab_size = 9
    per_step = False

    def __init__(self, seq_len: int = PAPER_LEN, n_relevant: int = 2) -> None:
        super().__init__(seq_len)
        if n_relevant not in PAPER_WINDOWS:
            raise ValueError(f"n_relevant={n_relevant} is not allowed: 2 (experiment 6a) or 3 (6b)")
        scale = seq_len / PAPER_LEN
        self.windows = [(round(lo * scale), round(hi * scale)) for lo, hi in PAPER_WINDOWS[n_relevant]]
        self.min_len = round(PAPER_MIN_LEN * scale)
        if self.windows[0][0] < 1 or self.windows[-1][1] >= self.min_len - 1:
            raise ValueError(f"seq_len={seq_len} is too short for {n_relevant} relevant symbols")
        self.n_relevant = n_relevant
        self.output_size = 2**n_relevant

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        L = self.seq_len
        lengths = torch.randint(self.min_len, L + 1, (n,), generator=generator)  # (N,)
        x = torch.randint(1, 5, (n, L), generator=generator)  # distractors a..d
        start = L - lengths  # left padding: sequence i occupies x[i, start[i]:]
        steps = torch.arange(L)
        x[steps < start[:, None]] = PAD
        rows = torch.arange(n)
        x[rows, start] = B
        x[:, -1] = E
        bits = torch.randint(0, 2, (n, self.n_relevant), generator=generator)  # 0: X, 1: Y
        for k, (lo, hi) in enumerate(self.windows):
            where = torch.randint(lo, hi + 1, (n,), generator=generator)
            x[rows, start + where] = X + bits[:, k]
        weights = 2 ** torch.arange(self.n_relevant - 1, -1, -1)
        y = (bits * weights).sum(1)  # (N,) the order read as a binary number: XX 0 ... YY 3
        return x, y

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.float(), y)

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        acc = (out.argmax(-1) == y).float().mean().item()
        return {"acc": acc, "ce": self.loss(out, y).item()}

    def baseline(self) -> dict[str, float]:
        return {"acc": 1 / self.output_size, "ce": math.log(self.output_size)}
