"""Embedded Reber grammar, next-symbol prediction (Hochreiter & Schmidhuber 1997, experiment 1).

A string is B, then T or P, then a whole Reber string (B ... E), then the same T or P again,
then E; e.g. ``BTBTSSXXTVVETE``. The Reber automaton is deterministic, so the prefix fixes the
state and every choice between its two outgoing symbols is a fair coin: the Bayes-optimal
predictor puts probability 1/2 on each legal symbol at a branch and 1 on the only legal one
elsewhere. Its loss on any string is known exactly (one bit per branch), so we report bits per
symbol *above* that optimum. The hard part is the long-range one: the symbol before the last E
repeats the second symbol, across the whole embedded string.

Inputs ``(N, T)`` are the first ``seq_len`` symbols, right-padded with token 0; the target at
step t is symbol t + 1 (``IGNORE`` where there is none). Strings longer than ``seq_len`` are cut:
a cut removes positions from scoring but leaves the distribution of every scored next symbol
unchanged, so the optimum stays exact.

Tokens: 0 pad, then B T P S X V E as 1..7; outputs are the 7 symbols, B as class 0.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import Task, register

SYMBOLS = "BTPSXVE"
IGNORE = -100
# The Reber automaton: state -> [(symbol, next state), ...], each choice with equal probability.
# State 0 emits the inner B; state 6 the inner E; -1 means "the inner string is over".
REBER = {
    0: [("B", 1)],
    1: [("T", 2), ("P", 3)],
    2: [("S", 2), ("X", 4)],
    3: [("T", 3), ("V", 5)],
    4: [("X", 3), ("S", 6)],
    5: [("P", 4), ("V", 6)],
    6: [("E", -1)],
}


def embedded_automaton() -> tuple[Tensor, Tensor]:
    """The embedded grammar as tables over its 19 states (0 start, 18 done):
    ``prob[s, k]`` the probability that state s emits symbol k, ``nxt[s, k]`` the state after."""
    names = ["start", "branch"] + [f"{b}{s}" for b in "TP" for s in [*REBER, "after"]] + ["end", "done"]
    index = {name: i for i, name in enumerate(names)}
    edges: dict[str, list[tuple[str, str]]] = {
        "start": [("B", "branch")],
        "branch": [("T", "T0"), ("P", "P0")],
        "end": [("E", "done")],
        "done": [],
    }
    for b in "TP":
        for s, out in REBER.items():
            edges[f"{b}{s}"] = [(sym, f"{b}{t}" if t >= 0 else f"{b}after") for sym, t in out]
        edges[f"{b}after"] = [(b, "end")]
    prob = torch.zeros(len(names), len(SYMBOLS), dtype=torch.float64)
    nxt = torch.full((len(names), len(SYMBOLS)), index["done"], dtype=torch.long)
    for name, out in edges.items():
        for sym, target in out:
            prob[index[name], SYMBOLS.index(sym)] = 1 / len(out)
            nxt[index[name], SYMBOLS.index(sym)] = index[target]
    return prob, nxt


@register
class ReberTask(Task):
    name = "reber"
    metric = "excess_bits"
    higher_is_better = False
    vocab_size = len(SYMBOLS) + 1
    output_size = len(SYMBOLS)
    per_step = True
    acc_means = "share of strings with the legal symbols ranked highest at every step"

    def __init__(self, seq_len: int = 60) -> None:
        super().__init__(seq_len)
        self.prob, self.next_state = embedded_automaton()  # (S, 7) each

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        T = self.seq_len
        symbols = torch.full((n, T + 1), IGNORE, dtype=torch.long)  # class ids, B = 0
        state = torch.zeros(n, dtype=torch.long)
        done = len(self.prob) - 1
        for t in range(T + 1):
            live = state != done
            if not live.any():
                break
            k = torch.multinomial(self.prob[state[live]], 1, generator=generator).squeeze(1)
            symbols[live, t] = k
            state[live] = self.next_state[state[live], k]
        x = torch.where(symbols[:, :T] == IGNORE, 0, symbols[:, :T] + 1)  # (N, T), 0 = pad
        return x, symbols[:, 1:]  # (N, T), (N, T)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)

    def optimal_probs(self, y: Tensor) -> Tensor:
        """``(N, T, 7)``: the exact next-symbol distribution at every step, from the targets
        (the prefix before target t is B followed by targets 0..t-1)."""
        n, T = y.shape
        state = self.next_state[0, 0].expand(n).clone()  # after the leading B
        probs = torch.empty(n, T, len(SYMBOLS), dtype=torch.float64)
        for t in range(T):
            probs[:, t] = self.prob[state]
            state = self.next_state[state, y[:, t].clamp(min=0)]
        return probs

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        scored = y != IGNORE  # (N, T)
        target = y.clamp(min=0)[..., None]
        model_bits = -out.double().log_softmax(-1).gather(-1, target).squeeze(-1) / math.log(2)
        probs = self.optimal_probs(y)  # (N, T, 7)
        best_bits = torch.where(scored, -probs.gather(-1, target).squeeze(-1).log2(), 0.0)
        count = scored.sum()
        bits = (model_bits * scored).sum() / count
        optimum = (best_bits * scored).sum() / count
        # The paper's criterion: at every step the legal symbols get the highest outputs.
        legal = probs > 0
        lowest_legal = out.masked_fill(~legal, math.inf).amin(-1)
        highest_illegal = out.masked_fill(legal, -math.inf).amax(-1)
        step_ok = (lowest_legal > highest_illegal) | ~scored
        return {
            "excess_bits": (bits - optimum).item(),
            "bits": bits.item(),
            "optimal_bits": optimum.item(),
            "acc": step_ok.all(1).float().mean().item(),
        }

    def expected_optimal_bits(self) -> float:
        """The optimum's bits per scored symbol in expectation over strings cut at ``seq_len``
        (total expected bits / total expected scored symbols), by propagating the state law."""
        law = torch.zeros(len(self.prob), dtype=torch.float64)
        law[self.next_state[0, 0]] = 1.0  # after the leading B, the first input
        p = self.prob
        entropy = -(p * torch.where(p > 0, p.log2(), 0.0)).sum(1)  # (S,) bits per emission
        bits = scored = 0.0
        for _ in range(self.seq_len):
            bits += (law * entropy).sum().item()
            scored += (law * p.sum(1)).sum().item()  # "done" emits nothing and is not scored
            law = torch.zeros_like(law).index_add_(0, self.next_state.flatten(), (law[:, None] * p).flatten())
        return bits / scored

    @cached_property
    def _optimum(self) -> float:
        return self.expected_optimal_bits()

    def baseline(self) -> dict[str, float]:
        # Uniform guesses over the 7 symbols: log2(7) bits, never ranks the legal set first.
        uniform = math.log2(len(SYMBOLS))
        return {
            "excess_bits": uniform - self._optimum,
            "bits": uniform,
            "optimal_bits": self._optimum,
            "acc": 0.0,
        }
