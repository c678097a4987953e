"""Measurements on a model rather than training: how much gradient reaches the initial state.

Dimension legend: N examples, T time, H hidden, L layers x directions.

The vanishing-gradient claim (Hochreiter 1991; Hochreiter & Schmidhuber 1997) is about
∂ℓ/∂(h_0, c_0): the error signal that flows from a loss at step T back to the state before the
first step. :func:`initial_state_grad_norm` measures it for a :class:`SequenceModel` on the adding
problem, per example, in float64 so that small norms are not lost to rounding.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from lstmlab.runner.models import SequenceModel
from lstmlab.runner.tasks import make_task


def initial_state_grad_norm(model: SequenceModel, x: Tensor, y: Tensor) -> Tensor:
    """‖∂ℓ_n/∂(h_0, c_0)‖ for each example, ``(N,)``, with ℓ_n = (ŷ_n − y_n)² the squared error
    of a last-step prediction (``per_step=False``) and the initial state zero.

    For an LSTM the gradient stacks h_0's and c_0's parts (one norm over both); a GRU or RNN has
    h_0 only. The model is copied to float64; the original is left untouched.
    """
    if model.per_step:
        raise ValueError("initial_state_grad_norm needs a last-step model (per_step=False)")
    net = copy.deepcopy(model).double().eval()
    rnn = net.rnn
    n = x.shape[0]
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h0 = torch.zeros(layers, n, rnn.hidden_size, dtype=torch.float64, requires_grad=True)  # (L, N, H)
    is_lstm = net.kind in ("lstmlab", "torch_lstm")
    state: tuple[Tensor, ...] = (h0,)
    if is_lstm:
        c0 = torch.zeros_like(h0, requires_grad=True)
        state = (h0, c0)
    pred = net(x.double(), state if is_lstm else h0).squeeze(-1)  # (N,)
    loss = (pred - y.double()).square().sum()  # examples are independent: Σ_n ℓ_n
    grads = torch.autograd.grad(loss, state)
    return torch.cat([g.transpose(0, 1).reshape(n, -1) for g in grads], dim=1).norm(dim=1)  # (N,)


N_EXAMPLES = 256  # adding-problem examples per length in grad_norm_curve (reports cite it)


def grad_norm_curve(
    model: SequenceModel, lengths: list[int], n: int = N_EXAMPLES, seed: int = 0
) -> dict[int, float]:
    """Root-mean-square over ``n`` adding-problem examples of :func:`initial_state_grad_norm`,
    for each sequence length T in ``lengths`` (the same examples for every model)."""
    curve = {}
    for T in lengths:
        task = make_task("adding", seq_len=max(T, 2))
        x, y = task.sample(n, torch.Generator().manual_seed(seed))
        if T == 1:  # one step: the marked value itself; both markers fall on it
            x, y = x[:, :1].clone(), 2 * x[:, 0, 0]
            x[:, 0, 1] = 1.0
        curve[T] = initial_state_grad_norm(model, x, y).square().mean().sqrt().item()
    return curve


def decades_per_step(curve: dict[int, float]) -> float:
    """The least-squares slope of log10(norm) against T, negated: how many orders of magnitude
    the gradient loses per step (0: constant; lengths whose norm is 0 are left out)."""
    points = [(T, math.log10(v)) for T, v in curve.items() if v > 0]
    if len(points) < 2:
        return math.nan
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return -cov / var
