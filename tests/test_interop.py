"""keras_ee.interop: the authors' PyTorch checkpoints, read without torch, give the authors' logits.

Fixtures (tests/data/torch_checkpoints/README.md) were written by the authors' own model code;
keras-ee and these tests never import torch.
"""

import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from keras_ee import interop, run_folder, runs
from keras_ee.interop import torch_import
from tests import torch_writer

DATA = Path(__file__).parent / "data" / "torch_checkpoints"
# family -> options the import needs beyond the file (the ImageNet fixture ran on 160x160 inputs)
FAMILIES = {
    "msdnet_cifar": {},
    "msdnet_imagenet": {"input_shape": (160, 160, 3)},
    "ranet_cifar": {},
    "imta_cifar": {},
}


def _io(name):
    saved = np.load(DATA / f"{name}_io.npz")
    x = saved["inputs_nchw"].astype(np.float32).transpose(0, 2, 3, 1)
    logits = [saved[f"logits_{k}"] for k in range(1, 1 + sum(f.startswith("logits_") for f in saved.files))]
    return x, logits


def _assert_parity(model, name):
    x, expected = _io(name)
    out = model(x, training=False)
    assert len(out) == len(expected)
    for k, (got, want) in enumerate(zip(out, expected), 1):
        err = np.abs(np.asarray(got) - want).max()
        assert err <= 1e-4 * np.abs(want).max(), (name, k, err)


