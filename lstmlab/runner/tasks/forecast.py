"""Forecasting the series that statsmodels ships, by rolling origin, with classical baselines.

Series (``statsmodels.datasets``): ``sunspots`` (yearly sunspot numbers 1700-2008, 309 points),
``co2`` (weekly Mauna Loa CO2 1958-2001, 2,284 points; its 59 gaps interpolated linearly) and
``nile`` (yearly Nile flow at Aswan 1871-1970, 100 points). Each has a period m, used by the
seasonal naive forecast and the MASE scale, and a default horizon H of one season: sunspots
m = 11 (the solar cycle, approximately), H = 11; co2 m = 52, H = 52; nile has no season, m = 1
(naive), H = 10.

Splits by time: the first 60% of the series is train, the next 20% val, the last 20% test. An
origin t is the index of the last observation a forecast may use; its window has the context
``y[t-L+1 .. t]`` (L = seq_len) and the targets ``y[t+1 .. t+H]``. A window belongs to the split
that holds all of its targets (contexts may reach back into earlier splits: that is what was
observed at the origin). Every origin of the test split is scored: rolling-origin evaluation
with the model's parameters fitted once, on the train split (Tashman 2000, "without
recalibration"), for the networks and the classical models alike.

Network input ``(N, L, 2)``: ``(y - y_t) / s`` and ``(y - mean) / s``, with mean and s the train
split's mean and standard deviation. Output ``(N, H)``: ``(y_{t+k} - y_t) / s`` for k = 1..H, so
a forecast is ``y_t + s * out``. Target ``(N, H, 2)``: that normalised value and the raw one.

Metrics over all windows and leads 1..H (``mase``, the primary; ``smape`` in percent; ``mse``, so
RMSE = sqrt(mse)) and at lead 1 (``mase_h1``). MASE divides by the mean absolute m-step change
over the train split (Hyndman & Koehler 2006), the same constant for every method.

Dimension legend: N windows, L context length, H horizon, n series length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.runner.tasks.base import register
from lstmlab.runner.tasks.dataset import DatasetTask

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train, val, test, by time


@dataclass(frozen=True)
class SeriesSpec:
    period: int  # m: seasonal naive and the MASE scale
    horizon: int  # the default H
    description: str


SERIES = {
    "sunspots": SeriesSpec(11, 11, "yearly sunspot numbers 1700-2008"),
    "co2": SeriesSpec(52, 52, "weekly Mauna Loa CO2 (ppm) 1958-2001, gaps interpolated"),
    "nile": SeriesSpec(1, 10, "yearly Nile flow at Aswan (10^8 m^3) 1871-1970"),
}


def load_series(name: str) -> np.ndarray:
    """The series ``name`` as a float64 array ``(n,)`` from statsmodels' bundled data."""
    from statsmodels import datasets

    if name == "sunspots":
        return datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)
    if name == "co2":
        co2 = datasets.co2.load_pandas().data["co2"]
        return co2.interpolate(method="time").to_numpy(np.float64)
    if name == "nile":
        return datasets.nile.load_pandas().data["volume"].to_numpy(np.float64)
    raise ValueError(f"unknown series {name!r}; series: {', '.join(SERIES)}")


def mase_scale(train: np.ndarray, period: int) -> float:
    """Mean absolute ``period``-step change over ``train``: the MASE denominator."""
    return float(np.mean(np.abs(train[period:] - train[:-period])))


def forecast_errors(forecast: np.ndarray, actual: np.ndarray, scale: float) -> dict[str, float]:
    """MASE (over leads 1..H and at lead 1), sMAPE (%) and MSE of forecasts ``(N, H)``."""
    err = forecast - actual  # (N, H)
    denom = np.abs(forecast) + np.abs(actual)
    ape = np.divide(2 * np.abs(err), denom, out=np.zeros_like(err), where=denom > 0)
    return {
        "mase": float(np.mean(np.abs(err)) / scale),
        "mase_h1": float(np.mean(np.abs(err[:, 0])) / scale),
        "smape": float(100 * np.mean(ape)),
        "mse": float(np.mean(err**2)),
    }


