"""Config composition: every preset composes, and a bad config fails early and says why."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf

from lstmlab.runner import config
from lstmlab.runner.build import build_model, build_task
from lstmlab.runner.config import ConfigError, compose, ignored_model_keys, validate
from lstmlab.runner.train import train

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
    assert cfg.model.forget_bias == (1.0 if model == "lstmlab_forget1" else 0.0)
    assert cfg.model.chrono_t_max == (cfg.task.seq_len if model == "lstmlab_chrono" else None)


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


def test_lstmlab_keys_apply_to_lstmlab_and_are_ignored_by_torch_models_with_a_note():
    """`lstmlab-train model.forget_bias=1.0` sweeps all four kinds: lstmlab takes it."""
    for kind in ("lstmlab", "torch_lstm", "torch_gru", "torch_rnn"):
        cfg = compose(
            [f"model={kind}", "model.forget_bias=1.0", "model.backend=reference", "model.hidden_size=4"]
        )
        model = build_model(cfg.model, build_task(cfg.task))
        if kind == "lstmlab":
            assert ignored_model_keys(cfg.model) == []
            assert model.rnn.forget_bias == 1.0 and model.rnn.backend == "reference"
        else:
            assert ignored_model_keys(cfg.model) == ["model.backend=reference", "model.forget_bias=1.0"]
    assert ignored_model_keys(compose(["model=torch_gru"]).model) == []  # defaults: no note


@pytest.mark.parametrize("kind", ["lstmlab", "torch_gru"])
def test_dropout_on_one_layer_gets_the_modules_warning(kind):
    cfg = compose([f"model={kind}", "model.dropout=0.5", "model.hidden_size=4"])
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        build_model(cfg.model, build_task(cfg.task))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_no_preset_restates_what_it_would_get_anyway(experiment):
    preset = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    groups = [f"{k.removeprefix('override /')}={v}" for d in preset.get("defaults", []) for k, v in d.items()]
    base = compose(["experiment=single", *groups])  # the same groups, without the preset's values
    restated = [
        f"{section}.{key}"
        for section in ("model", "task", "optim", "trainer", "logger")
        for key, value in (preset.get(section) or {}).items()
        if base[section][key] == value
    ]
    assert restated == []


def test_a_default_changed_in_its_dataclass_takes_effect(monkeypatch):
    """The dataclasses are the only source of defaults: no YAML file restates them."""

    @dataclasses.dataclass
    class Model(config.ModelConfig):
        num_layers: int = 3

    @dataclasses.dataclass
    class Copy(config.CopyTaskConfig):
        copy_len: int = 4

    swap = {"base": Model, "copy": Copy}
    schemas = [(group, name, swap.get(name, node)) for group, name, node in config.SCHEMAS]
    monkeypatch.setattr(config, "SCHEMAS", schemas)
    monkeypatch.setattr(config.OptimConfig, "__init__", _with_default(config.OptimConfig, momentum=0.5))
    cfg = compose(["model=torch_gru", "task=copy", "optim=sgd"])
    assert (cfg.model.num_layers, cfg.task.copy_len, cfg.optim.momentum) == (3, 4, 0.5)


def _with_default(cls: type, **defaults: object):
    init = cls.__init__

    def patched(self, **kwargs):
        init(self, **{**defaults, **kwargs})

    return patched


def _group_files() -> list[tuple[Path, type]]:
    """Each config-group YAML and the schema it fills in."""
    schemas = {name: node for group, name, node in config.SCHEMAS if group == "schema/task"}
    files = [(p, config.ModelConfig) for p in (CONF / "model").glob("*.yaml")]
    files += [(p, config.ModelConfig) for p in (CONF / "variant").glob("*.yaml")]  # package model
    files += [
        (p, schemas[OmegaConf.load(p).defaults[0].split("/")[-1].split("@")[0]])
        for p in (CONF / "task").glob("*.yaml")
    ]
    for group, node in (
        ("optim", config.OptimConfig),
        ("trainer", config.TrainerConfig),
        ("logger", config.LoggerConfig),
    ):
        files += [(p, node) for p in (CONF / group).glob("*.yaml")]
    return files


@pytest.mark.parametrize(("path", "schema"), _group_files(), ids=lambda v: getattr(v, "stem", ""))
def test_no_config_file_restates_a_default(path, schema):
    defaults = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
    values = OmegaConf.to_container(OmegaConf.load(path)) or {}  # conf/variant/NP.yaml sets nothing
    names_the_option = {"defaults", "name", "kind"}  # which optimizer, model or logger this file is
    restated = {
        k: v for k, v in values.items() if k not in names_the_option and defaults.get(k, v is None) == v
    }
    assert restated == {}, f"{path.name} restates the defaults of {schema.__name__}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden_size=-4", "model.hidden_size=-4 is not allowed: a positive integer"),
        ("model.dropout=1.5", "model.dropout=1.5 is not allowed"),
        ("optim.lr=0", "optim.lr=0.0 is not allowed"),
        ("trainer.epochs=2", "null unless task.train_size is set"),
        ("task.seq_len=1", "task.seq_len=1 is not allowed"),
        ("model.chrono_t_max=2", r"model.chrono_t_max=2.0 is not allowed: null or a number > 2"),
        ("trainer.compile=fast", "trainer.compile='fast' is not allowed: none | default | reduce-overhead"),
        (
            "trainer.precision=bf16",
            r"trainer.precision='bf16' needs a GPU: .* \(choices: fp32 here; fp32, bf16",
        ),
    ],
)
def test_bad_values_fail_before_any_data_is_made(override, message, tmp_path, monkeypatch):
    import lstmlab.runner.train

    def no_data(*args, **kwargs):
        raise AssertionError("the task was built before the config was validated")

    monkeypatch.setattr(lstmlab.runner.train, "build_task", no_data)
    if "precision" in override:
        override += " trainer.device=cpu"
    with pytest.raises(ConfigError, match=message):
        train(compose(["experiment=smoke", *override.split()]), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_module_and_the_config_agree_on_chrono_t_max():
    from lstmlab import LSTM

    with pytest.raises(ValueError, match="greater than 2"):
        LSTM(2, 3, chrono_t_max=2)
    with pytest.raises(ConfigError, match="null or a number > 2"):
        validate(compose(["model=lstmlab_chrono", "task.seq_len=2"]))
    validate(compose(["model=lstmlab_chrono", "task.seq_len=3"]))
    LSTM(2, 3, chrono_t_max=3)


@pytest.mark.parametrize("backend", ["triton", "triton_step", "triton_persistent"])
def test_a_triton_backend_that_cannot_run_here_is_a_config_error(backend, monkeypatch):
    import lstmlab.kernels.backends

    from lstmlab.runner.config import check_runnable

    monkeypatch.setattr(lstmlab.kernels.backends, "TRITON_INTERPRET", False)  # CPU tensors, no interpreter
    cfg = compose([f"model.backend={backend}", "trainer.device=cpu"])
    with pytest.raises(
        ConfigError, match=f"model.backend='{backend}' is not allowed here: .*need CUDA tensors"
    ):
        check_runnable(cfg)
    check_runnable(compose([f"model.backend={backend}", "trainer.device=cpu", "model=torch_gru"]))  # ignored


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["model.hidden_size=-3"],
            "model.hidden_size=-3 is not allowed: a positive integer (in the sweep's run",
        ),
        (["-m", "experiment=smoke", "model=torch_rnn", "task.seq_len=5,0"], "task.seq_len=0 is not allowed"),
        (
            ["experiment=single", "model.backend=triton"],
            "model.backend='triton' is not allowed here: backend='triton' was requested but the Triton",
        ),
        (["optim.name=rmsprop"], "optim.name: Invalid value 'rmsprop', expected one of [adam, adamw, sgd]"),
    ],
    ids=["default-sweep", "swept-value", "triton-on-cpu", "enum"],
)
def test_cli_config_error_is_one_line_exit_2_and_no_folder(args, message, tmp_path):
    """Every run of the command line is checked before Hydra makes a folder or a sweep starts."""
    # On the CPU also on a GPU machine, where Triton cannot run CPU tensors without the interpreter.
    cmd = [sys.executable, "-m", "lstmlab.runner.train", *args, "trainer.device=cpu"]
    cmd += [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("lstmlab-train: ")
    assert message in proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written for a rejected command"


def test_help_names_the_default_every_preset_group_option_and_the_output(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lstmlab.runner.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "With no arguments it runs the `compare` preset" in text
    for preset in EXPERIMENTS:
        assert f"\n  {preset} " in text, preset
    listed: dict[str, str] = {}  # group -> its options as the help lists them
    for line in text.split("Groups (GROUP=OPTION):\n", 1)[1].split("\n\n", 1)[0].splitlines():
        if line[2] != " ":
            group = line.split()[0]
        listed[group] = listed.get(group, "") + line
    for group in ("model", "task", "variant", "optim", "trainer", "logger"):
        options = set(listed[group].replace(",", " ").replace("(default)", "").split()[1:]) - {group}
        assert options == {p.stem for p in (CONF / group).glob("*.yaml")}, group
    assert "outputs/DATE/TIME/" in text and "multirun/DATE/TIME/N/" in text
    assert "schema" not in text
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_key_names_the_keys_its_section_takes():
    from lstmlab.runner.config import unknown_override_keys

    valid = [
        "model=torch_gru", "task=copy", "experiment=single", "variant=CIFG", "seed=3", "trainer.steps=5",
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
    cmd = [sys.executable, "-m", "lstmlab.runner.train", "experiment=single", "model.hiden_size=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "did you mean model.hidden_size?" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for a rejected command"
