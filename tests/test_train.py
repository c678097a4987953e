"""The training runner: every model trains, runs are reproducible and resumable, failures are
loud, and the same code runs data-parallel under torchrun and on Hydra's submitit launcher."""

import json
import logging
import os
import platform
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lstmlab.runner.train
from lstmlab.runner.config import ConfigError, compose
from lstmlab.runner.loggers import read_jsonl
from lstmlab.runner.tasks.adding import AddingTask
from lstmlab.runner.train import CKPT_NAME, NonFiniteLossError, train

# Tiny runs on one thread each: the suite shares a 2-core machine. On the CPU also where a GPU
# is present, so that the backends asserted below are the CPU's.
SMALL = ["experiment=smoke", "trainer.num_threads=1", "trainer.device=cpu"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lstmlab.runner.train", *args]


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without their timings, which differ between any two runs."""
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]


@pytest.mark.parametrize("model", ["lstmlab", "torch_lstm", "torch_gru", "torch_rnn"])
@pytest.mark.parametrize("task", ["adding", "copy"])
def test_each_model_trains_with_a_finite_decreasing_loss(model, task, tmp_path):
    overrides = [f"model={model}", f"task={task}", "optim.lr=1e-2", "trainer.steps=30"]
    summary = train(compose([*SMALL, *overrides, "trainer.eval_interval=5"]), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    losses = torch.tensor([row["train_loss"] for row in rows])  # means over 5 steps
    assert [row["step"] for row in rows] == [5, 10, 15, 20, 25, 30]
    assert torch.isfinite(losses).all()
    assert losses[-2:].mean() < 0.9 * losses[0]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["model"] == model and summary["task"] == task
    assert summary["seq_len"] == 10 and summary["input_len"] == (10 if task == "adding" else 30)
    assert summary["compile"] == "none" and summary["devices"] == [summary["device"]]
    assert summary["backend"] == ("cpu" if model == "lstmlab" else "native")  # auto on a CPU: the C++ kernel
    if model == "lstmlab":
        assert summary["cpu_gemm"].startswith("auto: ")  # the GEMM engine that ran, in words
    else:
        assert summary["cpu_gemm"] is None
    assert summary["parameters"] > 0 and summary["time_per_step_s"] > 0
    assert set(summary["final"]["test"]) == {summary["metric"], "acc"}
    assert summary["baseline"][summary["metric"]] > 0
    assert (tmp_path / CKPT_NAME).exists()


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    cfg = compose([*SMALL, "model.num_layers=2", "model.dropout=0.2"])
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    c = train(compose([*SMALL, "model.num_layers=2", "model.dropout=0.2", "seed=1"]), tmp_path)
    assert a["final"] == b["final"]
    assert comparable(read_jsonl(tmp_path / "a/metrics.jsonl")) == comparable(
        read_jsonl(tmp_path / "b/metrics.jsonl")
    )
    assert a["final"] != c["final"]


def test_epochs_over_a_fixed_training_set(tmp_path):
    cfg = compose([*SMALL, "task.train_size=64", "trainer.epochs=3", "trainer.eval_interval=4"])
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 3 * 64 // 16
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [4, 8, 12]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    # Two layers with dropout, so the restored RNG state matters as much as the weights.
    overrides = [
        *SMALL,
        "model.num_layers=2",
        "model.dropout=0.1",
        "optim.schedule=cosine",
        "trainer.steps=300",
        "trainer.eval_interval=25",
        "trainer.ckpt_interval=50",
        "trainer.log_interval=25",
    ]
    through = train(compose(overrides), tmp_path / "through")

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(*overrides, f"hydra.run.dir={killed}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (killed / CKPT_NAME).exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(killed / CKPT_NAME, weights_only=True)
    assert 50 <= state["step"] < 300
    assert not (killed / "summary.json").exists()

    resumed = train(compose([*overrides, "trainer.resume=true"]), killed)
    assert resumed["resumed_from_step"] == state["step"]
    assert resumed["final"] == through["final"]  # bitwise: floats compared with ==
    assert comparable(read_jsonl(killed / "metrics.jsonl")) == comparable(
        read_jsonl(tmp_path / "through/metrics.jsonl")
    )
    final_state = torch.load(killed / CKPT_NAME, weights_only=True)
    through_state = torch.load(tmp_path / "through" / CKPT_NAME, weights_only=True)
    for name, tensor in through_state["model"].items():
        assert torch.equal(final_state["model"][name], tensor), name


def test_a_folder_holding_a_run_is_never_overwritten_silently(tmp_path):
    first = train(compose(SMALL), tmp_path)
    written = (tmp_path / "summary.json").read_text()
    with pytest.raises(
        ConfigError, match=r"holds a finished run \(summary.json, checkpoints/last.pt, metrics"
    ):
        train(compose([*SMALL, "seed=1"]), tmp_path)
    assert (tmp_path / "summary.json").read_text() == written

    (tmp_path / "summary.json").unlink()  # a partial run: a checkpoint and metrics, no summary
    with pytest.raises(
        ConfigError, match=r"holds a partial run .*trainer\.resume=true.*trainer\.overwrite=true"
    ):
        train(compose([*SMALL, "seed=1"]), tmp_path)

    replaced = train(compose([*SMALL, "seed=1", "trainer.overwrite=true", "trainer.steps=10"]), tmp_path)
    assert replaced["final"] != first["final"] and replaced["resumed_from_step"] is None
    assert torch.load(tmp_path / CKPT_NAME, weights_only=True)["step"] == 10
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10]


def test_cli_prints_the_run_folder_and_refuses_to_overwrite_it(tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "model=torch_rnn", "trainer.steps=5", f"hydra.run.dir={run}"]
    proc = subprocess.run(cli(*args), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert f"output: {run}" in lines[0] and f"output: {run}" in lines[-1]  # at start and at end
    assert "allocator: glibc malloc keeps freed memory" in lines[1] or platform.libc_ver()[0] != "glibc"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    again = subprocess.run(cli(*args), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr.startswith(f"lstmlab-train: trainer.resume=false is not allowed here: {run} holds")
    assert again.stderr.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # Hydra did not touch it either


def test_log_lines_show_evaluation_numbers_only_at_the_step_they_come_from(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lstmlab.runner.train")
    train(compose([*SMALL, "model=torch_rnn"]), tmp_path)  # log every 5 steps, evaluate every 10
    progress = {
        int(r.message.split()[1].split("/")[0]): r.message
        for r in caplog.records
        if r.message.startswith("step ")
    }
    assert sorted(progress) == [5, 10, 15, 20]
    rows = {row["step"]: row for row in read_jsonl(tmp_path / "metrics.jsonl")}
    for step, line in progress.items():
        if step in rows:
            assert f"val_mse {rows[step]['val/mse']:.4g}" in line
        else:
            assert "val" not in line


def test_torch_models_note_the_lstmlab_keys_they_ignore(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lstmlab.runner.train")
    overrides = [*SMALL, "model=torch_gru", "model.forget_bias=1.0", "trainer.steps=2"]
    summary = train(compose(overrides), tmp_path)
    notes = [r.message for r in caplog.records if r.message.startswith("note: ")]
    assert notes == ["note: model.forget_bias=1.0 applies to model=lstmlab only; torch_gru ignores it"]
    assert summary["config"]["model"]["forget_bias"] == 1.0


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_trainer_compile_applies_to_every_model_kind(mode, tmp_path, monkeypatch):
    compiled = []

    def spy(module, mode=None):
        compiled.append((module.kind, mode))
        return module

    monkeypatch.setattr(torch, "compile", spy)
    for kind in ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn"):
        summary = train(
            compose([*SMALL, f"model={kind}", "trainer.steps=1", f"trainer.compile={mode}"]), tmp_path / kind
        )
        assert summary["compile"] == mode
    expected_mode = None if mode == "default" else mode
    assert compiled == [(k, expected_mode) for k in ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn")]


def test_compiled_torch_baseline_trains_like_eager(tmp_path):
    """trainer.compile=default on the CPU, one tiny model. Dynamo does not trace torch's RNN
    modules (a graph break: torch's own kernel runs), so this checks the wiring and the numbers."""
    import torch._dynamo

    overrides = [
        *SMALL,
        "model=torch_gru",
        "model.hidden_size=8",
        "trainer.steps=4",
        "trainer.eval_interval=4",
    ]
    eager = train(compose(overrides), tmp_path / "eager")
    torch._dynamo.reset()
    compiled = train(compose([*overrides, "trainer.compile=default"]), tmp_path / "compiled")
    assert compiled["compile"] == "default"
    assert torch._dynamo.utils.counters["frames"]["total"] > 0  # the model went through dynamo
    for split in ("val", "test"):
        for key, value in eager["final"][split].items():
            assert compiled["final"][split][key] == pytest.approx(value, rel=1e-4, abs=1e-6)
    torch._dynamo.reset()


def test_checkpoint_holds_everything_and_loads_without_pickle(tmp_path):
    train(compose([*SMALL, "optim=adamw"]), tmp_path)
    state = torch.load(tmp_path / CKPT_NAME, weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "step", "data"}
    assert state["step"] == state["data"]["position"] == 20
    assert state["rng"]["torch"].dtype == torch.uint8
    assert state["config"]["optim"]["name"] == "adamw"  # plain containers, enums as strings
    assert not (tmp_path / (CKPT_NAME + ".tmp")).exists()


def test_resume_refuses_a_different_model(tmp_path):
    train(compose(SMALL), tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume: .* different model"):
        train(compose([*SMALL, "model.hidden_size=8", "trainer.resume=true"]), tmp_path)


def poison_loss_at(monkeypatch, bad_call: int) -> None:
    """Make AddingTask's training loss NaN from its ``bad_call``-th call on."""
    calls = {"n": 0}
    loss = AddingTask.loss

    def poisoned(self, out, y):
        calls["n"] += 1
        value = loss(self, out, y)
        return value * float("nan") if calls["n"] >= bad_call else value

    monkeypatch.setattr(AddingTask, "loss", poisoned)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, bad_call=14)  # step 14 (1-based): evals use metrics(), not loss
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 14"):
        train(compose(SMALL), tmp_path)
    assert torch.load(tmp_path / CKPT_NAME, weights_only=True)["step"] == 10
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10]
    assert not (tmp_path / "summary.json").exists()


def read_wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, records, buf, pos = path.read_bytes(), 32768, [], b"", 7  # 7: file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def finished_records(run_file: Path, timeout: float = 30.0) -> list:
    """The records once the exit record is on disk: wandb.finish() can return before wandb's
    service process has flushed the file."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {run_file} after {timeout} s"
        time.sleep(0.1)


def items(updates) -> dict:
    """A wandb record's key/value items as a dict (keys with "/" may come as nested_key)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates}


def test_wandb_offline_logs_config_metrics_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = train(compose([*SMALL, "logger=wandb"]), tmp_path)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("history") == 2 and kinds[-1] == "exit"
    assert records[-1].exit.exit_code == 0

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = items(run.config.update)
    assert config["model"]["kind"] == "lstmlab" and config["trainer"]["steps"] == 20
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    rows = [items(h.item) for h in history]
    assert [row["_step"] for row in rows] == [10, 20]
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["val/mse"] for row in rows] == [row["val/mse"] for row in metrics]
    final = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            final.update(items(record.summary.update))
    assert final["final/test/mse"] == summary["final"]["test"]["mse"]
    assert final["parameters"] == summary["parameters"]