@register
class ForecastTask(DatasetTask):
    name = "forecast"
    metric = "mase"
    higher_is_better = False
    input_size = 2
    per_step = False

    def __init__(self, seq_len: int = 33, series: str = "sunspots", horizon: int | None = None) -> None:
        if series not in SERIES:
            raise ValueError(f"unknown series {series!r}; series: {', '.join(SERIES)}")
        super().__init__(seq_len)
        self.series = series
        self.period = SERIES[series].period
        self.horizon = SERIES[series].horizon if horizon is None else horizon
        if self.horizon < 1:
            raise ValueError(f"forecast: horizon must be >= 1, got {self.horizon}")
        self.output_size = self.horizon
        self._y: np.ndarray | None = None

    # ---- the series, its split points and the origins of each split

    @property
    def y(self) -> np.ndarray:
        if self._y is None:
            self._y = load_series(self.series)
        return self._y

    @property
    def bounds(self) -> tuple[int, int]:
        """``(val_start, test_start)``: the first indices of the val and test splits."""
        n = len(self.y)
        n_test, n_val = round(n * SPLIT_FRACTIONS[2]), round(n * SPLIT_FRACTIONS[1])
        return n - n_test - n_val, n - n_test

    def origins(self, name: str) -> np.ndarray:
        """The origins of split ``name``: every t whose targets y[t+1..t+H] all lie in it."""
        val_start, test_start = self.bounds
        spans = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, len(self.y))}
        first, end = spans[name]
        lo = max(first - 1, self.seq_len - 1)  # a full context, and the first target in the split
        hi = end - 1 - self.horizon  # the last target in the split
        if hi < lo:
            raise ValueError(
                f"forecast {self.series}: the {name} split has no complete window of context "
                f"{self.seq_len} and horizon {self.horizon}"
            )
        return np.arange(lo, hi + 1)

    @property
    def train_mean_std(self) -> tuple[float, float]:
        train = self.y[: self.bounds[0]]
        return float(train.mean()), float(train.std())

    @property
    def scale(self) -> float:
        return mase_scale(self.y[: self.bounds[0]], self.period)

    def targets(self, name: str) -> np.ndarray:
        """The raw targets ``(N, H)`` of split ``name``, row i for origin ``origins(name)[i]``."""
        t = self.origins(name)
        return self.y[t[:, None] + np.arange(1, self.horizon + 1)]

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        mean, s = self.train_mean_std
        out = {}
        for name in ("train", "val", "test"):
            t = self.origins(name)  # (N,)
            context = self.y[t[:, None] + np.arange(-self.seq_len + 1, 1)]  # (N, L)
            last = self.y[t][:, None]  # (N, 1): y_t
            x = np.stack([(context - last) / s, (context - mean) / s], axis=-1)  # (N, L, 2)
            raw = self.targets(name)  # (N, H)
            y = np.stack([(raw - last) / s, raw], axis=-1)  # (N, H, 2)
            out[name] = (torch.from_numpy(x).float(), torch.from_numpy(y).double())
        return out

    # ---- loss, metrics, baseline

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out.float(), y[..., 0].float())

    def metrics(self, out: Tensor, y: Tensor) -> dict[str, float]:
        s = self.train_mean_std[1]
        actual = y[..., 1].cpu().numpy()  # (N, H)
        forecast = actual + s * (out.double().cpu().numpy() - y[..., 0].cpu().numpy())
        return forecast_errors(forecast, actual, self.scale)

    def baseline(self) -> dict[str, float]:
        """The seasonal naive forecast on the test windows."""
        return forecast_errors(seasonal_naive(self, "test"), self.targets("test"), self.scale)


# ---- classical forecasts on exactly the windows the networks are scored on


def seasonal_naive(task: ForecastTask, split: str = "test") -> np.ndarray:
    """``(N, H)``: y_{t+k} forecast by the last observation one or more periods before it."""
    t, m = task.origins(split), task.period
    k = np.arange(1, task.horizon + 1)
    back = m * np.ceil(k / m).astype(int)  # (H,): the nearest whole number of periods >= k
    return task.y[t[:, None] + k - back]


def fourier_terms(n: int, period: float, k: int) -> np.ndarray:
    """``(n, 2k)`` sine and cosine regressors of the first ``k`` harmonics of ``period``."""
    i = np.arange(n)[:, None] * np.arange(1, k + 1) * (2 * np.pi / period)
    return np.concatenate([np.sin(i), np.cos(i)], axis=1)


WEEKS_PER_YEAR = 365.25 / 7


