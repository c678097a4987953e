"""Train one model on one task: ``lstmlab-train`` (the same as ``python -m lstmlab.train``).

The whole run is :func:`train`, top to bottom: seed -> data -> model -> optimizer -> loop ->
final evaluation -> ``summary.json``. ``@hydra.main`` below only composes the config, calls it
and returns the sweep metric. Under ``torchrun`` the same code trains data-parallel (DDP, gloo on
CPU, NCCL on GPU): every rank draws the same global batch and keeps its slice, so N ranks compute
the gradient of one batch of ``trainer.batch_size``; only rank 0 writes files.

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
from omegaconf import DictConfig
from torch import Tensor, nn

from lstmlab.config import ConfigError, register_configs, to_plain, unknown_override_keys, validate
from lstmlab.kernels.gemm import describe_cpu_gemm
from lstmlab.loggers import JsonlLogger, NullLogger, WandbLogger
from lstmlab.models import SequenceModel, count_parameters
from lstmlab.tasks import Task, derive_seed, make_task

log = logging.getLogger("lstmlab.train")

CKPT_NAME = "checkpoints/last.pt"


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
    ``out_dir`` and return the summary (a dict of plain values)."""
    validate(cfg)
    tr = cfg.trainer
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    ddp = _init_distributed(tr.device)
    try:
        return _train(cfg, Path(out_dir), overrides or [], ddp)
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


