"""Each kind of bad input raises the exception type torch raises, with a message that names what
was expected and what came."""

import re

import pytest
import torch

import lstmlab


def expect(exc, *fragments):
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


@pytest.fixture
def lstm():
    return lstmlab.LSTM(4, 6, num_layers=2)


def test_wrong_rank(lstm):
    with expect(ValueError, "Expected input to be 2D or 3D, got 4D"):
        lstm(torch.randn(2, 3, 4, 5))
    with expect(ValueError, "Expected input to be 2D or 3D, got 1D"):
        lstm(torch.randn(4))
    with expect(ValueError, "LSTMCell: Expected input to be 1D or 2D, got 3D"):
        lstmlab.LSTMCell(4, 6)(torch.randn(2, 3, 4))


def test_wrong_feature_size(lstm):
    with expect(RuntimeError, "input.size(-1) must be equal to input_size. Expected 4, got 5"):
        lstm(torch.randn(5, 3, 5))
    with expect(RuntimeError, "inconsistent input_size: got 5 expected 4"):
        lstmlab.LSTMCell(4, 6)(torch.randn(3, 5))


def test_state_of_the_wrong_shape(lstm):
    with expect(RuntimeError, "Expected hidden[0] size (2, 3, 6), got [2, 2, 6]"):
        lstm(torch.randn(5, 3, 4), (torch.randn(2, 2, 6), torch.randn(2, 3, 6)))
    with expect(RuntimeError, "Expected hidden[1] size (2, 3, 6), got [2, 3, 7]"):
        lstm(torch.randn(5, 3, 4), (torch.randn(2, 3, 6), torch.randn(2, 3, 7)))
    proj = lstmlab.LSTM(4, 6, proj_size=2)
    with expect(RuntimeError, "Expected hidden[0] size (1, 3, 2), got [1, 3, 6]"):
        proj(torch.randn(5, 3, 4), (torch.randn(1, 3, 6), torch.randn(1, 3, 6)))
    cell = lstmlab.LSTMCell(4, 6)
    with expect(RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 2"):
        cell(torch.randn(3, 4), (torch.randn(2, 6), torch.randn(3, 6)))
    with expect(RuntimeError, "hidden1 has inconsistent hidden_size: got 5, expected 6"):
        cell(torch.randn(3, 4), (torch.randn(3, 6), torch.randn(3, 5)))


def test_batched_input_with_unbatched_state_and_the_reverse(lstm):
    with expect(RuntimeError, "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 2-D)"):
        lstm(torch.randn(5, 3, 4), (torch.randn(2, 6), torch.randn(2, 6)))
    with expect(RuntimeError, "For unbatched 2-D input, hx and cx should also be 2-D but got (3-D, 3-D)"):
        lstm(torch.randn(5, 4), (torch.randn(2, 1, 6), torch.randn(2, 1, 6)))
    with expect(RuntimeError, "hx must be a tuple (h_0, c_0) of two tensors, got Tensor"):
        lstm(torch.randn(5, 3, 4), torch.randn(2, 3, 6))
    cell = lstmlab.LSTMCell(4, 6)
    with expect(RuntimeError, "for 1-D input, h_0 and c_0 should be 1-D but got (2-D, 2-D)"):
        cell(torch.randn(4), (torch.randn(3, 6), torch.randn(3, 6)))
    with expect(RuntimeError, "for 2-D input, h_0 and c_0 should be 2-D but got (1-D, 1-D)"):
        cell(torch.randn(3, 4), (torch.randn(6), torch.randn(6)))


def test_dtype_mismatch(lstm):
    with expect(ValueError, "input dtype (torch.float64) does not match weight dtype (torch.float32)"):
        lstm(torch.randn(5, 3, 4, dtype=torch.float64))
    with expect(RuntimeError, "h_0 and c_0 must have the input's dtype (torch.float32), got (torch.float64"):
        lstm(torch.randn(5, 3, 4), (torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6)))
    with expect(RuntimeError, "input dtype (torch.float64) does not match weight dtype (torch.float32)"):
        lstmlab.LSTMCell(4, 6)(torch.randn(3, 4, dtype=torch.float64))


