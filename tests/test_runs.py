"""Runs that survive faults: exact resume, atomic backups and final model, the folder lock,
validation before the first write, and the non-finite guards of every method."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from tiny_models import SMALL_CNN, SMALL_CNN_ARGS, StopAt  # noqa: E402

from keras_ee import cli, data, experiment, runs
from keras_ee.config import TrainConfig

TINY = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=SMALL_CNN,
    epochs=3,
    batch_size=128,
    val_size=200,
    evaluate=False,
    train_size=400,
)
METHODS = ("baseline", "l2w")


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def _weights(run):
    model = runs.load_run_model(run / "model.keras")
    values = [np.asarray(v.numpy()) for v in model.variables]
    values += [np.asarray(v.numpy()) for v in model.optimizer.variables]
    return values


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)  # bit-identical, not close
    ha, hb = _history(a), _history(b)
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb] == ["0", "1", "2"]
    assert ha == hb
    np.testing.assert_array_equal(np.load(a / "dump" / "test_logits.npy"), np.load(b / "dump" / "test_logits.npy"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    out = {}
    for method in METHODS:
        experiment.train(TrainConfig(**TINY, method=method), root / method, verbose=0)
        out[method] = root / method
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["between_epochs", "inside_an_epoch"])
def test_an_interrupted_run_resumes_bit_identical(method, where, uninterrupted, tmp_path):
    cfg = TrainConfig(**TINY, method=method)
    run = tmp_path / "run"
    stop = StopAt(1) if where == "between_epochs" else StopAt(1, batch=1)
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[stop])
    assert not (run / "model.keras").exists() and runs.RunBackup(run / "backup").backups() == [1]
    experiment.train(cfg, run, verbose=0)
    _assert_same_run(run, uninterrupted[method])
    assert not (run / "backup").exists()


def test_the_data_order_is_a_function_of_seed_and_epoch():
    from keras_ee import data

    splits = data.load("digits", val_size=200)

    def labels(ds):
        return np.concatenate([y.numpy() for _, y in ds])

    whole = labels(splits.train_dataset(64, seed=3, first_epoch=0, epochs=3))
    n = splits.num_train
    tail = labels(splits.train_dataset(64, seed=3, first_epoch=2, epochs=3))
    np.testing.assert_array_equal(whole[2 * n :], tail)  # epoch 2 alone = epoch 2 after 0 and 1
    assert not np.array_equal(whole[:n], whole[n : 2 * n])  # epochs differ
    x_a = next(iter(splits.train_dataset(64, seed=3, first_epoch=1, epochs=2)))[0].numpy()
    x_b = next(iter(splits.train_dataset(64, seed=3, first_epoch=1, epochs=2)))[0].numpy()
    np.testing.assert_array_equal(x_a, x_b)  # augmentation too
    assert splits.train_batches(64) == -(-n // 64)


def _child(script, cwd):
    """Run a Python script in a fresh process; return (returncode, stdout + stderr)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    return out.returncode, out.stdout + out.stderr


_KILL_ON_REPLACE = """
    import os, signal, sys
    import keras_ee.atomic as atomic
    from keras_ee import experiment
    from keras_ee.config import TrainConfig

    target = {target!r}
    real_replace = os.replace
    def replace(src, dst):
        if str(dst).endswith(target):
            os.kill(os.getpid(), signal.SIGKILL)   # kill -9 with the new file written, not yet in place
        return real_replace(src, dst)
    atomic.os.replace = replace
    experiment.train(TrainConfig(**{cfg!r}), {run!r}, verbose=0)
"""


