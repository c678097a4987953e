"""lstmlab: a from-scratch LSTM with fused Triton kernels, a drop-in replacement for torch.nn.LSTM."""

from lstmlab.backends import BACKENDS, resolve_backend
from lstmlab.modules import LSTM, LSTMCell

__version__ = "0.1.0"
__all__ = ["BACKENDS", "LSTM", "LSTMCell", "__version__", "resolve_backend"]