def _train(cfg: DictConfig, out_dir: Path, overrides: list[str], ddp: DistInfo) -> dict:
    tr, mc = cfg.trainer, cfg.model
    device = _pick_device(str(tr.device), ddp)
    precision = str(tr.precision)
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"trainer.precision={precision!r} needs a CUDA device; on CPU use fp32")
    if tr.batch_size % ddp.world:
        raise ConfigError(f"trainer.batch_size={tr.batch_size} must divide by {ddp.world} ranks")
    if ddp.world > 1:  # every rank writes into rank 0's directory (Hydra's may differ by a second)
        shared = [str(out_dir.resolve())]
        dist.broadcast_object_list(shared, src=0)
        out_dir = Path(shared[0])
    ckpt_path = out_dir / CKPT_NAME

    # ---- seed and data: every batch is a function of (seed, split, step), so a resumed run
    # draws exactly the batches the uninterrupted run would have drawn.
    torch.manual_seed(cfg.seed)  # model init and dropout
    task = make_task(**_task_options(cfg.task))
    if task.fixed_splits:  # a data set brings its own splits; the seed orders the batches
        if cfg.task.train_size is not None:
            raise ConfigError(f"task.train_size must be null: task {task.name!r} has fixed splits")
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

    # ---- model
    lstmlab_options = {}
    if str(mc.kind) == "lstmlab":
        lstmlab_options = dict(
            backend=str(mc.backend), forget_bias=mc.forget_bias, chrono_t_max=mc.chrono_t_max
        )
    model = SequenceModel(
        str(mc.kind),
        task.output_size,
        input_size=task.input_size,
        vocab_size=task.vocab_size,
        per_step=task.per_step,
        hidden_size=mc.hidden_size,
        num_layers=mc.num_layers,
        bidirectional=mc.bidirectional,
        dropout=mc.dropout,
        **lstmlab_options,
    ).to(device)
    n_params = count_parameters(model)
    net: nn.Module = model
    if ddp.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ---- optimizer, schedule, loss scaling (fp16 only)
    optimizer = _make_optimizer(cfg.optim, model.parameters())
    scheduler = _make_scheduler(cfg.optim, optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = _autocast(device, precision)

    step, prior_wall, prior_train = 0, 0.0, 0.0
    if tr.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        _check_resumable(state["config"], to_plain(cfg))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step, prior_wall, prior_train = state["step"], state["wall_s"], state["train_s"]
        log.info("resumed from %s at step %d", ckpt_path, step)
    elif tr.resume:
        log.info("trainer.resume=true but %s does not exist: starting from step 0", ckpt_path)
    resumed_from = step if step else None

    logger = _make_logger(cfg, out_dir, ddp, resumed_from) if ddp.is_main else NullLogger()
    log.info(
        "%s (%d parameters) on %s: %s, T=%d, %d steps of batch %d on %s x%d",
        mc.kind, n_params, device, task.name, task.total_len, total_steps, tr.batch_size,
        device.type, ddp.world,
    )  # fmt: skip

    def save_checkpoint() -> None:
        if ddp.is_main:
            _atomic_save(
                {
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _get_rng_state(),
                    "data": {"position": step},  # the next batch is batch number `step`
                    "config": to_plain(cfg),
                    "wall_s": prior_wall + time.perf_counter() - t_start,
                    "train_s": prior_train + train_s,
                },
                ckpt_path,
            )

    # ---- training loop
    t_start = time.perf_counter()
    train_s, steps_run = 0.0, 0  # time spent in training steps (not evals), this session
    pending: list[Tensor] = []  # losses not yet checked: a sync per step would stall a GPU
    val_metrics: dict[str, float] = {}
    train_loss = float("nan")
    logged = (step, 0.0)  # (step, train_s) at the last progress line
    failed = True
    try:
        net.train()
        while step < total_steps:
            t0 = time.perf_counter()
            x, y = _train_batch(task, cfg.seed, step, tr.batch_size, train_set, ddp)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                out = net(x)  # (B, T, O) or (B, O)
                loss = task.loss(out, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tr.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            pending.append(loss.detach().float())
            step += 1
            steps_run += 1
            train_s += time.perf_counter() - t0

            last = step == total_steps
            do_eval = step % tr.eval_interval == 0 or last
            do_ckpt = step % tr.ckpt_interval == 0 or last
            if step % tr.log_interval == 0 or do_eval or do_ckpt:
                # Check every loss before anything is logged or saved: a checkpoint is only
                # ever written from a model whose losses were all finite.
                train_loss = _check_finite(pending, step, ddp)
                pending.clear()
            if do_eval and ddp.is_main:
                val_metrics = evaluate(model, task, val, tr.eval_batch_size, device, autocast)
                logger.log(
                    {
                        "step": step,
                        "train_loss": train_loss,
                        **{f"val/{k}": v for k, v in val_metrics.items()},
                        "lr": scheduler.get_last_lr()[0],
                        "wall_s": prior_wall + time.perf_counter() - t_start,
                    }
                )
                net.train()
            if step % tr.log_interval == 0 or last:
                rate = (step - logged[0]) / max(train_s - logged[1], 1e-9)
                logged = (step, train_s)
                shown = " ".join(f"val_{k} {v:.4g}" for k, v in val_metrics.items())
                log.info(
                    "step %d/%d | loss %.4g | %s | %.1f steps/s",
                    step, total_steps, train_loss, shown or "val -", rate,
                )  # fmt: skip
            if do_ckpt:
                save_checkpoint()

        # ---- final evaluation (also when resuming a run that had already finished)
        if ddp.world > 1:
            _assert_in_sync(model)
        final_val = evaluate(model, task, val, tr.eval_batch_size, device, autocast)
        final_test = evaluate(model, task, test, tr.eval_batch_size, device, autocast)
        wall = prior_wall + time.perf_counter() - t_start
        per_step = train_s / steps_run if steps_run else None
        summary = {
            "name": cfg.name,
            "model": str(mc.kind),
            "backend": model.backend,
            "cpu_gemm": describe_cpu_gemm() if device.type == "cpu" and mc.kind == "lstmlab" else None,
            "task": task.name,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "seed": cfg.seed,
            "parameters": n_params,
            "steps": total_steps,
            "batch_size": tr.batch_size,
            "seq_len": task.total_len,
            "final": {"train_loss": train_loss, "val": final_val, "test": final_test},
            "baseline": task.baseline(),
            "wall_s": wall,
            "time_per_step_s": per_step,
            "tokens_per_s": tr.batch_size * task.total_len / per_step if per_step else None,
            **_peak_memory(device),
            "device": _device_name(device),
            "world_size": ddp.world,
            "precision": precision,
            "resumed_from_step": resumed_from,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "overrides": list(overrides),
            "config": to_plain(cfg),
        }
        if ddp.is_main:
            (out_dir / "summary.json").write_text(_json(summary))
            logger.summary(summary)
        failed = False
        base = summary["baseline"][task.metric]
        log.info(
            "done: test %s %.4g (baseline %.4g), test acc %.3f, %.1f ms/step, backend %s",
            task.metric, final_test[task.metric], base, final_test.get("acc", math.nan),
            1e3 * (per_step or 0.0), model.backend,
        )  # fmt: skip
        return summary
    finally:
        logger.close(failed=failed)


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


def _init_distributed(device: Any) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = str(device) == "cuda" or (str(device) == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def _pick_device(requested: str, ddp: DistInfo) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device='cuda' but no CUDA device is visible; use auto|cpu")
        return torch.device("cuda", ddp.local_rank)
    return torch.device("cpu")


def _task_options(task_cfg: DictConfig) -> dict[str, Any]:
    runner_keys = {"train_size", "val_size", "test_size"}  # the runner's, not the task's
    return {k: v for k, v in to_plain(task_cfg).items() if k not in runner_keys}


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


def _make_optimizer(oc: DictConfig, params: Any) -> torch.optim.Optimizer:
    name = str(oc.name)
    if name == "adam":
        return torch.optim.Adam(params, lr=oc.lr, weight_decay=oc.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay)
    return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)


def _make_scheduler(oc: DictConfig, optimizer: torch.optim.Optimizer, total: int) -> Any:
    """Linear warm-up, then constant, cosine to 0 or linear to 0 (a factor on ``optim.lr``)."""
    warmup, kind = oc.warmup_steps, str(oc.schedule)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def _make_logger(cfg: DictConfig, out_dir: Path, ddp: DistInfo, resume_step: int | None) -> NullLogger:
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


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda_max_allocated"}  # fmt: skip
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, the process's
    return {"peak_memory_bytes": rss_kib * 1024, "peak_memory_kind": "cpu_max_rss"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
    summary = train(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    return summary["final"]["val"][summary["metric"]]  # what a sweeper optimises


def main() -> None:
    """``lstmlab-train``: a misspelt key fails here with the keys its section takes, then Hydra."""
    problems = unknown_override_keys(sys.argv[1:])
    if problems:
        print("\n".join(f"lstmlab-train: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(2)
    hydra_main()


if __name__ == "__main__":
    main()
