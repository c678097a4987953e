"""Plot styling shared by the reports and the benchmark scripts: every line visible, log axes
labelled at numbers a reader can read off. Imports matplotlib only inside the functions."""

from __future__ import annotations

from typing import Any

# (dashes, marker) per line, in drawing order. Two lines that coincide (lstmlab and torch_lstm
# from the same weights, two paths to one kernel) must both stay visible.
LINE_STYLES: list[tuple[Any, str]] = [
    ("-", "o"),
    ("--", "s"),
    ("-.", "^"),
    (":", "D"),
    ((0, (5, 1, 1, 1, 1, 1)), "v"),
    ((0, (1, 1)), "P"),
    ((0, (8, 2)), "X"),
    ((0, (3, 1, 3, 1, 1, 1)), "*"),
]


def line_style(n: int) -> dict[str, Any]:
    """``Axes.plot`` keywords for the n-th line: its own dashes and open marker, thinner than the
    line before and drawn above it, so a line on top of an earlier one leaves it visible; markers
    alternate large and small, so one point of two lines shows both."""
    dashes, marker = LINE_STYLES[n % len(LINE_STYLES)]
    return {
        "ls": dashes,
        "marker": marker,
        "fillstyle": "none",
        "lw": max(3.0 - 0.6 * n, 1.0),
        "markersize": 11 - 4 * (n % 2),
        "zorder": 3 + n,
    }


def readable_log_axis(axis: Any, lo: float, hi: float) -> None:
    """Label a log axis at plain numbers: 1-2-5 (1-2-3-5 below 30x) steps over a range of 3x or
    more, and over a narrower one about six evenly spaced round values (matplotlib's default
    labels only powers of ten, so a 28-45 ms range read "30" and "40" and nothing else, and a
    0.167-0.185 range read "1.75 x 10^-1")."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if hi / lo >= 30:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    elif hi / lo >= 3:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    else:
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
