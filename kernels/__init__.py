"""lstmlab.kernels: the LSTM recurrence as one registered operator per layer and direction (forward
and backward, `torch.ops.lstmlab.lstm_layer_fwd` / `lstm_layer_bwd`), with the gate math in
PyTorch (`reference`) or fused Triton kernels (`triton`), every matrix product on the engine
`gemm` picks (oneDNN for fp32 on CPU), and the textbook oracle (`naive`). Cell variants
(`variants.py`: peepholes, CIFG, Greff's ablations, layer norm, zoneout, recurrent dropout) run
through their own op pair, `lstmlab::lstm_variant_layer_fwd` / `_bwd` (`variant_layer.py`)."""

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
from .variant_layer import lstm_variant_layer, lstm_variant_layer_bwd, lstm_variant_layer_fwd
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
    "lstm_layer_bwd",
    "lstm_layer_from_input",
    "lstm_layer_fwd",
    "lstm_layer_naive",
    "lstm_variant_layer",
    "lstm_variant_layer_bwd",
    "lstm_variant_layer_fwd",
    "set_cpu_gemm_engine",
]