def test_kill_9_while_writing_a_backup_or_the_final_model_loses_nothing(uninterrupted, tmp_path):
    cfg = {**TINY, "method": "baseline"}
    run = tmp_path / "run"
    # Killed while the backup after epoch 2 is being written: epoch 1's backup is intact.
    rc, out = _child(_KILL_ON_REPLACE.format(target="epoch-0002.weights.h5", cfg=cfg, run=str(run)), tmp_path)
    assert rc == -signal.SIGKILL, out
    assert runs.RunBackup(run / "backup").backups() == [1]
    assert [r["epoch"] for r in _history(run)] == ["0", "1"]  # epoch 1's row was written before its backup
    # Killed while model.keras is being written, after all three epochs trained.
    rc, out = _child(_KILL_ON_REPLACE.format(target="model.keras", cfg=cfg, run=str(run)), tmp_path)
    assert rc == -signal.SIGKILL, out
    assert not (run / "model.keras").exists() and runs.RunBackup(run / "backup").backups() == [3]
    rc, out = _child(
        f"""
        from keras_ee import experiment
        from keras_ee.config import TrainConfig
        experiment.train(TrainConfig(**{cfg!r}), {str(run)!r}, verbose=0)
    """,
        tmp_path,
    )
    assert rc == 0, out
    assert "resuming from the backup after epoch 3" in out
    _assert_same_run(run, uninterrupted["baseline"])  # every epoch once, and the same result
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in run.rglob("*"))


def test_a_damaged_backup_falls_back_or_starts_over_and_says_so(tmp_path, capsys):
    cfg = TrainConfig(**TINY, method="baseline")
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[StopAt(2)])
    backups = runs.RunBackup(run / "backup")
    assert backups.backups() == [2]
    newest = run / "backup" / "epoch-0002.weights.h5"
    older = run / "backup" / "epoch-0001.weights.h5"
    # An older complete backup is still there (say the kill came before the old one was pruned).
    older.write_bytes(newest.read_bytes())
    (run / "backup" / "epoch-0001.json").write_text(json.dumps({"epoch": 1}))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn
    model = experiment.build_model(cfg, data.load_configured(cfg))
    assert backups.restore(model) == 1
    assert "epoch-0002.weights.h5" in capsys.readouterr().err
    older.write_bytes(b"garbage")
    model = experiment.build_model(cfg, data.load_configured(cfg))
    assert backups.restore(model) == 0
    assert "starting the training over" in capsys.readouterr().err
    experiment.train(cfg, run, verbose=0)  # the command itself recovers, no manual cleanup
    assert [r["epoch"] for r in _history(run)] == ["0", "1", "2"]


def test_a_full_disk_during_a_backup_is_a_clear_error_and_resumable(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY, method="baseline")
    run = tmp_path / "run"
    real = runs.shutil.disk_usage
    calls = {"n": 0}

    def disk_usage(path):
        calls["n"] += 1
        usage = real(path)
        return usage._replace(free=10) if calls["n"] >= 2 else usage  # full from the second backup on

    monkeypatch.setattr(runs.shutil, "disk_usage", disk_usage)
    with pytest.raises(runs.RunWriteError, match="not enough disk space.*backup after epoch 1 is intact"):
        experiment.train(cfg, run, verbose=0)
    monkeypatch.setattr(runs.shutil, "disk_usage", real)
    assert (
        cli.main(
            [
                "train",
                "--out",
                str(run),
                "--dataset",
                "digits",
                "--model",
                "multiexit_cnn",
                "--method",
                "baseline",
                "--epochs",
                "3",
                "--batch-size",
                "128",
                "--val-size",
                "200",
                "--train-size",
                "400",
                "--no-evaluate",
                "--quiet",
                *SMALL_CNN_ARGS,
            ]
        )
        == 0
    )
    assert [r["epoch"] for r in _history(run)] == ["0", "1", "2"]


def test_a_read_only_file_system_is_a_one_line_error_naming_the_path(tmp_path, monkeypatch, capsys):
    import errno
    import pathlib

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)  # root ignores permissions: fail the call itself
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 4
    err = capsys.readouterr().err
    assert f"cannot create run folder '{tmp_path / 'run'}': Read-only file system" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_out_naming_a_file_or_a_path_under_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert cli.main(["train", "--out", str(target), "--epochs", "1"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(target / "run"), "--epochs", "1"]) == 2
    assert "lies under the file" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_a_second_command_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with runs.RunLock(run):
        assert cli.main(["train", "--out", str(run), "--epochs", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {os.getpid()}" in err and len(err.strip().splitlines()) == 1
        assert not (run / "config.json").exists()
    # A lock file left by a dead process is stale: the next command takes it over.
    (run / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "command": "keras-ee train"}))
    with runs.RunLock(run):
        pass


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from keras_ee import runs
        lock = runs.RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunFolderBusyError, match=f"process {child.pid}"):
            runs.RunLock(run).acquire()
    finally:
        child.kill()
        child.wait()
    with runs.RunLock(run):  # released by the OS with the dead process
        pass


