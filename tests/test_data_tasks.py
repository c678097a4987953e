"""The data set tasks: loading (shapes, checksums, disjoint splits), the forecasting
metrics against hand-computed values, the classical baselines on exactly the networks' windows,
and each task through the runner. Tests that need ``lstmlab[data]`` skip without it."""

import math
import sys

import numpy as np
import pytest
import torch

from lstmlab.runner.config import ConfigError, compose
from lstmlab.runner.tasks import TASKS, make_task
from lstmlab.runner.tasks.charlm import ALPHABET, VOCAB_SIZE, corpus_files, decode, encode, split_of
from lstmlab.runner.tasks.dataset import array_digest
from lstmlab.runner.tasks.forecast import forecast_errors, mase_scale
from lstmlab.runner.train import train

SMALL = [
    "experiment=single",
    "trainer.num_threads=1",
    "logger=none",
    "model.hidden_size=16",
    "trainer.device=cpu",
]


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_data_tasks_are_registered_with_fixed_splits():
    for name in ("mnist1d", "digits", "forecast", "charlm"):
        assert TASKS[name].fixed_splits
    assert not TASKS["adding"].fixed_splits
    with pytest.raises(NotImplementedError, match="generates its data"):
        make_task("adding", seq_len=10).split("test")


# ---- digits


def test_digits_shapes_checksums_and_disjoint_splits():
    pytest.importorskip("sklearn")
    from lstmlab.runner.tasks.digits import load_digits_arrays

    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert array_digest(images) == "5e2c1f01e6455cd4" and array_digest(labels) == "d6c917d2ef199a11"
    task = make_task("digits", seq_len=8)
    sizes = {s: len(task.split(s)[0]) for s in ("train", "val", "test")}
    assert sizes == {"train": 1258, "val": 180, "test": 359}
    assert task.split("train")[0].shape[1:] == (8, 8) and task.input_size == 8
    # Every image lands in exactly one split: together they are the data set, pixel for pixel.
    together = torch.cat([task.split(s)[0] for s in ("train", "val", "test")]).flatten(1)
    expected = torch.from_numpy(images.reshape(1797, 64) / 16).float()
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, expected.tolist()))
    pixels = make_task("digits", seq_len=64)
    assert pixels.split("test")[0].shape == (359, 64, 1)
    assert torch.equal(pixels.split("test")[0].flatten(1), task.split("test")[0].flatten(1))
    with pytest.raises(ValueError, match="seq_len must be 8"):
        make_task("digits", seq_len=10)


# ---- MNIST-1D


@pytest.fixture(scope="module")
def mnist1d_task():
    pytest.importorskip("mnist1d")
    return make_task("mnist1d")


def test_mnist1d_is_generated_without_network_access(monkeypatch):
    pytest.importorskip("mnist1d")
    import socket

    from lstmlab.runner.tasks.mnist1d import generate_mnist1d

    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("requests.get", refuse)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    data = generate_mnist1d()
    assert np.array_equal(np.random.get_state()[1], before)  # the global RNG is left alone
    digests = {k: array_digest(v) for k, v in data.items()}
    assert digests == {
        "x": "0b4008bf87158657",
        "y": "57920b9314eacbbf",
        "x_test": "d54f303324fafbdc",
        "y_test": "16ca7bc6f59d11f5",
    }


def test_mnist1d_splits(mnist1d_task):
    (xt, yt), (xv, _), (xs, ys) = (mnist1d_task.split(s) for s in ("train", "val", "test"))
    assert xt.shape == (3600, 40, 1) and xv.shape == (400, 40, 1) and xs.shape == (1000, 40, 1)
    assert yt.shape == (3600,) and set(yt.unique().tolist()) == set(range(10))
    assert not rows(xt) & rows(xv) and not rows(xt) & rows(xs) and not rows(xv) & rows(xs)
    assert mnist1d_task.baseline()["acc"] == pytest.approx((ys == yt.bincount().argmax()).float().mean())


# ---- forecasting: data, metrics, windows, baselines


