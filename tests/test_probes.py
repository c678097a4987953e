"""Gradient-retention probe (lstmlab.analysis.probes) and the issue-4 report step
(lstmlab.analysis.memory_report)."""

import math

import pytest
import torch

import lstmlab.runner.build
from lstmlab.analysis import memory_report
from lstmlab.analysis.probes import decades_per_step, grad_norm_curve, initial_state_grad_norm
from lstmlab.runner.config import compose, to_plain
from lstmlab.runner.models import SequenceModel
from lstmlab.runner.train import train


def test_decades_per_step_is_the_slope_of_log10():
    assert decades_per_step({T: 3 * 10 ** (-0.25 * T) for T in (1, 10, 50)}) == pytest.approx(0.25)
    assert decades_per_step({1: 0.5, 10: 0.5, 400: 0.5}) == pytest.approx(0.0)
    assert decades_per_step({1: 0.5, 10: 1e-3, 50: 0.0}) == pytest.approx(math.log10(500) / 9)


def test_grad_norm_matches_finite_differences():
    torch.manual_seed(0)
    model = SequenceModel("torch_gru", 1, input_size=2, per_step=False, hidden_size=4).double()
    x, y = torch.rand(3, 6, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)

    def loss_0(h0: torch.Tensor) -> float:  # the first example's squared error from state h0
        out = model.rnn(model.encoder(x[:1]), h0.view(1, 1, 4))[0]
        return (model.head(out[:, -1]).squeeze() - y[0]).square().item()

    eps, h0 = 1e-6, torch.zeros(4, dtype=torch.float64)
    fd = torch.tensor([(loss_0(h0 + eps * e) - loss_0(h0 - eps * e)) / (2 * eps) for e in torch.eye(4)])
    norms = initial_state_grad_norm(model, x, y)  # (N,)
    assert norms.shape == (3,)
    assert norms[0].item() == pytest.approx(fd.norm().item(), rel=1e-6)


def test_lstmlab_and_torch_lstm_agree_at_the_same_seed():
    curves = []
    for kind, extra in (("lstmlab", {"backend": "reference"}), ("torch_lstm", {})):
        torch.manual_seed(3)
        model = SequenceModel(kind, 1, input_size=2, per_step=False, hidden_size=8, **extra)
        curves.append(grad_norm_curve(model, [1, 5, 30], n=16))
    for T in (1, 5, 30):
        assert curves[0][T] == pytest.approx(curves[1][T], rel=1e-10)
    assert curves[0][30] < curves[0][1]


def test_per_step_models_are_rejected():
    model = SequenceModel("torch_rnn", 3, vocab_size=5, per_step=True, hidden_size=4)
    with pytest.raises(ValueError, match="needs a last-step model"):
        initial_state_grad_norm(model, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2))


def _tiny_sweep(tmp_path, runs: list[list[str]]) -> list[dict]:
    base = [
        "experiment=smoke",
        "trainer.steps=2",
        "trainer.num_threads=1",
        "logger=jsonl",
        "trainer.device=cpu",
    ]
    return [train(compose(base + o), tmp_path / "sweep" / str(i), o) for i, o in enumerate(runs)]


def test_rebuild_draws_the_runs_initial_weights(tmp_path, monkeypatch):
    built = []

    class Capture(SequenceModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append({k: v.clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(lstmlab.runner.build, "SequenceModel", Capture)
    cfg = compose(
        ["experiment=smoke", "trainer.steps=2", "model=lstmlab_chrono", "seed=7", "trainer.device=cpu"]
    )
    train(cfg, tmp_path)
    rebuilt = memory_report.rebuild(to_plain(cfg), None).state_dict()
    assert built[0].keys() == rebuilt.keys()
    for k, v in built[0].items():
        assert torch.equal(v, rebuilt[k]), k
    trained = memory_report.rebuild(to_plain(cfg), str(tmp_path)).state_dict()
    assert not torch.equal(trained["rnn.weight_hh_l0"], rebuilt["rnn.weight_hh_l0"])


def test_grad_retention_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory_report, "LENGTHS", [1, 4])
    monkeypatch.setattr(memory_report, "N_EXAMPLES", 16)
    runs = [["model=lstmlab"], ["model=torch_lstm"], ["model=lstmlab_chrono"]]
    runs += [["model=lstmlab", "seed=5"], ["model=torch_lstm", "seed=5"]]
    _tiny_sweep(tmp_path, [[*r, "model.hidden_size=8"] for r in runs])
    memory_report.main(["grad_retention", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    doc = (tmp_path / "out" / "grad_retention.md").read_text()
    for row in ("| lstmlab.LSTM | init |", "| torch.nn.LSTM | trained |", "chrono T_max=4 (init only)"):
        assert row in doc
    assert "Command: `" in doc and "commit " in doc
    # The prose states what the runs hold: their seeds, sizes, steps and the backend that ran.
    assert "over 16 fixed examples, then the geometric mean over 2 seeds (0, 5)" in doc
    assert (
        "Hidden size 8, 1 layer(s). 'trained': after 2 steps on adding T=10 (adam, lr 0.001, batch 16)" in doc
    )
    assert "lstmlab.LSTM ran its cpu backend." in doc
    assert (tmp_path / "out" / "grad_retention.png").stat().st_size > 0

    # Again into the same folder (by default the committed docs/results): refused, nothing touched.
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit) as exit_:
        memory_report.main(["grad_retention", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"memory_report: {tmp_path / 'out'} holds grad_retention.md, ")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    memory_report.main(
        ["grad_retention", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--overwrite"]
    )


def test_bidirectional_and_horizon_reports(tmp_path):
    tagging = ["task=hmm_tagging", "task.seq_len=12", "task.resolve_distance=3"]
    bi = [*tagging, "model=torch_gru", "model.bidirectional=true"]
    (_, bigru) = _tiny_sweep(tmp_path, [[*tagging, "model=torch_gru"], bi])
    memory_report.main(["bidirectional", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    doc = (tmp_path / "out" / "bidirectional.md").read_text()
    assert "| Bayes bound, left-to-right (filtering) | 0." in doc
    assert f"| Bi-GRU | {bigru['final']['test']['acc']:.4f} |" in doc  # computed from the run
    assert "mean ± std over 1 seed (0) on each seed's 64-sequence test set" in doc
    assert "ran its" not in doc  # no lstmlab run, no sentence about its backend

    adding, copy = _tiny_sweep(
        tmp_path / "h", [["task=adding", "model=torch_rnn"], ["task=copy", "model=torch_rnn"]]
    )
    memory_report.main(["horizon", str(tmp_path / "h" / "sweep"), "--out", str(tmp_path / "out")])
    doc = (tmp_path / "out" / "memory_horizon.md").read_text()
    rnn_rows = [line for line in doc.splitlines() if line.startswith("| RNN (tanh) | ")]
    assert rnn_rows[0].startswith(f"| RNN (tanh) | {adding['final']['test']['mse']:.3g} · 0/1 |")
    assert rnn_rows[1].startswith(f"| RNN (tanh) | {copy['final']['test']['ce']:.3g} · acc ")
    assert f"| trivial baseline | {adding['baseline']['mse']:.3g} | |" in doc
    assert "test metric on 64 held-out sequences" in doc
