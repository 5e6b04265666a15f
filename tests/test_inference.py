"""Real early exit (keras_ee.inference): parity with calibration.simulate, order, batches, tf.function,
the architectures, save/load, SavedModel export without keras_ee, budgets, deadlines, errors, the CLI."""

import csv
import json
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_models import SMALL_CNN_ARGS, SMALL_MSDNET, SMALL_RANET, tiny_backbone

from keras_ee import calibration, cli, data, models
from keras_ee.inference import EarlyExitModel


def _logits(model, x):
    out = model.predict_on_batch(x)
    return np.stack([np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])])


def _simulated(logits, thresholds, kind="max_softmax", temperature=1.0):
    """Per-sample (exit 1-based, label, score, near-threshold count) by calibration's rule."""
    scores, preds = calibration.exit_scores(logits, kind=kind, temperature=temperature)
    k, n = scores.shape
    exit0 = np.full(n, k - 1)
    for e in range(k - 2, -1, -1):
        exit0 = np.where(scores[e].astype(np.float64) >= thresholds[e], e, exit0)
    near = 0
    for e in range(k - 1):
        t = thresholds[e]
        if np.isfinite(t):
            near += int(np.sum(np.abs(scores[e].astype(np.float64) - t) <= 1e-6 * abs(t)))
    rows = np.arange(n)
    return exit0 + 1, preds[exit0, rows], scores[exit0, rows], near


