"""The researcher's path end to end on tiny settings: train -> evaluate -> compare -> plot-weights,
resume after an interruption, and the command line's refusals."""

import csv
import json

import keras
import numpy as np
import pytest
from tiny_models import SMALL_CNN, SMALL_CNN_ARGS

from keras_ee import cli, dumps, experiment
from keras_ee.config import TrainConfig

TINY = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=SMALL_CNN,
    epochs=2,
    batch_size=64,
    val_size=200,
    train_size=400,
)
# The runs of the module fixture, as `keras-ee train` flags (a budget between the exits' costs).
RUN_ARGS = [
    "--dataset",
    "digits",
    "--model",
    "multiexit_cnn",
    *SMALL_CNN_ARGS,
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--val-size",
    "200",
    "--train-size",
    "400",
    "--budget",
    "20K",
    "--quiet",
]


def _history_epochs(run):
    with open(run / "history.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("baseline", "l2w"):
        assert cli.main(["train", *RUN_ARGS, "--method", method, "--out", str(root / method)]) == 0
        out[method] = root / method
    return out


def test_train_writes_a_complete_run_folder(runs):
    for method, run in runs.items():
        for name in (
            "config.json",
            "model.keras",
            "history.csv",
            "costs.json",
            "dump/val_logits.npy",
            "eval/anytime.csv",
            "eval/budget.csv",
            "eval/budget.png",
        ):
            assert (run / name).exists(), f"{method}: {name} missing"
        assert (run / "tensorboard").is_dir()
        assert not (run / "backup").exists()  # removed once training finished
        assert _history_epochs(run) == [0, 1]
        d = dumps.load_dump(run / "dump")
        costs = json.loads((run / "costs.json").read_text())
        assert d.mul_adds == costs["mul_adds"] and d.num_classes == 10
        # The dumped logits are the saved model's outputs.
        model = keras.saving.load_model(run / "model.keras")
        assert len(model.backbone.outputs) == d.num_exits
        header = open(run / "history.csv").readline()
        assert "exit_1_accuracy" in header and "val_budget_auc" in header
    assert (runs["l2w"] / "l2w_samples.npz").is_file() and (runs["l2w"] / "wpn.npz").is_file()
    assert "exit_1_weight_mean" in open(runs["l2w"] / "history.csv").readline()


def test_evaluate_compare_and_plot_weights(runs, tmp_path, capsys):
    assert cli.main(["evaluate", str(runs["l2w"])]) == 0
    printed = capsys.readouterr().out
    assert "Anytime prediction" in printed and "Budgeted batch" in printed
    assert cli.main(["compare", str(runs["baseline"]), str(runs["l2w"]), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in rows] == ["baseline", "l2w"] and all(0 <= r["auc"] <= 1 for r in rows)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert cli.main(["plot-weights", str(runs["l2w"]), "--out", str(tmp_path / "w.png")]) == 0
    assert (tmp_path / "w.png").is_file()
    assert cli.main(["sweep", str(runs["l2w"] / "dump"), "--out", str(tmp_path / "sw")]) == 0
    assert (tmp_path / "sw" / "budget.csv").is_file()


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt


def test_frozen_wpn_ablation_trains_from_a_previous_runs_wpn(runs, tmp_path):
    cfg = TrainConfig(
        **TINY,
        method="l2w",
        evaluate=False,
        method_options={"weighting": "frozen", "wpn_weights_path": str(runs["l2w"] / "wpn.npz")},
    )
    cfg.epochs = 1
    experiment.train(cfg, tmp_path / "frozen", verbose=0)
    saved, reused = np.load(runs["l2w"] / "wpn.npz"), np.load(tmp_path / "frozen" / "wpn.npz")
    for key in saved.files:  # frozen: the WPN did not move during training
        np.testing.assert_array_equal(saved[key], reused[key])


def test_interrupted_train_resumes_where_it_stopped(tmp_path):
    cfg = TrainConfig(**TINY, method="baseline", evaluate=False)
    cfg.epochs = 3
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[_Interrupt(2)])
    assert (run / "backup").is_dir() and not (run / "model.keras").exists()
    assert _history_epochs(run) == [0, 1]
    experiment.train(cfg, run, verbose=0)
    assert _history_epochs(run) == [0, 1, 2]  # epochs 0 and 1 were not trained again
    assert (run / "model.keras").is_file()


def test_a_different_config_in_an_existing_run_is_refused(tmp_path, capsys):
    experiment.prepare_workdir(TrainConfig(**TINY), tmp_path)
    (tmp_path / "history.csv").write_text("epoch,loss\n0,1.0\n")  # the run has started
    with pytest.raises(ValueError, match="epochs: 2 -> 5"):
        experiment.prepare_workdir(TrainConfig(**{**TINY, "epochs": 5}), tmp_path)
    assert cli.main(["train", "--out", str(tmp_path), "--epochs", "5", "--dataset", "digits"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_cli_refusals_are_clear(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "no dump/" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "no-such-data", "--out", str(tmp_path / "x")]) == 2
    assert "no-such-data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--budget", "lots"])
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"epochz": 3}))
    assert cli.main(["train", "--config", str(cfg_file)]) == 2
    assert "epochz" in capsys.readouterr().err


def test_config_file_and_flags_combine(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('dataset = "digits"\nepochs = 7\nmethod = "l2w"\n[method_options]\nq = 0.5\n')
    args = cli.build_parser().parse_args(["train", "--config", str(f), "--delta", "0.3", "--epochs", "9"])
    cfg = cli._config_from_args(args)
    assert cfg.epochs == 9 and cfg.method_options == {"q": 0.5, "delta": 0.3} and cfg.dataset == "digits"
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_non_finite_loss_is_reported_not_a_traceback(tmp_path, monkeypatch, capsys):
    from keras_ee.training import NonFiniteLossError

    def explode(config, out, verbose):
        raise NonFiniteLossError("loss of exit 2 became nan at step 7")

    monkeypatch.setattr(experiment, "train", explode)
    assert cli.main(["train", "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "exit 2 became nan at step 7" in err and "lower the learning rate" in err


def test_rerunning_a_finished_run_in_a_fresh_process_reuses_the_model(runs):
    """A second `keras-ee train` on a finished run loads model.keras (custom classes registered)."""
    import subprocess
    import sys

    before = (runs["baseline"] / "model.keras").stat().st_mtime
    out = subprocess.run(
        [sys.executable, "-m", "keras_ee", "train", *RUN_ARGS, "--method", "baseline", "--out", str(runs["baseline"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "training already finished" in out.stdout
    assert (runs["baseline"] / "model.keras").stat().st_mtime == before


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("epochs", 0, "epochs"),
        ("batch_size", 1, "batch_size"),
        ("learning_rate", -0.1, "learning_rate"),
        ("schedule", "linear", "schedule"),
        ("momentum", 1.0, "momentum"),
        ("weight_decay", -1, "weight_decay"),
        ("dump_dtype", "int8", "dump_dtype"),
        ("budgets", [0], "budgets"),
        ("model_options", [1], "model_options"),
    ],
)
def test_train_config_refuses_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_unknown_method_and_bad_method_options_are_refused():
    with pytest.raises(ValueError, match="unknown training method 'no_such_method'"):
        experiment.make_method("no_such_method", {})
    with pytest.raises(ValueError, match="bad options for method 'l2w'"):
        experiment.make_method("l2w", {"qq": 1})
