"""The synthetic tasks: data layout, targets, and the trivial baselines they report."""

import math

import pytest
import torch

from lstmlab.runner.tasks import TASKS, derive_seed, make_task


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_names_tasks_and_rejects_unknown():
    assert {"adding", "copy"} <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known tasks: adding, .*copy"):
        make_task("nope", seq_len=10)


def test_derive_seed_is_stable_and_separates_streams():
    assert derive_seed(0, "train", 5) == derive_seed(0, "train", 5)
    assert len({derive_seed(0, "train", s) for s in range(100)} | {derive_seed(0, "val")}) == 101
    assert 0 <= derive_seed(1, "x") < 2**63


def test_adding_layout_and_target():
    task = make_task("adding", seq_len=11)
    x, y = task.sample(256, gen())  # (N, T, 2), (N,)
    assert x.shape == (256, 11, 2) and y.shape == (256,)
    values, marker = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert (marker.sum(1) == 2).all()
    assert (marker[:, :5].sum(1) == 1).all() and (marker[:, 5:].sum(1) == 1).all()
    torch.testing.assert_close(y, (values * marker).sum(1))


def test_adding_baseline_matches_predicting_one():
    task = make_task("adding", seq_len=20)
    _, y = task.sample(200_000, gen(1))
    ones = torch.ones(len(y), 1)
    measured, expected = task.metrics(ones, y), task.baseline()
    assert expected["mse"] == pytest.approx(1 / 6)
    assert measured["mse"] == pytest.approx(expected["mse"], abs=3e-3)
    assert measured["acc"] == pytest.approx(expected["acc"], abs=3e-3)
    assert task.metrics(y[:, None], y) == {"mse": 0.0, "acc": 1.0}


def test_copy_layout_and_target():
    task = make_task("copy", seq_len=7, n_symbols=8, copy_len=10)
    x, y = task.sample(64, gen())  # (N, T + 20) each
    assert x.shape == y.shape == (64, 27) and task.total_len == 27
    symbols = x[:, :10]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (x[:, 10:16] == 0).all()  # T - 1 = 6 blanks
    assert (x[:, 16] == 9).all()  # the delimiter
    assert (x[:, 17:] == 0).all()  # 10 blanks while the answer is given
    assert (y[:, :17] == 0).all() and torch.equal(y[:, 17:], symbols)
    assert task.vocab_size == 10 and task.output_size == 9


def test_copy_baseline_is_blanks_then_uniform_guesses():
    T, L, S = 30, 10, 8
    task = make_task("copy", seq_len=T)
    _, y = task.sample(512, gen(2))
    # The best memoryless answer: certain blanks, then uniform over the S symbols.
    logits = torch.full((512, T + 2 * L, S + 1), -1e4)
    logits[:, : T + L, 0] = 0.0
    logits[:, T + L :, 1:] = 0.0
    measured = task.metrics(logits, y)
    assert task.baseline()["ce"] == pytest.approx(10 * math.log(8) / (T + 20))
    assert measured["ce"] == pytest.approx(task.baseline()["ce"], rel=1e-5)
    assert task.baseline()["acc"] == 0.125
    perfect = torch.nn.functional.one_hot(y, S + 1).float() * 50
    assert task.metrics(perfect, y)["acc"] == 1.0


@pytest.mark.parametrize("name", sorted(n for n, cls in TASKS.items() if not cls.fixed_splits))
def test_sampling_is_a_function_of_the_generator_seed(name):
    task = make_task(name, seq_len=12)
    a, b = task.sample(8, gen(3)), task.sample(8, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = task.sample(8, gen(4))
    assert not torch.equal(a[0], c[0])
