"""`LSTM` and `LSTMCell`: drop-in replacements for `torch.nn.LSTM` / `torch.nn.LSTMCell`.

Same constructor arguments, parameter names and shapes, gate order (i, f, g, o), two bias vectors,
U(−1/√H, 1/√H) initialisation drawn in the same order (the same seed gives the same weights as torch),
inputs and outputs. On purpose we differ in opt-in keywords only: ``backend`` picks the
implementation, ``forget_bias`` and ``chrono_t_max`` initialise the gate biases, and the cell-variant
options (``peepholes``, ``cifg``, Greff's ablations, ``layer_norm``, zoneout, recurrent dropout;
`kernels/variants.py` has their equations) change the cell. A variant's extra parameters exist only
when it is on, are registered after torch's (so the same seed draws the same torch weights), and are
named torch-style: ``weight_peephole_l0`` [3, H], ``weight_ln_ih_l0`` / ``weight_ln_hh_l0`` [4H],
``weight_ln_c_l0`` / ``bias_ln_c_l0`` [H].

B: batch  T: time  I: input size  H: hidden size  P: proj_size or H  D: directions  L: layers
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstmlab.backends import both_directions_reason, check_backend_name, resolve_backend
from lstmlab.kernels import lstm_layer, lstm_layer_both_directions, variants
from lstmlab.kernels.packed import pack, pad
from lstmlab.kernels.transforms import COMPOSITE, transform_active
from lstmlab.kernels.variants import CellVariant

CELL_OPTIONS = tuple(f.name for f in dataclasses.fields(CellVariant))  # the variant's module keywords


def _cell_variant(owner: str, options: dict[str, object], excluded: tuple[str, ...] = ()) -> CellVariant:
    """The CellVariant of a module's keyword options: its fields are the keywords (one spec)."""
    valid = [name for name in CELL_OPTIONS if name not in excluded]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"{owner}.__init__() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"the cell-variant options are {', '.join(valid)}"
        )
    return CellVariant(**options)


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")


def _check_gate_init(bias: bool, forget_bias: float, chrono_t_max: float | None) -> None:
    if not isinstance(forget_bias, numbers.Real) or isinstance(forget_bias, bool):
        raise TypeError(f"forget_bias should be a real number, got: {type(forget_bias).__name__}")
    if chrono_t_max is not None:
        if not isinstance(chrono_t_max, numbers.Real) or isinstance(chrono_t_max, bool):
            raise TypeError(f"chrono_t_max should be a number or None, got: {type(chrono_t_max).__name__}")
        if chrono_t_max <= 2:
            raise ValueError(
                "chrono_t_max is the longest dependency to expect, in steps: it must be greater "
                f"than 2 (biases are drawn as log U[1, chrono_t_max − 1]), got {chrono_t_max}"
            )
        if forget_bias != 0:
            raise ValueError(
                "forget_bias and chrono_t_max both set the forget-gate bias; pass one of them, "
                f"got forget_bias={forget_bias} and chrono_t_max={chrono_t_max}"
            )
    if not bias and (forget_bias != 0 or chrono_t_max is not None):
        raise ValueError("forget_bias and chrono_t_max initialise biases, which need bias=True")