def test_a_refused_command_writes_nothing_and_the_corrected_one_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "multiexit_cnn",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--val-size",
        "200",
        "--train-size",
        "400",
        "--no-evaluate",
        "--quiet",
        *SMALL_CNN_ARGS,
    ]
    assert cli.main(base + ["--q", "0"]) == 2  # the default folder
    assert "q" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.json"))
    assert cli.main(base + ["--model-option", "no_such_option=1"]) == 2
    assert not any(tmp_path.rglob("config.json"))
    # A folder with only the config of a run that never started (older versions wrote it) is not a run.
    run = tmp_path / "runs" / "multiexit_cnn-l2w-digits-s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "method_options": {"q": 0.0}}))
    assert cli.main(base + ["--q", "0.5"]) == 0
    assert json.loads((run / "config.json").read_text())["method_options"] == {"q": 0.5}


def test_nan_pixels_are_refused_by_the_loaders():
    from keras_ee.data import ArraySplits

    x = np.random.default_rng(0).random((20, 8, 8, 1)).astype("float32")
    x[7, 3, 3, 0] = np.nan
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match="NaN or infinite pixels .image 7"):
        ArraySplits("toy", x, y, x[:4], y[:4], x[:4], y[:4], class_names=["a", "b"], pixel_scale=1.0)


def _tiny_backbone(bn=True, classes=3, units=None):
    inp = keras.Input((4, 4, 1))
    h = keras.layers.Conv2D(4, 3, padding="same")(inp)
    if bn:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Flatten()(h)
    a = keras.layers.Dense(units or classes, name="exit_1")(h)
    b = keras.layers.Dense(classes, name="exit_2")(keras.layers.Dense(8, activation="relu")(h))
    return keras.Model(inp, [a, b])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_stops_on_a_nan_pixel(method):
    """The preset's loss stays finite on a NaN pixel (its pooling drops it) while a gradient
    and the BatchNorm statistics turn NaN: every method's step check stops the run."""
    from keras_ee import data, training

    cfg = TrainConfig(**{**TINY, "method": method})
    splits = data.load("digits", val_size=200)
    keras.utils.set_random_seed(0)
    model = experiment.build_model(cfg, splits)
    x = (splits._x_train[:256] / 16.0).astype("float32")
    x[3, 2, 2, 0] = np.nan
    with pytest.raises(training.NonFiniteLossError, match=r"NaN or inf in the .* at optimizer step \d+ .epoch 1"):
        model.fit(x, splits._y_train[:256], batch_size=64, epochs=1, verbose=0)


def test_dropout_and_every_variable_come_back_from_a_backup(tmp_path):
    """A backbone with Dropout (its seed state is a model variable): resume = uninterrupted."""
    from keras_ee import training

    def build():
        keras.utils.set_random_seed(1)
        inp = keras.Input((6,))
        h = keras.layers.Dropout(0.5)(keras.layers.Dense(16, activation="relu")(inp))
        model = training.MultiExitModel(
            keras.Model(inp, [keras.layers.Dense(3, name="exit_1")(inp), keras.layers.Dense(3, name="exit_2")(h)]),
            method=training.L2W(),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        return model

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
    straight = build()
    straight.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    first = build()
    backup = runs.RunBackup(tmp_path / "backup")
    first.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[backup])
    resumed = build()
    assert runs.RunBackup(tmp_path / "backup").restore(resumed) == 1
    resumed.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    for a, b in zip(straight.variables + straight.optimizer.variables, resumed.variables + resumed.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_finite_loss_with_non_finite_gradients_is_caught():
    """The loss can stay finite while a gradient overflows: the step check names the variable."""
    from keras_ee import training

    model = training.MultiExitModel(_tiny_backbone(bn=False), method=training.Baseline())
    model.compile(optimizer=keras.optimizers.SGD(1e30))
    x = np.full((8, 4, 4, 1), 1e30, "float32")
    y = np.arange(8) % 3
    with pytest.raises(training.NonFiniteLossError, match="NaN or inf in the (gradient|updated value|training loss)"):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)


