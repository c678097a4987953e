"""Tagging sequences from a known HMM whose ambiguous tags are resolved by a later token.

The hidden chain: a background state O (tag O) emits one of four ordinary words and, with
probability ``p_ambiguous``, moves to one of two branches b = 0, 1 (a fair coin). A branch emits
the ambiguous word ``x`` (tag X0 or X1: the same word for both, so nothing on the left tells
them apart), then ``resolve_distance - 1`` filler steps that emit ordinary words (tag O), then a
resolver (tag R0 or R1) that emits the word r_b, or with probability ``noise`` the other
branch's word; then back to O. A left-to-right tagger can only guess X0 against X1; a tagger
that sees the resolver, ``resolve_distance`` steps to the right, gets it right with 1 - noise.

Both Bayes bounds are exact: :meth:`HMMTaggingTask.bayes_accuracy` runs forward filtering
(argmax p(tag_t | x_1..t)) and forward-backward smoothing (argmax p(tag_t | x_1..T)) on given
inputs, and scores each position by the probability that its argmax is right (max_k p(k | ...)),
which is the expected accuracy of the Bayes-optimal tagger on those inputs.

Dimension legend: N sequences, T steps, S hidden states, W words, K tags.
Words: 0..3 ordinary, 4 the ambiguous x, 5 r0, 6 r1. Tags: 0 O, 1 X0, 2 X1, 3 R0, 4 R1.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import Task, register

N_ORDINARY = 4
TAG_NAMES = ("O", "X0", "X1", "R0", "R1")


class HMM:
    """A discrete HMM with a tag for every state, and its exact posteriors over tags.

    Args:
        initial: ``(S,)`` p(s_1). transition: ``(S, S)`` p(s_{t+1} | s_t).
        emission: ``(S, W)`` p(x_t | s_t). tag_of_state: ``(S,)`` long, the tag of each state.
    """

    def __init__(self, initial: Tensor, transition: Tensor, emission: Tensor, tag_of_state: Tensor):
        self.initial = initial.double()
        self.transition = transition.double()
        self.emission = emission.double()
        self.tag_of_state = tag_of_state
        self.n_tags = int(tag_of_state.max()) + 1
        self.tag_matrix = F.one_hot(tag_of_state, self.n_tags).double()  # (S, K)

    def sample(self, n: int, T: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` sequences of words and tags, ``(N, T)`` each."""
        words = torch.empty(n, T, dtype=torch.long)
        states = torch.empty(n, T, dtype=torch.long)
        s = torch.multinomial(self.initial.expand(n, -1), 1, generator=generator).squeeze(1)
        for t in range(T):
            if t:
                s = torch.multinomial(self.transition[s], 1, generator=generator).squeeze(1)
            states[:, t] = s
            words[:, t] = torch.multinomial(self.emission[s], 1, generator=generator).squeeze(1)
        return words, self.tag_of_state[states]

    def posteriors(self, words: Tensor) -> tuple[Tensor, Tensor]:
        """``(filtered, smoothed)``, ``(N, T, K)`` each: p(tag_t | x_1..t) and p(tag_t | x_1..T),
        by the scaled forward-backward recursions."""
        n, T = words.shape
        like = self.emission.T[words]  # (N, T, S) p(x_t | s)
        alpha = torch.empty(n, T, len(self.initial), dtype=torch.float64)
        a = self.initial * like[:, 0]
        alpha[:, 0] = a / a.sum(-1, keepdim=True)
        for t in range(1, T):
            a = (alpha[:, t - 1] @ self.transition) * like[:, t]
            alpha[:, t] = a / a.sum(-1, keepdim=True)
        beta = torch.ones_like(alpha)
        for t in range(T - 2, -1, -1):
            b = (beta[:, t + 1] * like[:, t + 1]) @ self.transition.T
            beta[:, t] = b / b.sum(-1, keepdim=True)
        gamma = alpha * beta
        gamma = gamma / gamma.sum(-1, keepdim=True)
        return alpha @ self.tag_matrix, gamma @ self.tag_matrix