@torch.no_grad()
def _check_lstm_args(
    num_layers: int, batch_first: bool, dropout: float, bidirectional: bool, proj_size: int, hidden_size: int
) -> None:
    """torch.nn.LSTM's argument checks, with its messages (and its warning for dropout on one layer)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got {dropout!r}"
        )
    _check_size("num_layers", num_layers)
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional should be of type bool, got: {type(bidirectional).__name__}")
    if isinstance(proj_size, bool) or not isinstance(proj_size, int):
        raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
    if proj_size < 0:
        raise ValueError(
            f"proj_size should be a positive integer or zero to disable projections, got {proj_size}"
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and "
            f"hidden_size={hidden_size}"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero "
            f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}",
            stacklevel=3,
        )


@torch.no_grad()
def _init_gate_biases(
    bias_ih: Tensor, bias_hh: Tensor, forget_bias: float, chrono_t_max: float | None
) -> None:
    """Forget bias (Jozefowicz et al. 2015) or chrono init (Tallec & Ollivier 2018), on bias_ih."""
    H = bias_ih.shape[0] // 4
    if chrono_t_max is not None:
        # b_f ~ log U[1, T_max − 1], b_i = −b_f: characteristic forgetting times up to T_max.
        b_f = torch.empty_like(bias_ih[:H]).uniform_(1, chrono_t_max - 1).log_()
        bias_ih[H : 2 * H] = b_f
        bias_ih[:H] = -b_f
        bias_hh[: 2 * H] = 0
    elif forget_bias != 0:
        bias_ih[H : 2 * H] += forget_bias


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _check_same_device(x: Tensor, weight: Tensor, states: tuple[Tensor, ...]) -> None:
    if x.device != weight.device:
        raise RuntimeError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{x.device} and parameter tensor at {weight.device}"
        )
    for s in states:
        if s.device != x.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{x.device} and hidden tensor at {s.device}"
            )


def _packed_batch(sorted_indices: Tensor | None, hx: object) -> int | None:
    """The batch of a packed input when a tensor's shape tells it (so compiled graphs keep a static
    size), else None: then only the packed data's batch_sizes[0] does."""
    if sorted_indices is not None:
        return sorted_indices.shape[0]
    if isinstance(hx, (tuple, list)) and len(hx) == 2 and isinstance(hx[0], Tensor) and hx[0].dim() == 3:
        return hx[0].shape[1]
    return None


