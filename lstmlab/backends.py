"""Which implementation runs an LSTM layer: the rule and the table live in `lstmlab.kernels.backends`
(:func:`resolve_backend` is the only place that decides); this module is their public name."""

from lstmlab.kernels.backends import (
    KERNEL_BACKENDS,
    REQUESTS,
    TABLE,
    both_directions_reason,
    check_backend_name,
    persistent_unavailable_reason,
    resolve_backend,
    triton_unavailable_reason,
    unavailable_reason,
)

BACKENDS = REQUESTS  # what LSTM(backend=...) accepts

__all__ = [
    "BACKENDS",
    "KERNEL_BACKENDS",
    "TABLE",
    "both_directions_reason",
    "check_backend_name",
    "persistent_unavailable_reason",
    "resolve_backend",
    "triton_unavailable_reason",
    "unavailable_reason",
]