@pytest.fixture(scope="module")
def trained():
    """A multiexit_cnn trained a few epochs on a learnable 10-class task (8x8x1), with val and test images."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 10))
    x = rng.normal(size=(1400, 8, 8, 1)).astype("float32")
    y = np.argmax(x.reshape(len(x), -1) @ w + rng.normal(scale=2.0, size=(len(x), 10)), axis=1).astype("int32")
    model = models.create("multiexit_cnn", input_shape=(8, 8, 1), num_classes=10)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * 4
    )
    model.fit(x[:800], [y[:800]] * 4, epochs=3, batch_size=64, verbose=0)
    return model, (x[800:1100], y[800:1100]), (x[1100:], y[1100:])


@pytest.fixture(scope="module")
def ee(trained):
    model, (xv, yv), _ = trained
    return EarlyExitModel.from_model(model, _logits(model, xv), yv, budget=_mid_budget(model))


def _mid_budget(model):
    from keras_ee import costs

    c = costs.exit_costs(model)["mul_adds"]
    return 0.5 * (c[0] + c[-1])


@pytest.mark.parametrize(
    "kind,temperature", [("max_softmax", 1.0), ("margin", 1.0), ("entropy", 1.0), ("max_softmax", [1.5, 1.2, 1.0, 0.8])]
)
def test_parity_with_simulate(trained, kind, temperature):
    model, (xv, yv), (xt, yt) = trained
    e = EarlyExitModel.from_model(
        model, _logits(model, xv), yv, budget=_mid_budget(model), kind=kind, temperature=temperature
    )
    out = e.predict(xt, batch_size=64)
    exits, labels, scores, near = _simulated(_logits(model, xt), e.thresholds, kind, temperature)
    assert near == 0  # no test score within 1e-6 (relative) of a threshold on this fixture
    np.testing.assert_array_equal(out["exit"], exits)
    np.testing.assert_array_equal(out["label"], labels)
    np.testing.assert_allclose(out["confidence"], scores, rtol=1e-5)
    # The exits really spread over the network, and agree with simulate's counts.
    counts = np.bincount(out["exit"] - 1, minlength=4)
    assert (counts > 0).sum() >= 3, counts
    s, p = calibration.exit_scores(_logits(model, xt), kind=kind, temperature=temperature)
    sim = calibration.simulate(s, p == yt[None], e.thresholds, e.costs)
    np.testing.assert_array_equal(sim["exit_counts"], counts)
    assert sim["accuracy"] == pytest.approx(np.mean(out["label"] == yt))


def test_order_batches_and_extremes(trained, ee):
    _, _, (xt, _) = trained
    ref = ee.predict(xt, batch_size=64)
    perm = np.random.default_rng(3).permutation(len(xt))
    shuffled = ee.predict(xt[perm], batch_size=64)
    # Convolutions may round differently at another batch size (oneDNN picks kernels by shape): the
    # decisions are the same, the confidences agree to float32 rounding.
    for got, rows in (
        (shuffled, perm),
        (ee.predict(xt, batch_size=1), slice(None)),  # batch of 1
        (ee.predict(xt[:37], batch_size=16), slice(0, 37)),  # 16, 16, 5
        (ee.predict(xt[:1]), slice(0, 1)),
    ):
        np.testing.assert_array_equal(got["exit"], ref["exit"][rows])
        np.testing.assert_array_equal(got["label"], ref["label"][rows])
        np.testing.assert_allclose(got["confidence"], ref["confidence"][rows], rtol=1e-5)
    empty = ee.predict(xt[:0])
    assert all(v.shape == (0,) for v in empty.values())
    logits = _logits(ee.backbone, xt)
    saved, budget = ee.thresholds, ee.budget
    try:
        ee.set_thresholds([-np.inf] * 4)  # everyone leaves at exit 1
        out = ee.predict(xt)
        assert (out["exit"] == 1).all()
        np.testing.assert_array_equal(out["label"], logits[0].argmax(-1))
        ee.set_thresholds([np.inf] * 3 + [-np.inf])  # nobody leaves early
        out = ee.predict(xt)
        assert (out["exit"] == 4).all()
        np.testing.assert_array_equal(out["label"], logits[3].argmax(-1))
    finally:
        ee._thresholds.assign(saved)
        ee.budget = budget


def test_eager_and_tf_function_with_unknown_batch(trained, ee):
    _, _, (xt, _) = trained
    ref = ee.predict(xt[:50])
    eager = ee(tf.constant(xt[:50]))
    for key in ref:
        np.testing.assert_array_equal(eager[key].numpy(), ref[key])
    fn = tf.function(lambda x: ee(x), input_signature=[tf.TensorSpec((None, 8, 8, 1), tf.float32)])
    for n in (1, 7, 50):
        out = fn(tf.constant(xt[:n]))
        np.testing.assert_array_equal(out["exit"].numpy(), ref["exit"][:n])
        np.testing.assert_array_equal(out["label"].numpy(), ref["label"][:n])
        np.testing.assert_allclose(out["confidence"].numpy(), ref["confidence"][:n], rtol=1e-5)
    assert len(fn._list_all_concrete_functions()) == 1


def test_pooled_predict_takes_the_same_decisions_on_full_batches(trained, ee, monkeypatch):
    _, _, (xt, _) = trained
    ref = ee.predict(xt, batch_size=64)
    seen = []  # the pool size of every stage call
    step = ee._pool_step

    def counting(k, final):
        fn = step(k, final)
        return lambda *state: (seen.append((k, int(state[0].shape[0]))), fn(*state))[1]

    monkeypatch.setattr(ee, "_pool_step", counting)
    for batch_size in (64, 7, 1, 1000):
        seen.clear()
        got = ee.predict(xt, batch_size=batch_size, pooled=True)
        np.testing.assert_array_equal(got["exit"], ref["exit"])
        np.testing.assert_array_equal(got["label"], ref["label"])
        np.testing.assert_allclose(got["confidence"], ref["confidence"], rtol=1e-5)
        for k in range(ee.num_exits):  # full pools, except the last call of each stage
            sizes = [size for stage, size in seen if stage == k]
            assert sum(sizes) == int(np.sum(ref["exit"] > k)), (batch_size, k, sizes)
            full = min(batch_size, len(xt))  # at least a full batch, except the last call
            assert all(size >= full for size in sizes[:-1]) and all(size == full for size in sizes[:-1] if k == 0), (
                sizes
            )
            assert all(size > 0 for size in sizes)
    monkeypatch.undo()
    shuffled = np.random.default_rng(4).permutation(len(xt))
    np.testing.assert_array_equal(ee.predict(xt[shuffled], batch_size=16, pooled=True)["exit"], ref["exit"][shuffled])
    for deadline in (1, 2):
        np.testing.assert_array_equal(
            ee.predict(xt, batch_size=16, pooled=True, deadline=deadline)["exit"],
            ee.predict(xt, deadline=deadline)["exit"],
        )
    assert all(v.shape == (0,) for v in ee.predict(xt[:0], pooled=True).values())
    # Nobody leaves early: every stage step hands its whole state on uncut (no gather).
    kept = ee.thresholds
    ee.set_thresholds([np.inf] * (ee.num_exits - 1) + [-np.inf])
    try:
        everyone = ee.predict(xt, batch_size=16, pooled=True)
        serving = ee.predict(xt, batch_size=16)
    finally:
        ee.set_thresholds(kept)
    np.testing.assert_array_equal(everyone["exit"], np.full(len(xt), ee.num_exits))
    np.testing.assert_array_equal(everyone["label"], serving["label"])
    np.testing.assert_allclose(everyone["confidence"], serving["confidence"], rtol=1e-5)
    with pytest.raises(TypeError, match="`pooled` must be a bool, received 'yes'"):
        ee.predict(xt, pooled="yes")


def test_deadline(trained, ee):
    _, _, (xt, _) = trained
    ref = ee.predict(xt)
    logits = _logits(ee.backbone, xt)
    one = ee.predict(xt, deadline=1)
    assert (one["exit"] == 1).all()
    np.testing.assert_array_equal(one["label"], logits[0].argmax(-1))
    two = ee.predict(xt, deadline=2)
    early = ref["exit"] <= 2
    assert (two["exit"] <= 2).all() and (two["exit"][~early] == 2).all()
    np.testing.assert_array_equal(two["exit"][early], ref["exit"][early])
    np.testing.assert_array_equal(two["label"][~early], logits[1].argmax(-1)[~early])
    for key in ref:
        np.testing.assert_array_equal(ee.predict(xt, deadline=4)[key], ref[key])
    for bad in (0, 5, 1.5, True, "2"):
        with pytest.raises(ValueError, match="deadline"):
            ee.predict(xt, deadline=bad)


def test_set_budget_from_the_saved_sweep(trained, ee):
    model, (xv, yv), _ = trained
    c = ee.costs
    saved = ee.thresholds.copy(), ee.budget
    try:
        costs_seen = []
        for f in (0.2, 0.4, 0.6, 0.8):
            b = c[0] + f * (c[-1] - c[0])
            info = ee.set_budget(b)
            assert ee.budget == b
            assert info["val_mean_cost"] <= b
            s = ee.val_scores
            sim = calibration.simulate(s, np.zeros_like(s, bool), ee.thresholds, c)
            assert sim["mean_cost"] == info["val_mean_cost"]
            # Within a few samples' worth of the target (300 validation samples).
            assert b - info["val_mean_cost"] <= 3 * (c[-1] - c[0]) / s.shape[1]
            costs_seen.append(info["val_mean_cost"])
        assert costs_seen == sorted(costs_seen)
        ee.set_budget(f"{c[-1] / 1e3}K")
        assert (ee.thresholds[:-1] == np.inf).all()
        ee.set_budget(c[0])
        assert (ee.thresholds == -np.inf).all()
        with pytest.raises(ValueError, match="below the first exit's cost"):
            ee.set_budget(c[0] * 0.9)
        with pytest.raises(ValueError, match="above the last exit's cost"):
            ee.set_budget(c[-1] * 1.1)
        with pytest.raises(ValueError, match="Mul-Add count"):
            ee.set_budget("fast")
        with pytest.raises(ValueError, match="positive"):
            ee.set_budget(-3)
    finally:
        ee._thresholds.assign(saved[0])
        ee.budget = saved[1]


def test_save_load_and_export_round_trips(trained, ee, tmp_path):
    _, _, (xt, _) = trained
    ref = ee.predict(xt)
    path = ee.save(tmp_path / "ee.keras")
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, EarlyExitModel)
    np.testing.assert_array_equal(loaded.thresholds, ee.thresholds)
    np.testing.assert_array_equal(loaded.val_scores, ee.val_scores)
    np.testing.assert_array_equal(loaded.costs, ee.costs)
    assert (loaded.kind, loaded.budget, loaded.sweep) == (ee.kind, ee.budget, ee.sweep)
    for key, value in loaded.predict(xt).items():
        np.testing.assert_array_equal(value, ref[key])
    b = 0.3 * ee.costs[0] + 0.7 * ee.costs[-1]
    assert loaded.set_budget(b) == EarlyExitModel.load(path).set_budget(b)
    # The SavedModel runs in a process where keras_ee cannot be imported.
    out_dir = ee.export(tmp_path / "serving")
    np.save(tmp_path / "x.npy", xt)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["keras_ee"] = None
        try:
            import keras_ee
            raise SystemExit("keras_ee importable")
        except ImportError:
            pass
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({str(out_dir)!r})
        x = tf.constant(np.load({str(tmp_path / "x.npy")!r}))
        out = m.signatures["serving_default"](images=x)
        np.savez({str(tmp_path / "served.npz")!r}, **{{k: v.numpy() for k, v in out.items()}})
        two = m.anytime(x, tf.constant(2, tf.int32))
        np.save({str(tmp_path / "anytime.npy")!r}, two["exit"].numpy())
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = np.load(tmp_path / "served.npz")
    for key in ref:
        if np.issubdtype(ref[key].dtype, np.floating):  # another process: oneDNN may round the last bit apart
            np.testing.assert_allclose(served[key], ref[key], rtol=1e-6, atol=0, err_msg=key)
        else:
            np.testing.assert_array_equal(served[key], ref[key], err_msg=key)
    np.testing.assert_array_equal(np.load(tmp_path / "anytime.npy"), ee.predict(xt, deadline=2)["exit"])


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.MSDNetBackbone(num_classes=5, **SMALL_MSDNET),
        lambda: models.RANetBackbone(num_classes=5, **SMALL_RANET),
        lambda: models.attach_exits(_residual_backbone(), ["b", "d"], num_classes=5),
    ],
    ids=["msdnet", "ranet", "attach_exits"],
)
def test_architectures(build):
    keras.utils.set_random_seed(1)
    model = build()
    shape = tuple(model.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    xv, xt = rng.normal(size=(120,) + shape).astype("float32"), rng.normal(size=(45,) + shape).astype("float32")
    e = EarlyExitModel.from_model(model, _logits(model, xv), rng.integers(0, 5, 120), budget=_mid_budget(model))
    out = e.predict(xt, batch_size=16)
    exits, labels, _, near = _simulated(_logits(model, xt), e.thresholds)
    ok = np.ones(len(xt), bool)
    if near:  # an untrained model's near-uniform scores: skip exactly those samples
        s, _ = calibration.exit_scores(_logits(model, xt))
        for k in range(len(e.thresholds) - 1):
            t = e.thresholds[k]
            if np.isfinite(t):
                ok &= np.abs(s[k].astype(np.float64) - t) > 1e-6 * abs(t)
    np.testing.assert_array_equal(out["exit"][ok], exits[ok])
    np.testing.assert_array_equal(out["label"][ok], labels[ok])
    assert len(set(out["exit"].tolist())) >= 2
    # Throughput mode: survivors pooled across batches (several carried tensors per stage here).
    pooled = e.predict(xt, batch_size=16, pooled=True)
    np.testing.assert_array_equal(pooled["exit"][ok], exits[ok])
    np.testing.assert_array_equal(pooled["label"][ok], labels[ok])
    np.testing.assert_allclose(pooled["confidence"], out["confidence"], rtol=1e-5)


def _residual_backbone():
    inp = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="b")(a)
    c = keras.layers.Add(name="add")([a, b])
    d = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="d")(c)
    return keras.Model(inp, keras.layers.Dense(4, name="top")(keras.layers.GlobalAveragePooling2D()(d)))


def test_clear_errors(trained, ee):
    model, (xv, yv), _ = trained
    with pytest.raises(ValueError, match="stage markers"):
        EarlyExitModel(tiny_backbone(), [0.5, 0.5, -np.inf], [1, 2, 3])
    with pytest.raises(ValueError, match="3 values; the model has 4 exits"):
        EarlyExitModel(model, [0.5, 0.5, -np.inf], ee.costs)
    with pytest.raises(ValueError, match="last threshold must be -inf"):
        EarlyExitModel(model, [0.5] * 4, ee.costs)
    with pytest.raises(ValueError, match="costs"):
        EarlyExitModel(model, [0.5] * 3 + [-np.inf], [3, 2, 1, 0])
    with pytest.raises(ValueError, match="kind"):
        EarlyExitModel(model, [0.5] * 3 + [-np.inf], ee.costs, kind="gater")
    with pytest.raises(ValueError, match="below the first exit's cost"):
        EarlyExitModel.from_model(model, _logits(model, xv), yv, budget=1)
    with pytest.raises(ValueError, match="set_budget needs"):
        EarlyExitModel(model, [0.5] * 3 + [-np.inf], ee.costs).set_budget(ee.costs[1])
    with pytest.raises(ValueError, match=r"shape \(N, 8, 8, 1\)"):
        ee.predict(np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="numeric"):
        ee.predict(np.zeros((3, 8, 8, 1), bool))
    with pytest.raises(FileNotFoundError, match="model.keras"):
        EarlyExitModel.from_run("/nonexistent/run", budget="1M")


def test_solve_budget_wrapper():
    rng = np.random.default_rng(0)
    s = (rng.random((3, 400)) * 0.8 + np.arange(3)[:, None] * 0.05).astype(np.float32)
    c = [1.0, 2.0, 4.0]
    for target in (1.3, 2.5, 3.9):
        out = calibration.solve_budget(s, c, target)
        assert out["val_mean_cost"] <= target and target - out["val_mean_cost"] < 3 * 3 / 400
        want = calibration.calibrate(s, calibration.geometric_fractions(out["q"], 3))
        np.testing.assert_array_equal(out["thresholds"], want)
    out = calibration.solve_budget(s, c, 2.5, mode="per_stage", qs=[0.1, 0.5, 0.9])
    assert out["val_mean_cost"] <= 2.5
    with pytest.raises(ValueError, match="below the first exit's cost"):
        calibration.solve_budget(s, c, 0.5)
    with pytest.raises(ValueError, match="above the last exit's cost"):
        calibration.solve_budget(s, c, 5.0)
    with pytest.raises(ValueError, match="mode"):
        calibration.solve_budget(s, c, 2.0, mode="uniform")
    with pytest.raises(TypeError, match="target"):
        calibration.solve_budget(s, c, "2M")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "cnn"
    argv = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "multiexit_cnn",
        "--method",
        "baseline",
        *SMALL_CNN_ARGS,
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--val-size",
        "200",
        "--train-size",
        "400",
        "--no-evaluate",
        "--quiet",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    return out


def test_from_run_and_cli_predict(run, tmp_path, capsys):
    from keras_ee import dumps, experiment

    dump = dumps.load_dump(run / "dump")
    budget = 0.5 * (dump.mul_adds[0] + dump.mul_adds[-1])
    e = EarlyExitModel.from_run(run, budget=budget)
    splits = data.load_configured(experiment.TrainConfig.from_file(run / "config.json"))
    raw = splits._x_test[:40] if hasattr(splits, "_x_test") else None
    if raw is None:
        pytest.skip("the digits splits keep no raw test images")
    norm = (raw.astype(np.float32) * np.float32(splits.pixel_scale) - splits.mean) / splits.std
    if norm.ndim == 3:
        norm = norm[..., None]
    ref = e.predict(raw if raw.ndim == 4 else raw[..., None])  # raw pixels: from_run's model normalises them
    exits, labels, _, near = _simulated(_logits(e.backbone, norm), e.thresholds)
    assert near == 0
    np.testing.assert_array_equal(ref["exit"], exits)
    np.testing.assert_array_equal(ref["label"], labels)
    np.savez(tmp_path / "images.npz", x=raw)
    csv_path = tmp_path / "pred.csv"
    argv = [
        "predict",
        str(run),
        "--budget",
        f"{budget / 1e3}K",
        "--images",
        str(tmp_path / "images.npz"),
        "--out",
        str(csv_path),
    ]
    assert cli.main(argv) == 0
    assert "40 images" in capsys.readouterr().out
    rows = list(csv.DictReader(open(csv_path)))
    assert [int(r["exit"]) for r in rows] == ref["exit"].tolist()
    assert [int(r["label"]) for r in rows] == ref["label"].tolist()
    # The normalisation comes from the run's preprocessing.json: no dataset is loaded for it.
    saved = json.loads((run / "preprocessing.json").read_text())
    np.testing.assert_allclose(saved["mean"], splits.mean, rtol=1e-6)
    np.testing.assert_allclose(saved["std"], splits.std, rtol=1e-6)
    assert saved["pixel_scale"] == pytest.approx(splits.pixel_scale)

    def no_dataset(config):
        raise AssertionError("predict loaded the dataset")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_configured", no_dataset)
        assert cli.main(argv[:-1] + [str(tmp_path / "pooled.csv"), "--pooled", "--batch-size", "16"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pooled.csv")))
    assert [int(r["exit"]) for r in rows] == ref["exit"].tolist()
    # A run from before preprocessing.json: the statistics come from its dataset, as before.
    old_run = tmp_path / "old_run"
    shutil.copytree(run, old_run)
    (old_run / "preprocessing.json").unlink()
    assert cli.main(["predict", str(old_run)] + argv[2:-1] + [str(tmp_path / "old.csv")]) == 0
    assert [int(r["exit"]) for r in csv.DictReader(open(tmp_path / "old.csv"))] == ref["exit"].tolist()
    (old_run / "preprocessing.json").write_text('{"pixel_scale": 1, "mean": [0.5, 0.5, 0.5], "std": [1, 1, 1]}')
    assert cli.main(["predict", str(old_run)] + argv[2:-1] + [str(tmp_path / "bad.csv")]) == 2
    assert "normalisation has 3 channels; the model takes 1" in capsys.readouterr().err
    (old_run / "preprocessing.json").write_text('{"pixel_scale": 1, "mean": [0.5], "std": [0]}')
    assert cli.main(["predict", str(old_run)] + argv[2:-1] + [str(tmp_path / "bad.csv")]) == 2
    assert "preprocessing.json' is damaged" in capsys.readouterr().err
    # A folder of PNG files gives the same answers (sorted by name).
    folder = tmp_path / "png"
    folder.mkdir()
    pixels = np.asarray(raw if raw.ndim == 4 else raw[..., None])
    if pixels.dtype != np.uint8:
        pytest.skip("the digits images are not uint8")
    for i, img in enumerate(pixels):
        (folder / f"img_{i:03d}.png").write_bytes(tf.io.encode_png(img).numpy())
    assert (
        cli.main(
            ["predict", str(run), "--budget", str(budget), "--images", str(folder), "--out", str(tmp_path / "png.csv")]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "png.csv")))
    assert [int(r["exit"]) for r in rows] == ref["exit"].tolist()
    assert rows[0]["image"] == "img_000.png"
    # Errors are one line.
    capsys.readouterr()
    assert cli.main(["predict", str(run), "--budget", "1", "--images", str(folder), "--out", str(csv_path)]) == 2
    assert "below the first exit's cost" in capsys.readouterr().err
    assert (
        cli.main(["predict", str(run), "--budget", "1M", "--images", str(tmp_path / "nope"), "--out", str(csv_path)])
        == 2
    )


def test_lazy_submodule():
    import keras_ee

    assert keras_ee.inference.EarlyExitModel is EarlyExitModel
    assert "inference" in dir(keras_ee)


def test_empty_remainder_skips_later_stages(trained, ee):
    _, _, (xt, _) = trained
    calls = []
    stages = ee._runtime.stages

    class Counting:
        def __init__(self, k, stage):
            self.k, self.stage, self.outputs = k, stage, stage.outputs

        def __call__(self, *args, **kwargs):
            calls.append(self.k)
            return self.stage(*args, **kwargs)

    saved, budget = ee.thresholds, ee.budget
    try:
        ee._runtime.stages = [Counting(k + 1, s) for k, s in enumerate(stages)]
        ee.set_thresholds([-np.inf] * 4)
        out = ee(tf.constant(xt[:20]))  # eager: only the branch taken runs
        assert calls == [1] and (out["exit"].numpy() == 1).all()
        calls.clear()
        ee.set_thresholds([np.inf] * 3 + [-np.inf])
        ee(tf.constant(xt[:20]))
        assert calls == [1, 2, 3, 4]
        calls.clear()
        ee(tf.constant(xt[:20]), deadline=2)
        assert calls == [1, 2]
        calls.clear()
        out = ee(tf.zeros((0, 8, 8, 1)))
        assert calls == [] and all(v.shape == (0,) for v in out.values())
    finally:
        ee._runtime.stages = stages
        ee._thresholds.assign(saved)
        ee.budget = budget
    fn = tf.function(lambda x: ee(x), input_signature=[tf.TensorSpec((None, 8, 8, 1), tf.float32)])
    assert all(v.shape == (0,) for v in fn(tf.zeros((0, 8, 8, 1))).values())


def test_all_stay_fast_path_keeps_order_and_parity(trained, ee, monkeypatch):
    """When nobody leaves at an exit, the carried state goes on uncut (no gather over it): the
    decisions, labels and order still equal simulate's, also after a later exit where some leave."""
    import keras_ee.inference as inference

    _, _, (xt, _) = trained
    logits = _logits(ee.backbone, xt)
    cut = []
    real_gather = tf.gather

    def spy(params, indices, *args, **kwargs):
        if len(params.shape) == 4:  # a carried feature map, not an index or score vector
            cut.append(int(params.shape[0]))
        return real_gather(params, indices, *args, **kwargs)

    saved, budget = ee.thresholds, ee.budget
    try:
        for thresholds in ([np.inf, np.inf, np.inf, -np.inf], [np.inf, saved[1], saved[2], -np.inf]):
            ee.set_thresholds(thresholds)
            exits, labels, _, near = _simulated(logits, ee.thresholds)
            assert near == 0
            perm = np.random.default_rng(5).permutation(len(xt))
            cut.clear()
            monkeypatch.setattr(inference.tf, "gather", spy)
            out = ee(tf.constant(xt[perm]))  # eager: only the branch taken runs
            monkeypatch.setattr(inference.tf, "gather", real_gather)
            np.testing.assert_array_equal(out["exit"].numpy(), exits[perm])
            np.testing.assert_array_equal(out["label"].numpy(), labels[perm])
            got = ee.predict(xt, batch_size=64)  # compiled, batches 64, 64, ..., 44
            np.testing.assert_array_equal(got["exit"], exits)
            np.testing.assert_array_equal(got["label"], labels)
            if np.isinf(thresholds[1]):
                assert cut == []  # everyone stayed everywhere: nothing was copied
            else:
                assert len(cut) > 0 and (exits > 2).any() and (exits == 2).any()
    finally:
        ee._thresholds.assign(saved)
        ee.budget = budget


