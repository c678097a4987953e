"""lstmlab.LSTM (reference backend) against torch.nn.LSTM on copy T=50, same seed and batches:
one batch's outputs and gradients, then 150 Adam steps, in float32 and in float64.

Run: nice -n 10 python docs/results/copy_parity.py   (numbers quoted in docs/results/memory.md)
"""

import torch
import torch.nn.functional as F

from lstmlab.runner.models import SequenceModel
from lstmlab.runner.tasks import make_task

torch.set_num_threads(1)
task = make_task("copy", seq_len=50)
KINDS = (("lstmlab", {"backend": "reference"}), ("torch_lstm", {}))


def build(kind: str, extra: dict, dtype: torch.dtype) -> SequenceModel:
    torch.manual_seed(1)
    model = SequenceModel(kind, task.output_size, vocab_size=task.vocab_size, hidden_size=64, **extra)
    return model.to(dtype)


x, y = task.sample(64, torch.Generator().manual_seed(0))
for dtype in (torch.float32, torch.float64):
    results = []
    for kind, extra in KINDS:
        model = build(kind, extra, dtype)
        out = model(x)  # (B, T, O)
        F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    grad_diff = max(((grads_a[k] - grads_b[k]).abs().max() / grads_b[k].abs().max()).item() for k in grads_a)
    out_diff = (out_a - out_b).abs().max().item()
    print(f"{dtype}: max |output diff| {out_diff:.2g}, max relative grad diff {grad_diff:.2g}")

for dtype in (torch.float32, torch.float64):
    losses = []
    for kind, extra in KINDS:
        model = build(kind, extra, dtype)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        trajectory = []
        for step in range(150):
            xb, yb = task.sample(64, torch.Generator().manual_seed(step))
            loss = F.cross_entropy(model(xb).flatten(0, 1), yb.flatten())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            trajectory.append(loss.item())
        losses.append(trajectory)
    rel = [abs(a - b) / abs(b) for a, b in zip(*losses, strict=True)]
    print(
        f"{dtype}: relative loss difference at steps 1, 50, 100, 150:",
        [f"{rel[i]:.1e}" for i in (0, 49, 99, 149)],
    )
