"""Greff et al.'s cell variants in the runner: the schema keys reach lstmlab.LSTM, the `variant`
group sweeps, the `odyssey` preset composes, and `lstmlab-report --odyssey` marks what differs
from V."""

import dataclasses
import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from lstmlab.kernels.variants import GREFF_VARIANTS, CellVariant
from omegaconf import OmegaConf

import lstmlab.runner.train
from lstmlab.analysis.odyssey import analyse, seed_noise_share, variance_shares, welch_p
from lstmlab.analysis.report import main as report_main
from lstmlab.runner import config
from lstmlab.runner.build import LSTMLAB_KEYS, VARIANT_KEYS, build_model, build_task
from lstmlab.runner.config import check_runnable, compose, ignored_model_keys
from lstmlab.runner.train import preflight, train

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = ["experiment=smoke", "trainer.num_threads=1", "trainer.device=cpu"]


def test_model_config_declares_the_cell_variant_with_its_names_and_defaults():
    schema = {f.name: f for f in dataclasses.fields(config.ModelConfig)}
    for field in dataclasses.fields(CellVariant):
        assert field.name in schema, field.name
        assert schema[field.name].default == field.default, field.name
        assert schema[field.name].type == field.type, field.name
    assert set(VARIANT_KEYS) <= set(LSTMLAB_KEYS)


def test_the_variant_keys_are_derived_from_the_cell_variant_not_restated(monkeypatch):
    """ModelConfig ends with CellVariant's fields; a new option becomes a key with no edit here."""
    names = [f.name for f in dataclasses.fields(config.ModelConfig)]
    assert names[-len(VARIANT_KEYS) :] == list(VARIANT_KEYS)  # CellVariant's, in its order

    @dataclasses.dataclass(frozen=True)
    class Wider(CellVariant):
        new_option: float = 0.25

    monkeypatch.setattr(config, "CellVariant", Wider)

    @dataclasses.dataclass
    @config.with_cell_variant_fields
    class Schema:
        kind: str = "lstmlab"

    fields = {f.name: f for f in dataclasses.fields(Schema)}
    assert list(fields) == ["kind", *VARIANT_KEYS, "new_option"]
    assert (fields["new_option"].type, fields["new_option"].default) == (float, 0.25)


@pytest.mark.parametrize(
    ("override", "error"),
    [("model.zoneout_c=lots", "Error merging override model.zoneout_c=lots"),
     ("model.cifg=maybe", "Error merging override model.cifg=maybe"),
     ("model.peepholse=true", "Could not override 'model.peepholse'")],
)  # fmt: skip
def test_a_wrong_variant_key_or_type_fails_at_composition(override, error):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=error):
        compose([override])


