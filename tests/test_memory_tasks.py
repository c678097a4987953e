"""The memory tasks: temporal_order, reber, hmm_tagging. Layout, determinism, the
trivial baselines against their formulas, and the exact optima against brute force."""

import itertools
import math
import re

import pytest
import torch

from lstmlab.runner.tasks import make_task
from lstmlab.runner.tasks.hmm_tagging import HMM
from lstmlab.runner.tasks.reber import IGNORE, SYMBOLS


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("name", "options"), [
    ("temporal_order", {"n_relevant": 2}),
    ("temporal_order", {"n_relevant": 3}),
    ("reber", {}),
    ("hmm_tagging", {"resolve_distance": 7}),
])  # fmt: skip
def test_sampling_is_deterministic_per_seed(name, options):
    task = make_task(name, **options)
    a, b, c = task.sample(16, gen(5)), task.sample(16, gen(5)), task.sample(16, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ---- temporal order


@pytest.mark.parametrize("n_relevant", [2, 3])
def test_temporal_order_follows_the_paper(n_relevant):
    task = make_task("temporal_order", n_relevant=n_relevant)  # seq_len 110: the paper's numbers
    x, y = task.sample(2000, gen(1))
    assert x.shape == (2000, 110) and y.shape == (2000,) and task.output_size == 2**n_relevant
    windows = {2: [(10, 20), (50, 60)], 3: [(10, 20), (33, 43), (66, 76)]}[n_relevant]  # 1-based
    lengths = []
    for row, label in zip(x, y, strict=True):
        seq = row[row != 0]  # left padding removed
        lengths.append(len(seq))
        assert seq[0] == 5 and seq[-1] == 6 and ((seq[1:-1] >= 1) & (seq[1:-1] <= 8)).all()
        where = ((seq == 7) | (seq == 8)).nonzero().flatten() + 1  # 1-based positions of X/Y
        assert len(where) == n_relevant
        assert all(lo <= t <= hi for t, (lo, hi) in zip(where.tolist(), windows, strict=True))
        bits = (seq[where - 1] == 8).long()  # X 0, Y 1, read as a binary number
        assert int((bits * 2 ** torch.arange(n_relevant - 1, -1, -1)).sum()) == label
    assert min(lengths) == 100 and max(lengths) == 110


def test_temporal_order_baseline_is_chance():
    task = make_task("temporal_order", n_relevant=3)
    _, y = task.sample(40_000, gen(2))
    freq = torch.bincount(y, minlength=8).float() / len(y)
    torch.testing.assert_close(freq, torch.full((8,), 1 / 8), atol=6e-3, rtol=0)
    majority = torch.zeros(len(y), 8)
    majority[:, int(freq.argmax())] = 1.0
    measured = task.metrics(majority, y)
    assert measured["acc"] == pytest.approx(task.baseline()["acc"], abs=6e-3)
    assert task.metrics(torch.zeros(len(y), 8), y)["ce"] == pytest.approx(math.log(8))
    assert task.baseline() == {"acc": 1 / 8, "ce": math.log(8)}


def test_temporal_order_rejects_bad_options():
    with pytest.raises(ValueError, match="n_relevant=4 is not allowed"):
        make_task("temporal_order", n_relevant=4)
    with pytest.raises(ValueError, match="seq_len=5 is too short"):
        make_task("temporal_order", seq_len=5)


# ---- embedded Reber grammar

_AFTER_X = "(XT*VP)*(S|XT*VV)"  # from the state after the first X: loops back through T*V P
REBER_RE = f"B(TS*X{_AFTER_X}|PT*V(V|P{_AFTER_X}))E"
EMBEDDED_RE = re.compile(f"B(T{REBER_RE}T|P{REBER_RE}P)E")


def _strings(x: torch.Tensor) -> list[str]:
    return ["".join(SYMBOLS[k - 1] for k in row.tolist() if k) for row in x]


def test_reber_strings_are_in_the_grammar():
    task = make_task("reber", seq_len=80)
    x, y = task.sample(3000, gen(3))
    assert x.shape == y.shape == (3000, 80) and task.vocab_size == 8 and task.output_size == 7
    complete = [s for s in _strings(x) if s.endswith("E") and len(s) < 80]
    assert len(complete) > 2900
    assert all(EMBEDDED_RE.fullmatch(s) for s in complete)
    assert {s[1] for s in complete} == {"T", "P"} and {s[3] for s in complete} == {"T", "P"}
    # The target is the input shifted by one; the padding and the final E are not scored.
    scored = y != IGNORE
    torch.testing.assert_close(y[:, :-1][scored[:, :-1]], x[:, 1:][scored[:, :-1]] - 1)
    assert (scored.sum(1) == (x != 0).sum(1) - 1).float().mean() > 0.97


def test_reber_cut_strings_are_scored_to_the_end():
    task = make_task("reber", seq_len=12)
    x, y = task.sample(500, gen(4))
    full = (x != 0).all(1)  # strings of 12 symbols or more
    whole = torch.tensor([EMBEDDED_RE.fullmatch(s) is not None for s in _strings(x)])
    cut = full & ~whole
    assert cut.any() and (y[cut] != IGNORE).all()  # a cut string is scored at every step
    assert (y[full & whole, -1] == IGNORE).all()  # one of exactly 12: its last E is not


def test_reber_optimum_is_exact_and_uniform_is_the_baseline():
    task = make_task("reber")
    _, y = task.sample(5000, gen(5))
    probs = task.optimal_probs(y)  # (N, T, 7)
    scored = y != IGNORE
    legal_target = probs.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    assert (legal_target[scored] > 0).all()  # every sampled symbol is legal in its state
    # Bayes-optimal outputs: zero excess bits; the paper's criterion holds on every string.
    best = task.metrics(probs.clamp(min=1e-30).log(), y)
    assert best["excess_bits"] == pytest.approx(0.0, abs=1e-9) and best["acc"] == 1.0
    assert best["optimal_bits"] == pytest.approx(task.baseline()["optimal_bits"], abs=0.01)
    uniform = task.metrics(torch.zeros(*y.shape, 7), y)
    assert uniform["bits"] == pytest.approx(math.log2(7))
    assert uniform["excess_bits"] == pytest.approx(task.baseline()["excess_bits"], abs=0.01)
    assert uniform["acc"] == task.baseline()["acc"] == 0.0


def test_reber_expected_optimum_by_hand():
    # Uncut, a string has 2 + n_inner + 2 scored steps (after the first B) and one bit per
    # branch; a long cut keeps the ratio E[bits] / E[steps] of the uncut strings.
    task = make_task("reber", seq_len=200)
    _, y = task.sample(5000, gen(6))
    scored = (y != IGNORE).sum()
    bits = -task.optimal_probs(y).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1).log2()
    empirical = bits[y != IGNORE].sum() / scored
    assert task.expected_optimal_bits() == pytest.approx(empirical.item(), rel=0.02)