def test_forecast_series_checksums():
    pytest.importorskip("statsmodels")
    from lstmlab.runner.tasks.forecast import load_series

    expected = {
        "sunspots": (309, "a275d2252abd8495"),
        "co2": (2284, "ccbeffff9c7ea28f"),
        "nile": (100, "14b01fabbecc24a5"),
    }
    for name, (n, digest) in expected.items():
        y = load_series(name)
        assert len(y) == n and np.isfinite(y).all() and array_digest(y) == digest


def test_mase_smape_rmse_against_hand_computed_values():
    train = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    assert mase_scale(train, 1) == pytest.approx((2 + 1 + 3 + 1) / 4)  # 1.75
    assert mase_scale(train, 2) == pytest.approx((1 + 2 + 2) / 3)
    forecast = np.array([[4.0, 6.0], [5.0, 5.0]])
    actual = np.array([[5.0, 4.0], [5.0, 7.0]])
    m = forecast_errors(forecast, actual, scale=1.75)
    assert m["mase"] == pytest.approx((1 + 2 + 0 + 2) / 4 / 1.75)
    assert m["mase_h1"] == pytest.approx((1 + 0) / 2 / 1.75)
    assert m["mse"] == pytest.approx((1 + 4 + 0 + 4) / 4)
    assert m["smape"] == pytest.approx(100 * (2 / 9 + 4 / 10 + 0 + 4 / 12) / 4)
    assert forecast_errors(np.zeros((1, 1)), np.zeros((1, 1)), 1.0)["smape"] == 0.0  # 0/0 counts as 0


@pytest.fixture(scope="module")
def nile():
    pytest.importorskip("statsmodels")
    return make_task("forecast", series="nile", seq_len=20)


def test_forecast_windows_are_disjoint_in_time_and_hold_their_split(nile):
    val_start, test_start = nile.bounds
    assert (val_start, test_start) == (60, 80) and nile.horizon == 10 and nile.period == 1
    spans = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, 100)}
    for name, (first, end) in spans.items():
        t = nile.origins(name)
        targets = t[:, None] + np.arange(1, 11)
        # Targets fill the split (train's first ones wait for a full context of 20).
        assert targets.min() == max(first, 20) and targets.max() == end - 1
        x, y = nile.split(name)
        assert x.shape == (len(t), 20, 2) and y.shape == (len(t), 10, 2)
        torch.testing.assert_close(y[..., 1], torch.from_numpy(nile.y[targets]))
        # The context ends at the origin: its relative channel is 0 there.
        assert (x[:, -1, 0] == 0).all()
    mean, s = nile.train_mean_std
    t = nile.origins("test")
    context = nile.y[t[:, None] + np.arange(-19, 1)]
    torch.testing.assert_close(nile.split("test")[0][..., 1], torch.from_numpy((context - mean) / s).float())


def test_network_metrics_are_the_raw_unit_metrics_of_its_forecasts(nile):
    x, y = nile.split("test")
    out = torch.randn(len(x), nile.horizon, generator=torch.Generator().manual_seed(0))
    s = nile.train_mean_std[1]
    last = nile.y[nile.origins("test")][:, None]
    forecast = last + s * out.double().numpy()
    assert nile.metrics(out, y) == pytest.approx(forecast_errors(forecast, nile.targets("test"), nile.scale))
    perfect = y[..., 0].float()
    assert nile.metrics(perfect, y)["mase"] == pytest.approx(0.0, abs=1e-5)


def test_seasonal_naive_by_hand():
    pytest.importorskip("statsmodels")
    from lstmlab.runner.tasks.forecast import seasonal_naive

    task = make_task("forecast", series="sunspots", seq_len=33)  # m = 11 = H
    t = task.origins("test")
    f = seasonal_naive(task)
    assert f.shape == (len(t), 11)
    for i in (0, len(t) - 1):
        assert np.array_equal(f[i], task.y[t[i] - 10 : t[i] + 1])  # y_{t+k-11}, k = 1..11
    assert task.baseline() == pytest.approx(forecast_errors(f, task.targets("test"), task.scale))
    short = make_task("forecast", series="sunspots", seq_len=33, horizon=13)  # k > m: two periods
    assert np.array_equal(seasonal_naive(short)[:, 11:], seasonal_naive(short)[:, :2])


