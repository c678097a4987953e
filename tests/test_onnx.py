"""ONNX export of models holding lstmlab.LSTM / LSTMCell, with both of torch's exporters.

Each configuration is exported once per exporter with a dynamic batch and sequence length, then run
in onnxruntime at the export's shape and at two others, and compared with eager at 1e-5 (fp32).
The graph must use ONNX's LSTM node where the cell fits it (vanilla, peepholes, CIFG, eval-mode
dropout and zoneout) and a loop per layer elsewhere (Scan with dynamo=True, Loop with dynamo=False).

B: batch  T: time  I: input size  H: hidden size  P: proj_size or H  D: directions  L: layers
"""

import io
import warnings

import pytest
import torch
from _utils import rel_err
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

REASON = "ONNX export needs the export extra: pip install 'lstmlab[export]'"
onnx = pytest.importorskip("onnx", reason=REASON)
ort = pytest.importorskip("onnxruntime", reason=REASON)
pytest.importorskip("onnxscript", reason=REASON)  # torch.onnx's dynamo=True exporter

import lstmlab  # noqa: E402
from lstmlab import onnx_export  # noqa: E402

I, H = 4, 6
SHAPES = [(5, 3), (8, 2), (1, 1)]  # (T, B): the export's first, then two it never saw
TOL = 1e-5
EXPORTERS = {"dynamo": True, "torchscript": False}
LOOP_OP = {True: "Scan", False: "Loop"}

# name: (LSTM keywords, whether (h_0, c_0) is given); every one in eval mode
NODE_CONFIGS = {
    "plain": (dict(), False),
    "2-layers-bidirectional-batch_first-hx": (dict(num_layers=2, bidirectional=True, batch_first=True), True),
    "no-bias-bidirectional": (dict(bias=False, bidirectional=True), False),
    "peepholes-2-layers-hx": (dict(peepholes=True, num_layers=2), True),
    "cifg-peepholes-batch_first": (dict(cifg=True, peepholes=True, batch_first=True), False),
    "eval-dropout-zoneout-recurrent_dropout": (
        dict(num_layers=2, dropout=0.5, zoneout_c=0.3, zoneout_h=0.2, recurrent_dropout=0.25),
        False,
    ),
}
LOOP_CONFIGS = {
    "proj_size-2-layers-bidirectional-hx": (dict(proj_size=3, num_layers=2, bidirectional=True), True),
    "layer_norm-peepholes-cifg-no-bias": (
        dict(layer_norm=True, peepholes=True, cifg=True, bias=False),
        False,
    ),
    "gate-and-activation-removals-bidirectional-batch_first": (
        dict(input_gate=False, forget_gate=False, output_gate=False, bidirectional=True, batch_first=True)
        | dict(input_activation=False, output_activation=False),
        False,
    ),
}


class Flat(nn.Module):
    """An LSTM with (h_0, c_0) as two inputs (when given) and flat outputs (output, h_n, c_n)."""

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h0=None, c0=None):
        out, (h, c) = self.lstm(x, None if h0 is None else (h0, c0))
        return out, h, c


def make_lstm(kwargs: dict) -> lstmlab.LSTM:
    torch.manual_seed(0)
    lstm = lstmlab.LSTM(I, H, **kwargs)
    with torch.no_grad():  # layer norm starts at γ = 1, β = 0: move it off the identity
        for name, p in lstm.named_parameters():
            if "_ln_" in name:
                p.uniform_(0.5, 1.5)
    return lstm.eval()


def lstm_inputs(lstm: lstmlab.LSTM, T: int, B: int, with_state: bool) -> tuple[torch.Tensor, ...]:
    x = torch.randn(B, T, I) if lstm.batch_first else torch.randn(T, B, I)
    if not with_state:
        return (x,)
    D = 2 if lstm.bidirectional else 1
    P = lstm.proj_size or H
    return x, torch.randn(lstm.num_layers * D, B, P), torch.randn(lstm.num_layers * D, B, H)


def export(model: nn.Module, args: tuple, dynamo: bool, axes: list[dict[int, str]]):
    """The ONNX model of ``model``; inputs x, h0, c0 (those given), each dynamic on its ``axes``
    ({axis: "batch" or "time"})."""
    names = ["x", "h0", "c0"][: len(args)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' advice (TracerWarning, deprecations)
        if dynamo:
            dims = {"batch": torch.export.Dim("batch"), "time": torch.export.Dim("time")}
            shapes = tuple({a: dims[n] for a, n in arg_axes.items()} for arg_axes in axes)
            program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, verbose=False)
            return program.model_proto
        f = io.BytesIO()
        dynamic_axes = dict(zip(names, axes, strict=True))
        torch.onnx.export(model, args, f, dynamo=False, input_names=names, dynamic_axes=dynamic_axes)
        return onnx.load_from_string(f.getvalue())


def lstm_axes(lstm: lstmlab.LSTM, with_state: bool) -> list[dict[int, str]]:
    x = {0: "batch", 1: "time"} if lstm.batch_first else {0: "time", 1: "batch"}
    return [x, {1: "batch"}, {1: "batch"}] if with_state else [x]


