"""An imported run is a run like a trained one: `keras-ee evaluate RUN --dataset ...` dumps its logits
and gives the tables; `predict`, `EarlyExitModel.from_run`, `save` and `export` work on it and take
raw pixels (the run's preprocessing.json is applied inside the model).

One imported run (the authors' small CIFAR MSDNet of tests/data/torch_checkpoints) evaluated on a
tiny .npz dataset of random 8-bit 32x32 images, shared by every test."""

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_ee import calibration, cli, dumps, inputs, runs
from keras_ee.inference import EarlyExitModel

DATA = Path(__file__).parent / "data" / "torch_checkpoints"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)


def _tiny_dataset(path, classes=10, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    y_train, y_test = np.arange(100) % classes, np.arange(40) % classes
    x_train = rng.integers(0, 256, size=(100, 32, 32, 3)).astype(dtype)
    x_test = rng.integers(0, 256, size=(40, 32, 32, 3)).astype(dtype)
    if dtype != np.uint8:
        x_train, x_test = x_train / 255.0, x_test / 255.0
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(run folder, .npz dataset): imported, then evaluated on the dataset by the CLI."""
    root = tmp_path_factory.mktemp("imported_runs")
    run = root / "run"
    assert cli.main(["import", str(DATA / "msdnet_cifar_zip.pth"), "--out", str(run)]) == 0
    npz = _tiny_dataset(root / "tiny.npz")
    assert cli.main(["evaluate", str(run), "--dataset", f"npz:{npz}", "--val-size", "40"]) == 0
    return run, npz


@pytest.fixture(scope="module")
def ee(imported):
    run, _ = imported
    c = dumps.load_dump(run / "dump").mul_adds
    return EarlyExitModel.from_run(run, budget=0.5 * (c[0] + c[-1]))


def _test_pixels(npz):
    with np.load(npz) as z:
        return z["x_test"], z["y_test"]


def _simulated(logits, thresholds):
    """(exit 1-based, label) of every sample by calibration's rule, and how many scores lie within
    1e-6 (relative) of a threshold (where float32 rounding may move a sample)."""
    scores, preds = calibration.exit_scores(logits)
    k, n = scores.shape
    exit0 = np.full(n, k - 1)
    for e in range(k - 2, -1, -1):
        exit0 = np.where(scores[e].astype(np.float64) >= thresholds[e], e, exit0)
    near = sum(
        int(np.sum(np.abs(scores[e].astype(np.float64) - t) <= 1e-6 * abs(t)))
        for e, t in enumerate(thresholds[:-1])
        if np.isfinite(t)
    )
    return exit0 + 1, preds[exit0, np.arange(n)], near


def test_evaluate_dumps_the_logits_and_writes_the_tables(imported, capsys):
    run, npz = imported
    dump = dumps.load_dump(run / "dump")
    assert np.asarray(dump.val_logits).shape == (4, 40, 10) and np.asarray(dump.test_logits).shape == (4, 40, 10)
    assert {"anytime.csv", "budget.csv"} <= {p.name for p in (run / "eval").iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == f"npz:{npz}" and config["val_size"] == 40 and config["method"] == "baseline"
    # The test logits are the model's on pixels / 255 normalised with the authors' CIFAR-10 constants.
    x, y = _test_pixels(npz)

    backbone = runs.load_run_model(run / "model.keras").backbone
    normalised = (x.astype(np.float32) / 255.0 - np.float32(CIFAR10_MEAN)) / np.float32(CIFAR10_STD)
    want = np.stack([np.asarray(o) for o in backbone(normalised, training=False)])
    np.testing.assert_allclose(np.asarray(dump.test_logits), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(dump.test_labels, y)
    # Evaluated again without flags: the dump is kept, the tables written again.
    stamp = (run / "dump").stat().st_mtime_ns
    assert cli.main(["evaluate", str(run)]) == 0
    assert (run / "dump").stat().st_mtime_ns == stamp
    assert "Anytime prediction" in capsys.readouterr().out


def test_predict_on_raw_pixels_equals_the_simulation_from_the_dump(imported, ee, tmp_path):
    run, npz = imported
    x, _ = _test_pixels(npz)
    out = ee.predict(x)  # uint8 pixels as the dataset stores them
    exits, labels, near = _simulated(np.asarray(dumps.load_dump(run / "dump").test_logits), ee.thresholds)
    assert near == 0
    np.testing.assert_array_equal(out["exit"], exits)
    np.testing.assert_array_equal(out["label"], labels)
    assert len(set(out["exit"].tolist())) >= 2  # the budget really spreads the exits
    pooled = ee.predict(x, pooled=True, batch_size=16)
    np.testing.assert_array_equal(pooled["exit"], exits)
    # The command line the same, from an .npz of the raw pixels.
    np.savez(tmp_path / "images.npz", x=x)
    budget = str(ee.budget)
    argv = ["predict", str(run), "--budget", budget, "--images", str(tmp_path / "images.npz")]
    assert cli.main(argv + ["--out", str(tmp_path / "pred.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert [int(r["exit"]) for r in rows] == exits.tolist()
    assert [int(r["label"]) for r in rows] == labels.tolist()


def test_from_model_takes_the_normalisation(imported, ee):
    run, npz = imported
    dump = dumps.load_dump(run / "dump")
    x, _ = _test_pixels(npz)
    raw = EarlyExitModel.from_model(
        ee.backbone,
        np.asarray(dump.val_logits),
        np.asarray(dump.val_labels),
        ee.budget,
        costs=dump.mul_adds,
        preprocessing={"pixel_scale": 1 / 255, "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "pixel_range": [0, 255]},
    )
    plain = EarlyExitModel.from_run(run, budget=ee.budget, raw_pixels=False)  # takes normalised images
    assert plain.preprocessing is None and raw.preprocessing == ee.preprocessing
    normalised = (x.astype(np.float32) / 255.0 - np.float32(CIFAR10_MEAN)) / np.float32(CIFAR10_STD)
    want = plain.predict(normalised)
    for model in (raw, ee):
        got = model.predict(x)
        np.testing.assert_array_equal(got["exit"], want["exit"])
        np.testing.assert_array_equal(got["label"], want["label"])
    with pytest.raises(ValueError, match="normalisation has 1 channels; the model takes 3"):
        EarlyExitModel.from_model(
            ee.backbone,
            dump.val_logits,
            dump.val_labels,
            ee.budget,
            preprocessing={"pixel_scale": 1, "mean": [0], "std": [1]},
        )
    with pytest.raises(ValueError, match="std > 0"):
        inputs.Preprocessing(1.0, [0, 0, 0], [1, 0, 1])


def test_saved_and_exported_models_take_raw_pixels(imported, ee, tmp_path, capsys):
    _, npz = imported
    x, _ = _test_pixels(npz)
    ref = ee.predict(x)
    loaded = EarlyExitModel.load(ee.save(tmp_path / "ee.keras"))
    assert loaded.preprocessing == ee.preprocessing
    np.testing.assert_array_equal(loaded.predict(x)["exit"], ref["exit"])
    served = tf.saved_model.load(str(ee.export(tmp_path / "serving")))
    out = served.signatures["serving_default"](images=tf.constant(x, tf.float32))
    np.testing.assert_array_equal(out["exit"].numpy(), ref["exit"])
    np.testing.assert_array_equal(out["label"].numpy(), ref["label"])
    # The saved model on the command line: raw pixels; --normalized would normalise twice.
    np.savez(tmp_path / "images.npz", x=x)
    argv = ["predict", str(tmp_path / "ee.keras"), "--images", str(tmp_path / "images.npz")]
    assert cli.main(argv + ["--out", str(tmp_path / "a.csv")]) == 0
    assert [int(r["exit"]) for r in csv.DictReader(open(tmp_path / "a.csv"))] == ref["exit"].tolist()
    assert cli.main(argv + ["--out", str(tmp_path / "b.csv"), "--normalized"]) == 2
    assert "normalises raw pixels itself" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()


def test_raw_pixels_are_checked_against_the_run_range(imported, ee):
    _, npz = imported
    x, _ = _test_pixels(npz)
    assert ee.preprocessing.pixel_range == (0.0, 255.0)
    far = x.astype(np.float32) * 4  # 0..1020: not 8-bit pixels
    with pytest.raises(ValueError, match=r"outside the training pixel range \[0, 255\]"):
        ee.predict(far)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        ee(far[:2])
    mild = x.astype(np.float32)
    mild[0, 0, 0, 0] = 260.0
    with pytest.warns(inputs.PixelRangeWarning, match="slightly outside"):
        ee.predict(mild)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ee.predict(x)  # inside: no warning


def test_evaluate_refusals(imported, tmp_path, capsys):
    run, npz = imported
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    stamp = (copy / "dump").stat().st_mtime_ns
    cases = {
        "wrong classes": (["--dataset", f"npz:{_tiny_dataset(tmp_path / 'five.npz', classes=5)}"], "5 classes"),
        "float pixels": (["--dataset", f"npz:{_tiny_dataset(tmp_path / 'f.npz', dtype=np.float32)}"], "scaled by 1"),
    }
    for name, (flags, needle) in cases.items():
        assert cli.main(["evaluate", str(copy), *flags]) == 2, name
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (name, err)
    assert (copy / "dump").stat().st_mtime_ns == stamp  # nothing replaced
    (copy / "import.json").unlink()  # now it looks like a trained run
    assert cli.main(["evaluate", str(copy), "--dataset", f"npz:{npz}"]) == 2
    assert "apply only to imported runs" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert cli.main(["import", str(DATA / "msdnet_cifar_zip.pth"), "--out", str(fresh)]) == 0
    assert cli.main(["evaluate", str(fresh), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (fresh / "dump").exists()
