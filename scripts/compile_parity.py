"""How far torch.compile'd lstmlab.LSTM is from eager torch.nn.LSTM on the same weights.

    python scripts/compile_parity.py            # CPU, the reference backend, Inductor

Prints, per module configuration and compile mode, the max absolute error of the outputs
(out, h_n, c_n) and of every gradient (parameters and inputs) against eager torch.nn.LSTM.
The same comparison, with tolerances, is tests/test_compile.py; this prints the numbers.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import lstmlab

CONFIGS = [  # (name, LSTM keywords, packed input)
    ("batch_first (the issue's example)", dict(batch_first=True), False),
    ("bidirectional, 2 layers", dict(num_layers=2, bidirectional=True), False),
    ("proj_size=8, 2 layers", dict(num_layers=2, proj_size=8), False),
    ("packed, unsorted, bidirectional", dict(bidirectional=True), True),
]
# eager lstmlab first: the fp32 round-off that compiled runs are to be measured against
MODES = [("eager (not compiled)", None), ("inductor", {}), ("inductor, fullgraph", {"fullgraph": True})]


def outputs_and_grads(model: torch.nn.Module, make_x, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    out, (h_n, c_n) = model(make_x())
    out = out.data if isinstance(out, PackedSequence) else out
    loss = out.square().sum() + h_n.sum() + c_n.sum()
    return [out, h_n, c_n, *torch.autograd.grad(loss, [*model.parameters(), *leaves])]


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; lstmlab backend: reference (CPU)")
    for name, kwargs, packed in CONFIGS:
        for mode, options in MODES:
            torch.manual_seed(0)
            ours = lstmlab.LSTM(16, 32, **kwargs)
            theirs = torch.nn.LSTM(16, 32, **kwargs)
            theirs.load_state_dict(ours.state_dict())
            torch._dynamo.reset()
            compiled = ours if options is None else torch.compile(ours, **options)
            if packed:
                leaves = [torch.randn(n, 16, requires_grad=True) for n in (20, 13, 7, 17)]

                def make_x(leaves=leaves):
                    return pack_sequence(leaves, enforce_sorted=False)
            else:
                shape = (4, 20, 16) if kwargs.get("batch_first") else (20, 4, 16)
                leaves = [torch.randn(*shape, requires_grad=True)]

                def make_x(leaves=leaves):
                    return leaves[0]

            actual = outputs_and_grads(compiled, make_x, leaves)
            expected = outputs_and_grads(theirs, make_x, leaves)
            errors = [(a - e).abs().max().item() for a, e in zip(actual, expected, strict=True)]
            print(f"{name:34s} {mode:20s} outputs {max(errors[:3]):.1e}  gradients {max(errors[3:]):.1e}")


if __name__ == "__main__":
    main()
