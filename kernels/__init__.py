"""lstmlab.kernels: the LSTM recurrence as one registered operator pair per layer and direction for
every cell (`torch.ops.lstmlab.lstm_layer_fwd` / `lstm_layer_bwd`, `layer.py`; the vanilla cell is
the variant with no flags, `variants.py`), run by one of the backends of one table (`backends.py`):
the gate math in PyTorch (`reference`, `torch_gates.py`) or fused Triton kernels (`triton_step`,
`triton_gates.py`; `triton_persistent`, `triton_persistent.py`) or a fused C++ time loop on the CPU
(`cpu`, `cpu_kernel.py` + `cpu_lstm.cpp`, built on first use), every matrix product on the engine
`gemm` picks (oneDNN for fp32 on CPU), the shared time loop (`loop.py`), and the textbook oracle
(`naive`). Under torch.func transforms the same function runs in differentiable ops (`transforms.py`)."""

from .backends import HAS_TRITON, KERNEL_BACKENDS, TRITON_INTERPRET
from .gemm import CPU_GEMM_ENGINES, cpu_gemm_engine, get_cpu_gemm_engine, set_cpu_gemm_engine
from .layer import (
    gates_backward,
    gates_forward,
    lstm_layer,
    lstm_layer_both_directions,
    lstm_layer_bwd,
    lstm_layer_from_input,
    lstm_layer_fwd,
)
from .loop import accumulation_dtype, clear_workspace
from .naive import lstm_cell_naive, lstm_layer_naive
from .variants import GREFF_VARIANTS, CellVariant

__all__ = [
    "CPU_GEMM_ENGINES",
    "GREFF_VARIANTS",
    "HAS_TRITON",
    "KERNEL_BACKENDS",
    "TRITON_INTERPRET",
    "CellVariant",
    "accumulation_dtype",
    "clear_workspace",
    "cpu_gemm_engine",
    "gates_backward",
    "gates_forward",
    "get_cpu_gemm_engine",
    "lstm_cell_naive",
    "lstm_layer",
    "lstm_layer_both_directions",
    "lstm_layer_bwd",
    "lstm_layer_from_input",
    "lstm_layer_fwd",
    "lstm_layer_naive",
    "set_cpu_gemm_engine",
]
