"""Exact per-exit cost accounting against architectures.md and the papers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from keras_ee import costs, models

# architectures.md 3.10 / 3.13 / 4.10 / 4.11: exact cumulative reference counts.
EXACT = {
    ("msdnet_cifar_5", 100): (
        [299704, 649740, 1018308, 1492424, 2078924],
        [6859876, 14350024, 27536684, 41714576, 58480628],
    ),
    ("msdnet_cifar_7", 100): (
        [299704, 649740, 1111388, 1727200, 2384968, 3052244, 3966664],
        [6859876, 14350024, 27291436, 48448912, 76432628, 108850520, 137280956],
    ),
    ("msdnet_cifar_5", 10): (
        [288094, 626520, 983478, 1445984, 2020874],
        [6848266, 14326804, 27501854, 41668136, 58422578],
    ),
    ("msdnet_cifar_7", 10): (
        [288094, 626520, 1076558, 1680760, 2326918, 2982584, 3885394],
        [6848266, 14326804, 27256606, 48402472, 76374578, 108780860, 137199686],
    ),
    ("ranet_cifar_c1", 100): (
        [358660, 899880, 1304995, 1800711, 2188193, 2617261],
        [8372324, 21788360, 32878892, 41570192, 53283828, 58990680],
    ),
    ("ranet_cifar_c1", 10): (
        [347050, 876660, 1270165, 1754271, 2130143, 2547601],
        [8360714, 21765140, 32844062, 41523752, 53225778, 58921020],
    ),
    # Derived (unpublished) counts for Model-C-2, architectures.md 4.11.
    ("ranet_cifar_c2", 100): (
        [367940, 909160, 1314275, 1809991, 2717647, 3685779, 4462599, 5186987],
        [10739812, 24155848, 35246380, 43937680, 93068276, 114677336, 164023356, 175743648],
    ),
    ("msdnet_imagenet_s4", 1000): (
        [4238504, 8772240, 13073272, 16748416, 23958440],
        [339902824, 685456720, 1008156120, 1254472688, 1360529624],
    ),
    ("msdnet_imagenet_s6", 1000): (
        [4238504, 10775952, 17842936, 24581408, 38678920],
        [339902824, 924194832, 1517433848, 1991602432, 2194420840],
    ),
    ("msdnet_imagenet_s7", 1000): (
        [4238504, 11889168, 20577208, 29158384, 47544824],
        [339902824, 1058266480, 1811878152, 2422156808, 2684443568],
    ),
}

# architectures.md section 2: pure conv+Dense MACs (x1e6 CIFAR, x1e9 ImageNet).
PURE = {
    "msdnet_cifar_5": (1e6, 2, [6.79, 14.21, 27.28, 41.37, 58.09]),
    "msdnet_cifar_7": (1e6, 2, [6.79, 14.21, 27.04, 48.05, 75.90, 108.19, 136.57]),
    "ranet_cifar_c1": (1e6, 2, [8.33, 21.71, 32.73, 41.40, 52.98, 58.68]),
    "msdnet_imagenet_s4": (1e9, 3, [0.337, 0.682, 1.004, 1.250, 1.356]),
}

# architectures.md section 2: backbone up to k plus head k only.
OWN_HEAD = {
    "msdnet_cifar_5": ([0.30, 0.39, 0.44, 0.63, 0.83], [6.86, 12.12, 22.20, 33.85, 46.33]),
    "ranet_cifar_c1": ([0.36, 0.61, 0.61, 0.78, 0.73, 0.83], [8.37, 19.12, 25.77, 31.18, 37.85, 40.26]),
}

# Published tables as printed: (preset, params scale, mul-add scale, rows).
# Each row: (params, mul_adds, decimals) -- IMTA printed some 7-exit values
# with one decimal and L2W padded them with zeros (architectures.md 3.12).
PUBLISHED = {
    "L2W Table 1 / IMTA Table 1 (7-exit MSDNet, C100)": (
        "msdnet_cifar_7",
        1e6,
        1e6,
        [
            (0.30, 6.86, 2),
            (0.65, 14.35, 2),
            (1.11, 27.29, 2),
            (1.73, 48.45, 2),
            (2.38, 76.43, 2),
            (3.05, 108.9, (2, 1)),
            (4.0, 137.3, 1),
        ],
    ),
    "L2W Table 2 (RANet C-1, C100)": (
        "ranet_cifar_c1",
        1e6,
        1e6,
        [(0.36, 8.37, 2), (0.90, 21.79, 2), (1.30, 32.88, 2), (1.80, 41.57, 2), (2.19, 53.28, 2), (2.62, 58.99, 2)],
    ),
    "L2W supp. Table 1 / main Table 3 (MSDNet ImageNet k=4)": (
        "msdnet_imagenet_s4",
        1e6,
        1e9,
        [(4.24, 0.34, 2), (8.77, 0.69, 2), (13.07, 1.01, 2), (16.75, 1.25, 2), (23.96, 1.36, 2)],
    ),
    "L2W supp. Table 2 / main Table 4 (MSDNet ImageNet k=6)": (
        "msdnet_imagenet_s6",
        1e6,
        1e9,
        [(4.24, 0.34, 2), (10.78, 0.92, 2), (17.84, 1.52, 2), (24.58, 1.99, 2), (38.68, 2.19, 2)],
    ),
    "L2W supp. Table 3 / main Table 5 (MSDNet ImageNet k=7)": (
        "msdnet_imagenet_s7",
        1e6,
        1e9,
        [(4.24, 0.34, 2), (11.89, 1.06, 2), (20.58, 1.81, 2), (29.16, 2.42, 2), (47.54, 2.68, 2)],
    ),
}
# L2W supp. Table 4 / main Table 6 (5-exit MSDNet, C100): Mul-Adds only.
PUBLISHED_5EXIT_MUL_ADDS = [6.86, 14.35, 27.54, 41.71, 58.48]

_CACHE = {}


def _costs(name, num_classes, rule="reference"):
    key = (name, num_classes, rule)
    if key not in _CACHE:
        model = models.create(name, num_classes=num_classes)
        _CACHE[(name, num_classes, "reference")] = costs.exit_costs(model)
        _CACHE[(name, num_classes, "macs")] = costs.exit_costs(model, rule="macs")
        del model
        keras.backend.clear_session()
    return _CACHE[key]


@pytest.mark.parametrize("name,num_classes", sorted(EXACT))
def test_exact_reference_counts(name, num_classes):
    params, mul_adds = EXACT[(name, num_classes)]
    c = _costs(name, num_classes)
    assert c["params"] == params
    assert c["mul_adds"] == mul_adds
    # Cumulative lists are running sums of the per-stage costs.
    assert list(np.cumsum(c["stage_params"])) == params
    assert list(np.cumsum(c["stage_mul_adds"])) == mul_adds


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_macs_table(name):
    scale, decimals, expected = PURE[name]
    classes = 1000 if "imagenet" in name else 100
    got = [round(x / scale, decimals) for x in _costs(name, classes, "macs")["mul_adds"]]
    assert got == expected
    # Pure MACs are strictly below the reference count at every exit.
    ref = _costs(name, classes)["mul_adds"]
    assert all(m < r for m, r in zip(_costs(name, classes, "macs")["mul_adds"], ref))


def test_msdnet_exit1_breakdown():
    # architectures.md 2: conv 6,779,904 + Linear 12,800 (pure) at exit 1.
    assert _costs("msdnet_cifar_5", 100, "macs")["mul_adds"][0] == 6779904 + 12800


@pytest.mark.parametrize("name", sorted(OWN_HEAD))
def test_own_head_only_numbers(name):
    params, mul_adds = OWN_HEAD[name]
    c = _costs(name, 100)
    assert [round(p / 1e6, 2) for p in c["own_head_params"]] == params
    assert [round(m / 1e6, 2) for m in c["own_head_mul_adds"]] == mul_adds
    # Exit 1 has no earlier head; the last exit's own-head figure excludes the others.
    assert c["own_head_mul_adds"][0] == c["mul_adds"][0]
    assert c["own_head_mul_adds"][-1] < c["mul_adds"][-1]


@pytest.mark.parametrize("table", sorted(PUBLISHED))
def test_published_tables_at_printed_precision(table):
    name, p_scale, m_scale, rows = PUBLISHED[table]
    classes = 1000 if "imagenet" in name else 100
    c = _costs(name, classes)
    for k, (p, m, decimals) in enumerate(rows):
        dp, dm = decimals if isinstance(decimals, tuple) else (decimals, decimals)
        assert round(c["params"][k] / p_scale, dp) == pytest.approx(p), (table, k)
        assert round(c["mul_adds"][k] / m_scale, dm) == pytest.approx(m), (table, k)


def test_published_5exit_wpn_table():
    c = _costs("msdnet_cifar_5", 100)
    assert [round(m / 1e6, 2) for m in c["mul_adds"]] == PUBLISHED_5EXIT_MUL_ADDS


def _tiny_two_exit(markers):
    """x(6x6x2) -> conv3x3(4) -> relu -> [exit 1: GAP, Dense 3]; conv3x3 s2 (5) -> exit 2."""
    inp = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inp)
    a = keras.layers.ReLU()(a)
    side = keras.layers.Conv2D(7, 1, use_bias=True)(inp)  # only exit 2 needs it
    e1 = keras.layers.Dense(3, name="exit_1")(keras.layers.GlobalAveragePooling2D()(a))
    carried = [a, side]
    if markers:
        side_m = keras.layers.Identity(name="stage_1_state_1")(side)
        a_m = keras.layers.Identity(name="stage_1_state_0")(a)
        carried = [a_m, side_m]
    b = keras.layers.Conv2D(5, 3, strides=2, padding="same", use_bias=False)(carried[0])
    b = keras.layers.Concatenate()([b, keras.layers.MaxPooling2D(2)(carried[1])])
    e2 = keras.layers.Dense(2, name="exit_2")(keras.layers.Flatten()(b))
    return keras.Model(inp, [e1, e2])


def test_generic_graph_walk_hand_counts():
    # Hand counts (batch 1). Stage sets differ with/without markers: the 1x1
    # "side" conv belongs to exit 2 by ancestry, but to stage 1 when exit 1's
    # stage hands it on through a marker.
    conv_a = 3 * 3 * 2 * 4 * 36
    relu_a = 4 * 36
    gap = 4 * 36
    dense1 = 4 * 3 + 3
    side = 1 * 1 * 2 * 7 * 36
    conv_b = 3 * 3 * 4 * 5 * 9
    pool = 7 * 9 * 4
    dense2 = (9 * 12) * 2 + 2
    p_a, p_d1, p_side = 3 * 3 * 2 * 4, 4 * 3 + 3, 2 * 7 + 7
    p_b, p_d2 = 3 * 3 * 4 * 5, 108 * 2 + 2

    lazy = costs.exit_costs(_tiny_two_exit(markers=False))
    assert lazy["mul_adds"][0] == conv_a + relu_a + gap + dense1
    assert lazy["mul_adds"][1] == lazy["mul_adds"][0] + side + conv_b + pool + dense2
    assert lazy["params"] == [p_a + p_d1, p_a + p_d1 + p_side + p_b + p_d2]

    marked = costs.exit_costs(_tiny_two_exit(markers=True))
    assert marked["mul_adds"][0] == conv_a + relu_a + gap + dense1 + side
    assert marked["mul_adds"][1] == lazy["mul_adds"][1]
    assert marked["params"][0] == p_a + p_d1 + p_side
    macs = costs.exit_costs(_tiny_two_exit(markers=True), rule="macs")
    assert macs["mul_adds"][1] == conv_a + side + conv_b + 9 * 12 * 2 + 4 * 3


def test_nested_model_and_activation_in_layer():
    inner_in = keras.Input((4, 4, 3))
    inner = keras.Model(inner_in, keras.layers.Conv2D(2, 1, activation="relu", use_bias=False)(inner_in))
    inp = keras.Input((4, 4, 3))
    y = keras.layers.Dense(5, name="exit_1")(keras.layers.Flatten()(inner(inp)))
    c = costs.exit_costs(keras.Model(inp, [y]))
    assert c["mul_adds"] == [3 * 2 * 16 + 2 * 16 + 32 * 5 + 5]
    assert c["params"] == [6 + 32 * 5 + 5]


def test_errors():
    model = models.create("multiexit_cnn", input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="rule"):
        costs.exit_costs(model, rule="flops")
    with pytest.raises(TypeError):
        costs.exit_costs("not a model")
    inp = keras.Input((5,), dtype="int32")
    emb = keras.layers.Embedding(10, 3)(inp)
    bad = keras.Model(inp, [keras.layers.Dense(2)(keras.layers.Flatten()(emb))])
    with pytest.raises(ValueError, match="Embedding"):
        costs.exit_costs(bad)


def test_multiexit_cnn_costs_rise():
    for shape in [(8, 8, 1), (28, 28, 1), (32, 32, 3)]:
        c = costs.exit_costs(models.create("multiexit_cnn", input_shape=shape))
        assert all(b > a for a, b in zip(c["mul_adds"], c["mul_adds"][1:]))
        assert all(b > a for a, b in zip(c["params"], c["params"][1:]))


def test_format_and_presets_table():
    table = costs.presets_table(["multiexit_cnn", "msdnet_cifar_5"])
    lines = table.splitlines()
    assert lines[0].startswith("model") and "Mul-Adds" in lines[0]
    row = [l for l in lines if l.startswith("msdnet_cifar_5")][0]
    assert "6.86 14.35 27.54 41.71 58.48" in row
    assert "0.30 0.65 1.02 1.49 2.08" in row
    assert any(l.startswith("multiexit_cnn") for l in lines)
    with pytest.raises(ValueError):
        costs.format_table({"x": {"params": [1]}})
