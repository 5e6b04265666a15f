"""Bad input to the inference surfaces gets one clear line, never a silent answer (issue 27):
plug-in paths and image files that cannot be read (item 4), non-finite images (6), pixels
outside the training range and non-numeric dtypes (7), `--confidence` on a saved model (10),
deadlines (11), `from_model`'s labels (12), `predict`'s messages and early checks (14), the
split sizes and Mul-Add counts (15). One tiny run shared by every test."""

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from keras_ee import cli, data, dumps, experiment, run_folder, training
from keras_ee.config import TrainConfig
from keras_ee.costs import parse_mul_adds
from keras_ee.inference import EarlyExitModel

TINY = dict(
    dataset="digits", model="multiexit_cnn", method="baseline", epochs=1, batch_size=128, val_size=200, train_size=200
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guards") / "run"
    experiment.train(TrainConfig(**TINY, evaluate=False), out, verbose=0)
    return out


@pytest.fixture(scope="module")
def budget(run):
    c = dumps.load_dump(run / "dump").mul_adds
    return 0.5 * (c[0] + c[-1])


@pytest.fixture(scope="module")
def ee(run, budget):
    return EarlyExitModel.from_run(run, budget=budget, raw_pixels=False)  # takes normalised images


def _raw_digits(n=6, seed=0):
    """Raw digits-like pixels: uint8 in 0..16, (n, 8, 8)."""
    return np.random.default_rng(seed).integers(0, 17, size=(n, 8, 8)).astype(np.uint8)


def _normalized(run, raw):
    scale, mean, std = run_folder.read_preprocessing(run)
    return ((raw.astype(np.float32) * np.float32(scale) - mean) / std)[..., None].astype(np.float32)


def _predict(run, images, out, *extra, budget="400K"):
    argv = ["predict", str(run), "--images", str(images), "--out", str(out)]
    return cli.main(argv + (["--budget", budget] if budget else []) + list(extra))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------- item 4: plug-ins and image files


def test_a_plugin_with_a_syntax_error_or_no_module_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_plugin_27.py").write_text("import keras_ee\n\ndef oops(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"broken_plugin_27\.py.*line 3") as info:
        training.get_method("broken_plugin_27:Method")
    assert "\n" not in str(info.value)
    for bad in (":Foo", "pkg.mod:", "pkg.mod:A:B", " :Foo"):
        with pytest.raises(ValueError, match="package.module:Class") as info:
            training.get_method(bad)
        assert "Empty module name" not in str(info.value)
    argv = ["train", "--dataset", "digits", "--method", "broken_plugin_27:Method", "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    _one_line_error(capsys, "broken_plugin_27.py", "line 3")
    assert not (tmp_path / "r").exists()


def _object_npz(path):
    with zipfile.ZipFile(path, "w") as z:
        buf = io.BytesIO()
        np.save(buf, np.array([None, 1], dtype=object), allow_pickle=True)
        z.writestr("x.npy", buf.getvalue())


def test_unreadable_image_files_are_one_line_naming_the_file(run, tmp_path, capsys):
    np.savez(tmp_path / "good.npz", x=_raw_digits())
    whole = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    np.save(tmp_path / "single.npy", _raw_digits())
    (tmp_path / "text.npz").write_text("these are not images\n")
    np.savez(tmp_path / "strings.npz", x=np.array(["a", "b"]))
    _object_npz(tmp_path / "objects.npz")
    cases = {
        "truncated.npz": "truncated",
        "single.npy": ".npy",
        "text.npz": "not an .npz",
        "strings.npz": "numeric",
        "objects.npz": "Python objects",
    }
    for name, needle in cases.items():
        assert _predict(run, tmp_path / name, tmp_path / "out.csv") == 2, name
        err = _one_line_error(capsys, name, needle)
        assert "allow_pickle" not in err and "pickle.load" not in err, err
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------- item 6: non-finite images


def _with_non_finite(x):
    x = np.array(x, copy=True)
    x[1, 0, 0, 0] = np.nan
    x[3] = np.inf
    x[4, 2, 2, 0] = -np.inf
    return x


def test_non_finite_images_are_refused_by_predict_and_call(run, ee, tmp_path, capsys):
    x = _with_non_finite(_normalized(run, _raw_digits()))
    for pooled in (False, True):
        with pytest.raises(ValueError, match=r"images 1, 3, 4 \(3 of 6\).*NaN or infinite"):
            ee.predict(x, pooled=pooled)
    with pytest.raises(ValueError, match=r"images 1, 3, 4"):
        ee(x)
    with pytest.raises(ValueError, match=r"images 1, 3, 4"):
        ee(tf.constant(x))
    raw = _raw_digits().astype(np.float32)
    raw[2, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=raw)
    assert _predict(run, tmp_path / "nan.npz", tmp_path / "out.csv") == 2
    _one_line_error(capsys, "nan.npz", "image 2 ", "NaN or infinite")
    assert not (tmp_path / "out.csv").exists()


def test_the_no_confidence_rule_is_shared_by_every_pass(run, ee, tmp_path):
    """A non-finite image, or an exit whose logits are not all finite, has a NaN confidence that
    never meets a threshold: the image runs to the last exit (or the deadline's) and comes out with
    label -1 and confidence NaN, in the compiled pass, the pooled pass and the SavedModel alike."""
    x = _with_non_finite(_normalized(run, _raw_digits()))
    bad = np.array([False, True, False, True, True, False])
    k = ee.num_exits
    ref = ee.predict(x[~bad])
    outs = {"compiled": {key: v.numpy() for key, v in ee.serving_function()(tf.constant(x)).items()}}
    outs["pooled"] = ee._predict_pooled(x, 2, k)
    path = ee.export(tmp_path / "served")
    served = tf.saved_model.load(str(path))
    outs["saved"] = {key: v.numpy() for key, v in served.serve(tf.constant(x)).items()}
    for name, out in outs.items():
        np.testing.assert_array_equal(out["exit"][bad], [k] * 3, err_msg=name)
        np.testing.assert_array_equal(out["label"][bad], [-1] * 3, err_msg=name)
        assert np.isnan(out["confidence"][bad]).all(), name
        np.testing.assert_array_equal(out["exit"][~bad], ref["exit"], err_msg=name)
        np.testing.assert_array_equal(out["label"][~bad], ref["label"], err_msg=name)
    anytime = served.anytime(tf.constant(x), tf.constant(2))
    np.testing.assert_array_equal(anytime["exit"].numpy()[bad], [2] * 3)
    np.testing.assert_array_equal(anytime["label"].numpy()[bad], [-1] * 3)
    pooled = ee._predict_pooled(x, 4, 2)
    np.testing.assert_array_equal(pooled["exit"][bad], [2] * 3)
    # The rule itself: logits with a NaN or inf have no confidence, whatever the kernels do with NaN.
    for kind in ("max_softmax", "margin", "entropy"):
        e = EarlyExitModel(ee.backbone, ee.thresholds, ee.costs, kind=kind)
        logits = tf.constant([[np.nan, 1.0, 2.0], [np.inf, 1.0, 2.0], [0.5, 1.0, 2.0]], tf.float32)
        score, label = e._score(logits, 0, tf.constant([True, True, True]))
        assert np.isnan(score.numpy()[:2]).all() and np.isfinite(score.numpy()[2]), kind
        np.testing.assert_array_equal(label.numpy(), [-1, -1, 2])
        score, label = e._score(logits, 0, tf.constant([True, True, False]))
        assert np.isnan(score.numpy()[2]) and label.numpy()[2] == -1


# ---------------------------------------------------------------- item 7: pixel range and dtypes


def test_the_training_pixel_range_is_recorded_and_enforced(run, tmp_path, capsys):
    saved = json.loads((run / "preprocessing.json").read_text())
    assert saved["pixel_range"] == [0.0, 16.0]  # digits store 0..16
    eight_bit = _raw_digits().astype(np.int64) * 15  # 0..240: 8-bit pixels for a 0..16 dataset
    np.savez(tmp_path / "png8.npz", x=eight_bit.astype(np.uint8))
    np.savez(tmp_path / "huge.npz", x=np.full((3, 8, 8), 10**12, np.int64))
    for name in ("png8.npz", "huge.npz"):
        assert _predict(run, tmp_path / name, tmp_path / "out.csv") == 2
        _one_line_error(capsys, name, "[0, 16]")
    # The same for a folder of 8-bit PNG files, naming the file.
    folder = tmp_path / "png"
    folder.mkdir()
    for i, img in enumerate(eight_bit.astype(np.uint8)):
        (folder / f"img_{i}.png").write_bytes(tf.io.encode_png(img[..., None]).numpy())
    assert _predict(run, folder, tmp_path / "out.csv") == 2
    _one_line_error(capsys, "img_0.png", "[0, 16]")
    assert not (tmp_path / "out.csv").exists()
    # A mild excess (within the documented tolerance) warns once and predicts.
    mild = _raw_digits()
    mild[:3, 0, 0] = 17
    np.savez(tmp_path / "mild.npz", x=mild)
    assert _predict(run, tmp_path / "mild.npz", tmp_path / "out.csv") == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "[0, 16]" in err, err
    # A run from before the range was recorded: no check.
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns(".lock"))
    pre = json.loads((old / "preprocessing.json").read_text())
    del pre["pixel_range"]
    (old / "preprocessing.json").write_text(json.dumps(pre))
    assert _predict(old, tmp_path / "png8.npz", tmp_path / "old.csv") == 0


def test_non_numeric_pixels_are_refused(run, ee, tmp_path, capsys):
    arrays = {
        "bool": np.ones((3, 8, 8), bool),
        "complex": np.ones((3, 8, 8), np.complex64),
        "str": np.full((3, 8, 8), "a"),
    }
    for name, x in arrays.items():
        np.savez(tmp_path / f"{name}.npz", x=x)
        assert _predict(run, tmp_path / f"{name}.npz", tmp_path / "out.csv") == 2, name
        _one_line_error(capsys, f"{name}.npz", "numeric")
        with pytest.raises(ValueError, match="numeric"):
            ee.predict(x[..., None])
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------- item 10: --confidence on a saved model


def test_confidence_on_a_saved_model_is_applied_or_refused(run, ee, tmp_path, capsys):
    path = ee.save(tmp_path / "ee.keras")
    np.savez(tmp_path / "norm.npz", x=_normalized(run, _raw_digits()))
    args = ["--normalized"]
    assert _predict(path, tmp_path / "norm.npz", tmp_path / "a.csv", *args, "--confidence", "entropy", budget="") == 2
    _one_line_error(capsys, "max_softmax", "--confidence entropy")
    assert not (tmp_path / "a.csv").exists()
    assert _predict(path, tmp_path / "norm.npz", tmp_path / "b.csv", *args, "--confidence", "max_softmax") == 0


# ---------------------------------------------------------------- item 11: one deadline range


def test_every_deadline_entry_checks_the_range(run, ee, tmp_path):
    x = _normalized(run, _raw_digits())
    for bad in (0, 99, -1):
        with pytest.raises(ValueError, match=r"deadline must be an int stage in 1\.\.4"):
            ee(x, deadline=bad)
        with pytest.raises(ValueError, match=r"deadline must be an int stage in 1\.\.4"):
            ee(x, deadline=tf.constant(bad))
        with pytest.raises(ValueError, match=r"1\.\.4"):
            ee.predict(x, deadline=bad)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"deadline must be an int stage in 1\.\.4"):
            ee.serving_function(deadline=True)(tf.constant(x), tf.constant(bad))
    served = tf.saved_model.load(str(ee.export(tmp_path / "served")))
    for bad in (0, 99):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"deadline must be an int stage in 1\.\.4"):
            served.anytime(tf.constant(x), tf.constant(bad))
    ok = served.anytime(tf.constant(x), tf.constant(4))
    np.testing.assert_array_equal(ok["exit"].numpy(), ee(x, deadline=4)["exit"].numpy())