@pytest.mark.parametrize("path", sorted((CONF / "variant").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_variant_file_sets_exactly_its_variant(path):
    values = OmegaConf.to_container(OmegaConf.load(path)) or {}
    expected = GREFF_VARIANTS.get(path.stem)
    if expected is None:  # LN, zoneout: not Greff's, but a valid cell
        expected = {"LN": {"layer_norm": True}, "zoneout": {"zoneout_c": 0.5, "zoneout_h": 0.05}}[path.stem]
    assert values == expected
    assert path.read_text().startswith("# @package model\n")
    assert set(GREFF_VARIANTS) <= {p.stem for p in (CONF / "variant").glob("*.yaml")}


def test_torch_models_ignore_the_variant_with_one_note_per_key(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lstmlab.runner.train")
    cfg = compose([*SMALL, "model=torch_lstm", "variant=NOAF", "model.hidden_size=4", "trainer.steps=2"])
    assert ignored_model_keys(cfg.model) == ["model.peepholes=True", "model.output_activation=False"]
    summary = train(cfg, tmp_path)
    notes = [r.message for r in caplog.records if r.message.startswith("note: ")]
    assert notes == [
        "note: model.peepholes=True applies to model=lstmlab only; torch_lstm ignores it",
        "note: model.output_activation=False applies to model=lstmlab only; torch_lstm ignores it",
    ]
    assert summary["variant"] is None  # torch.nn.LSTM's own cell ran


def test_an_impossible_variant_is_one_line_exit_2_before_any_folder(tmp_path, monkeypatch, capsys):
    """lstmlab-train in this process: the sweep's third run couples the gates without an input gate."""
    monkeypatch.chdir(tmp_path)
    argv = ["lstmlab-train", "-m", "experiment=smoke", "variant=V,NFG,CIFG", "model.input_gate=false"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        lstmlab.runner.train.main()
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "lstmlab-train: the cell variant model.peepholes=true model.cifg=true model.input_gate=false "
        "is not allowed: cifg=True couples the forget gate to the input gate"
    )
    assert err.count("\n") == 1 and "(in the sweep's run " in err and "variant=CIFG" in err
    assert list(tmp_path.iterdir()) == []  # nothing was made
    assert preflight(["-m", "experiment=smoke", "variant=V,NIG,CIFG"]) == []  # each valid alone


def _preset_jobs() -> tuple[list[list[str]], dict[str, list[str]]]:
    """The runs `lstmlab-train experiment=odyssey` launches, as Hydra's basic sweeper splits them."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config.register_configs()
    with initialize_config_module("lstmlab.conf", version_base="1.3"):
        base = hydra_compose("config", overrides=["experiment=odyssey"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in base.hydra.sweeper.params.items()}
    assert base.hydra.mode.name == "MULTIRUN"
    assert base.hydra.callbacks.report._target_ == "lstmlab.analysis.report.OdysseyReportCallback"
    parsed = OverridesParser.create().parse_overrides([f"{k}={','.join(v)}" for k, v in params.items()])
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return [[*job, "experiment=odyssey"] for job in jobs], params


def test_the_odyssey_preset_is_the_full_grid_and_every_combination_composes():
    """Every run's overrides from Hydra's own sweeper; every distinct composition (task x variant,
    32 of the 288 runs: the learning rate and seed only set two numbers) through Hydra's compose
    API and the runner's checks, without training. Composing all 288 takes ~80 s here; the
    runner's preflight does that when the sweep starts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    jobs, params = _preset_jobs()
    assert params["variant"] == list(GREFF_VARIANTS)
    assert {"odyssey_adding", "odyssey_temporal_order", "mnist1d", "odyssey_charlm"} == set(params["task"])
    assert len(params["optim.lr"]) >= 3 and len(params["seed"]) >= 3
    grid = [dict(o.split("=", 1) for o in job) for job in jobs]
    assert len(grid) == math.prod(len(v) for v in params.values()) == 288
    keys = ("seed", "task", "optim.lr", "variant")

    def point(values: tuple[str, ...]) -> tuple:  # Hydra writes 3e-3 as 0.003
        return tuple(float(v) if k == "optim.lr" else v for k, v in zip(keys, values, strict=True))

    expected = {point(p) for p in itertools.product(*(params[k] for k in keys))}
    assert {point(tuple(run[k] for k in keys)) for run in grid} == expected
    assert [run["seed"] for run in grid[: len(grid) // 3]] == ["0"] * (len(grid) // 3)  # seed outermost

    seen = set()
    with initialize_config_module("lstmlab.conf", version_base="1.3"):
        for i, (job, run) in enumerate(zip(jobs, grid, strict=True)):
            if (run["task"], run["variant"]) in seen:
                continue
            seen.add((run["task"], run["variant"]))
            cfg = hydra_compose("config", overrides=job)
            check_runnable(cfg)
            assert cfg.seed == int(run["seed"]) and cfg.optim.lr == float(run["optim.lr"]), i
            assert str(cfg.model.backend) == "reference" and cfg.trainer.num_threads == 1
            task = build_task(cfg.task)
            assert task.name == run["task"].removeprefix("odyssey_")
            model = build_model(cfg.model, task)
            assert model.rnn.variant == CellVariant.greff(run["variant"])  # the keys reach the module
    assert len(seen) == 32


# ---- the report, on synthetic run folders with known numbers


def fake_run(variant: str, lr: float, seed: int, val: float, test: float, task: str = "adding") -> dict:
    metric, higher = ("mse", False) if task == "adding" else ("acc", True)
    return {
        "model": "lstmlab",
        "variant": {"name": variant, "changed": GREFF_VARIANTS[variant]},
        "backend": "reference",
        "task": task,
        "metric": metric,
        "higher_is_better": higher,
        "seed": seed,
        "steps": 200,
        "batch_size": 64,
        "input_len": 30,
        "parameters": 4513,
        "device": "cpu (x86_64, 1 threads)",
        "torch": "2.13.0+cpu",
        "wall_s": 5.0,
        "final": {"val": {metric: val}, "test": {metric: test}},
        "baseline": {metric: 1 / 6 if task == "adding" else 0.25},
        "config": {
            "seed": seed,
            "model": {"hidden_size": 32},
            "optim": {"lr": lr, "name": "adam", "schedule": "constant"},
        },
    }


V_TEST = [0.10, 0.11, 0.12]
NFG_TEST = [0.50, 0.52, 0.51]


def write_sweep(root: Path) -> None:
    runs = []
    for seed in range(3):
        # at lr 3e-3 every variant is better on test but worse on validation: not chosen
        for variant in ("V", "NP", "NFG"):
            runs.append(fake_run(variant, 3e-3, seed, val=0.3, test=0.01))
        runs.append(fake_run("V", 1e-2, seed, val=0.2, test=V_TEST[seed]))
        runs.append(fake_run("NP", 1e-2, seed, val=0.2, test=V_TEST[(seed + 1) % 3]))  # V's, reordered
        runs.append(fake_run("NFG", 1e-2, seed, val=0.25, test=NFG_TEST[seed]))
        runs.append(fake_run("V", 1e-2, seed, val=0.9, test=0.9 - 0.01 * seed, task="temporal_order"))
    for i, run in enumerate(runs):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "summary.json").write_text(json.dumps(run))


def welch_by_hand(a: list[float], b: list[float]) -> float:
    from scipy.stats import t

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * t.sf(abs(statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb), df)


def test_welch_p_and_where_it_is_undefined():
    assert welch_p(NFG_TEST, V_TEST) == pytest.approx(welch_by_hand(NFG_TEST, V_TEST), rel=1e-9)
    assert welch_p(NFG_TEST, V_TEST) < 0.05
    assert welch_p([0.12, 0.10, 0.11], V_TEST) == pytest.approx(1.0)
    assert welch_p([1.0, 1.0], [1.0, 1.0]) is None and welch_p([0.5], V_TEST) is None


def test_variance_shares_split_the_grid_between_lr_and_variant():
    by_lr = variance_shares({"V": {1e-3: 0.0, 1e-2: 2.0}, "NP": {1e-3: 0.0, 1e-2: 2.0}})
    assert by_lr == pytest.approx({"variant": 0.0, "lr": 1.0, "interaction": 0.0})
    by_variant = variance_shares({"V": {1e-3: 1.0, 1e-2: 1.0}, "NP": {1e-3: 3.0, 1e-2: 3.0}})
    assert by_variant == pytest.approx({"variant": 1.0, "lr": 0.0, "interaction": 0.0})
    assert variance_shares({"V": {1e-3: 1.0}, "NP": {1e-2: 1.0}}) is None  # not a full grid
    # cells of two seeds: variance 2 each, so 2 / 2 = 1 of seed noise per cell mean; means 2 and 6
    # have variance 4
    assert seed_noise_share([[1.0, 3.0], [5.0, 7.0]]) == pytest.approx(0.25)
    assert seed_noise_share([[1.0], [5.0]]) is None


def test_the_report_marks_a_worse_variant_and_not_an_equal_one(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    write_sweep(tmp_path / "sweep")
    saved = {}
    monkeypatch.setattr(plt, "close", lambda fig: saved.setdefault("fig", fig))
    report_main(["--odyssey", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert out.endswith(
        f"odyssey_report.md, {tmp_path / 'out'}/odyssey.png, {tmp_path / 'out'}/odyssey.json\n"
    )
    report_main(["--odyssey", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])  # again: said
    assert capsys.readouterr().out.endswith("odyssey.json (replacing the earlier ones)\n")

    result = json.loads((tmp_path / "out" / "odyssey.json").read_text())
    adding = result["tasks"]["adding"]["variants"]
    assert {v: row["lr"] for v, row in adding.items()} == {"V": 1e-2, "NP": 1e-2, "NFG": 1e-2}
    assert adding["V"]["test"] == V_TEST and adding["NFG"]["test"] == NFG_TEST
    assert adding["NFG"]["significant"] and adding["NFG"]["better"] is False
    assert adding["NFG"]["p"] == pytest.approx(welch_by_hand(NFG_TEST, V_TEST), rel=1e-9)
    assert not adding["NP"]["significant"] and adding["NP"]["p"] == pytest.approx(1.0)
    assert list(result["tasks"]) == ["adding", "temporal_order"]

    table = (tmp_path / "out" / "odyssey_report.md").read_text()
    adding_table = table.split("## adding")[1].split("Validation")[0]
    rows = {line.split(" | ")[0][2:]: line for line in adding_table.splitlines() if line.startswith("| ")}
    assert rows["V"] == "| V | 0.01 | 0.11 ± 0.01 | 0.1, 0.11, 0.12 | (reference) | (reference) |"
    assert rows["NFG"].startswith("| NFG | 0.01 | 0.51 ± 0.01 | 0.5, 0.52, 0.51 | **+0.4 (worse)** | **")
    assert rows["NP"] == "| NP | 0.01 | 0.11 ± 0.01 | 0.11, 0.12, 0.1 | +0 | 1 |"
    assert "| NFG | 0.3 | **0.25** |" in table  # the validation grid, the chosen lr bold
    assert "the learning rate explains" in table and out.startswith(table)

    ax = saved["fig"].axes[0]  # adding
    stars = [text.get_position()[0] for text in ax.texts if text.get_text() == "*"]
    assert stars == [2]  # over NFG, the third variant; none over NP
    assert (tmp_path / "out" / "odyssey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_command_documents_odyssey(capsys):
    with pytest.raises(SystemExit) as done:
        report_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--odyssey" in text and "Welch's t-test" in text and "--out OUT" in text


def test_analyse_reads_what_varies_from_the_runs(tmp_path):
    write_sweep(tmp_path)
    from lstmlab.runner.loggers import collect_runs

    setup = analyse(collect_runs(tmp_path))["tasks"]["adding"]["setup"]
    assert setup["seeds"] == [0, 1, 2] and setup["lrs"] == [3e-3, 1e-2] and setup["steps"] == [200]


def test_the_variant_group_sweeps_and_the_preset_reports_itself(tmp_path):
    """`lstmlab-train experiment=odyssey` cut down to seconds: two variants, one task, one
    seed; each run records its variant, and the sweep writes the odyssey report."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lstmlab.runner.train", "experiment=odyssey", "variant=V,NP"]
    cmd += ["task=odyssey_adding", "seed=0", "optim.lr=1e-2", "trainer.steps=2", "model.hidden_size=4"]
    cmd += ["task.seq_len=5", "task.val_size=8", "task.test_size=8", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((json.loads(p.read_text()) for p in sweep.glob("*/summary.json")), key=str)
    assert {s["variant"]["name"]: s["variant"]["changed"] for s in summaries} == {
        name: GREFF_VARIANTS[name] for name in ("V", "NP")
    }
    assert all(s["config"]["model"]["peepholes"] == (s["variant"]["name"] != "NP") for s in summaries)
    report = (sweep / "odyssey_report.md").read_text()
    assert "| NP | 0.01 |" in report and "(reference)" in report
    assert (sweep / "odyssey.png").exists() and (sweep / "odyssey.json").exists()
