"""A training method from outside keras-ee, defined in this one file: an option, a search space
and an artifact. It trains through `experiment.train` and `keras-ee train --method
module:Class`, `tuning.search` finds its search space, and an entry point registers it; nothing
else is edited."""

import json
import sys

import keras
import numpy as np
import pytest
from keras import ops
from tiny_models import SMALL_CNN, SMALL_CNN_ARGS

from keras_ee import cli, experiment, training
from keras_ee.atomic import atomic_write_json
from keras_ee.config import TrainConfig
from keras_ee.training import registry

TINY = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=SMALL_CNN,
    epochs=1,
    batch_size=128,
    val_size=200,
    train_size=300,
    evaluate=False,
)


@keras.saving.register_keras_serializable(package="keras_ee_test_plugin")
class DeepFirst(training.Method):
    """Exit k's cross-entropy weighted by `(k / K) ** power` (a method no paper needs)."""

    search_space = {"power": training.SearchRange(0.0, 2.0)}

    def __init__(self, power: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not power >= 0:
            raise ValueError(f"`power` must be >= 0; received {power!r}.")
        self.power = float(power)

    def compute_loss(self, model, y, logits, ce, sample_weight=None):
        k = np.arange(1, self.num_exits + 1) / self.num_exits
        per_exit = ops.mean(ce, axis=0) * ops.convert_to_tensor(k**self.power, ce.dtype)
        return ops.sum(per_exit), per_exit

    def save_artifacts(self, model, splits, workdir):
        atomic_write_json(workdir / "deep_first.json", {"power": self.power, "exits": self.num_exits})

    def get_config(self):
        return {**super().get_config(), "power": self.power}


PATH = f"{__name__}:DeepFirst"


def test_a_method_from_a_module_path_trains_through_experiment_train(tmp_path):
    spec = training.get_method(PATH)
    assert spec.cls is DeepFirst and spec.options["power"].default == 1.0
    run = experiment.train(TrainConfig(**TINY, method=PATH, method_options={"power": 0.5}), tmp_path / "r", verbose=0)
    assert json.loads((run / "deep_first.json").read_text()) == {"power": 0.5, "exits": 3}  # SMALL_CNN
    assert (run / "model.keras").is_file() and (run / "dump" / "test_logits.npy").is_file()


def test_a_method_from_a_module_path_trains_through_the_command_line(tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "multiexit_cnn",
        *SMALL_CNN_ARGS,
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--val-size",
        "200",
        "--train-size",
        "300",
        "--no-evaluate",
        "--quiet",
        "--method",
        PATH,
        "--method-option",
        "power=2",
        "--out",
        str(tmp_path / "r"),
    ]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "r" / "deep_first.json").read_text())["power"] == 2.0
    assert cli.main(argv[:-4] + ["--method-option", "power=lots", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "power='lots': expected a number; valid options: power (float, default 1.0)" in err
    assert not (tmp_path / "bad").exists()


def test_tuning_finds_the_plugin_search_space():
    from tuning import search

    assert search.search_space(PATH) == {"power": training.SearchRange(0.0, 2.0)}


def test_an_entry_point_registers_a_method(tmp_path, monkeypatch):
    dist = tmp_path / "keras_ee_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: keras-ee-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[keras_ee.methods]\ndeep_first = {PATH}\n")
    registry.list_methods()  # the package's own methods, registered before the copy
    monkeypatch.setattr(registry, "_METHODS", registry._METHODS.copy())  # dropped after the test
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "deep_first" in training.list_methods()
    assert isinstance(experiment.make_method("deep_first", {"power": 0}), DeepFirst)
    assert "deep_first" in registry.methods_table()


def test_registering_checks_the_declaration():
    with pytest.raises(TypeError, match="Method subclass"):
        training.register_method("not_a_method", summary="x")(object)
    with pytest.raises(ValueError, match="unknown option 'beta'"):
        training.register_method("bad_space", summary="x", search_space={"beta": training.SearchRange(0, 1)})(DeepFirst)
    with pytest.raises(ValueError, match="already registered"):
        training.register_method("l2w", summary="x")(DeepFirst)
    assert "bad_space" not in training.list_methods()


def test_registered_options_convert_command_line_values():
    spec = training.get_method("l2w")
    assert spec.convert({"q": 1, "meta_interval": 2.0, "weighting": "selection"}) == {
        "q": 1.0,
        "meta_interval": 2,
        "weighting": "selection",
    }
    with pytest.raises(ValueError, match=r"weighting='wpm': expected one of \['wpn', 'frozen'"):
        spec.convert({"weighting": "wpm"})
    with pytest.raises(ValueError, match="meta_interval=1.5: expected an integer"):
        spec.convert({"meta_interval": 1.5})
    assert training.get_method("baseline").convert({"exit_weights": [1, 2]}) == {"exit_weights": [1, 2]}


def test_keras_ee_methods_lists_every_method_with_its_paper(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "l2w:" in out and "arXiv:2209.08310" in out and "q (float, default 0.75)" in out
    assert "baseline:" in out and "tuned: q in [0.5, 1], delta in [0.1, 1]" in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
