"""The model a task trains: input layer -> recurrent core -> linear head.

Dimension legend: B batch, T time, D input features, V vocabulary, H hidden, O outputs.

The core is one of ``lstmlab`` (lstmlab.LSTM), ``torch_lstm``, ``torch_gru`` or ``torch_rnn``
(torch.nn.LSTM / GRU / RNN with tanh), built with the same keywords so that a comparison changes
only the recurrence. This module takes plain keyword arguments and never imports Hydra.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

MODEL_KINDS = ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn")


def build_rnn(
    kind: str,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    **lstmlab_options: object,
) -> nn.Module:
    """A batch-first recurrent layer stack of the given kind.

    ``lstmlab_options`` (backend, forget_bias, chrono_t_max and the cell variant's options:
    peepholes, cifg, input_gate, ..., recurrent_dropout) go to lstmlab.LSTM only; passing them
    for a torch kind is an error rather than silently ignored.
    """
    # dropout with one layer does nothing; the modules say so with a warning, passed on here.
    common = dict(num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, batch_first=True)
    if kind == "lstmlab":
        from lstmlab import LSTM

        return LSTM(input_size, hidden_size, **common, **lstmlab_options)
    if lstmlab_options:
        raise ValueError(f"{sorted(lstmlab_options)} only apply to kind='lstmlab', not {kind!r}")
    if kind == "torch_lstm":
        return nn.LSTM(input_size, hidden_size, **common)
    if kind == "torch_gru":
        return nn.GRU(input_size, hidden_size, **common)
    if kind == "torch_rnn":
        return nn.RNN(input_size, hidden_size, nonlinearity="tanh", **common)
    raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_KINDS)}")


class SequenceModel(nn.Module):
    """Embedding (token inputs) or linear (continuous inputs) -> RNN -> linear head.

    Args:
        kind: one of ``MODEL_KINDS``.
        output_size: O, outputs per prediction.
        input_size: D for continuous inputs ``(B, T, D)``; give this or ``vocab_size``.
        vocab_size: V for token inputs ``(B, T)`` of integer ids.
        per_step: predict at every step ``(B, T, O)``, or once from the last step ``(B, O)``.
        hidden_size, num_layers, bidirectional, dropout, **lstmlab_options: see :func:`build_rnn`.
            The input layer maps to ``hidden_size`` features.
    """

    def __init__(
        self,
        kind: str,
        output_size: int,
        *,
        input_size: int | None = None,
        vocab_size: int | None = None,
        per_step: bool = True,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        **lstmlab_options: object,
    ) -> None:
        super().__init__()
        if (input_size is None) == (vocab_size is None):
            raise ValueError("give exactly one of input_size (continuous) or vocab_size (tokens)")
        self.kind = kind
        self.per_step = per_step
        if vocab_size is not None:
            self.encoder: nn.Module = nn.Embedding(vocab_size, hidden_size)
        else:
            self.encoder = nn.Linear(input_size, hidden_size)
        self.rnn = build_rnn(
            kind,
            hidden_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout,
            **lstmlab_options,
        )
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), output_size)
        self._last_device: torch.device | None = None

    def forward(self, x: Tensor, state: Any = None, *, return_state: bool = False) -> Any:
        """Outputs ``(B, T, O)`` (per step) or ``(B, O)`` (last step) for inputs ``(B, T, D)`` or
        token ids ``(B, T)``. ``state`` is the recurrent module's initial state (``h_0``, or
        ``(h_0, c_0)`` for an LSTM; None: zeros); with ``return_state`` the final state comes
        back too, as ``(outputs, state)``, for generating one step at a time."""
        self._last_device = x.device
        h = self.encoder(x)  # (B, T, H)
        out, final = self.rnn(h, state)  # (B, T, H * directions)
        if not self.per_step:
            out = out[:, -1]  # (B, H * directions)
        y = self.head(out)  # (B, T, O) or (B, O)
        return (y, final) if return_state else y

    @property
    def backend(self) -> str | None:
        """The backend the last forward actually ran: lstmlab's ``last_backend``, or for torch's
        modules "cudnn" (CUDA with cuDNN enabled) or "native". None before the first forward."""
        if self.kind == "lstmlab":
            return self.rnn.last_backend
        if self._last_device is None:
            return None
        cudnn = torch.backends.cudnn
        if self._last_device.type == "cuda" and cudnn.enabled and cudnn.is_available():
            return "cudnn"
        return "native"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