@pytest.mark.parametrize("method", ["ARIMA", "ETS"])
def test_classical_forecasts_use_the_test_windows_and_only_the_past(nile, method):
    from lstmlab.runner.tasks import forecast as fc

    def run(task):
        if method == "ARIMA":
            return fc.arima_forecasts(task, orders=[(0, 1, 1)])[0]
        return fc.ets_forecasts(task)[0]

    f = run(nile)
    assert f.shape == nile.split("test")[1].shape[:2] == (len(nile.origins("test")), nile.horizon)
    # Change every value after the fifth test origin: forecasts from origins up to it must not move,
    # those after it must, so row i is the forecast from origin origins("test")[i].
    t5 = nile.origins("test")[4]
    future = make_task("forecast", series="nile", seq_len=20)
    future._y = nile.y.copy()
    future._y[t5 + 1 :] += 500.0
    g = run(future)
    np.testing.assert_allclose(g[:5], f[:5], rtol=1e-9)
    assert not np.allclose(g[5:], f[5:])


# ---- character language model


def test_charlm_corpus_split_by_file_and_encoding():
    files = corpus_files()
    assert files == sorted(files) and len(files) > 50
    names = {s: {f.name for i, f in enumerate(files) if split_of(i) == s} for s in ("train", "val", "test")}
    assert not names["train"] & names["val"] and not names["train"] & names["test"]
    assert not names["val"] & names["test"] and sum(map(len, names.values())) == len(files)
    assert len(names["val"]) == len(files) // 10 + (len(files) % 10 > 8)
    assert len(names["test"]) == len(files) // 10
    text = "def f(x):\n\treturn x  # ok\n"
    assert VOCAB_SIZE == 98 and decode(encode(text)) == text
    assert encode("é→").tolist() == [0, 0] and decode(encode(ALPHABET)) == ALPHABET


@pytest.fixture(scope="module")
def charlm():
    return make_task("charlm", seq_len=64, eval_chars=4096)


def test_charlm_chunks_and_bits_per_character(charlm):
    x, y = charlm.split("val")
    assert x.shape == y.shape == (64, 64)  # 4096 characters in chunks of 64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])
    uniform = torch.zeros(*y.shape, VOCAB_SIZE)
    assert charlm.metrics(uniform, y)["bpc"] == pytest.approx(math.log2(VOCAB_SIZE))
    assert 3 < charlm.baseline()["bpc"] < math.log2(VOCAB_SIZE)


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the corpus is the running Python's stdlib")
def test_charlm_checksums_on_python_3_11_7():
    task = make_task("charlm")
    digests = {s: array_digest(task.split(s)[0]) for s in ("train", "val", "test")}
    assert digests == {"train": "28d52ff2b3364e11", "val": "1e8e9586527a3bdb", "test": "a9ba4c1677a7c1d6"}


# ---- through the runner


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("digits", []),
        ("mnist1d", []),
        ("forecast_nile", ["trainer.batch_size=16"]),
        ("charlm", ["task.seq_len=32", "task.max_train_chars=20000", "task.eval_chars=2048"]),
    ],
)
def test_each_data_task_trains_through_the_runner(task, extra, tmp_path):
    needs = {"digits": "sklearn", "mnist1d": "mnist1d", "forecast_nile": "statsmodels"}
    if task in needs:
        pytest.importorskip(needs[task])
    cfg = compose([*SMALL, f"task={task}", "trainer.steps=20", "optim.lr=1e-2", *extra])
    summary = train(cfg, tmp_path)
    name = cfg.task.name
    assert summary["task"] == name and summary["metric"] == TASKS[name].metric
    assert all(math.isfinite(v) for v in summary["final"]["test"].values())
    assert summary["final"]["train_loss"] > 0
    if name == "charlm":
        from lstmlab.analysis.sample import generate, load_model

        text = generate(load_model(tmp_path), "import ", 40, temperature=1.0, seed=0)
        assert text.startswith("import ") and len(text) == 47
        assert generate(load_model(tmp_path), "import ", 40, 1.0, 0) == text


def test_fixed_split_tasks_refuse_a_train_size(tmp_path):
    pytest.importorskip("sklearn")
    with pytest.raises(
        ConfigError, match=r"task\.train_size=64 is not allowed: null: task 'digits' has fixed"
    ):
        train(compose([*SMALL, "task=digits", "task.train_size=64"]), tmp_path)
    assert list(tmp_path.iterdir()) == []
