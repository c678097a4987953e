"""Train one model on one task: ``lstmlab-train`` (the same as ``python -m lstmlab.runner.train``).

A run is :func:`train`, which checks the config and calls three functions, each read top to
bottom: :func:`setup` (run folder -> seed -> data -> model -> optimizer -> resume -> logger),
:func:`fit` (the training loop) and :func:`summarize` (final evaluation -> ``summary.json``).
They share one :class:`Run` record, passed explicitly. ``main`` (``lstmlab-train``) checks every
run of the command line first (:func:`preflight`); ``@hydra.main`` then only composes the config,
calls :func:`train` and returns the sweep metric. Under ``torchrun`` the same code trains
data-parallel (DDP, gloo on CPU, NCCL on GPU): every rank draws the same global batch and keeps
its slice, so N ranks compute the gradient of one batch of ``trainer.batch_size``; only rank 0
runs Hydra, logs and writes files.

Dimension legend: B batch (per rank), T time, O outputs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from lstmlab.kernels.gemm import describe_cpu_gemm
from lstmlab.runner import allocator
from lstmlab.runner.build import (
    CKPT_NAME,
    build_model,
    build_optimizer,
    build_scheduler,
    build_task,
    greff_name,
)
from lstmlab.runner.config import (
    ConfigError,
    check_runnable,
    compose,
    ignored_model_keys,
    register_configs,
    to_plain,
    unknown_override_keys,
)
from lstmlab.runner.loggers import JsonlLogger, NullLogger, WandbLogger
from lstmlab.runner.models import SequenceModel, count_parameters
from lstmlab.runner.tasks import Task, derive_seed

log = logging.getLogger("lstmlab.runner.train")
_allocator_note: str | None = None  # main()'s heap policy (allocator.py), logged by its first run


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops at once."""


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train(cfg: DictConfig, out_dir: str | Path = ".", overrides: list[str] | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.task``; write metrics, checkpoints and ``summary.json`` into
    ``out_dir`` and return the summary (a dict of plain values). The config is checked in full
    (:func:`lstmlab.runner.config.check_runnable`) before any data is made or anything is written."""
    ddp = _dist_info()
    device = check_runnable(cfg, ddp.world, ddp.local_rank)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if ddp.world > 1:
        _join_process_group(device)
    run = None
    try:
        run = setup(cfg, Path(out_dir), ddp, device)
        failed = True
        try:
            fit(run)
            summary = summarize(run, overrides or [])
            failed = False
        finally:
            run.logger.close(failed=failed)
        return summary
    finally:
        # the DDP wrapper goes before its process group: freed after destroy_process_group, its
        # reducer's destructor deadlocked in ~ProcessGroupGloo (seen under torchrun with gloo)
        run = None
        if ddp.world > 1:
            dist.destroy_process_group()


@dataclass
class Run:
    """What :func:`setup` builds and :func:`fit` and :func:`summarize` use, passed explicitly."""

    cfg: DictConfig
    out_dir: Path
    ddp: DistInfo
    device: torch.device
    task: Task
    train_set: tuple[Tensor, Tensor] | None  # None: a fresh batch every step
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    total_steps: int
    model: SequenceModel  # the parameters; evaluation calls it
    net: nn.Module  # what the training loop calls: the model, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    logger: NullLogger
    step: int = 0  # optimizer steps taken, over every session of this run
    prior_wall: float = 0.0  # wall and training seconds of the sessions before a resume
    prior_train: float = 0.0
    resumed_from: int | None = None
    t_start: float = 0.0  # this session's clock
    train_s: float = 0.0  # seconds in training steps (not evals), this session
    steps_run: int = 0  # timed steps of this session (without its first step)
    compile_s: float | None = None  # the first step of this session under torch.compile
    warmup_s: float | None = None  # the first step of this session without torch.compile
    train_loss: float = math.nan  # mean loss since the last check


def setup(cfg: DictConfig, out_dir: Path, ddp: DistInfo, device: torch.device) -> Run:
    """Run folder -> seed -> data -> model -> optimizer -> resume -> logger."""
    tr = cfg.trainer
    out_dir = _claim_run_dir(out_dir, tr, ddp)

    # Every batch is a function of (seed, split, step), so a resumed run draws exactly the
    # batches the uninterrupted run would have drawn.
    torch.manual_seed(cfg.seed)  # model init and dropout
    task = build_task(cfg.task)
    if task.fixed_splits:  # a data set brings its own splits; the seed orders the batches
        train_set, val, test = task.split("train"), task.split("val"), task.split("test")
    else:
        val = task.sample(cfg.task.val_size, _gen(cfg.seed, "val"))
        test = task.sample(cfg.task.test_size, _gen(cfg.seed, "test"))
        train_set = None
        if cfg.task.train_size is not None:
            train_set = task.sample(cfg.task.train_size, _gen(cfg.seed, "train_set"))
    total_steps = tr.steps
    if tr.epochs is not None:
        total_steps = tr.epochs * (len(train_set[0]) // tr.batch_size)

    model = build_model(cfg.model, task).to(device)
    for note in ignored_model_keys(cfg.model):
        log.warning("note: %s applies to model=lstmlab only; %s ignores it", note, cfg.model.kind)
    net: nn.Module = model
    if ddp.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if tr.compile != "none":  # the torch baselines too, so that a comparison stays fair
        net = torch.compile(net, mode=None if tr.compile == "default" else tr.compile)

    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.optim, optimizer, total_steps)
    precision = str(tr.precision)
    run = Run(
        cfg, out_dir, ddp, device, task, train_set, val, test, total_steps, model, net,
        optimizer, scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        autocast=_autocast(device, precision),
        logger=NullLogger(),
    )  # fmt: skip
    if tr.resume:
        _load_checkpoint(run)
    if ddp.is_main:
        run.logger = _make_logger(cfg, out_dir, run.resumed_from)
    log.info("output: %s", out_dir.resolve())
    global _allocator_note
    if _allocator_note is not None:  # the command's heap policy, said once per process
        log.info("allocator: %s", _allocator_note)
        _allocator_note = None
    log.info("%s", describe_run(run))
    if device.type == "cpu":
        warning = load_warning(torch.get_num_threads() * ddp.world, os.getloadavg()[0], _cores())
        if warning:
            log.warning("%s", warning)
    return run


def describe_run(run: Run) -> str:
    """The first log line: model, cell, task, steps, device, each said once."""
    cfg, tr, task, model = run.cfg, run.cfg.trainer, run.task, run.model
    what = f"{cfg.model.kind} ({count_parameters(model):,} parameters"
    variant = _variant(model)
    if variant is not None:
        what += f", cell {variant['name'] or 'custom'}"
        what += f": {_options(variant['changed'])}" if variant["changed"] else " (torch.nn.LSTM's cell)"
    length = f"T={cfg.task.seq_len}"
    if task.total_len != cfg.task.seq_len:  # copy: T blanks plus the symbols, twice
        length += f", input length {task.total_len}"
    where = f"{run.device}" if run.ddp.world == 1 else f"{run.ddp.world} x {run.device.type}"
    if run.device.type == "cpu":
        threads = torch.get_num_threads()
        where += f", {threads} thread{'s' if threads > 1 else ''}" + (" each" if run.ddp.world > 1 else "")
    return (
        f"{what}) on {task.name} ({length}): {run.total_steps} step{'s' if run.total_steps > 1 else ''} "
        f"of batch {tr.batch_size} on "
        f"{where}, compile {tr.compile}"
    )


def _options(changed: dict[str, Any]) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items())


def _cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_warning(threads: int, load: float, cores: int) -> str | None:
    """A warning when this run's threads and the work already running need more than the cores:
    then every parallel op waits for its slowest thread, and ms/step measures the machine's load."""
    if threads + load <= cores:
        return None
    remedy = "lower trainer.num_threads or run" if threads > 1 else "run"
    return (
        f"this run's {threads} CPU thread{'s' if threads > 1 else ''} and a load of {load:.1f} "
        f"(1-minute average) need more than the {cores} cores: ms/step will be inflated; "
        f"{remedy} when the machine is idle to time it"
    )


def fit(run: Run) -> None:
    """The training loop: batch, forward, loss, backward, clip, step; then, on their cadences,
    check the losses, evaluate, log and checkpoint."""
    tr, task, model = run.cfg.trainer, run.task, run.model
    run.t_start = time.perf_counter()
    pending: list[Tensor] = []  # losses not yet checked: a sync per step would stall a GPU
    logged = (run.step, 0.0)  # (step, train_s) at the last progress line
    # The first step of a session is timed on its own, so that ms/step is the steady step's cost.
    # Under torch.compile it compiles forward and backward (seconds to minutes): compile_s. Without,
    # it pays the process's one-time costs (loading the C++ kernel, first allocations, oneDNN's
    # primitives): warmup_s, 65–100 ms for the compare preset's models, about 0.4 ms/step of the 150
    # steps' mean (docs/benchmarks/cpu-2026-12-06-fused-projection.md).
    compiling = tr.compile != "none"
    first = True
    run.net.train()
    while run.step < run.total_steps:
        t0 = time.perf_counter()
        x, y = _train_batch(task, run.cfg.seed, run.step, tr.batch_size, run.train_set, run.ddp)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with run.autocast:
            out = run.net(x)  # (B, T, O) or (B, O)
            loss = task.loss(out, y)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if tr.grad_clip is not None:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        pending.append(loss.detach().float())
        run.step += 1
        if first:
            if compiling:
                run.compile_s = time.perf_counter() - t0
            else:
                run.warmup_s = time.perf_counter() - t0
            first = compiling = False
            logged = (run.step, 0.0)
        else:
            run.steps_run += 1
            run.train_s += time.perf_counter() - t0

        step, last = run.step, run.step == run.total_steps
        do_eval = step % tr.eval_interval == 0 or last
        do_ckpt = step % tr.ckpt_interval == 0 or last
        do_log = step % tr.log_interval == 0 or last
        if do_log or do_eval or do_ckpt:
            # Check every loss before anything is logged or saved: a checkpoint is only ever
            # written from a model whose losses were all finite.
            run.train_loss = _check_finite(pending, step, run.ddp)
            pending.clear()
        val_metrics: dict[str, float] = {}  # this step's evaluation, or none
        if do_eval and run.ddp.is_main:
            val_metrics = evaluate(model, task, run.val, tr.eval_batch_size, run.device, run.autocast)
            run.logger.log(
                {
                    "step": step,
                    "train_loss": run.train_loss,
                    **{f"val/{k}": v for k, v in val_metrics.items()},
                    "lr": run.scheduler.get_last_lr()[0],
                    "wall_s": run.prior_wall + time.perf_counter() - run.t_start,
                }
            )
            run.net.train()
        if do_log:
            rate = (step - logged[0]) / max(run.train_s - logged[1], 1e-9)
            logged = (step, run.train_s)
            fresh = "".join(f" | val_{k} {v:.4g}" for k, v in val_metrics.items())
            log.info(
                "step %d/%d | loss %.4g | %.1f steps/s%s", step, run.total_steps, run.train_loss, rate, fresh
            )
        if do_ckpt and run.ddp.is_main:
            _save_checkpoint(run)


def summarize(run: Run, overrides: list[str]) -> dict[str, Any]:
    """Final evaluation (also when resuming a run that had already finished), then
    ``summary.json``: what ran, where, how fast, and how well against the trivial baseline."""
    cfg, tr, task, model, device = run.cfg, run.cfg.trainer, run.task, run.model, run.device
    if run.ddp.world > 1:
        _assert_in_sync(model)
    final_val = evaluate(model, task, run.val, tr.eval_batch_size, device, run.autocast)
    final_test = evaluate(model, task, run.test, tr.eval_batch_size, device, run.autocast)
    per_step = run.train_s / run.steps_run if run.steps_run else None
    devices = _device_names(device, run.ddp)
    summary = {
        "name": cfg.name,
        "model": str(cfg.model.kind),
        "backend": model.backend,
        "variant": _variant(model),
        "cpu_gemm": describe_cpu_gemm() if device.type == "cpu" and model.kind == "lstmlab" else None,
        "compile": tr.compile,
        "task": task.name,
        "metric": task.metric,
        "acc_means": task.acc_means,
        "higher_is_better": task.higher_is_better,
        "seed": cfg.seed,
        "parameters": count_parameters(model),
        "steps": run.total_steps,
        "batch_size": tr.batch_size,
        "seq_len": cfg.task.seq_len,  # task.seq_len, as configured
        "input_len": task.total_len,  # steps the model reads per sequence (copy: T + 2 copy_len)
        "final": {"train_loss": run.train_loss, "val": final_val, "test": final_test},
        "baseline": task.baseline(),
        "wall_s": run.prior_wall + time.perf_counter() - run.t_start,
        "time_per_step_s": per_step,  # training steps only: no evaluation, not the session's first
        "compile_s": run.compile_s,
        "warmup_s": run.warmup_s,
        "tokens_per_s": tr.batch_size * task.total_len / per_step if per_step else None,
        **_peak_memory(device),
        "device": _describe_devices(devices),
        "devices": devices,  # one per torchrun process
        "world_size": run.ddp.world,
        "precision": str(tr.precision),
        "resumed_from_step": run.resumed_from,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "overrides": list(overrides),
        "config": to_plain(cfg),
    }
    if run.ddp.is_main:
        (run.out_dir / "summary.json").write_text(_json(summary))
        run.logger.summary(summary)
    log.info("done: %s", describe_result(summary))
    log.info("output: %s", run.out_dir.resolve())
    return summary


def describe_result(summary: dict[str, Any]) -> str:
    """The last log line's numbers: test metric against the baseline, ms/step, backend."""
    metric, test = summary["metric"], summary["final"]["test"]
    line = f"test {metric} {test[metric]:.4g} (baseline {summary['baseline'][metric]:.4g})"
    if metric != "acc" and "acc" in test:
        line += f", test acc {test['acc']:.3f}"
        line += f" ({summary['acc_means']})" if summary.get("acc_means") else ""
    per_step = summary["time_per_step_s"]
    line += f", {1e3 * per_step:.1f} ms/step" if per_step else ", no step timed"
    if summary.get("compile_s") is not None:
        line += f" after {summary['compile_s']:.1f} s compiling"
    return line + f", backend {summary['backend']}"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    split: tuple[Tensor, Tensor],
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> dict[str, float]:
    """The task's metrics over a whole split, batch by batch, weighted by batch size."""
    model.eval()
    x_all, y_all = split
    totals: dict[str, float] = {}
    for i in range(0, len(x_all), batch_size):
        x, y = x_all[i : i + batch_size].to(device), y_all[i : i + batch_size].to(device)
        with autocast:
            out = model(x)
        for k, v in task.metrics(out, y).items():
            totals[k] = totals.get(k, 0.0) + v * len(x)
    return {k: v / len(x_all) for k, v in totals.items()}


# ---- helpers, in the order train() uses them


def _dist_info() -> DistInfo:
    """This process's place under torchrun (WORLD_SIZE > 1), from the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def _join_process_group(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


RUN_FILES = ("summary.json", CKPT_NAME, "metrics.jsonl")  # what makes a folder hold a run


def _refusal(run_dir: str | Path, found: list[str], tr: DictConfig) -> str | None:
    """Why a run may not start in ``run_dir``, which holds the run files ``found``, or None."""
    if not found or tr.resume or tr.overwrite:
        return None
    what = "finished" if "summary.json" in found else "partial"
    return (
        f"trainer.resume=false is not allowed here: {run_dir} holds a {what} run "
        f"({', '.join(found)}); continue it with trainer.resume=true, replace it with "
        "trainer.overwrite=true, or choose another run directory"
    )


def _claim_run_dir(out_dir: Path, tr: DictConfig, ddp: DistInfo) -> Path:
    """The run directory (rank 0's, under torchrun: Hydra's may differ by a second). A folder
    that holds a run is continued (``trainer.resume``), replaced (``trainer.overwrite``: its run
    files are deleted first) or refused, never overwritten silently."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    problem = _refusal(out_dir, found, tr)
    shared = [str(out_dir.resolve()), problem]
    if ddp.world > 1:  # every rank raises, or none does
        dist.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise ConfigError(shared[1])
    if found and tr.overwrite and ddp.is_main:
        for name in found:
            (out_dir / name).unlink()
        log.info("trainer.overwrite=true: deleted the old run's %s", ", ".join(found))
    return Path(shared[0])


def _gen(*labels: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*labels))


