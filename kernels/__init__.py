"""lstmlab.kernels: the LSTM recurrence as one registered operator per layer and direction (forward
and backward, `torch.ops.lstmlab.lstm_layer_fwd` / `lstm_layer_bwd`), with the gate math in
PyTorch (`reference`) or fused Triton kernels (`triton`), every matrix product on the engine
`gemm` picks (oneDNN for fp32 on CPU), and the textbook oracle (`naive`)."""

from .gemm import CPU_GEMM_ENGINES, cpu_gemm_engine, get_cpu_gemm_engine, set_cpu_gemm_engine
from .layer import (
    HAS_TRITON,
    KERNEL_BACKENDS,
    TRITON_INTERPRET,
    accumulation_dtype,
    clear_workspace,
    gates_backward,
    gates_forward,
    lstm_layer,
    lstm_layer_bwd,
    lstm_layer_from_input,
    lstm_layer_fwd,
)
from .naive import lstm_cell_naive, lstm_layer_naive

__all__ = [
    "CPU_GEMM_ENGINES",
    "HAS_TRITON",
    "KERNEL_BACKENDS",
    "TRITON_INTERPRET",
    "accumulation_dtype",
    "clear_workspace",
    "cpu_gemm_engine",
    "gates_backward",
    "gates_forward",
    "get_cpu_gemm_engine",
    "lstm_cell_naive",
    "lstm_layer",
    "lstm_layer_bwd",
    "lstm_layer_from_input",
    "lstm_layer_fwd",
    "lstm_layer_naive",
    "set_cpu_gemm_engine",
]
