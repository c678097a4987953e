"""LSTM cell variants: which parts of the cell are on, as one immutable description.

Every backend reads a :class:`CellVariant`; the kernels read its :attr:`CellVariant.flags`, a bit
mask whose bits become ``tl.constexpr`` switches, so that the vanilla cell (no bit set) runs the
code it ran before variants existed.

One step of one layer, every variant at once (``naive.py`` writes it out with autograd; each
backend must compute the same function). ⊙ is element-wise, σ the logistic sigmoid:

    d_t   = h_{t−1} ⊙ m                          recurrent dropout (Gal & Ghahramani 2016): one
                                                 mask m [B, H] per sequence, scaled 1/(1 − p)
    r_t   = d_t · W_hhᵀ                          [B, 4H]
    r_t   = γ_hh ⊙ LN(r_t)                       layer norm (Ba et al. 2016; as haste's LayerNormLSTM)
    a_t   = gx_t + r_t                           gx_t = x_t·W_ihᵀ + b (layer norm: γ_ih ⊙ LN(x_t·W_ihᵀ) + b)
    a_i  += p_i ⊙ c_{t−1},  a_f += p_f ⊙ c_{t−1}   peepholes (Gers & Schmidhuber 2000)
    i     = σ(a_i)            (no input gate: 1)
    f     = σ(a_f)            (no forget gate: 1; coupled, CIFG: 1 − i)
    g     = tanh(a_g)         (no input activation: a_g)
    c̃     = f ⊙ c_{t−1} + i ⊙ g
    a_o  += p_o ⊙ c̃                              the output gate's peephole sees the new cell
    o     = σ(a_o)            (no output gate: 1)
    y     = γ_c ⊙ LN(c̃) + β_c                    layer norm only; else y = c̃
    h̃     = o ⊙ tanh(y)       (no output activation: o ⊙ y)
    c_t   = z^c ⊙ c_{t−1} + (1 − z^c) ⊙ c̃          zoneout (Krueger et al. 2016): z^c, z^h ∈ {0, 1}
    h_t   = z^h ⊙ h_{t−1} + (1 − z^h) ⊙ h̃          drawn per element and step, 1 with probability p

LN(v) = (v − mean(v)) / sqrt(var(v) + 1e-5) over the feature dimension (4H for r_t, H for c̃),
biased variance. Zoneout and recurrent dropout act only in training; in eval mode no mask is drawn
and the step is the plain one (identity at eval; note that Krueger et al. use the expectation
z = p instead). Parameters, torch-style names per layer and direction (suffix ``_l{k}[_reverse]``):
``weight_peephole`` [3, H] (p_i, p_f, p_o), ``weight_ln_ih`` [4H] (γ_ih), ``weight_ln_hh`` [4H]
(γ_hh), ``weight_ln_c`` [H] (γ_c), ``bias_ln_c`` [H] (β_c).

B: batch  T: time  H: hidden size  G = 4H: stacked gates (i, f, g, o)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

# bits of CellVariant.flags: what the kernels switch on (a tl.constexpr each)
PEEPHOLES = 1 << 0
CIFG = 1 << 1
NO_INPUT_GATE = 1 << 2
NO_FORGET_GATE = 1 << 3
NO_OUTPUT_GATE = 1 << 4
NO_INPUT_ACTIVATION = 1 << 5
NO_OUTPUT_ACTIVATION = 1 << 6
LAYER_NORM = 1 << 7
ZONEOUT_C = 1 << 8  # set by the layer when zoneout masks are passed (training), not by the variant
ZONEOUT_H = 1 << 9
RECURRENT_DROPOUT = 1 << 10  # likewise, when a dropout mask is passed
# the bits that describe the cell itself; the last three depend on the mode (train or eval)
STRUCTURE_BITS = (1 << 8) - 1
ALL_BITS = (1 << 11) - 1
LN_EPS = 1e-5

# "LSTM: A Search Space Odyssey" (Greff et al. 2017): their vanilla cell (V) has peepholes; every
# other variant is V with one change. Full gate recurrence (FGR) is not implemented.
GREFF_VARIANTS: dict[str, dict[str, bool]] = {
    "V": {"peepholes": True},
    "NP": {},  # no peepholes: torch.nn.LSTM's cell
    "CIFG": {"peepholes": True, "cifg": True},
    "NIG": {"peepholes": True, "input_gate": False},
    "NFG": {"peepholes": True, "forget_gate": False},
    "NOG": {"peepholes": True, "output_gate": False},
    "NIAF": {"peepholes": True, "input_activation": False},
    "NOAF": {"peepholes": True, "output_activation": False},
}


@dataclass(frozen=True)
class CellVariant:
    """Which parts of the LSTM cell are on. All defaults: torch.nn.LSTM's cell.

    peepholes: diagonal weights from the cell to the gates (i, f see c_{t−1}; o sees c̃).
    cifg: couple the input and forget gates, f = 1 − i.
    input_gate / forget_gate / output_gate: False fixes that gate at 1 (Greff's NIG / NFG / NOG).
    input_activation / output_activation: False drops the tanh on g / on the cell (NIAF / NOAF).
    layer_norm: normalise both projections' pre-activations and the cell (haste's LayerNormLSTM).
    zoneout_c / zoneout_h: probability that a unit keeps its previous value at a step (training).
    recurrent_dropout: probability that a unit of h_{t−1} is dropped, one mask per sequence (training).
    """

    peepholes: bool = False
    cifg: bool = False
    input_gate: bool = True
    forget_gate: bool = True
    output_gate: bool = True
    input_activation: bool = True
    output_activation: bool = True
    layer_norm: bool = False
    zoneout_c: float = 0.0
    zoneout_h: float = 0.0
    recurrent_dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"{field.name} must be a bool, got {value!r}")
            if field.type == "float":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise TypeError(f"{field.name} must be a probability (a float), got {value!r}")
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"{field.name} must be in [0, 1), got {value}")
        if self.cifg and not (self.input_gate and self.forget_gate):
            missing = "input" if not self.input_gate else "forget"
            raise ValueError(
                f"cifg=True couples the forget gate to the input gate (f = 1 − i), so it needs both; "
                f"got {missing}_gate=False. Use cifg=False to remove a gate instead."
            )

    @classmethod
    def greff(cls, name: str) -> CellVariant:
        """One of Greff et al.'s variants by its name in the paper (``GREFF_VARIANTS``)."""
        if name not in GREFF_VARIANTS:
            raise ValueError(f"Greff variant must be one of {sorted(GREFF_VARIANTS)}, got {name!r}")
        return cls(**GREFF_VARIANTS[name])

    @classmethod
    def from_flags(cls, flags: int) -> CellVariant:
        """The structure a kernel flag word describes (its mask bits describe a mode, not the cell)."""
        return cls(
            peepholes=bool(flags & PEEPHOLES),
            cifg=bool(flags & CIFG),
            input_gate=not flags & NO_INPUT_GATE,
            forget_gate=not flags & NO_FORGET_GATE,
            output_gate=not flags & NO_OUTPUT_GATE,
            input_activation=not flags & NO_INPUT_ACTIVATION,
            output_activation=not flags & NO_OUTPUT_ACTIVATION,
            layer_norm=bool(flags & LAYER_NORM),
        )

    @property
    def is_vanilla(self) -> bool:
        return self == CellVariant()

    @property
    def flags(self) -> int:
        """The structural bits (``PEEPHOLES`` … ``LAYER_NORM``); the layer adds the mask bits."""
        return (
            PEEPHOLES * self.peepholes
            | CIFG * self.cifg
            | NO_INPUT_GATE * (not self.input_gate)
            | NO_FORGET_GATE * (not self.forget_gate)
            | NO_OUTPUT_GATE * (not self.output_gate)
            | NO_INPUT_ACTIVATION * (not self.input_activation)
            | NO_OUTPUT_ACTIVATION * (not self.output_activation)
            | LAYER_NORM * self.layer_norm
        )

    def changed(self) -> dict[str, object]:
        """The options that differ from the vanilla cell (for reprs and run summaries)."""
        vanilla = CellVariant()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(vanilla, f.name)
        }


FLAG_NAMES = {
    PEEPHOLES: "peepholes",
    CIFG: "cifg",
    NO_INPUT_GATE: "no input gate",
    NO_FORGET_GATE: "no forget gate",
    NO_OUTPUT_GATE: "no output gate",
    NO_INPUT_ACTIVATION: "no input activation",
    NO_OUTPUT_ACTIVATION: "no output activation",
    LAYER_NORM: "layer norm",
    ZONEOUT_C: "zoneout on c",
    ZONEOUT_H: "zoneout on h",
    RECURRENT_DROPOUT: "recurrent dropout",
}


@functools.cache  # argument checks on every layer call name the bits they test
def flag_names(flags: int) -> tuple[str, ...]:
    """The names of the bits set in ``flags`` (error messages, logs)."""
    return tuple(name for bit, name in FLAG_NAMES.items() if flags & bit)