def _train_batch(
    task: Task,
    seed: int,
    step: int,
    batch_size: int,
    train_set: tuple[Tensor, Tensor] | None,
    ddp: DistInfo,
) -> tuple[Tensor, Tensor]:
    """Batch number ``step`` of the global batch, and this rank's slice of it."""
    if train_set is None:
        x, y = task.sample(batch_size, _gen(seed, "train", step))
    else:
        n = len(train_set[0])
        epoch, i = divmod(step, n // batch_size)
        order = torch.randperm(n, generator=_gen(seed, "epoch", epoch))
        idx = order[i * batch_size : (i + 1) * batch_size]
        x, y = train_set[0][idx], train_set[1][idx]
    per_rank = batch_size // ddp.world
    mine = slice(ddp.rank * per_rank, (ddp.rank + 1) * per_rank)
    return x[mine], y[mine]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume into a different model, task, optimizer or seed."""
    differ = [k for k in ("model", "task", "optim", "seed") if saved.get(k) != current.get(k)]
    if differ:
        raise ConfigError(
            f"cannot resume: the checkpoint was made with different {', '.join(differ)} "
            f"(saved {[saved.get(k) for k in differ]}, now {[current.get(k) for k in differ]})"
        )


def _get_rng_state() -> dict[str, Any]:
    """RNG states as tensors, so that ``torch.load(weights_only=True)`` can read them."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _load_checkpoint(run: Run) -> None:
    """Continue from ``checkpoints/last.pt`` if there is one: weights, optimizer, schedule,
    loss scale, RNG states, step and clocks."""
    path = run.out_dir / CKPT_NAME
    if not path.exists():
        log.info("trainer.resume=true but %s does not exist: starting from step 0", path)
        return
    state = torch.load(path, map_location=run.device, weights_only=True)
    _check_resumable(state["config"], to_plain(run.cfg))
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    run.step, run.prior_wall, run.prior_train = state["step"], state["wall_s"], state["train_s"]
    run.resumed_from = run.step or None
    log.info("resumed from %s at step %d", path, run.step)


def _save_checkpoint(run: Run) -> None:
    _atomic_save(
        {
            "step": run.step,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": _get_rng_state(),
            "data": {"position": run.step},  # the next batch is batch number `step`
            "config": to_plain(run.cfg),
            "wall_s": run.prior_wall + time.perf_counter() - run.t_start,
            "train_s": run.prior_train + run.train_s,
        },
        run.out_dir / CKPT_NAME,
    )


def _make_logger(cfg: DictConfig, out_dir: Path, resume_step: int | None) -> NullLogger:
    kind = str(cfg.logger.kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "none":
        return NullLogger()
    if kind == "jsonl":
        return JsonlLogger(out_dir, resume_step)
    return WandbLogger(
        out_dir,
        to_plain(cfg),
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        mode=cfg.logger.mode,
        tags=list(cfg.logger.tags),
        name=cfg.name,
        resume_step=resume_step,
    )


def _check_finite(pending: list[Tensor], step: int, ddp: DistInfo) -> float:
    """Mean of the pending losses (over ranks too); raise naming the first bad step."""
    losses = torch.stack(pending)  # (steps since the last check,)
    if ddp.world > 1:
        dist.all_reduce(losses)
        losses /= ddp.world
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        bad_step = step - len(losses) + 1 + int(bad[0])
        raise NonFiniteLossError(
            f"the training loss is {losses[bad[0]].item()} at step {bad_step}; stopping. "
            "The last checkpoint and metrics.jsonl hold the last good state. "
            "Try a lower optim.lr, trainer.grad_clip, or trainer.precision=fp32."
        )
    return losses.mean().item()


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a reader (or a run killed
    mid-write) sees the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _assert_in_sync(model: nn.Module) -> None:
    """DDP keeps every rank's parameters equal; check it (bitwise) before the final evaluation."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(flat, ref):
        raise RuntimeError(f"DDP ranks diverged: max |difference| {(flat - ref).abs().max()}")


def _variant(model: SequenceModel) -> dict[str, Any] | None:
    """The cell variant the lstmlab module was built with: Greff et al.'s name for it (None for
    another combination) and the options that differ from torch.nn.LSTM's cell. None for a torch
    model, whose cell is its own."""
    if model.kind != "lstmlab":
        return None
    variant = model.rnn.variant
    return {"name": greff_name(variant), "changed": variant.changed()}


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda_max_allocated"}  # fmt: skip
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, the process's
    return {"peak_memory_bytes": rss_kib * 1024, "peak_memory_kind": "cpu_max_rss"}


def _device_names(device: torch.device, ddp: DistInfo) -> list[str]:
    """Each torchrun process's device, in rank order (one entry without torchrun)."""
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} ({device})"
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    names: list[Any] = [name] * ddp.world
    if ddp.world > 1:
        dist.all_gather_object(names, name)
    return names