def _in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: ``.to()`` only where it converts (a no-op ``.to()`` still costs a dispatch,
    several per layer call)."""
    return t if t.dtype == dtype else t.to(dtype)


class _LSTMBase(nn.Module):
    """What LSTM and LSTMCell share, as torch's RNNBase and RNNCellBase do for theirs: argument
    checks, the opt-in keywords, initialisation, the input-dtype/autocast rule, backend choice."""

    # constructor keywords that repr() shows when they differ from these defaults
    _repr_defaults: ClassVar[dict[str, object]] = {
        "bias": True,
        "backend": "auto",
        "forget_bias": 0.0,
        "chrono_t_max": None,
    }

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        backend: str,
        forget_bias: float,
        chrono_t_max: float | None,
        variant: CellVariant,
    ) -> None:
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        _check_gate_init(bias, forget_bias, chrono_t_max)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = check_backend_name(backend)
        self.forget_bias = forget_bias
        self.chrono_t_max = chrono_t_max
        self.variant = variant
        self.last_backend: str | None = None  # the backend the last forward actually ran

    def _register_variant_parameters(self, suffix: str, factory: dict) -> None:
        """The variant's own parameters of one layer and direction (none for the vanilla cell)."""
        H, G = self.hidden_size, 4 * self.hidden_size
        params: dict[str, tuple[int, ...]] = {}
        if self.variant.peepholes:
            params["weight_peephole"] = (3, H)  # p_i, p_f, p_o
        if self.variant.layer_norm:
            params |= {"weight_ln_ih": (G,), "weight_ln_hh": (G,), "weight_ln_c": (H,), "bias_ln_c": (H,)}
        for name, shape in params.items():
            self.register_parameter(f"{name}{suffix}", nn.Parameter(torch.empty(shape, **factory)))

    def kernel_flags(self) -> int:
        """The cell variant's kernel bits (`kernels/variants.py`) the next forward uses: the
        variant's structure, plus the masks' in training mode. 0 for the vanilla cell."""
        v, flags = self.variant, self.variant.flags
        if (v.zoneout_c or v.zoneout_h or v.recurrent_dropout) and self.training:
            flags |= variants.ZONEOUT_C * (v.zoneout_c > 0) | variants.ZONEOUT_H * (v.zoneout_h > 0)
            flags |= variants.RECURRENT_DROPOUT * (v.recurrent_dropout > 0)
        return flags

    def _layer(
        self,
        x: Tensor,
        suffix: str,
        h0: Tensor,
        c0: Tensor,
        batch_sizes: Tensor | None,
        backend: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One layer and direction, any cell: x [T, B, I] in the compute dtype -> out [T, B, P],
        h_n [B, P], c_n [B, H]. Masks are drawn here, from torch's generator of the device, in
        training only: zoneout per element and step, recurrent dropout once per sequence."""
        dtype, (T, B), H, P = x.dtype, x.shape[:2], self.hidden_size, h0.shape[-1]
        v = self.variant

        def param(name: str) -> Tensor | None:
            p = getattr(self, f"{name}{suffix}", None)
            return None if p is None else _in_dtype(p, dtype)

        b_ih, b_hh = param("bias_ih"), param("bias_hh")
        bias = None if b_ih is None else b_ih + b_hh
        w_ih = param("weight_ih")
        if v.layer_norm:  # γ_ih ⊙ LN(x·W_ihᵀ) + b, differentiated by autograd; the op takes gx
            x = F.layer_norm(F.linear(x, w_ih), (4 * H,), param("weight_ln_ih"), bias, variants.LN_EPS)
            w_ih = bias = None
        flags = self.kernel_flags()
        zoneout = dropout = None
        if flags & (variants.ZONEOUT_C | variants.ZONEOUT_H):  # [T, B, 2, H]: (z^c, z^h), 1 = keep
            p_keep = torch.tensor([v.zoneout_c, v.zoneout_h], device=x.device).view(2, 1)
            zoneout = (torch.rand(T, B, 2, H, device=x.device) < p_keep).to(torch.uint8)
        if flags & variants.RECURRENT_DROPOUT:  # [B, P], 0 or 1/(1 − p): one mask per sequence
            keep = 1.0 - v.recurrent_dropout  # drawn in fp32 whatever the dtype: a seed gives one mask
            dropout = (torch.rand(B, P, device=x.device) < keep).to(dtype).div_(keep)
        ln_c = None if not v.layer_norm else torch.stack([param("weight_ln_c"), param("bias_ln_c")])
        return lstm_layer(
            x, h0, c0, param("weight_hh"), param("weight_hr"), batch_sizes, backend,
            w_ih=w_ih, bias=bias, flags=flags, peephole=param("weight_peephole"),
            ln_hh=param("weight_ln_hh"), ln_c=ln_c, zoneout=zoneout, dropout=dropout,
        )  # fmt: skip

    def _bias_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(bias_ih, bias_hh) of every layer and direction."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        # torch's parameters first, in torch's order (a variant's come after them): the same
        # seed draws the same torch weights whatever the variant. Peepholes are drawn like
        # weights; layer-norm gains start at 1 and its bias at 0, as in Ba et al. and haste.
        for name, weight in self.named_parameters():
            if "_ln_" in name:
                nn.init.constant_(weight, 1.0 if name.startswith("weight") else 0.0)
            else:
                nn.init.uniform_(weight, -stdv, stdv)
        if self.bias:
            for bias_ih, bias_hh in self._bias_pairs():
                _init_gate_biases(bias_ih, bias_hh, self.forget_bias, self.chrono_t_max)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for key, default in self._repr_defaults.items():
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)!r}"
        for key, value in self.variant.changed().items():
            s += f", {key}={value!r}"
        return s

    def _compute_dtype(self, x: Tensor, weight: Tensor, error: type[Exception]) -> torch.dtype:
        """The dtype the layer runs in: autocast's if it is on, else the input's, which must then be
        the weights' (raises ``error`` otherwise, as torch's LSTM and LSTMCell do). LSTM's words are
        torch's ("RNN input dtype ..."); for LSTMCell torch has only its matmul's "mat1 and mat2 must
        have the same dtype", so ours says what to convert, with torch's exception type."""
        autocast_dtype = _autocast_dtype(x.device)
        weight_dtype = weight.dtype
        if x.dtype != weight_dtype and autocast_dtype is None:
            owner = "RNN" if isinstance(self, LSTM) else type(self).__name__
            raise error(
                f"{owner} input dtype ({x.dtype}) does not match weight dtype "
                f"({weight_dtype}). Convert input: input.to({weight_dtype}), or convert model: "
                f"model.to({x.dtype})"
            )
        return autocast_dtype or x.dtype

    def _check_state_dtypes(self, x: Tensor, h0: Tensor, c0: Tensor) -> None:
        if _autocast_dtype(x.device) is None and (h0.dtype != x.dtype or c0.dtype != x.dtype):
            raise RuntimeError(
                f"{type(self).__name__}: h_0 and c_0 must have the input's dtype ({x.dtype}), got "
                f"({h0.dtype}, {c0.dtype})"
            )

    def _pick_backend(
        self,
        x: Tensor,
        batch: int,
        dtype: torch.dtype,
        proj_size: int = 0,
        single_step: bool = False,
    ) -> str:
        """The implementation for a call on input ``x`` (the rule: lstmlab.backends), kept in last_backend."""
        flags = self.kernel_flags()
        H = self.hidden_size
        backend = resolve_backend(self.backend, x.device, batch, H, dtype, proj_size, single_step, flags)
        # under a torch.func transform or forward-mode AD the layer runs in differentiable ops
        # (lstmlab.kernels.transforms), whatever the backend: say so
        # (the parameters lazily: they are looked at only while a forward-mode dual level is open)
        tensors = itertools.chain((x,), self.parameters())
        self.last_backend = COMPOSITE if transform_active(tensors) else backend
        return backend


