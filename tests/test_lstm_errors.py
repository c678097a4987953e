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
                "backend must be one of ('auto', 'triton', 'triton_step', 'triton_persistent', 'reference')",
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