def test_folded_kernels_follow_the_backbone_weights(trained, ee, tmp_path):
    """The pass runs on a snapshot of the BatchNorm-folded kernels (InferenceSnapshot):
    predict, eager calls, serving_function and a loaded model all see the backbone's current
    weights; a compiled function held from before a weight change sees it after refresh()."""
    model, _, (xt, _) = trained
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    e = EarlyExitModel(copy, ee.thresholds, ee.costs)
    assert len(e._runtime.snapshot) > 0
    held = e.serving_function()
    x = tf.constant(xt[:64])
    before = {k: v.numpy() for k, v in held(x).items()}
    unit = [l for l in copy.layers if isinstance(l, models.ConvBNReLU)][0]
    unit.moving_variance.assign(unit.moving_variance * 9.0)
    unit.beta.assign(unit.beta + 0.5)
    fresh = EarlyExitModel(copy, ee.thresholds, ee.costs).predict(xt[:64])
    exits, labels, _, _ = _simulated(_logits(copy, xt[:64]), ee.thresholds)
    np.testing.assert_array_equal(fresh["exit"], exits)
    np.testing.assert_array_equal(fresh["label"], labels)
    assert not np.array_equal(fresh["confidence"], before["confidence"])
    stale = {k: v.numpy() for k, v in held(x).items()}  # documented: held functions need refresh()
    np.testing.assert_array_equal(stale["confidence"], before["confidence"])
    for out in (e.predict(xt[:64]), e(x), e.serving_function()(x), held(x)):
        for key in fresh:
            np.testing.assert_array_equal(np.asarray(out[key]), fresh[key])
    loaded = keras.saving.load_model(e.save(tmp_path / "changed.keras"))
    for key, value in loaded.serving_function()(x).items():
        np.testing.assert_array_equal(value.numpy(), fresh[key])


@pytest.mark.parametrize("preset, expected", [(None, "16384"), ("2048", "2048")])
def test_import_raises_onednn_primitive_cache_unless_set(preset, expected):
    # The early-exit pass meets every survivor count; oneDNN's 1024-entry cache thrashes on a
    # stream of fresh batches (bench/primitive_cache.py), so `import keras_ee` raises it, before
    # TensorFlow runs anything, and never overrides the user's own value.
    import os

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = "import os, sys, keras_ee; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "False"]