class LSTM(_LSTMBase):
    r"""A multi-layer LSTM, computing for each element of the input sequence, in each layer:

    .. math::
        i_t = σ(W_{ii} x_t + b_{ii} + W_{hi} h_{t−1} + b_{hi}) \quad
        f_t = σ(W_{if} x_t + b_{if} + W_{hf} h_{t−1} + b_{hf}) \\
        g_t = \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t−1} + b_{hg}) \quad
        o_t = σ(W_{io} x_t + b_{io} + W_{ho} h_{t−1} + b_{ho}) \\
        c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t \qquad h_t = o_t ⊙ \tanh(c_t)

    and, with ``proj_size > 0``, h_t = W_{hr} (o_t ⊙ tanh(c_t)). The input projection of all steps
    is one GEMM; the time loop of each layer and direction is one registered operator (forward and
    backward, safe under torch.compile, torch.export and CUDA graphs) whose gate math runs in
    fused Triton kernels (``backend="triton"``) or in PyTorch (``"reference"``).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
        device, dtype: exactly as :class:`torch.nn.LSTM`.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton is importable, else reference),
            ``"triton"`` (the persistent kernels where the shape qualifies, else per step),
            ``"triton_persistent"``, ``"triton_step"`` or ``"reference"`` (see lstmlab.backends).
            An explicit request that cannot run raises; ``last_backend`` says what ran.
        forget_bias: added to the forget-gate part of ``bias_ih`` after the default init
            (1.0 is the usual choice; Jozefowicz et al. 2015). Default 0: torch's init.
        chrono_t_max: chrono initialisation (Tallec & Ollivier 2018) for dependencies up to this
            many steps: b_f ~ log U[1, T_max − 1], b_i = −b_f (on ``bias_ih``; ``bias_hh`` zeroed
            there). Default None: torch's init.
        peepholes, cifg, input_gate, forget_gate, output_gate, input_activation,
        output_activation, layer_norm, zoneout_c, zoneout_h, recurrent_dropout: the cell variant,
            keyword-only: the fields of :class:`lstmlab.kernels.variants.CellVariant` (equations in
            `kernels/variants.py`). All off by default: then the module is torch.nn.LSTM exactly.
            Zoneout and recurrent dropout draw their masks from torch's generator in training only
            (identity in eval mode). ``zoneout_h`` does not combine with ``proj_size``.

    Inputs: input, (h_0, c_0)
        input [T, B, I], [B, T, I] with ``batch_first``, [T, I] unbatched, or a PackedSequence.
        h_0 [D·L, B, P] and c_0 [D·L, B, H] ([D·L, P], [D·L, H] unbatched); zeros if omitted.

    Outputs: output, (h_n, c_n)
        output [T, B, D·P] ([B, T, D·P] with ``batch_first``; a PackedSequence if input was one),
        h_n [D·L, B, P], c_n [D·L, B, H].

    Example:
        >>> rnn = LSTM(10, 20, num_layers=2)
        >>> output, (h_n, c_n) = rnn(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        forget_bias: float = 0.0,
        chrono_t_max: float | None = None,
        **cell_options: bool | float,
    ) -> None:
        variant = _cell_variant("LSTM", cell_options)
        super().__init__(input_size, hidden_size, bias, backend, forget_bias, chrono_t_max, variant)
        _check_lstm_args(num_layers, batch_first, dropout, bidirectional, proj_size, hidden_size)
        if proj_size > 0 and variant.zoneout_h > 0:
            raise ValueError(
                f"zoneout_h mixes h_(t-1) [B, proj_size] with the new h before its projection "
                f"[B, hidden_size], so it cannot be combined with proj_size; got proj_size={proj_size} "
                f"and zoneout_h={variant.zoneout_h}. Use zoneout_c, or proj_size=0"
            )
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        # Registration order is torch's, so reset_parameters() draws the same numbers for a seed.
        for layer in range(num_layers):
            for direction in range(num_directions):
                suffix = f"l{layer}{'_reverse' if direction == 1 else ''}"
                layer_input = input_size if layer == 0 else real_hidden * num_directions
                G = 4 * hidden_size
                params = {
                    f"weight_ih_{suffix}": (G, layer_input),
                    f"weight_hh_{suffix}": (G, real_hidden),
                }
                if bias:
                    params[f"bias_ih_{suffix}"] = (G,)
                    params[f"bias_hh_{suffix}"] = (G,)
                if proj_size > 0:
                    params[f"weight_hr_{suffix}"] = (proj_size, hidden_size)
                for name, shape in params.items():
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        for layer in range(num_layers):  # after all of torch's: its weights draw as torch's do
            for suffix in self._direction_suffixes(layer):
                self._register_variant_parameters(f"_{suffix}", factory)
        self.reset_parameters()

    _repr_defaults: ClassVar[dict[str, object]] = {
        "num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0, "bidirectional": False,
        "proj_size": 0, "backend": "auto", "forget_bias": 0.0, "chrono_t_max": None,
    }  # fmt: skip

    def _bias_pairs(self) -> list[tuple[Tensor, Tensor]]:
        return [
            (getattr(self, f"bias_ih_{suffix}"), getattr(self, f"bias_hh_{suffix}"))
            for layer in range(self.num_layers)
            for suffix in self._direction_suffixes(layer)
        ]

    def _direction_suffixes(self, layer: int) -> list[str]:
        suffixes = [f"l{layer}"]
        if self.bidirectional:
            suffixes.append(f"l{layer}_reverse")
        return suffixes

    def flatten_parameters(self) -> None:
        """No-op, for code written for cuDNN's torch.nn.LSTM: lstmlab keeps no flat weight buffer."""

    @property
    def all_weights(self) -> list[list[Tensor]]:
        names = ["weight_ih", "weight_hh"]
        if self.bias:
            names += ["bias_ih", "bias_hh"]
        if self.proj_size > 0:
            names.append("weight_hr")
        return [
            [getattr(self, f"{name}_{suffix}") for name in names]
            for layer in range(self.num_layers)
            for suffix in self._direction_suffixes(layer)
        ]

    def _check_hidden(self, hx: object, is_batched: bool) -> tuple[Tensor, Tensor]:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise RuntimeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        h0, c0 = hx
        want = 3 if is_batched else 2
        if h0.dim() != want or c0.dim() != want:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got "
                f"({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        if not is_batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return h0, c0

    def _initial_state(
        self, x: Tensor, hx: object, is_batched: bool, sorted_indices: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(h_0 [D·L, B, P], c_0 [D·L, B, H]): zeros, or ``hx`` checked and in the packed order."""
        B, D, H = x.shape[1], 2 if self.bidirectional else 1, self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H
        if hx is None:
            h0 = torch.zeros(self.num_layers * D, B, P, dtype=x.dtype, device=x.device)
            c0 = torch.zeros(self.num_layers * D, B, H, dtype=x.dtype, device=x.device)
        else:
            h0, c0 = self._check_hidden(hx, is_batched)
            if sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
            for i, (state, size) in enumerate(((h0, P), (c0, H))):
                expected = (self.num_layers * D, B, size)
                if tuple(state.shape) != expected:
                    raise RuntimeError(f"Expected hidden[{i}] size {expected}, got {list(state.shape)}")
            self._check_state_dtypes(x, h0, c0)
        _check_same_device(x, self.weight_ih_l0, (h0, c0))
        return h0, c0

    def _run_layers(
        self, x: Tensor, h0: Tensor, c0: Tensor, batch_sizes: Tensor | None, backend: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, B, I] in the compute dtype -> output [T, B, D·P], h_n [D·L, B, P], c_n [D·L, B, H]:
        one layer op per layer and direction, the reverse direction over the time-flipped input (or
        one for both directions, where the backend runs them at once)."""
        D = 2 if self.bidirectional else 1
        both_at_once = D == 2 and self._both_directions_at_once(x, backend)  # the same for every layer
        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if both_at_once:
                pair = slice(2 * layer, 2 * layer + 2)  # [2, B, H]: this layer's two directions
                layer_input, h, c = self._both_directions(
                    layer_input, layer, h0[pair], c0[pair], batch_sizes, backend
                )
                h_n.extend(h.unbind(0))
                c_n.extend(c.unbind(0))
            else:
                outputs = []
                for direction, suffix in enumerate(self._direction_suffixes(layer)):
                    x_dir, steps = layer_input, batch_sizes
                    if direction == 1:  # reverse: run forwards over the time-flipped sequence
                        x_dir = layer_input.flip(0)
                        steps = None if batch_sizes is None else batch_sizes.flip(0)
                    idx = layer * D + direction
                    out, h, c = self._layer(x_dir, f"_{suffix}", h0[idx], c0[idx], steps, backend)
                    outputs.append(out.flip(0) if direction == 1 else out)  # [T, B, P]
                    h_n.append(h)
                    c_n.append(c)
                layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)  # [T, B, D·P]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    def _both_directions_at_once(self, x: Tensor, backend: str) -> bool:
        """Whether one call of the layer op runs both directions of a layer: the vanilla cell without
        projection, outside torch.func transforms, on a backend that runs both at once here (the
        persistent kernels where the SMs hold both directions' grids)."""
        if self.kernel_flags() or self.proj_size or self.last_backend == COMPOSITE:
            return False
        B, H = x.shape[1], self.hidden_size
        return both_directions_reason(backend, x.device, B, H, 0, x.dtype, 0) is None

    def _both_directions(
        self, x: Tensor, layer: int, h0: Tensor, c0: Tensor, batch_sizes: Tensor | None, backend: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Both directions of one layer in one op call: x [T, B, I], h0 and c0 [2, B, H] ->
        out [T, B, 2H], h_n and c_n [2, B, H]."""
        suffixes = [f"_{suffix}" for suffix in self._direction_suffixes(layer)]

        def pair(name: str) -> Tensor:  # [2, ...]: the forward direction's, then the reverse one's
            return torch.stack([_in_dtype(getattr(self, f"{name}{s}"), x.dtype) for s in suffixes])

        bias = pair("bias_ih") + pair("bias_hh") if self.bias else None
        w_ih, w_hh = pair("weight_ih"), pair("weight_hh")
        return lstm_layer_both_directions(x, h0, c0, w_ih, bias, w_hh, batch_sizes, backend)

    def forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = None
        batch_sizes = None
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise ValueError(f"input must have 2 dimensions, got {data.dim()}")
            batch_sizes = batch_sizes_t  # [T] int64 on the CPU: the op reads its values, tracing never does
            x = pad(data, batch_sizes_t, _packed_batch(sorted_indices, hx))  # [T, B, I] sorted
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            x = input if is_batched else input.unsqueeze(0 if self.batch_first else 1)
            if self.batch_first:
                x = x.transpose(0, 1)  # [T, B, I]

        compute_dtype = self._compute_dtype(x, self.weight_ih_l0, ValueError)
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )

        h0, c0 = self._initial_state(x, hx, is_batched, sorted_indices)
        backend = self._pick_backend(x, x.shape[1], compute_dtype, self.proj_size)
        x, h0, c0 = (_in_dtype(t, compute_dtype) for t in (x, h0, c0))
        from lstmlab import onnx_export  # ONNX export hook: lstmlab/onnx_export.py owns what runs here

        if onnx_export.is_exporting():
            output, h_n, c_n = onnx_export.lstm_layers(self, x, h0, c0, batch_sizes)
        else:
            output, h_n, c_n = self._run_layers(x, h0, c0, batch_sizes, backend)

        if packed:
            data = pack(output, batch_sizes_t, data.shape[0])  # [N, D·P]
            output = PackedSequence(data, batch_sizes_t, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
            return output, (h_n, c_n)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)


class LSTMCell(_LSTMBase):
    r"""One LSTM step, a drop-in replacement for :class:`torch.nn.LSTMCell`.

    The same math as :class:`LSTM` for one time step (the layer function run with T = 1).

    Args:
        input_size, hidden_size, bias, device, dtype: exactly as :class:`torch.nn.LSTMCell`.
        backend, forget_bias, chrono_t_max: as in :class:`LSTM`.
        peepholes, cifg, input_gate, forget_gate, output_gate, input_activation,
        output_activation, layer_norm, zoneout_c, zoneout_h: the cell variant, as in :class:`LSTM`
            (recurrent dropout keeps one mask per sequence, which a single step cannot: use LSTM).

    Inputs: input [B, I] or [I], (h_0 [B, H], c_0 [B, H]) (unbatched: [H]); zeros if omitted.
    Outputs: (h_1, c_1), shaped like h_0 and c_0.

    Example:
        >>> cell = LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
        >>> h.shape
        torch.Size([3, 20])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        forget_bias: float = 0.0,
        chrono_t_max: float | None = None,
        **cell_options: bool | float,
    ) -> None:
        # recurrent dropout keeps one mask per sequence, which a single step cannot
        variant = _cell_variant("LSTMCell", cell_options, excluded=("recurrent_dropout",))
        super().__init__(input_size, hidden_size, bias, backend, forget_bias, chrono_t_max, variant)
        factory = {"device": device, "dtype": dtype}
        G = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self._register_variant_parameters("", factory)
        self.reset_parameters()

    def _bias_pairs(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.bias_ih, self.bias_hh)]

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        # torch.nn.LSTMCell's checks, in its order, types and words: dimensions, then sizes, then dtypes
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise RuntimeError(
                    f"LSTMCell: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}"
                )
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead"
                    )
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)  # [B, I]
        B, H = x.shape[0], self.hidden_size
        if x.shape[1] != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}"
            )
        if hx is not None:
            h0, c0 = hx
            if h0.dim() != input.dim() or c0.dim() != input.dim():
                raise RuntimeError(
                    f"LSTMCell: for {input.dim()}-D input, h_0 and c_0 should be {input.dim()}-D but got "
                    f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                )
            if not is_batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
            for i, state in enumerate((h0, c0)):
                if state.shape[0] != B:
                    raise RuntimeError(
                        f"Input batch size {B} doesn't match hidden{i} batch size {state.shape[0]}"
                    )
                if state.shape[1] != H:
                    raise RuntimeError(
                        f"hidden{i} has inconsistent hidden_size: got {state.shape[1]}, expected {H}"
                    )
        dtype = self._compute_dtype(x, self.weight_ih, RuntimeError)
        if hx is None:
            h0 = c0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        else:
            self._check_state_dtypes(x, h0, c0)
        _check_same_device(x, self.weight_ih, (h0, c0))

        backend = self._pick_backend(x, B, dtype, single_step=True)
        x, h0, c0 = _in_dtype(x, dtype).unsqueeze(0), _in_dtype(h0, dtype), _in_dtype(c0, dtype)  # [1, B, I]
        from lstmlab import onnx_export  # ONNX export hook: lstmlab/onnx_export.py owns what runs here

        if onnx_export.is_exporting():
            _, h1, c1 = onnx_export.lstm_cell(self, x, h0, c0)
        else:
            _, h1, c1 = self._layer(x, "", h0, c0, None, backend)
        if not is_batched:
            h1, c1 = h1.squeeze(0), c1.squeeze(0)
        return h1, c1