# ---------------------------------------------------------------- item 12: from_model's labels


def test_from_model_checks_labels_as_the_dump_loader(run, ee, budget):
    dump = dumps.load_dump(run / "dump")
    logits, labels = np.asarray(dump.val_logits), np.asarray(dump.val_labels)
    with pytest.raises(ValueError, match=r"must have shape \(200,\)"):
        EarlyExitModel.from_model(ee.backbone, logits, labels[:-1], budget, costs=dump.mul_adds)
    with pytest.raises(TypeError, match="integer class ids"):
        EarlyExitModel.from_model(ee.backbone, logits, labels.astype(np.float32), budget, costs=dump.mul_adds)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        EarlyExitModel.from_model(ee.backbone, logits, labels + 10, budget, costs=dump.mul_adds)


# ---------------------------------------------------------------- item 14: predict's messages


def test_predict_names_what_the_run_argument_should_be(tmp_path, capsys):
    np.savez(tmp_path / "some.npz", x=_raw_digits())
    assert _predict(tmp_path / "some.npz", tmp_path / "some.npz", tmp_path / "out.csv") == 2
    err = _one_line_error(capsys, "some.npz", "not a run folder or a .keras model")
    assert "damaged" not in err


def test_image_decode_errors_carry_no_tensorflow_internals(run, tmp_path, capsys):
    folder = tmp_path / "png"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    assert _predict(run, folder, tmp_path / "out.csv") == 2
    err = _one_line_error(capsys, "broken.png")
    assert "function_node" not in err and "{{" not in err and "[Op:" not in err, err