def test_multi_exit_model_refuses_exits_that_cannot_be_trained():
    from keras_ee import training

    with pytest.raises(ValueError, match="exit_1 of the backbone has 1 output unit"):
        training.MultiExitModel(_tiny_backbone(units=1))
    with pytest.raises(ValueError, match="different class counts .exit_1: 5, exit_2: 3"):
        training.MultiExitModel(_tiny_backbone(units=5))
    inp = keras.Input((4,))
    probs = keras.layers.Dense(3, activation="softmax", name="exit_1")(inp)
    with pytest.raises(ValueError, match="exit_1 of the backbone ends in a softmax"):
        training.MultiExitModel(keras.Model(inp, [probs]))


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([0, 1, 2, 7] * 4), "received label 7"),
        (np.array([0, 1, 2, -1] * 4), "received label -1"),
        (np.array([0, 1, 2, 1.5] * 4), "non-integer label"),
    ],
)
def test_bad_labels_in_the_python_api_are_a_clear_error(labels, match):
    from keras_ee import training

    model = training.MultiExitModel(_tiny_backbone(), method=training.Baseline())
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x = np.zeros((16, 4, 4, 1), "float32")
    with pytest.raises(ValueError, match=f"labels must be integer class indices in 0..2.*{match}"):
        model.fit(x, labels, batch_size=16, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=match):
        model.evaluate(x, labels, batch_size=16, verbose=0)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"epochs": True}, "`epochs` must be a positive integer; received True"),
        ({"seed": 1.5}, "`seed` must be an integer"),
        ({"nesterov": "yes"}, "`nesterov` must be true or false"),
        ({"dataset": 3}, "`dataset` must be a string"),
        ({"confidence": "max"}, "`confidence` must be one of"),
        ({"budgets": [float("inf")]}, "`budgets`"),
    ],
)
def test_config_type_errors_name_the_field_and_the_file(values, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(values).replace("Infinity", "1e309"))
    with pytest.raises(ValueError, match=f"config file '{f}'.*{match}"):
        TrainConfig.from_file(f)


def test_malformed_toml_names_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("epochs = = 3\n")
    with pytest.raises(ValueError, match=f"config file '{f}' is not valid TOML"):
        TrainConfig.from_file(f)


def test_unknown_method_option_lists_the_valid_ones(capsys):
    with pytest.raises(ValueError, match=r"unknown option 'qq'; valid options: q \(float, default 0.75\)"):
        experiment.make_method("l2w", {"qq": 1})
    assert cli.main(["train", "--method", "baseline", "--method-option", "q=1", "--out", "/nonexistent/x"]) == 2
    assert "exit_weights" in capsys.readouterr().err


def test_a_truncated_model_keras_is_reported_as_damaged(tmp_path, uninterrupted):
    f = tmp_path / "model.keras"
    data = (uninterrupted["baseline"] / "model.keras").read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is damaged"):
        runs.load_run_model(f)


def test_a_finished_run_with_a_damaged_model_trains_again_and_says_so(tmp_path, uninterrupted, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted["baseline"], run)
    (run / "model.keras").write_bytes(b"PK\x03\x04 torn")
    experiment.train(TrainConfig(**TINY, method="baseline"), run, verbose=0)
    assert "is damaged" in capsys.readouterr().out
    _assert_same_run(run, uninterrupted["baseline"])


