"""Config composition: every preset composes, and a bad config fails early and says why."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf

from lstmlab.config import ConfigError, compose, validate
from lstmlab.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def test_presets_and_models_are_found():
    assert {"compare", "compare_copy", "single", "smoke"} <= set(EXPERIMENTS)
    assert MODELS == ["lstmlab", "lstmlab_chrono", "lstmlab_forget1", "torch_gru", "torch_lstm", "torch_rnn"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose([f"experiment={experiment}"])
    validate(cfg)
    assert OmegaConf.missing_keys(cfg) == set()
    assert cfg.name == f"{cfg.model.kind}-{cfg.task.name}-s{cfg.seed}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", ["adding", "copy"])
def test_every_model_and_task_composes(model, task):
    cfg = compose([f"model={model}", f"task={task}", "model.hidden_size=8"])
    validate(cfg)
    kind = "lstmlab" if model.startswith("lstmlab") else model  # lstmlab_chrono: an lstmlab preset
    assert str(cfg.model.kind) == kind and cfg.task.name == task
    assert ("backend" in cfg.model) == model.startswith("lstmlab")


def test_the_default_is_the_four_model_comparison():
    # compose() drops the hydra node; read the preset the CLI would sweep from the YAML itself.
    preset = OmegaConf.load(CONF / "experiment" / "compare.yaml")
    assert preset.hydra.mode == "MULTIRUN"
    swept = preset.hydra.sweeper.params.model.split(",")
    assert swept == ["lstmlab", "torch_lstm", "torch_gru", "torch_rnn"]
    assert OmegaConf.load(CONF / "config.yaml").defaults[-1] == {"experiment": "compare"}


def test_typo_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.lr=0.1"])
    assert "Key 'lr' not in 'TrainerConfig'" in str(err.value.__cause__)


def test_enum_lists_allowed_values():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["optim.name=rmsprop"])
    assert "Invalid value 'rmsprop', expected one of [adam, adamw, sgd]" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.device=tpu"])
    assert "expected one of [auto, cpu, cuda]" in str(err.value.__cause__)


def test_unknown_model_lists_the_models():
    with pytest.raises(HydraException, match="Could not find 'model/lstm'") as err:
        compose(["model=lstm"])
    for model in MODELS:
        assert model in str(err.value)


def test_lstmlab_options_are_rejected_for_torch_models():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["model=torch_gru", "model.backend=triton"])
    assert "Key 'backend' not in 'ModelConfig'" in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden_size=-4", "model.hidden_size=-4 is not allowed: a positive integer"),
        ("model.dropout=1.5", "model.dropout=1.5 is not allowed"),
        ("optim.lr=0", "optim.lr=0.0 is not allowed"),
        ("trainer.epochs=2", "null unless task.train_size is set"),
        ("task.seq_len=1", "task.seq_len=1 is not allowed"),
    ],
)
def test_bad_values_fail_before_any_data_is_made(override, message, tmp_path, monkeypatch):
    import lstmlab.train

    def no_data(*args, **kwargs):
        raise AssertionError("make_task was called before the config was validated")

    monkeypatch.setattr(lstmlab.train, "make_task", no_data)
    with pytest.raises(ConfigError, match=message):
        train(compose(["experiment=smoke", override]), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_bad_value_and_exits_nonzero(tmp_path):
    cmd = [sys.executable, "-m", "lstmlab.train", "experiment=single", "model.hidden_size=-1"]
    cmd += [f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "model.hidden_size=-1 is not allowed: a positive integer" in proc.stderr


def test_a_misspelt_key_names_the_keys_its_section_takes():
    from lstmlab.config import unknown_override_keys

    valid = [
        "model=torch_gru", "task=copy", "experiment=single", "seed=3", "trainer.steps=5",
        "task.n_relevant=3", "logger.tags=[a]", "hydra.run.dir=out", "hydra/launcher=submitit_local",
        "+extra=1", "~logger", "-m", "--cfg", "job",
    ]  # fmt: skip
    assert unknown_override_keys(valid) == []
    (typo,) = unknown_override_keys(["trainer.lr=3"])
    assert "unknown key 'trainer.lr': trainer takes batch_size," in typo
    assert "(did you mean optim.lr?)" in typo
    (section,) = unknown_override_keys(["trainr.steps=3"])
    assert "the top-level keys are experiment, hydra, logger, model" in section


def test_cli_rejects_a_misspelt_key_before_hydra_runs(tmp_path):
    cmd = [sys.executable, "-m", "lstmlab.train", "experiment=single", "model.hiden_size=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "did you mean model.hidden_size?" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for a rejected command"