def test_wandb_run_is_finished_when_training_fails(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    poison_loss_at(monkeypatch, bad_call=3)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(compose([*SMALL, "logger=wandb"]), tmp_path)
    assert wandb.run is None
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_records(run_file)
    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert [e.exit_code for e in exits] == [1]


def test_ddp_two_gloo_processes_stay_in_sync_and_match_one_process(tmp_path):
    overrides = [*SMALL, "model=torch_lstm", "trainer.device=cpu", "trainer.steps=10"]
    single = train(compose(overrides), tmp_path / "single")
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "lstmlab.runner.train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # Both ranks passed the bitwise parameter check before the final evaluation (else rc != 0),
    # and two half batches give the full batch's gradient, up to summation order.
    assert summary["world_size"] == 2 and len(summary["devices"]) == 2
    assert summary["devices"][0] == summary["devices"][1]
    assert summary["device"] == f"2 x {summary['devices'][0]}"
    output = proc.stdout + proc.stderr
    assert output.count("step 10/10") == 1, output[-3000:]  # only rank 0 logs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]  # and only it runs Hydra
    for split in ("val", "test"):
        for key, value in single["final"][split].items():
            assert summary["final"][split][key] == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1  # only rank 0 writes


def test_ddp_ranks_that_diverge_are_caught(monkeypatch):
    """_assert_in_sync compares every rank with rank 0; here with a one-process gloo group."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = torch.nn.Linear(3, 2)
        lstmlab.runner.train._assert_in_sync(model)  # one rank agrees with itself
        original = dist.broadcast

        def drifted(tensor, src):
            original(tensor, src)
            tensor.add_(1e-7)

        monkeypatch.setattr(dist, "broadcast", drifted)
        with pytest.raises(RuntimeError, match="DDP ranks diverged"):
            lstmlab.runner.train._assert_in_sync(model)
    finally:
        dist.destroy_process_group()


def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)",
    )
    sweep = tmp_path / "sweep"
    cmd = cli("-m", *SMALL, "hydra/launcher=submitit_local", "model=torch_rnn,torch_gru")
    cmd += [f"hydra.sweep.dir={sweep}", "trainer.steps=10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = sorted(json.loads(p.read_text())["model"] for p in sweep.glob("*/summary.json"))
    assert models == ["torch_gru", "torch_rnn"]
    assert "torch_gru (adding)" in (sweep / "report.md").read_text()


def test_the_first_log_line_says_each_thing_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lstmlab.runner.train")
    train(compose([*SMALL, "task=copy", "variant=CIFG", "trainer.steps=1"]), tmp_path)
    first = next(r.message for r in caplog.records if not r.message.startswith("output: "))
    assert first.startswith("lstmlab (")
    assert (
        ", cell CIFG: peepholes=true cifg=true) on copy (T=10, input length 30): 1 step of batch 16" in first
    )
    assert first.count("cpu") == 1 and first.endswith("on cpu, 1 thread, compile none")
    caplog.clear()
    train(compose([*SMALL, "model=torch_gru", "trainer.steps=1"]), tmp_path / "gru")
    first = next(r.message for r in caplog.records if not r.message.startswith("output: "))
    assert ") on adding (T=10): 1 step of batch" in first and "cell" not in first  # torch's cell is its own


def test_test_acc_is_explained_where_it_is_printed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lstmlab.runner.train")
    summary = train(compose([*SMALL, "model=torch_rnn", "trainer.steps=2"]), tmp_path)
    assert summary["acc_means"] == "share of sums within 0.04 of the target"
    done = next(r.message for r in caplog.records if r.message.startswith("done: "))
    assert f"test acc {summary['final']['test']['acc']:.3f} (share of sums within 0.04 of the target)" in done


def test_the_default_is_one_thread_and_null_keeps_torchs(tmp_path, monkeypatch):
    assert compose(["experiment=single"]).trainer.num_threads == 1
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    overrides = ["experiment=smoke", "trainer.device=cpu", "model=torch_rnn", "trainer.steps=1"]
    train(compose(overrides), tmp_path / "default")
    train(compose([*overrides, "trainer.num_threads=null"]), tmp_path / "null")
    assert calls == [1]


@pytest.mark.parametrize(
    ("threads", "load", "cores", "warns"),
    [(1, 0.5, 2, False), (1, 1.5, 2, True), (2, 0.2, 2, True), (4, 0.0, 8, False)],
)
def test_load_warning_when_the_threads_and_the_load_exceed_the_cores(threads, load, cores, warns):
    warning = lstmlab.runner.train.load_warning(threads, load, cores)
    assert (warning is not None) == warns
    if warns:
        assert f"{threads} CPU thread" in warning and f"the {cores} cores" in warning
        assert ("lower trainer.num_threads" in warning) == (threads > 1)  # 1 is as low as it goes


def test_a_run_on_a_loaded_machine_warns(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="lstmlab.runner.train")
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    train(compose([*SMALL, "model=torch_rnn", "trainer.steps=1"]), tmp_path / "busy")
    assert any(
        "ms/step will be inflated" in r.message for r in caplog.records if r.levelno == logging.WARNING
    )
    caplog.clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    train(compose([*SMALL, "model=torch_rnn", "trainer.steps=1"]), tmp_path / "idle")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_first_step_is_warmup_apart_from_ms_per_step(tmp_path, monkeypatch):
    """Without torch.compile the first step pays one-time costs: it is warmup_s, not part of ms/step."""
    from lstmlab.runner import models

    forward, calls = models.SequenceModel.forward, []

    def slow_first_call(self, *args, **kwargs):  # what loading a library costs, here
        calls.append(None)
        if len(calls) == 1:
            time.sleep(1.0)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(models.SequenceModel, "forward", slow_first_call)
    summary = train(compose([*SMALL, "model=torch_rnn", "trainer.steps=3"]), tmp_path)
    assert summary["warmup_s"] >= 1.0
    assert summary["compile_s"] is None
    assert summary["time_per_step_s"] < 0.2  # the two steps after it; counted, the mean is ≥ 0.33 s


def test_compile_time_is_reported_apart_from_ms_per_step(tmp_path, caplog, monkeypatch):
    """The first step under torch.compile compiles; it is compile_s, not part of ms/step."""
    caplog.set_level(logging.INFO, logger="lstmlab.runner.train")

    class SlowFirstCall(torch.nn.Module):  # what compiling costs, here
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.5)
            return self.module(x)

    def slow_first_call(module, mode=None):
        return SlowFirstCall(module)

    monkeypatch.setattr(torch, "compile", slow_first_call)
    overrides = [*SMALL, "model=torch_rnn", "trainer.steps=4", "trainer.compile=default"]
    summary = train(compose(overrides), tmp_path)
    assert summary["compile_s"] >= 0.5
    assert summary["time_per_step_s"] < 0.25  # three steps timed, without the compiling one
    done = next(r.message for r in caplog.records if r.message.startswith("done: "))
    assert f"ms/step after {summary['compile_s']:.1f} s compiling" in done
    eager = train(compose([*SMALL, "model=torch_rnn", "trainer.steps=2"]), tmp_path / "eager")
    assert eager["compile_s"] is None
