"""The runner comparison of issue 22: `lstmlab-train`'s compare preset with lstmlab and torch_lstm
only, in fp32 and bf16, for a bounded number of steps, then lstmlab's ms/step ÷ torch_lstm's.

    python scripts/runner_compare.py --out DIR [--device cuda] [--steps 150] [--precisions fp32 bf16]

One Hydra multirun in a child process (model × precision, one run after another), then
DIR/runner_compare.md and .csv from each run's summary.json: ms/step (training steps only, as
summary.json counts them), the backend lstmlab actually ran, and the ratio. Needs the runner extra
(hydra-core, omegaconf); without it nothing runs and DIR/runner_compare.md says what was missing (the
GPU image lacks them unless wheels are carried: docs/persistent.md, "The prepared GPU run").
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

# what `lstmlab-train` imports at start (lstmlab.runner.cli's RUNNER_EXTRA, less what a run with
# logger=none and no report callback never imports)
NEEDED = ("hydra", "omegaconf")
MODELS = ("lstmlab", "torch_lstm")


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def overrides(args: argparse.Namespace, sweep_dir: Path) -> list[str]:
    """The compare preset, narrowed to two models and bounded: no evaluation or checkpoint inside
    the timed steps, no report callback (matplotlib), no logger."""
    steps = args.steps
    return [
        "-m",
        "experiment=compare",
        f"model={','.join(MODELS)}",
        f"trainer.precision={','.join(args.precisions)}",
        f"trainer.device={args.device}",
        f"trainer.steps={steps}",
        f"trainer.log_interval={steps}",
        f"trainer.eval_interval={steps}",
        f"trainer.ckpt_interval={steps}",
        "trainer.eval_batch_size=64",
        "logger=none",
        "~hydra.callbacks.report",
        f"hydra.sweep.dir={sweep_dir}",
        *args.override,
    ]


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run: precision, model, backend, ms/step, device."""
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json")):
        s = json.loads(path.read_text())
        per_step = s.get("time_per_step_s")
        rows.append(
            {
                "precision": s["precision"],
                "model": s["config"]["model"]["kind"],
                "backend": s.get("backend") or "",
                "ms_per_step": None if per_step is None else 1e3 * per_step,
                "steps": s["steps"],
                "device": s.get("device", ""),
                "run": path.parent.name,
            }
        )
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """lstmlab ms/step ÷ torch_lstm ms/step for each precision that has both."""
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        by_model = {r["model"]: r for r in rows if r["precision"] == precision}
        mine, torch_lstm = by_model.get("lstmlab"), by_model.get("torch_lstm")
        if mine and torch_lstm and mine["ms_per_step"] and torch_lstm["ms_per_step"]:
            out.append(
                {
                    "precision": precision,
                    "lstmlab_ms": mine["ms_per_step"],
                    "torch_lstm_ms": torch_lstm["ms_per_step"],
                    "ratio": mine["ms_per_step"] / torch_lstm["ms_per_step"],
                    "lstmlab_backend": mine["backend"],
                }
            )
    return out


def write_tables(out: Path, rows: list[dict], header: str) -> None:
    with (out / "runner_compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["precision"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        header,
        "",
        "| precision | lstmlab ms/step | torch_lstm ms/step | ÷ torch_lstm | lstmlab backend |",
    ]
    lines.append("|---|---|---|---|---|")
    for r in ratios(rows):
        lines.append(
            f"| {r['precision']} | {r['lstmlab_ms']:.3f} | {r['torch_lstm_ms']:.3f} | {r['ratio']:.2f}× "
            f"| {r['lstmlab_backend']} |"
        )
    lines += ["", "Every run:", "", "| precision | model | backend | ms/step | steps | device |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        ms = "" if r["ms_per_step"] is None else f"{r['ms_per_step']:.3f}"
        lines.append(
            f"| {r['precision']} | {r['model']} | {r['backend']} | {ms} | {r['steps']} | {r['device']} |"
        )
    (out / "runner_compare.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=150, help="training steps per run (default: 150)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--timeout-s", type=float, default=None, help="stop the sweep after this long")
    p.add_argument(
        "--override", nargs="*", default=[], help="more Hydra overrides, e.g. model.backend=reference"
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    missing = missing_modules()
    if missing:
        reason = f"SKIPPED: the runner needs {', '.join(missing)}, not importable here (carry wheels in .whl)"
        (args.out / "runner_compare.md").write_text(reason + "\n")
        print(reason)
        return 0
    sweep_dir = args.out / "runner_multirun"
    command = [
        sys.executable,
        "-c",
        "from lstmlab.runner.train import main; main()",
        *overrides(args, sweep_dir),
    ]
    print("running:", " ".join(command[3:]), flush=True)
    try:
        rc = subprocess.run(command, timeout=args.timeout_s).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    rows = collect(sweep_dir)
    status = "complete" if rc == 0 else f"INCOMPLETE (sweep rc={rc}; the runs that finished are below)"
    header = f"# lstmlab-train compare preset, {args.steps} steps per run on {args.device}: {status}"
    write_tables(args.out, rows, header)
    print((args.out / "runner_compare.md").read_text())
    return 0 if rc == 0 and len(rows) == len(MODELS) * len(args.precisions) else 1


if __name__ == "__main__":
    sys.exit(main())