def test_an_npz_without_test_images_is_refused_before_training(tmp_path):
    f = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(
        f,
        x_train=rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8),
        y_train=np.arange(60) % 3,
        x_test=np.zeros((0, 8, 8, 1), np.uint8),
        y_test=np.zeros((0,), np.int64),
    )
    cfg = TrainConfig(**{**TINY, "dataset": f"npz:{f}", "val_size": 10, "train_size": None})
    with pytest.raises(ValueError, match="no test images"):
        experiment.train(cfg, tmp_path / "run", verbose=0)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_failed_write_after_training_keeps_the_model_and_says_so(tmp_path, monkeypatch, uninterrupted):
    import shutil

    from keras_ee import dumps

    run = tmp_path / "run"
    shutil.copytree(uninterrupted["baseline"], run)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(run / "dump"))

    monkeypatch.setattr(dumps, "save_dump", full)
    with pytest.raises(runs.RunWriteError, match="No space left on device; nothing was lost: the trained model"):
        experiment.train(TrainConfig(**TINY, method="baseline"), run, verbose=0)


def test_validation_inside_fit_runs_each_callback_once_and_quietly(capsys):
    """`fit` hands its CallbackList to `evaluate`; the guard must not wrap it again."""
    from keras_ee import training

    calls = []

    class Count(keras.callbacks.Callback):
        def on_test_batch_end(self, batch, logs=None):
            calls.append(batch)

    model = training.MultiExitModel(_tiny_backbone())
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x, y = np.zeros((8, 4, 4, 1), "float32"), np.arange(8) % 3
    capsys.readouterr()
    model.fit(x, y, validation_data=(x, y), batch_size=4, epochs=1, verbose=0, callbacks=[Count()])
    assert calls == [0, 1]
    assert capsys.readouterr().out == ""


# --- the orchestration's layers: every import points down -------------------------------------

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_ee")
# The modules of one run's orchestration, from the top: none may be imported by a module below it.
ORCHESTRATION = ("cli", "experiment", "runs", "distribute", "evaluation")


def _keras_ee_imports(path):
    """`(module, name)` for every `keras_ee` import of a source file, at any depth (`name` None for a module)."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "keras_ee":
            parts = node.module.split(".")
            for alias in node.names:
                found.append((parts[1], alias.name) if len(parts) > 1 else (alias.name, None))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], None) for a in node.names if a.name.startswith("keras_ee.")]
    return found


def _upward_imports(package=PACKAGE):
    """Imports by a training method of the orchestration above it, or of another module's private name."""
    folder = os.path.join(package, "training")
    bad = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            for module, imported in _keras_ee_imports(os.path.join(folder, name)):
                if module in ORCHESTRATION or (module != "training" and imported and imported.startswith("_")):
                    bad.append(f"training/{name}: {module}.{imported}" if imported else f"training/{name}: {module}")
    return bad


def test_no_training_method_imports_the_orchestration_above_it():
    assert _upward_imports() == []


def test_evaluation_and_plots_do_not_import_each_other():
    plots = {m for m, _ in _keras_ee_imports(os.path.join(PACKAGE, "plots.py"))}
    evaluation = {m for m, _ in _keras_ee_imports(os.path.join(PACKAGE, "evaluation.py"))}
    assert "evaluation" not in plots and "formatting" in plots and "formatting" in evaluation


def test_a_method_gets_a_run_folder_that_joins_like_a_path(tmp_path):
    from keras_ee.run_folder import RunFolder

    folder = RunFolder(str(tmp_path))
    assert folder / "wpn.npz" == tmp_path / "wpn.npz" and os.fspath(folder) == str(tmp_path)
    assert folder.scores_dir == tmp_path / "scores" and folder.dump_dir == tmp_path / "dump"
    assert folder.config_file == tmp_path / "config.json" and folder.model_file == tmp_path / "model.keras"


def test_reading_and_evaluating_a_run_starts_no_tensorflow():
    # A process of its own: this one has TensorFlow loaded already.
    code = (
        "import sys, keras_ee.cli, keras_ee.evaluation, keras_ee.run_folder, keras_ee.inputs; "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