# ---- HMM tagging and its Bayes bounds


def _brute_force_posteriors(hmm: HMM, T: int, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p(tag_t | x_1..t) and p(tag_t | x_1..T) by summing over every state path and every
    continuation of the words."""
    S, W = hmm.emission.shape
    paths = torch.tensor(list(itertools.product(range(S), repeat=T)))  # (S^T, T)
    all_x = torch.tensor(list(itertools.product(range(W), repeat=T)))  # (W^T, T)
    p_path = hmm.initial[paths[:, 0]] * hmm.transition[paths[:, :-1], paths[:, 1:]].prod(1)
    p_x = hmm.emission[paths[:, None, :], all_x[None, :, :]].prod(-1)  # (S^T, W^T)
    joint = p_path[:, None] * p_x
    tags = hmm.tag_of_state[paths]  # (S^T, T)
    filtered = torch.zeros(len(words), T, hmm.n_tags, dtype=torch.float64)
    smoothed = torch.zeros_like(filtered)
    for n, w in enumerate(words):
        for t in range(T):
            prefix = (all_x[:, : t + 1] == w[: t + 1]).all(1)  # the continuations of x_1..t
            whole = (all_x == w).all(1)
            for k in range(hmm.n_tags):
                on = tags[:, t] == k
                filtered[n, t, k] = joint[on][:, prefix].sum()
                smoothed[n, t, k] = joint[on][:, whole].sum()
    return filtered / filtered.sum(-1, keepdim=True), smoothed / smoothed.sum(-1, keepdim=True)


def test_bayes_bounds_match_brute_force_on_a_tiny_hmm():
    task = make_task("hmm_tagging", seq_len=4, resolve_distance=1, p_ambiguous=0.5, noise=0.2)
    words, _ = task.sample(12, gen(7))
    filtered, smoothed = task.hmm.posteriors(words)
    bf_filtered, bf_smoothed = _brute_force_posteriors(task.hmm, 4, words)
    torch.testing.assert_close(filtered, bf_filtered)
    torch.testing.assert_close(smoothed, bf_smoothed)
    bounds = task.bayes_accuracy(words)
    assert bounds["filter_acc"] == pytest.approx(bf_filtered.amax(-1).mean().item())
    assert bounds["smooth_acc"] == pytest.approx(bf_smoothed.amax(-1).mean().item())


def test_forward_backward_matches_brute_force_on_a_random_hmm():
    g = gen(8)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    normalise = lambda p: p / p.sum(-1, keepdim=True)  # noqa: E731
    hmm = HMM(normalise(rand(3)), normalise(rand(3, 3)), normalise(rand(3, 3)), torch.tensor([0, 0, 1]))
    words = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0], [1, 0, 1, 2]])
    for mine, brute in zip(hmm.posteriors(words), _brute_force_posteriors(hmm, 4, words), strict=True):
        torch.testing.assert_close(mine, brute)


def test_hmm_tagging_layout_bounds_and_baseline():
    d = 6
    task = make_task("hmm_tagging", seq_len=40, resolve_distance=d, noise=0.1)
    x, y = task.sample(2000, gen(9))
    assert x.shape == y.shape == (2000, 40) and task.vocab_size == 7 and task.output_size == 5
    assert torch.equal(x == 4, (y == 1) | (y == 2))  # the ambiguous word marks X0/X1
    ambiguous = ((y == 1) | (y == 2))[:, :-d].nonzero()
    resolver = y[ambiguous[:, 0], ambiguous[:, 1] + d]  # the tag d steps later: R of the branch
    assert torch.equal(resolver, y[ambiguous[:, 0], ambiguous[:, 1]] + 2)
    bounds = task.bayes_accuracy(x)
    assert bounds["filter_acc_ambiguous"] == pytest.approx(0.5)  # the left says nothing
    assert bounds["smooth_acc"] > bounds["filter_acc"]
    _, smoothed = task.hmm.posteriors(x)
    seen = smoothed[ambiguous[:, 0], ambiguous[:, 1]].amax(-1)  # the resolver is in the sequence
    torch.testing.assert_close(seen, torch.full_like(seen, 0.9))  # 1 - noise
    # The baseline: always O, whose expected frequency comes from the chain's state law.
    freq_o = (y == 0).float().mean().item()
    assert task.baseline()["acc"] == pytest.approx(freq_o, abs=5e-3)
    always_o = torch.zeros(*y.shape, 5)
    always_o[..., 0] = 1.0
    assert task.metrics(always_o, y)["acc"] == pytest.approx(freq_o)
    q = torch.bincount(y.flatten(), minlength=5).double() / y.numel()
    ce = task.metrics(q.log().float().expand(*y.shape, 5), y)["ce"]
    assert ce == pytest.approx(task.baseline()["ce"], abs=0.01)