@register
class HMMTaggingTask(Task):
    name = "hmm_tagging"
    metric = "acc"
    higher_is_better = True
    vocab_size = N_ORDINARY + 3
    output_size = len(TAG_NAMES)
    per_step = True

    def __init__(
        self,
        seq_len: int = 40,
        resolve_distance: int = 4,
        p_ambiguous: float = 0.2,
        noise: float = 0.05,
    ) -> None:
        super().__init__(seq_len)
        if resolve_distance < 1:
            raise ValueError(f"resolve_distance={resolve_distance} is not allowed: an integer >= 1")
        self.resolve_distance = resolve_distance
        self.hmm = self._build(resolve_distance, p_ambiguous, noise)

    @staticmethod
    def _build(d: int, p_ambiguous: float, noise: float) -> HMM:
        S = 1 + 2 * (d + 1)  # O, then per branch: x, d - 1 fillers, the resolver
        transition = torch.zeros(S, S, dtype=torch.float64)
        emission = torch.zeros(S, N_ORDINARY + 3, dtype=torch.float64)
        tags = torch.zeros(S, dtype=torch.long)
        transition[0, 0] = 1 - p_ambiguous
        emission[0, :N_ORDINARY] = 1 / N_ORDINARY
        for b in range(2):
            first = 1 + b * (d + 1)  # the ambiguous state; first + d is the resolver
            transition[0, first] = p_ambiguous / 2
            for j in range(d):
                transition[first + j, first + j + 1] = 1.0
            transition[first + d, 0] = 1.0
            emission[first, N_ORDINARY] = 1.0
            emission[first + 1 : first + d, :N_ORDINARY] = 1 / N_ORDINARY
            emission[first + d, N_ORDINARY + 1 + b] = 1 - noise
            emission[first + d, N_ORDINARY + 2 - b] = noise
            tags[first], tags[first + d] = 1 + b, 3 + b
        initial = F.one_hot(torch.tensor(0), S).double()
        return HMM(initial, transition, emission, tags)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.hmm.sample(n, self.seq_len, generator)  # words (N, T), tags (N, T)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.flatten(0, 1).float(), y.flatten())

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        right = out.argmax(-1) == y  # (N, T)
        ambiguous = (y == 1) | (y == 2)
        return {
            "acc": right.float().mean().item(),
            "acc_ambiguous": (right[ambiguous].float().mean().item() if ambiguous.any() else float("nan")),
            "ce": self.loss(out, y).item(),
        }

    def bayes_accuracy(self, words: Tensor) -> dict[str, float]:
        """Expected accuracy of the Bayes-optimal filtering and smoothing taggers on ``words``
        (overall, and at the X0/X1 positions, which are found from the inputs: word x)."""
        filtered, smoothed = self.hmm.posteriors(words)
        ambiguous = words == N_ORDINARY
        result = {}
        for name, post in (("filter", filtered), ("smooth", smoothed)):
            best = post.amax(-1)  # (N, T) the probability that the argmax is right
            result[f"{name}_acc"] = best.mean().item()
            result[f"{name}_acc_ambiguous"] = best[ambiguous].mean().item()
        return result

    @cached_property
    def _tag_marginals(self) -> Tensor:
        """``(K,)`` the expected fraction of each tag over the T positions."""
        law, total = self.hmm.initial, torch.zeros(self.hmm.n_tags, dtype=torch.float64)
        for _ in range(self.seq_len):
            total += law @ self.hmm.tag_matrix
            law = law @ self.hmm.transition
        return total / self.seq_len

    def baseline(self) -> dict[str, float]:
        # Always the most frequent tag (O), which scores 0 on X positions; the cross-entropy of
        # always predicting the tag frequencies q is their entropy H(q).
        q = self._tag_marginals
        ce = -(q * torch.where(q > 0, q.log(), 0.0)).sum().item()
        return {"acc": q.max().item(), "acc_ambiguous": 0.0, "ce": ce}