def _describe_devices(names: list[str]) -> str:
    """``cpu (x86_64, 1 threads)``, or for torchrun ``2 x cpu (x86_64, 1 threads)``."""
    if len(names) == 1:
        return names[0]
    if len(set(names)) == 1:
        return f"{len(names)} x {names[0]}"
    return ", ".join(names)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"


# ---- the command line

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://lstmlab.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    try:
        summary = train(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except ConfigError as err:  # found only once training starts (e.g. resuming another model)
        print(f"lstmlab-train: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return summary["final"]["val"][summary["metric"]]  # what a sweeper optimises


def main() -> None:
    """``lstmlab-train``: every run of the command line is composed and checked here first, so
    that a config error is one line on stderr and exit code 2, before Hydra makes any folder."""
    argv = sys.argv[1:]
    problems = unknown_override_keys(argv) or preflight(argv)
    if problems:
        print(f"lstmlab-train: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)
    global _allocator_note
    try:
        _allocator_note = allocator.keep_freed_memory()  # before any model: every model gets the same heap
    except ValueError as err:  # LSTMLAB_MALLOC set to something else than glibc
        print(f"lstmlab-train: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if _dist_info().rank > 0:  # only rank 0 runs Hydra, logs and writes
        logging.basicConfig(level=logging.WARNING)
        train(compose([a for a in argv if not a.startswith("-")]), ".")
        return
    hydra_main()


# Flags after which Hydra prints something instead of running: nothing to check.
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


def preflight(argv: list[str]) -> list[str]:
    """What would go wrong with ``lstmlab-train ARGV``, as one-line problems (empty: nothing):
    every config of the run or sweep composed and checked, and no run directory that holds a
    run it would overwrite. Runs no training and creates nothing."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals
    from hydra.errors import HydraException, MissingConfigException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    if any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        return []
    overrides = [a for a in argv if not a.startswith("-")]
    setup_globals()  # Hydra's resolvers, for ${now:...} in the run directories
    try:
        with initialize_config_module("lstmlab.conf", version_base="1.3"):
            parsed = OverridesParser.create().parse_overrides(overrides)
            fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
            base = hydra_compose("config", overrides=fixed, return_hydra_config=True)
            multirun = "-m" in argv or "--multirun" in argv or base.hydra.mode == RunMode.MULTIRUN
            if not multirun:
                return _check_job(hydra_compose("config", overrides=overrides), None, base.hydra.run.dir)
            if _dist_info().world > 1:
                return ["a sweep cannot run under torchrun: add experiment=single for one run"]
            params = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items()]
            (jobs,) = BasicSweeper.split_arguments(
                OverridesParser.create().parse_overrides(params + overrides), None
            )
            numbered = OmegaConf.to_container(base.hydra.sweep)["subdir"] == "${hydra.job.num}"
            for num, job in enumerate(jobs):
                job_dir = Path(base.hydra.sweep.dir) / str(num) if numbered else None
                problems = _check_job(hydra_compose("config", overrides=job), job, job_dir)
                if problems:
                    return problems
    except MissingConfigException as err:  # a group choice that does not exist: name the ones that do
        group, _, choice = (err.missing_cfg_file or "").rpartition("/")
        if group and err.options:
            return [f"{group}={choice} does not exist; the choices for {group} are {', '.join(err.options)}"]
        return [str(err).strip().splitlines()[0]]
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        key = getattr(cause, "full_key", None)
        return [f"{key + ': ' if key else ''}{str(cause).strip().splitlines()[0]}"]
    return []


def _check_job(cfg: DictConfig, job: list[str] | None, run_dir: str | Path | None) -> list[str]:
    """One run's problems: its config, and a run directory holding a run it would replace
    (``run_dir`` None: not known before Hydra names it; train() still checks it)."""
    where = f" (in the sweep's run {' '.join(job)})" if job else ""
    try:
        check_runnable(cfg, _dist_info().world)
    except ConfigError as err:
        return [f"{err}{where}"]
    found = [name for name in RUN_FILES if run_dir is not None and (Path(run_dir) / name).exists()]
    refusal = _refusal(run_dir, found, cfg.trainer)
    return [f"{refusal}{where}"] if refusal else []


if __name__ == "__main__":
    main()
