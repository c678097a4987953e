"""lstmlab.kernels: the LSTM recurrence as one autograd.Function per layer, with the gate math in
PyTorch (`reference`) or fused Triton kernels (`triton`), and the textbook oracle (`naive`)."""

from .layer import (
    HAS_TRITON,
    KERNEL_BACKENDS,
    TRITON_INTERPRET,
    LSTMLayerFunction,
    accumulation_dtype,
    gates_backward,
    gates_forward,
    lstm_layer,
)
from .naive import lstm_cell_naive, lstm_layer_naive

__all__ = [
    "HAS_TRITON",
    "KERNEL_BACKENDS",
    "TRITON_INTERPRET",
    "LSTMLayerFunction",
    "accumulation_dtype",
    "gates_backward",
    "gates_forward",
    "lstm_cell_naive",
    "lstm_layer",
    "lstm_layer_naive",
]