def test_device_mismatch():
    # "meta" stands in for a second device on a machine without a GPU
    with expect(RuntimeError, "found input tensor at cpu and parameter tensor at meta"):
        lstmlab.LSTM(4, 6, device="meta")(torch.randn(5, 3, 4))
    with expect(RuntimeError, "found input tensor at cpu and hidden tensor at meta"):
        lstmlab.LSTM(4, 6)(torch.randn(5, 3, 4), (torch.zeros(1, 3, 6, device="meta"),) * 2)
    with expect(RuntimeError, "found input tensor at cpu and parameter tensor at meta"):
        lstmlab.LSTMCell(4, 6, device="meta")(torch.randn(3, 4))


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(proj_size=6), ValueError, ["proj_size has to be smaller than hidden_size", "proj_size=6"]),
        (dict(proj_size=9), ValueError, ["proj_size has to be smaller than hidden_size"]),
        (dict(proj_size=-1), ValueError, ["proj_size should be a positive integer or zero", "got -1"]),
        (dict(proj_size=1.5), TypeError, ["proj_size should be of type int, got: float"]),
        (dict(dropout=1.5), ValueError, ["dropout should be a number in range [0, 1]", "got 1.5"]),
        (dict(dropout=-0.1), ValueError, ["dropout should be a number in range [0, 1]"]),
        (dict(dropout=True), ValueError, ["dropout should be a number in range [0, 1]", "got True"]),
        (dict(dropout="0.5"), ValueError, ["dropout should be a number", "got '0.5'"]),
        (dict(hidden_size=0), ValueError, ["hidden_size must be greater than zero, got 0"]),
        (dict(hidden_size=-3), ValueError, ["hidden_size must be greater than zero, got -3"]),
        (dict(hidden_size=6.0), TypeError, ["hidden_size should be of type int, got: float"]),
        (dict(input_size=0), ValueError, ["input_size must be greater than zero, got 0"]),
        (dict(input_size=2.5), TypeError, ["input_size should be of type int, got: float"]),
        (dict(num_layers=0), ValueError, ["num_layers must be greater than zero, got 0"]),
        (dict(num_layers=1.5), TypeError, ["num_layers should be of type int, got: float"]),
        (dict(bias=1), TypeError, ["bias should be of type bool, got: int"]),
        (
            dict(backend="cudnn"),
            ValueError,
            [
                "backend must be one of ('auto', 'triton', 'triton_step', 'triton_persistent', 'cpu', "
                "'reference')",
                "'cudnn'",
            ],
        ),
        (dict(forget_bias=1.0, bias=False), ValueError, ["need bias=True"]),
        (dict(chrono_t_max=2), ValueError, ["chrono_t_max", "greater than 2", "got 2"]),
        (dict(chrono_t_max=50, forget_bias=1.0), ValueError, ["pass one of them"]),
    ],
)
def test_invalid_constructor_arguments(kwargs, exc, fragments):
    args = dict(input_size=4, hidden_size=6) | kwargs
    with expect(exc, *fragments):
        lstmlab.LSTM(**args)


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(hidden_size=0), ValueError, ["hidden_size must be greater than zero, got 0"]),
        (dict(input_size=True), TypeError, ["input_size should be of type int, got: bool"]),
        (dict(bias="yes"), TypeError, ["bias should be of type bool, got: str"]),
        (dict(backend="fast"), ValueError, ["backend must be one of"]),
    ],
)
def test_invalid_cell_arguments(kwargs, exc, fragments):
    args = dict(input_size=4, hidden_size=6) | kwargs
    with expect(exc, *fragments):
        lstmlab.LSTMCell(**args)


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        lstmlab.LSTM(4, 6, dropout=0.2)


# ---- torch's error contract, case by case against torch itself ----
# (make the module, call it): torch.nn's and ours must raise the same type with the same words, in
# the same order (the first problem is the one reported). Where torch's words come from deep inside
# (a matmul, oneDNN) ours say what is wrong instead, with torch's type: those are in CLEARER.
D64, r = torch.float64, torch.randn


def torch_cell(nn):
    return nn.LSTMCell(10, 20)


def torch_lstm(nn):
    return nn.LSTM(10, 20, 2)