def arima_forecasts(
    task: ForecastTask, split: str = "test", orders: list[tuple[int, int, int]] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """ARIMA(p, d, q) with the lowest AIC on the train split among ``orders`` (default: p <= 3,
    d <= 1, q <= 2; for co2 with the first two annual Fourier harmonics as regressors), its
    parameters then fixed and the model re-filtered on ``y[..t]`` at every origin t of
    ``split``. Returns ``(N, H)`` forecasts and a description of the chosen model."""
    import warnings

    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.arima.model import ARIMA

    y, H = task.y, task.horizon
    train = y[: task.bounds[0]]
    exog = fourier_terms(len(y) + H, WEEKS_PER_YEAR, 2) if task.series == "co2" else None
    ex = (lambda a, b: exog[a:b]) if exog is not None else (lambda a, b: None)
    best = None
    with warnings.catch_warnings():
        # Some grid points fail to converge or start non-stationary; AIC judges them anyway.
        warnings.simplefilter("ignore", (ConvergenceWarning, UserWarning, RuntimeWarning))
        for p, d, q in orders or [(p, d, q) for d in (0, 1) for p in range(4) for q in range(3)]:
            model = ARIMA(train, exog=ex(0, len(train)), order=(p, d, q), trend="c" if d == 0 else "n")
            res = model.fit()
            if best is None or res.aic < best[0].aic:
                best = (res, (p, d, q))
        res, order = best
        forecasts = [
            res.apply(y[: t + 1], exog=ex(0, t + 1)).forecast(H, exog=ex(t + 1, t + 1 + H))
            for t in task.origins(split)
        ]
    info = {
        "order": order,
        "aic": round(float(res.aic), 1),
        "fourier_harmonics": 2 if exog is not None else 0,
    }
    return np.asarray(forecasts), info


def ets_forecasts(task: ForecastTask, split: str = "test") -> tuple[np.ndarray, dict[str, Any]]:
    """Exponential smoothing (Holt-Winters) with the lowest AICc on the train split among: no
    trend or an additive damped trend, times no season or an additive season of period m (when
    m > 1). Its smoothing parameters and initial states are then fixed and the recursion re-run
    on ``y[..t]`` at every origin t of ``split``. Returns ``(N, H)`` forecasts and the model."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    y, m = task.y, task.period
    best = None
    for trend in (None, "add"):
        for seasonal in (None, "add") if m > 1 else (None,):
            spec = {"trend": trend, "damped_trend": trend is not None, "seasonal": seasonal}
            spec["seasonal_periods"] = m if seasonal else None
            fit = ExponentialSmoothing(y[: task.bounds[0]], initialization_method="estimated", **spec).fit()
            if best is None or fit.aicc < best[0].aicc:
                best = (fit, spec)
    fit, spec = best
    p = fit.params
    known = {"initial_level": p["initial_level"]}
    smoothing = {"smoothing_level": p["smoothing_level"]}
    if spec["trend"]:
        known["initial_trend"] = p["initial_trend"]
        smoothing |= {"smoothing_trend": p["smoothing_trend"], "damping_trend": p["damping_trend"]}
    if spec["seasonal"]:
        known["initial_seasonal"] = p["initial_seasons"]
        smoothing["smoothing_seasonal"] = p["smoothing_seasonal"]
    forecasts = [
        ExponentialSmoothing(y[: t + 1], initialization_method="known", **known, **spec)
        .fit(optimized=False, **smoothing)
        .forecast(task.horizon)
        for t in task.origins(split)
    ]
    info = {"trend": spec["trend"] and "add damped", "seasonal": spec["seasonal"]}
    return np.asarray(forecasts), info | {k: round(float(v), 4) for k, v in smoothing.items()}


CLASSICAL = {
    "seasonal naive": lambda task, split: (seasonal_naive(task, split), {"period": task.period}),
    "ARIMA": arima_forecasts,
    "ETS": ets_forecasts,
}


def classical_results(task: ForecastTask, split: str = "test") -> dict[str, dict[str, Any]]:
    """Every classical method's metrics on ``split``, with its model description."""
    actual = task.targets(split)
    out = {}
    for name, method in CLASSICAL.items():
        forecasts, info = method(task, split)
        out[name] = {**forecast_errors(forecasts, actual, task.scale), "info": info}
    return out