@pytest.mark.parametrize("serialisation", ["zip", "legacy"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_the_authors(name, serialisation):
    model, report = interop.import_torch_checkpoint(DATA / f"{name}_{serialisation}.pth", **FAMILIES[name])
    _assert_parity(model, name)
    assert report.serialisation == serialisation
    # The fixtures alternate: one file of each family is main.py's DataParallel dict, the other bare.
    wrapped = (serialisation == "zip") != (name == "msdnet_imagenet")
    assert report.module_prefix is (wrapped or name == "imta_cifar")  # IMTA's `net.module.`: its WrappedModel
    assert report.container == ("state_dict" if wrapped else "bare")
    if wrapped:
        assert {"optimizer", "epoch"} <= set(report.ignored)
    assert report.ignored["num_batches_tracked"] > 0
    dead = len(report.ignored["unused_by_forward"]) + len(report.ignored.get("phase_one_classifiers", []))
    assert report.tensors_used + dead + report.ignored["num_batches_tracked"] == report.tensors_total
    assert report.sha256 == hashlib.sha256((DATA / f"{name}_{serialisation}.pth").read_bytes()).hexdigest()


def test_architecture_is_read_off_the_keys():
    _, report = interop.import_torch_checkpoint(DATA / "ranet_cifar_legacy.pth")
    assert report.family == "ranet" and report.preset == "ranet_cifar_c1"
    assert report.model_options["channels"] == 4 and report.model_options["growth_rate"] == 4
    assert report.model_options["head_channels"] == 16 and report.num_classes == 10
    _, report = interop.import_torch_checkpoint(DATA / "msdnet_cifar_legacy.pth")
    assert report.preset == "msdnet_cifar_5" and report.model_options["num_blocks"] == 4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_both_serialisations_hold_the_same_tensors(name):
    zip_obj, zip_kind = interop.read_torch_file(DATA / f"{name}_zip.pth")
    legacy_obj, legacy_kind = interop.read_torch_file(DATA / f"{name}_legacy.pth")
    assert (zip_kind, legacy_kind) == ("zip", "legacy")
    a = torch_import.strip_module_prefix(torch_import.unwrap_checkpoint(zip_obj)[0])[0]
    b = torch_import.strip_module_prefix(torch_import.unwrap_checkpoint(legacy_obj)[0])[0]
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def bare_msdnet():
    """The CIFAR MSDNet fixture's state_dict (no `module.`), to edit and write back."""
    obj, _ = interop.read_torch_file(DATA / "msdnet_cifar_legacy.pth")
    return dict(obj)


def test_the_test_writer_round_trips(bare_msdnet, tmp_path):
    path = torch_writer.write_state_dict(tmp_path / "copy.pth", bare_msdnet)
    again, kind = interop.read_torch_file(path)
    assert kind == "legacy" and again.keys() == bare_msdnet.keys()
    assert all(np.array_equal(again[k], bare_msdnet[k]) for k in again)
    _assert_parity(interop.load_torch_checkpoint(path), "msdnet_cifar")


KEY = "blocks.1.0.layers.1.conv_down.net.3.weight"  # a 3x3 conv inside block 2


def _edited(tmp_path, state_dict, **changes):
    edited = dict(state_dict)
    for key, value in changes.items():
        if value is None:
            del edited[key.replace("__", ".")]
        else:
            edited[key.replace("__", ".")] = value
    return torch_writer.write_state_dict(tmp_path / "edited.pth", edited)


def test_a_tensor_of_another_shape_is_refused(bare_msdnet, tmp_path):
    wrong = np.zeros(bare_msdnet[KEY].shape[:1] + (bare_msdnet[KEY].shape[1] + 1,) + (3, 3), np.float32)
    path = _edited(tmp_path, bare_msdnet, **{KEY.replace(".", "__"): wrong})
    with pytest.raises(interop.CheckpointMismatchError, match=f"{KEY}.*does not fit") as e:
        interop.load_torch_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_missing_key_is_refused(bare_msdnet, tmp_path):
    missing = "blocks.2.0.layers.0.conv_normal.net.4.running_var"
    path = _edited(tmp_path, bare_msdnet, **{missing.replace(".", "__"): None})
    with pytest.raises(interop.CheckpointMismatchError, match=f"lacks '{missing}'"):
        interop.load_torch_checkpoint(path)


def test_an_extra_key_is_refused(bare_msdnet, tmp_path):
    path = _edited(tmp_path, bare_msdnet, extra_head__weight=np.ones((3,), np.float32))
    with pytest.raises(
        interop.CheckpointMismatchError, match=r"1 checkpoint tensor\(s\) unused: \['extra_head.weight'\]"
    ):
        interop.load_torch_checkpoint(path)


@pytest.mark.parametrize(
    ("name", "preset"),
    [("msdnet_cifar", "msdnet_cifar_7"), ("ranet_cifar", "msdnet_cifar_5"), ("msdnet_cifar", "ranet_cifar_c1")],
)
def test_a_checkpoint_forced_onto_the_wrong_preset_is_refused(name, preset):
    with pytest.raises(interop.CheckpointMismatchError, match=f"does not fit model '{preset}'") as e:
        interop.load_torch_checkpoint(DATA / f"{name}_zip.pth", model=preset)
    assert "\n" not in str(e.value)


def test_the_right_preset_with_options_is_accepted():
    model = interop.load_torch_checkpoint(
        DATA / "msdnet_cifar_zip.pth",
        model="msdnet_cifar_5",
        num_blocks=4,
        channels=4,
        growth_rate=2,
        head_channels=16,
    )
    _assert_parity(model, "msdnet_cifar")


@pytest.mark.parametrize("serialisation", ["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_a_truncated_file_is_refused(serialisation, fraction, tmp_path):
    data = (DATA / f"msdnet_cifar_{serialisation}.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(interop.CheckpointError, match=r"cut\.pth") as e:
        interop.load_torch_checkpoint(path)
    assert "\n" not in str(e.value)


def test_other_files_are_refused(tmp_path):
    for content in (b"", b"hello world\n", pickle.dumps([1, 2, 3], protocol=2)):
        path = tmp_path / "other.pth"
        path.write_bytes(content)
        with pytest.raises(interop.CheckpointError):
            interop.load_torch_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        interop.load_torch_checkpoint(tmp_path / "nothere.pth")


def _malicious_object(side_effect: Path):
    return torch_writer.Call(torch_writer.Global("os", "system"), (f"touch {side_effect}",))


class _Evil:
    def __init__(self, side_effect):
        self.side_effect = side_effect

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.side_effect}",))


@pytest.mark.parametrize("layout", ["legacy", "zip", "legacy_header", "zip_reduce"])
def test_a_malicious_pickle_is_refused_and_nothing_runs(layout, tmp_path, bare_msdnet):
    side = tmp_path / "side_effect"
    path = tmp_path / "evil.pth"
    if layout == "legacy":  # a real state_dict with one entry that would call os.system
        obj, storages = torch_writer.tensor_calls({k: bare_msdnet[k] for k in list(bare_msdnet)[:3]})
        obj["evil"] = _malicious_object(side)
        torch_writer.write_legacy(path, obj, storages)
    elif layout == "legacy_header":  # in the system-information pickle, before the main object
        with open(path, "wb") as f:
            pickle.dump(torch_writer.MAGIC, f, protocol=2)
            pickle.dump(1001, f, protocol=2)
            f.write(pickle.dumps(_Evil(side), protocol=2))
    else:
        buffer = io.BytesIO()
        if layout == "zip":
            torch_writer._Pickler(buffer, protocol=2).dump({"state_dict": _malicious_object(side)})
        else:
            buffer.write(pickle.dumps({"state_dict": _Evil(side)}))
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", buffer.getvalue())
            archive.writestr("archive/version", "3\n")
    with pytest.raises(
        interop.UnsafeCheckpointError, match=r"refused: .*(os|posix)\.system.*nothing was executed"
    ) as e:
        interop.load_torch_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not side.exists()


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    from keras_ee import cli

    out = tmp_path_factory.mktemp("imported") / "run"
    assert cli.main(["import", str(DATA / "ranet_cifar_zip.pth"), "--out", str(out)]) == 0
    return out


def test_import_command_writes_a_run_folder(imported_run):
    import json

    from keras_ee.config import TrainConfig

    names = {p.name for p in imported_run.iterdir()}
    assert {"model.keras", "costs.json", "preprocessing.json", "config.json", "import.json", "state.json"} <= names
    report = json.loads((imported_run / "import.json").read_text())
    assert report["sha256"] == hashlib.sha256((DATA / "ranet_cifar_zip.pth").read_bytes()).hexdigest()
    assert report["serialisation"] == "zip" and report["family"] == "ranet" and report["dataset"] == "cifar10"
    assert {"optimizer", "num_batches_tracked"} <= set(report["ignored"])
    scale, mean, std = run_folder.read_preprocessing(imported_run)
    assert scale == pytest.approx(1 / 255) and np.allclose(mean, [0.4914, 0.4824, 0.4467])
    config = TrainConfig.from_file(imported_run / "config.json")
    assert config.model == "ranet_cifar_c1" and config.model_options["growth_rate"] == 4
    costs = json.loads((imported_run / "costs.json").read_text())
    assert costs["params"][-1] == 49609  # sum(p.numel() for p in model.parameters()) of the authors' model
    model = runs.load_run_model(imported_run / "model.keras")  # safe mode
    _assert_parity(model.backbone, "ranet_cifar")


def test_import_command_refusals(imported_run, tmp_path, capsys):
    from keras_ee import cli

    assert cli.main(["import", str(DATA / "ranet_cifar_zip.pth"), "--out", str(imported_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    out = tmp_path / "new"
    argv = ["import", str(DATA / "msdnet_cifar_zip.pth"), "--out", str(out), "--model", "msdnet_cifar_7"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit model 'msdnet_cifar_7'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written for a refused checkpoint
    assert cli.main(["import", str(DATA / "ranet_cifar_zip.pth"), "--out", str(out), "--dataset", "mnist"]) == 2
    assert not out.exists()


# ---------------------------------------------------------------- IMTA phase II


def test_imta_phase_two_maps_onto_keras_ee_imta_heads():
    from keras_ee import models
    from keras_ee.training.imta import CollaborationGate

    model, report = interop.import_torch_checkpoint(DATA / "imta_cifar_zip.pth")
    assert report.family == "imta" and report.method == "imta" and report.method_options == {}
    assert report.preset == "msdnet_cifar_5" and report.model_options["num_blocks"] == 3
    # The phase-I classifiers (net.classifier.{i}.linear) are not in IMTA's forward pass.
    assert report.ignored["phase_one_classifiers"] == [
        f"net.classifier.{i}.linear.{t}" for i in range(3) for t in ("bias", "weight")
    ]
    names = {layer.name for layer in model.layers}
    assert {"exit_2_collab_dense", "exit_2_collab_bn", "exit_3_collab_dense", "exit_3_collab_bn"} <= names
    gates = [layer for layer in model.layers if isinstance(layer, CollaborationGate)]
    assert len(gates) == 2 and all(g.open for g in gates)
    # With the transfer paths closed (phase I's wiring) exits 2 and 3 lose the authors' logits:
    # the parity test can fail.
    for g in gates:
        g.open = False
    x, expected = _io("imta_cifar")
    closed = model(x, training=False)
    assert np.abs(np.asarray(closed[1]) - expected[1]).max() > 1e-3 * np.abs(expected[1]).max()
    assert len(models.split_stages(model)) == 3


def test_imta_without_its_transfer_paths_is_refused(tmp_path):
    obj, _ = interop.read_torch_file(DATA / "imta_cifar_legacy.pth")
    edited = {k: v for k, v in obj.items() if not k.startswith("isc_modules.1.")}
    path = torch_writer.write_state_dict(tmp_path / "no_isc.pth", edited)
    with pytest.raises(
        interop.CheckpointMismatchError, match=r"not filled exactly once: \['exit_3_collab_dense/kernel'"
    ) as e:
        interop.load_torch_checkpoint(path)
    assert "IMTA's phase-II heads" in str(e.value) and "\n" not in str(e.value)


def test_imta_run_folder_holds_the_phase_two_model_and_its_teacher(tmp_path):
    import json

    from keras_ee import cli
    from keras_ee.training import IMTA, core

    out = tmp_path / "imta_run"
    assert cli.main(["import", str(DATA / "imta_cifar_legacy.pth"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "imta" and config["model"] == "msdnet_cifar_5"
    model = runs.load_run_model(out / "model.keras")
    assert isinstance(model.method, IMTA) and model.method.current_phase == 1
    _assert_parity(model.backbone, "imta_cifar")
    # The teacher of phase II's distillation is the phase-I last classifier on the last pooled feature.
    x, _ = _io("imta_cifar")
    *_, features = core.probe_model(model.backbone, ("exit_3_features",))(x, training=False)
    teacher = np.asarray(model.method.teacher_logits(features))
    want = np.load(DATA / "imta_cifar_io.npz")["phase1_logits_3"]
    assert np.abs(teacher - want).max() <= 1e-4 * np.abs(want).max()


def _damaged_zip(tmp_path):
    """The CIFAR MSDNet zip with one byte of a weight storage flipped (its CRC-32 no longer matches)."""
    data = bytearray((DATA / "msdnet_cifar_zip.pth").read_bytes())
    with zipfile.ZipFile(DATA / "msdnet_cifar_zip.pth") as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 5] ^= 0xFF
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(data))
    return path, info.filename


def test_a_damaged_zip_member_is_refused_and_a_given_model_kept(tmp_path):
    path, member = _damaged_zip(tmp_path)
    with pytest.raises(interop.CheckpointError, match=f"{member}' fails its CRC-32 check") as e:
        interop.read_torch_file(path)
    assert "damaged.pth" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(interop.CheckpointError, match="CRC-32"):
        interop.load_torch_checkpoint(path)
    model = interop.load_torch_checkpoint(DATA / "msdnet_cifar_zip.pth")  # a model of the right layout
    before = [np.array(w) for w in model.weights]
    with pytest.raises(interop.CheckpointError, match="CRC-32"):
        interop.load_torch_checkpoint(path, model=model)
    assert all(np.array_equal(a, np.asarray(w)) for a, w in zip(before, model.weights))  # nothing written


# ---- L2W-DEN: the MSDNet with its WPN (`meta_state_dict`) onto keras-ee's L2W


def _wpn_io():
    saved = np.load(DATA / "l2w_cifar_io.npz")
    return saved["wpn_inputs"], saved["wpn_outputs"]


def test_l2w_den_checkpoint_gives_the_authors_logits_and_wpn_outputs():
    model, report, method, state = torch_import.read_checkpoint_into_model(DATA / "l2w_cifar_zip.pth")
    _assert_parity(model, "l2w_cifar")
    inputs, want = _wpn_io()
    got = np.asarray(state["wpn"](inputs))
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    assert report.method == "l2w" and type(method).__name__ == "L2W"
    assert report.method_options == {"wpn_depth": 2, "wpn_width": 8, "wpn_input": "loss"}
    assert report.wpn["input_dim"] == 3 and report.wpn["tensors"] == 6 and "default" in report.wpn["input_type_from"]
    assert "meta_state_dict" not in report.ignored and "meta_optimizer" in report.ignored


def test_l2w_den_run_folder_holds_the_wpn_for_a_run_to_continue_with(tmp_path):
    import json

    from keras_ee import cli, training

    out = tmp_path / "l2w_run"
    assert cli.main(["import", str(DATA / "l2w_cifar_zip.pth"), "--out", str(out), "--wpn-input", "confidence"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "l2w" and config["method_options"]["wpn_input"] == "confidence"
    assert json.loads((out / "import.json").read_text())["wpn"]["input_type_from"] == "the caller (wpn_input)"
    model = runs.load_run_model(out / "model.keras")
    inputs, want = _wpn_io()
    assert np.abs(np.asarray(model.method.wpn(inputs)) - want).max() <= 1e-5
    _assert_parity(model.backbone, "l2w_cifar")
    # wpn.npz is L2W's own file: a new run takes it frozen (or as its initial WPN).
    frozen = training.L2W(
        wpn_depth=2, wpn_width=8, wpn_input="confidence", weighting="frozen", wpn_weights_path=str(out / "wpn.npz")
    )
    training.MultiExitModel(model.backbone, method=frozen)
    assert np.abs(np.asarray(frozen.wpn(inputs)) - want).max() <= 1e-5


def _l2w_parts():
    obj, _ = interop.read_torch_file(DATA / "l2w_cifar_zip.pth")
    return dict(obj["state_dict"]), dict(obj["meta_state_dict"])


def _write_l2w(path, state_dict, meta):
    calls, storages = torch_writer.tensor_calls(
        {**{f"s|{k}": v for k, v in state_dict.items()}, **{f"m|{k}": v for k, v in meta.items()}}
    )
    obj = {
        "state_dict": {k[2:]: v for k, v in calls.items() if k.startswith("s|")},
        "meta_state_dict": {k[2:]: v for k, v in calls.items() if k.startswith("m|")},
    }
    return torch_writer.write_legacy(path, obj, storages)


@pytest.mark.parametrize(
    "edit, match",
    [
        ("drop", r"lacks 'rest_hidden_layers\.0\.fc\.bias'"),
        ("extra", r"unused: \['output_layer\.scale'\]"),
        ("outputs", r"the WPN has 4 outputs; the network has 3 exits"),
        ("inputs", r"the WPN takes 5 inputs; expected 3 .* or 6"),
        ("hidden", r"rest_hidden_layers\.0\.fc\.weight' of shape \[8, 7\] does not fit hidden_2/kernel"),
    ],
)
def test_a_wpn_that_does_not_fit_is_refused(edit, match, tmp_path):
    state_dict, meta = _l2w_parts()
    if edit == "drop":
        del meta["rest_hidden_layers.0.fc.bias"]
    elif edit == "extra":
        meta["output_layer.scale"] = np.ones(3, np.float32)
    elif edit == "outputs":
        meta["output_layer.weight"] = np.zeros((4, 8), np.float32)
        meta["output_layer.bias"] = np.zeros(4, np.float32)
    elif edit == "inputs":
        meta["first_hidden_layer.fc.weight"] = np.zeros((8, 5), np.float32)
    else:
        meta["rest_hidden_layers.0.fc.weight"] = np.zeros((8, 7), np.float32)
    path = _write_l2w(tmp_path / "l2w.pth", state_dict, meta)
    with pytest.raises(interop.CheckpointMismatchError, match=match) as e:
        torch_import.read_checkpoint_into_model(path)
    assert "\n" not in str(e.value)


def test_wpn_input_choices_are_checked(tmp_path):
    with pytest.raises(interop.CheckpointMismatchError, match="wpn_input 'both' takes 2K"):
        torch_import.read_checkpoint_into_model(DATA / "l2w_cifar_zip.pth", wpn_input="both")
    with pytest.raises(ValueError, match="the checkpoint holds no WPN"):
        torch_import.read_checkpoint_into_model(DATA / "msdnet_cifar_zip.pth", wpn_input="loss")
    # A WPN of 2K inputs is `both`, whatever the default.
    state_dict, meta = _l2w_parts()
    meta["first_hidden_layer.fc.weight"] = np.concatenate([meta["first_hidden_layer.fc.weight"]] * 2, axis=1)
    _, report, _, _ = torch_import.read_checkpoint_into_model(_write_l2w(tmp_path / "both.pth", state_dict, meta))
    assert report.method_options["wpn_input"] == "both"
    # The WPN saved alone: one line saying where it belongs.
    alone = torch_writer.write_state_dict(tmp_path / "wpn.pth", meta)
    with pytest.raises(interop.CheckpointError, match="WPN alone") as e:
        interop.load_torch_checkpoint(alone)
    assert "\n" not in str(e.value)


# ---- gphi_MSDNet: the budget-aware paper's GELU MSDNet with its gaters (`meta_net`) onto BudgetAwareGating


def _gater_io():
    saved = np.load(DATA / "gphi_cifar_io.npz")
    return saved["gater_inputs"], saved["gater_outputs"]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def test_gated_gelu_msdnet_gives_the_authors_logits_and_gater_outputs():
    from keras_ee.training import gating

    model, report, method, state = torch_import.read_checkpoint_into_model(DATA / "gphi_cifar_zip.pth")
    _assert_parity(model, "gphi_cifar")
    assert report.model_options["activation"] == "gelu"  # not in the weights: read off the gaters' presence
    assert report.method == "gating" and type(method).__name__ == "BudgetAwareGating"
    # The gaters as their MLP_sigmoid computes them: P = sigmoid(z) of keras-ee's gater.
    features, want = _gater_io()
    assert np.abs(_sigmoid(state["gater"](features)) - want).max() <= 1e-5
    # ... on their features of the exits' logits (utils.compute_uncertainty: max_prob, margin).
    x, _ = _io("gphi_cifar")
    logits = model(x, training=False)
    ours = gating.confidence_features(logits[:-1], method.features)
    assert np.abs(np.asarray(ours) - features[: len(x)]).max() <= 1e-5
    assert np.abs(_sigmoid(state["gater"](ours)) - want[: len(x)]).max() <= 1e-5
    assert report.gater == {
        "gaters": 2,
        "features": ["max_prob", "margin"],
        "gater_width": 4,
        "gater_depth": 2,
        "gater_activation": "gelu",
        "tensors": 12,
        "from_args": {
            "cost_weight": 0.25,
            "gater_learning_rate": 1e-3,
            "gater_final_learning_rate": 1e-6,
            "gater_weight_decay": 1e-4,
            "gater_optimizer": "adamw",
        },
    }
    assert report.method_options["cost_weight"] == 0.25 and report.method_options["features"] == ["max_prob", "margin"]
    assert report.container == "model" and {"optimizer", "meta_optimizer", "scaler", "args"} <= set(report.ignored)
    assert "meta_net" not in report.ignored and report.ignored["args"].startswith("argparse.Namespace of")


def test_a_gated_msdnet_forced_onto_relu_is_refused():
    with pytest.raises(interop.CheckpointMismatchError, match="activations are gelu; the model uses \\['relu'\\]"):
        torch_import.read_checkpoint_into_model(
            DATA / "gphi_cifar_zip.pth",
            "msdnet_cifar_5",
            num_blocks=3,
            step_mode="even",
            channels=2,
            growth_rate=2,
            head_channels=8,
            activation="relu",
        )


def _gphi_parts():
    obj, _ = interop.read_torch_file(DATA / "gphi_cifar_zip.pth")
    assert vars(obj["args"])["data_set"] == "cifar10"  # an argparse.Namespace, read as plain attributes
    return dict(obj["model"]), dict(obj["meta_net"])


def _write_gphi(path, model_sd, meta):
    """utils.save_model's layout (`model`, `meta_net`, `epoch`), without `args` (keras-ee's defaults then)."""
    calls, storages = torch_writer.tensor_calls(
        {**{f"s|{k}": v for k, v in model_sd.items()}, **{f"m|{k}": v for k, v in meta.items()}}
    )
    obj = {
        "model": {k[2:]: v for k, v in calls.items() if k.startswith("s|")},
        "meta_net": {k[2:]: v for k, v in calls.items() if k.startswith("m|")},
        "epoch": 3,
    }
    return torch_writer.write_legacy(path, obj, storages)


@pytest.mark.parametrize(
    "edit, match",
    [
        ("shape", r"'1\.output_layer\.weight' of shape \[1, 5\] does not fit gate_2/out/kernel \[4, 1\]"),
        ("drop", r"lacks '1\.rest_hidden_layers\.0\.fc\.bias'"),
        ("extra", r"unused: \['0\.output_layer\.scale'\]"),
        ("gater", r"holds gaters \[0, 1, 2\]; a network of 3 exits has one per early exit"),
        ("inputs", r"the gaters take 3 inputs; gphi_MSDNet's take 2 \(max_prob, margin"),
        ("foreign", r"holds keys of no gater \(\['temperature'\]\)"),
    ],
)
def test_gaters_that_do_not_fit_are_refused(edit, match, tmp_path):
    model_sd, meta = _gphi_parts()
    if edit == "shape":
        meta["1.output_layer.weight"] = np.zeros((1, 5), np.float32)
    elif edit == "drop":
        del meta["1.rest_hidden_layers.0.fc.bias"]
    elif edit == "extra":
        meta["0.output_layer.scale"] = np.ones(1, np.float32)
    elif edit == "gater":
        meta.update({f"2.{k[2:]}": v for k, v in meta.items() if k.startswith("0.")})
    elif edit == "inputs":
        meta["0.first_hidden_layer.fc.weight"] = np.zeros((4, 3), np.float32)
    else:
        meta["temperature"] = np.ones(1, np.float32)
    path = _write_gphi(tmp_path / "gphi.pth", model_sd, meta)
    with pytest.raises(interop.CheckpointMismatchError, match=match) as e:
        torch_import.read_checkpoint_into_model(path)
    assert "\n" not in str(e.value)


def test_gaters_without_args_take_keras_ee_defaults(tmp_path):
    from keras_ee.training import BudgetAwareGating

    _, report, method, state = torch_import.read_checkpoint_into_model(_write_gphi(tmp_path / "g.pth", *_gphi_parts()))
    assert report.gater["from_args"] == {} and method.cost_weight == BudgetAwareGating().cost_weight
    features, want = _gater_io()
    assert np.abs(_sigmoid(state["gater"](features)) - want).max() <= 1e-5


def test_gated_msdnet_run_folder_holds_the_gater(tmp_path):
    import json

    from keras_ee import cli
    from keras_ee.training import BudgetAwareGating

    out = tmp_path / "gphi_run"
    assert cli.main(["import", str(DATA / "gphi_cifar_zip.pth"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "gating" and config["model_options"]["activation"] == "gelu"
    assert config["method_options"]["gater_width"] == 4 and config["method_options"]["cost_weight"] == 0.25
    assert json.loads((out / "import.json").read_text())["gater"]["gaters"] == 2
    model = runs.load_run_model(out / "model.keras")  # safe mode
    assert isinstance(model.method, BudgetAwareGating) and model.method.gater_activation == "gelu"
    _assert_parity(model.backbone, "gphi_cifar")
    features, want = _gater_io()
    assert np.abs(_sigmoid(model.method.gater(features)) - want).max() <= 1e-5
    x, _ = _io("gphi_cifar")
    got = model.method.gate_probabilities(model.backbone(x, training=False))
    assert np.abs(np.asarray(got) - want[: len(x)]).max() <= 1e-5
    # evaluate dumps the logits and the gaters' scores: the gaters calibrate as a trained gating run's.
    from keras_ee import dumps
    from tests.test_interop_runs import _tiny_dataset

    npz = _tiny_dataset(tmp_path / "tiny.npz")
    argv = ["evaluate", str(out), "--dataset", f"npz:{npz}", "--val-size", "40", "--confidence", "gater"]
    assert cli.main(argv) == 0
    dump = dumps.load_dump(out / "dump")
    with np.load(out / "scores" / "gater.npz") as scores:
        assert np.array_equal(scores["val"], model.method.exit_scores(np.asarray(dump.val_logits)))
        assert scores["test"].shape == (3, 40)