TORCH_CASES = {
    "cell_input_size": (torch_cell, lambda m: m(r(3, 11))),
    "cell_h_size": (torch_cell, lambda m: m(r(3, 10), (r(3, 21), r(3, 20)))),
    "cell_c_size": (torch_cell, lambda m: m(r(3, 10), (r(3, 20), r(3, 21)))),
    "cell_h_batch": (torch_cell, lambda m: m(r(3, 10), (r(5, 20), r(5, 20)))),
    "cell_c_batch": (torch_cell, lambda m: m(r(3, 10), (r(3, 20), r(5, 20)))),
    "cell_size_before_dtype": (torch_cell, lambda m: m(r(3, 11, dtype=D64))),
    "cell_4d_hx": (torch_cell, lambda m: m(r(3, 10), (r(2, 3, 1, 3), r(2, 3, 1, 3)))),
    "cell_3d_input": (torch_cell, lambda m: m(r(2, 3, 10))),
    "lstm_input_size": (torch_lstm, lambda m: m(r(5, 3, 11))),
    "lstm_h_size": (torch_lstm, lambda m: m(r(5, 3, 10), (r(2, 3, 21), r(2, 3, 20)))),
    "lstm_c_size": (torch_lstm, lambda m: m(r(5, 3, 10), (r(2, 3, 20), r(2, 3, 21)))),
    "lstm_h_layers": (torch_lstm, lambda m: m(r(5, 3, 10), (r(1, 3, 20), r(2, 3, 20)))),
    "lstm_h_batch": (torch_lstm, lambda m: m(r(5, 3, 10), (r(2, 4, 20), r(2, 4, 20)))),
    "lstm_dtype": (torch_lstm, lambda m: m(r(5, 3, 10, dtype=D64))),
    "lstm_dtype_before_size": (torch_lstm, lambda m: m(r(5, 3, 11, dtype=D64))),
    "lstm_4d_input": (torch_lstm, lambda m: m(r(4, 5, 3, 10))),
    "lstm_batched_unbatched_hx": (torch_lstm, lambda m: m(r(5, 3, 10), (r(2, 20), r(2, 20)))),
    "lstm_unbatched_batched_hx": (torch_lstm, lambda m: m(r(5, 10), (r(2, 3, 20), r(2, 3, 20)))),
    "cell_dtype": (torch_cell, lambda m: m(r(3, 10, dtype=D64))),
    "cell_unbatched_input_batched_hx": (torch_cell, lambda m: m(r(10), (r(3, 20), r(3, 20)))),
    "cell_state_dtype": (torch_cell, lambda m: m(r(3, 10), (r(3, 20, dtype=D64), r(3, 20, dtype=D64)))),
    "lstm_state_dtype": (torch_lstm, lambda m: m(r(5, 3, 10), (r(2, 3, 20).double(), r(2, 3, 20).double()))),
    "lstm_hx_not_a_tuple": (torch_lstm, lambda m: m(r(5, 3, 10), r(2, 3, 20))),
}
CLEARER = {  # torch's message here comes from its internals; ours (same type) says what to fix
    "cell_dtype": "LSTMCell input dtype (torch.float64) does not match weight dtype (torch.float32)",
    "cell_unbatched_input_batched_hx": "LSTMCell: for 1-D input, h_0 and c_0 should be 1-D",
    "cell_state_dtype": "LSTMCell: h_0 and c_0 must have the input's dtype (torch.float32)",
    "lstm_state_dtype": "LSTM: h_0 and c_0 must have the input's dtype (torch.float32)",
    "lstm_hx_not_a_tuple": "LSTM: hx must be a tuple (h_0, c_0) of two tensors, got Tensor",
}


def raised(make, call, namespace):
    torch.manual_seed(0)
    try:
        call(make(namespace))
    except Exception as e:  # the exception itself is what the test compares
        return type(e), str(e)
    return None, None


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_errors_are_torchs_type_order_and_words(case):
    make, call = TORCH_CASES[case]
    theirs, ours = raised(make, call, torch.nn), raised(make, call, lstmlab)
    assert theirs[0] is not None, "torch accepts this input: not an error case"
    assert ours[0] is theirs[0], (ours, theirs)
    if case in CLEARER:
        assert CLEARER[case] in ours[1]
    else:
        assert ours[1] == theirs[1]


def test_an_option_free_cell_never_reads_training():
    """torch's module tests treat a module whose forward reads self.training as one whose train and
    eval modes differ; a cell without zoneout must not read it."""

    class Watched(lstmlab.LSTMCell):
        reads = 0

        def __getattribute__(self, name):
            if name == "training":
                type(self).reads += 1
            return super().__getattribute__(name)

    plain, zoned = Watched(3, 4), Watched(3, 4, zoneout_c=0.5)
    Watched.reads = 0
    plain(torch.randn(2, 3))
    assert Watched.reads == 0
    zoned(torch.randn(2, 3))
    assert Watched.reads > 0  # the spy sees a read: a cell with zoneout reads its mode
