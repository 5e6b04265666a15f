"""keras_ee.models.presets: presets as data, their costs recomputed, the registry's shape, create."""

import keras
import pytest
from test_costs import EXACT

from keras_ee import costs, models
from keras_ee.cli import main as cli_main
from keras_ee.models import presets


@pytest.mark.parametrize("name", models.list_presets())
def test_the_table_costs_are_what_the_built_preset_costs(name):
    preset = models.get_preset(name)
    if (name, preset.num_classes) in EXACT:
        # tests/test_costs.py builds this preset and holds its counts to these (each build takes
        # seconds): the table must say the same.
        params, mul_adds = EXACT[(name, preset.num_classes)]
    else:
        counted = costs.exit_costs(models.create(name))
        keras.backend.clear_session()
        params, mul_adds = counted["params"], counted["mul_adds"]
    assert preset.params == tuple(params)
    assert preset.mul_adds == tuple(mul_adds)
    assert preset.num_exits == len(preset.mul_adds)


def test_every_preset_says_what_it_is():
    for name in models.list_presets():
        preset = models.get_preset(name)
        assert len(preset.params) == len(preset.mul_adds) == preset.num_exits > 1
        assert list(preset.params) == sorted(preset.params) and list(preset.mul_adds) == sorted(preset.mul_adds)
        if name.startswith("msdnet"):
            assert "arXiv:1703.09844" in preset.paper and f"--nBlocks {preset.num_exits}" in preset.authors_arguments
        if name.startswith("ranet"):
            assert "arXiv:2003.07326" in preset.paper and "--arch RANet" in preset.authors_arguments


def test_unknown_names_and_overrides_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown model preset 'resnet9000'; available: msdnet_cifar_5, "):
        models.create("resnet9000")
    with pytest.raises(ValueError, match="a model preset name must be a string; received 5"):
        models.get_preset(5)
    with pytest.raises(ValueError, match=r"create\('msdnet_cifar_5'\): unknown override\(s\) \['growthrate'\]"):
        models.create("msdnet_cifar_5", growthrate=3)
    with pytest.raises(ValueError, match="already registered"):
        models.register_preset("multiexit_cnn", models.get_preset("multiexit_cnn"))
    with pytest.raises(TypeError, match="expected a Preset"):
        models.register_preset("mine", {"builder": models.multiexit_cnn})


def test_a_registered_preset_is_listed_and_built(monkeypatch):
    registry = presets._presets
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))  # leave the table as it was
    tiny = models.Preset(
        models.multiexit_cnn, {"widths": (4, 8), "depth": 1}, (8, 8, 1), 3, "", "", (1, 2), (1, 2), "tiny"
    )
    models.register_preset("tiny_cnn", tiny)
    assert models.list_presets()[-1] == "tiny_cnn" and models.get_preset("tiny_cnn") is tiny
    model = models.create("tiny_cnn")
    assert model.name == "tiny_cnn" and len(model.outputs) == 2 and model.outputs[0].shape[-1] == 3


def test_keras_ee_models_prints_the_table_and_the_papers(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "msdnet_cifar_5      5      0.30 0.65 1.02 1.49 2.08" in out
    assert "6.86 14.35 27.54 41.71 58.48" in out
    assert "arXiv:2003.07326" in out and "--scale-list 1-2-2-3" in out