def test_predict_checks_its_flags_before_loading(run, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("predict loaded the run before checking its flags")

    monkeypatch.setattr(EarlyExitModel, "from_run", no_loading)
    monkeypatch.setattr(EarlyExitModel, "load", no_loading)
    np.savez(tmp_path / "x.npz", x=_raw_digits())
    for flags, needle in (
        (["--deadline", "0"], "--deadline"),
        (["--deadline", "5"], "1..4"),
        (["--batch-size", "0"], "--batch-size"),
    ):
        assert _predict(run, tmp_path / "x.npz", tmp_path / "out.csv", *flags) == 2, flags
        _one_line_error(capsys, needle)


# ---------------------------------------------------------------- item 15: sizes and Mul-Add counts


def test_split_sizes_state_the_range_that_is_accepted():
    # digits: 1,437 training images of 10 classes; one image of every class stays in training.
    for size in (5000, 0, 1428, 0.0001):
        with pytest.raises(ValueError, match=r"`val_size` in \[1, 1427\]"):
            data.load("digits", val_size=size)
    assert data.load("digits", val_size=1427).num_val == 1427
    with pytest.raises(ValueError, match=r"`train_size` in \[1, "):
        data.load("digits", val_size=200, train_size=5000)


def test_parse_mul_adds_says_not_finite():
    for text in ("1e400", "1e400M", float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            parse_mul_adds(text)
    with pytest.raises(ValueError, match="positive"):
        parse_mul_adds("0")