def run_and_compare(proto, model: nn.Module, inputs: tuple) -> None:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs, strict=True)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = model(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        err = rel_err(torch.from_numpy(g), w)
        assert err < TOL, f"output {k} at input shape {tuple(inputs[0].shape)}: {err:.2e}"


def top_level_ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("config", list(NODE_CONFIGS) + list(LOOP_CONFIGS))
def test_lstm_exports_and_runs_at_any_shape(config, exporter):
    kwargs, with_state = {**NODE_CONFIGS, **LOOP_CONFIGS}[config]
    dynamo = EXPORTERS[exporter]
    lstm = make_lstm(kwargs)
    model = Flat(lstm).eval()  # the TorchScript exporter restores the wrapper's mode onto lstm
    proto = export(model, lstm_inputs(lstm, *SHAPES[0], with_state), dynamo, lstm_axes(lstm, with_state))

    ops = top_level_ops(proto)
    layers = lstm.num_layers
    if config in NODE_CONFIGS:  # one fused node per layer (both directions in it), no loop
        assert ops.count("LSTM") == layers and "Loop" not in ops and "Scan" not in ops, ops
    else:  # one loop per layer (both directions in it), no LSTM node
        assert ops.count(LOOP_OP[dynamo]) == layers and "LSTM" not in ops, ops
    for T, B in SHAPES:
        run_and_compare(proto, model, lstm_inputs(lstm, T, B, with_state))


def test_lstm_node_attributes():
    """The node carries the cell: hidden_size, bidirectional, CIFG as input_forget, peepholes as P."""
    lstm = make_lstm(dict(bidirectional=True, cifg=True, peepholes=True))
    proto = export(Flat(lstm).eval(), lstm_inputs(lstm, *SHAPES[0], False), True, lstm_axes(lstm, False))
    (node,) = [n for n in proto.graph.node if n.op_type == "LSTM"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["hidden_size"] == H and attrs["direction"] == b"bidirectional" and attrs["input_forget"] == 1
    assert len(node.input) == 8 and node.input[4] == ""  # P given, sequence_lens left out


class CellWithState(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x, h0, c0):
        return self.cell(x, (h0, c0))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("variant", [{}, {"layer_norm": True}])
def test_lstm_cell_exports_and_runs_at_any_batch(variant, exporter):
    torch.manual_seed(0)
    cell = lstmlab.LSTMCell(I, H, **variant).eval()
    with torch.no_grad():
        for name, p in cell.named_parameters():
            if "_ln_" in name:
                p.uniform_(0.5, 1.5)
    model = CellWithState(cell).eval()

    def inputs(B):  # x [B, I], h0 [B, H], c0 [B, H]
        return torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)

    proto = export(model, inputs(3), EXPORTERS[exporter], [{0: "batch"}] * 3)
    ops = top_level_ops(proto)
    assert ("LSTM" in ops) == (not variant), ops
    for B in (3, 1, 5):
        run_and_compare(proto, model, inputs(B))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_packed_input_is_a_clear_error(exporter):
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstmlab.LSTM(I, H)

        def forward(self, x, lengths):
            return self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))[1][0]

    args = (torch.randn(5, 3, I), torch.tensor([5, 3, 2]))
    f = None if EXPORTERS[exporter] else io.BytesIO()
    with warnings.catch_warnings(), pytest.raises(Exception, match="PackedSequence input cannot be exported"):
        warnings.simplefilter("ignore")
        torch.onnx.export(Packed().eval(), args, f, dynamo=EXPORTERS[exporter], verbose=False)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_training_mode_masks_are_a_clear_error(exporter):
    lstm = lstmlab.LSTM(I, H, num_layers=2, dropout=0.5, zoneout_h=0.1).train()
    x = torch.randn(5, 3, I)
    with (
        warnings.catch_warnings(),
        pytest.raises(Exception, match=r"dropout=0.5, zoneout_h=0.1.*model\.eval"),
    ):
        warnings.simplefilter("ignore")
        if EXPORTERS[exporter]:
            torch.onnx.export(Flat(lstm), (x,), dynamo=True, verbose=False)
        else:  # this exporter puts the model in eval mode unless told to keep its mode
            mode = torch.onnx.TrainingMode.PRESERVE
            torch.onnx.export(Flat(lstm), (x,), io.BytesIO(), dynamo=False, training=mode)


def test_eager_forward_never_runs_the_export_path(monkeypatch):
    """Outside torch.onnx.export the hook's condition is False and nothing of onnx_export runs."""

    def fail(*args):
        raise AssertionError("the ONNX export path ran outside an export")

    monkeypatch.setattr(onnx_export, "lstm_layers", fail)
    monkeypatch.setattr(onnx_export, "lstm_cell", fail)
    assert not onnx_export.is_exporting()
    lstmlab.LSTM(I, H)(torch.randn(5, 3, I))
    lstmlab.LSTMCell(I, H)(torch.randn(3, I))
