"""One definition of a training setting: `TrainConfig`'s fields (and its nested recipe's) with
their metadata give `keras-ee train`'s flags, their help and the config-file keys; a run's
config.json written before the recipe was nested loads and resumes to the same settings."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from keras_ee import cli, experiment, run_folder
from keras_ee.config import FLAG, FLAG_GROUPS, RECIPES, Flag, RecipeConfig, TrainConfig, setting_keys, settings

OLD_CONFIG = Path(__file__).parent / "data" / "config_before_nested_recipe.json"

# A value other than the default for every setting (the flagless ones come from a config file).
NON_DEFAULT = dict(
    dataset="npz:some/file.npz",
    data_dir="data",
    val_size=300,
    imbalance_factor=50,
    train_size=500,
    samples_per_class=None,  # not with train_size
    meta_split_size=100,
    model="msdnet_cifar_5",
    model_options={"depth": 1, "activation": "gelu"},
    method="imta",
    method_options={"phase2_epochs": 3, "reference": "code"},
    epochs=7,
    batch_size=32,
    optimizer="adamw",
    learning_rate=0.01,
    schedule="cosine_per_batch",
    warmup_epochs=2,
    min_learning_rate=1e-6,
    momentum=0.5,
    nesterov=True,
    weight_decay=0.02,
    seed=3,
    mixup=0.2,
    cutmix=0.3,
    randaugment=5.0,
    randaugment_std=0.1,
    randaugment_ops=3,
    random_erasing=0.5,
    color_jitter=0.2,
    label_smoothing=0.05,
    ema=0.99,
    strategy="mirrored",
    precision="mixed_bfloat16",
    sync_batchnorm=True,
    confidence="entropy",
    budgets=[1e6, 2.5e6],
    evaluate=False,
    dump_dtype="float16",
)


def _config(*argv):
    return cli._config_from_args(cli.build_parser().parse_args(["train", *argv]))


def _argv(values):
    """The flags that set `values` (the inverse of the generated parser, from the same metadata)."""
    argv = []
    for s in settings():
        if s.nested or s.flag is None or s.key not in values:
            continue
        name = s.flag_name
        value = values[s.key]
        if s.type is bool:
            argv += [name] if value != s.default else []
        elif s.type is dict:
            for k, v in value.items():
                argv += [name, f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        elif s.type is list:
            for item in value:
                argv += [name, repr(item)]
        elif value is not None:
            argv += [name, str(value)]
    return argv


def test_every_field_has_a_flag_or_is_explicitly_flagless():
    for cls in (TrainConfig, RecipeConfig):
        for f in dataclasses.fields(cls):
            assert FLAG in f.metadata, f"{cls.__name__}.{f.name} declares no flag (metadata {FLAG!r})"
            flag = f.metadata[FLAG]
            assert flag is None or isinstance(flag, Flag) and flag.group in FLAG_GROUPS and flag.help, f.name
    flagless = {s.key for s in settings() if s.flag is None}
    assert flagless == {"meta_split_size", "dump_dtype"}  # config-file settings only, as before
    # One flat namespace: the recipe's keys are TrainConfig's keys in config.json and on the command line.
    keys = setting_keys()
    assert len(set(keys)) == len(keys) and "recipe" not in keys and {"mixup", "ema"} <= set(keys)
    assert set(NON_DEFAULT) == set(keys)


def test_help_lists_every_flag_in_its_group(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    positions = [text.index(f"\n{group}:") for group in FLAG_GROUPS]
    assert positions == sorted(positions)  # the groups in their order
    for s in settings():
        if s.flag is not None:
            at = text.index(f"  {s.flag_name}")
            group = max((g for g in FLAG_GROUPS if text.index(f"\n{g}:") < at), key=lambda g: text.index(f"\n{g}:"))
            assert group == s.flag.group, s.flag_name
    for shorthand in ("--q Q", "--delta DELTA", "--phase2-epochs PHASE2_EPOCHS", "--recipe {budget-aware}"):
        assert shorthand in text


def test_the_parser_round_trips_every_setting(tmp_path):
    expected = TrainConfig.from_dict(NON_DEFAULT)
    flagless = {s.key: NON_DEFAULT[s.key] for s in settings() if s.flag is None}
    (tmp_path / "flagless.json").write_text(json.dumps(flagless))
    got = _config("--config", str(tmp_path / "flagless.json"), *_argv(NON_DEFAULT))
    assert got == expected and got.to_dict() == {**TrainConfig().to_dict(), **NON_DEFAULT}
    # Unset flags leave the config file's values (here every key, in a .toml file too).
    (tmp_path / "all.json").write_text(json.dumps(NON_DEFAULT))
    assert _config("--config", str(tmp_path / "all.json")) == expected
    toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in NON_DEFAULT.items() if v is not None and "options" not in k)
    toml += "[model_options]\ndepth = 1\nactivation = 'gelu'\n[method_options]\nphase2_epochs = 3\nreference = 'code'\n"
    (tmp_path / "all.toml").write_text(toml)
    assert _config("--config", str(tmp_path / "all.toml")) == expected
    # No flag at all: the defaults.
    assert _config() == TrainConfig()


def test_shorthands_and_the_recipe_preset_keep_their_precedence(tmp_path):
    cfg = _config("--method-option", "q=0.2", "--q", "0.6", "--delta", "0.1", "--phase2-epochs", "4")
    assert cfg.method_options == {"q": 0.6, "delta": 0.1, "phase2_epochs": 4}  # shorthands win
    # The preset sits under every flag, wherever the flag's field is.
    cfg = _config("--dataset", "imagenet", "--optimizer", "sgd", "--recipe", "budget-aware", "--ema", "0.9")
    assert (
        cfg.optimizer == "sgd"
        and cfg.warmup_epochs == 20
        and cfg.recipe == dataclasses.replace(RECIPES["budget-aware"], ema=0.9)
    )
    (tmp_path / "c.json").write_text('{"mixup": 0.1, "dataset": "imagenet"}')
    cfg = _config("--config", str(tmp_path / "c.json"), "--recipe", "budget-aware")
    assert cfg.recipe.mixup == 0.8 and cfg.optimizer == "adamw"  # over the file
    assert _config("--no-evaluate").evaluate is False and _config("--sync-batchnorm").sync_batchnorm is True


def test_unknown_config_keys_are_refused_naming_the_known_ones(tmp_path, capsys):
    for values in ({"epochz": 3}, {"recipe": {"mixup": 0.8}}):
        with pytest.raises(ValueError, match="unknown config keys") as e:
            TrainConfig.from_dict(values)
        assert "'epochs'" in str(e.value) and "'mixup'" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "c.toml").write_text("[recipe]\nmixup = 0.8\n")
    assert cli.main(["train", "--config", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert "unknown config keys ['recipe']" in err and "'mixup'" in err
    # The nested field takes a RecipeConfig, nothing else; the recipe's own checks name their key.
    with pytest.raises(ValueError, match="config `recipe` must be a keras_ee.config.RecipeConfig"):
        TrainConfig(recipe={"mixup": 0.8})
    with pytest.raises(ValueError, match="config `ema` must be a momentum in"):
        TrainConfig.from_dict({"ema": 1.5})


def test_a_config_json_of_flat_keys_written_before_the_nested_recipe_loads_unchanged(tmp_path):
    cfg = TrainConfig.from_file(OLD_CONFIG)
    assert cfg.recipe == dataclasses.replace(RECIPES["budget-aware"], randaugment_ops=1)
    assert (cfg.method, cfg.method_options, cfg.epochs, cfg.learning_rate, cfg.budgets) == (
        "l2w",
        {"q": 0.7},
        2,
        0.05,
        [15e6],
    )
    # config.json stays flat: what this version writes is byte for byte what the older one wrote.
    cfg.to_json(tmp_path / "config.json")
    assert (tmp_path / "config.json").read_text() == OLD_CONFIG.read_text()


def test_a_run_folder_with_an_old_config_json_resumes_with_the_same_settings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(OLD_CONFIG, run / "config.json")
    (run / "history.csv").write_text("epoch,loss\n0,1.0\n")  # a run that started (no lock file: an old one)
    assert run_folder.is_run_folder(run)
    # The command that made it, given again, is the same run.
    argv = ["--recipe", "budget-aware", "--model", "multiexit_cnn", "--method", "l2w", "--q", "0.7", "--epochs", "2"]
    argv += ["--batch-size", "32", "--train-size", "300", "--randaugment-ops", "1", "--lr", "0.05", "--budget", "15M"]
    argv += ["--model-option", "depth=1", "--no-evaluate"]
    config = experiment.canonical_config(_config(*argv))
    assert experiment.prepare_workdir(config, run) == run
    assert (run / "config.json").read_text() == OLD_CONFIG.read_text()  # left as it was
    assert experiment.training_recipe(config) == config.recipe
    with pytest.raises(ValueError, match=r"other settings \(mixup: 0.8 -> 0.5\)"):
        experiment.prepare_workdir(experiment.canonical_config(_config(*argv, "--mixup", "0.5")), run)


def test_a_run_recorded_with_the_builders_old_option_names_resumes_under_the_new_ones(tmp_path):
    # config.json of a run made before MSDNetBackbone/RANetBackbone named their arguments
    # (`num_channels`, `growth_factor`, `bottleneck_factor`): the same run under today's names.
    run = tmp_path / "run"
    run.mkdir()
    old = {"num_channels": 8, "growth_factor": [1, 2], "bottleneck_factor": [1, 2], "growth_rate": 4}
    base = TrainConfig(model="msdnet_cifar_5", model_options={"moving_variance_update": "unbiased"})
    values = {**base.to_dict(), "model_options": {**old, "moving_variance_update": "unbiased"}}
    (run / "config.json").write_text(json.dumps(values))
    (run / "history.csv").write_text("epoch,loss\n0,1.0\n")
    stored = run_folder.recorded_config(TrainConfig.from_file(run / "config.json"))
    assert stored.model_options == {
        "channels": 8,
        "growth_factors": [1, 2],
        "bottleneck_factors": [1, 2],
        "growth_rate": 4,
        "moving_variance_update": "unbiased",
    }
    renamed = dataclasses.replace(base, model_options=stored.model_options)
    assert experiment.prepare_workdir(renamed, run, write=False) == run
