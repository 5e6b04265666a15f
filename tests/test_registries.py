"""Datasets and training methods on keras_ee.registry.Registry: register_*, list_*, get_*, one error shape."""

import re

import numpy as np
import pytest

from keras_ee import cli, data, training
from keras_ee.registry import Registry
from keras_ee.training import registry as method_registry

BUILTIN_DATASETS = ["digits", "cifar10", "cifar100", "fashion_mnist", "imagenet", "npz:PATH"]


@pytest.fixture
def scratch_datasets(monkeypatch):
    """`register_dataset` into a copy of the datasets' table, dropped after the test."""
    copy: Registry[data.DatasetSpec] = Registry("dataset", hint=data._DATASETS.hint)
    for name in data.list_datasets():
        copy.register(name, data._DATASETS.get(name))
    monkeypatch.setattr(data, "_DATASETS", copy)
    monkeypatch.setattr(data, "_ALIASES", dict(data._ALIASES))


# --- datasets ----------------------------------------------------------------------------


def test_datasets_are_listed_and_found_by_name_alias_or_npz_path():
    assert data.list_datasets() == BUILTIN_DATASETS
    assert data.get_dataset("cifar100").augment_pad == 4 and data.get_dataset("cifar100").augment_flip
    for alias, name in [("cifar-100", "cifar100"), (" CIFAR-10 ", "cifar10"), ("Fashion-MNIST", "fashion_mnist")]:
        assert data.get_dataset(alias).name == name
    assert data.get_dataset("ILSVRC2012").stream is not None and data.get_dataset("imagenet").read is None
    assert data.get_dataset("sklearn_digits").val_size == 300
    npz = data.get_dataset("npz:some/folder/mine.npz")
    assert npz.name == "npz:mine.npz" and npz.read is not None and npz.augment_pad is None


def test_keras_ee_datasets_prints_each_name_and_description(capsys):
    assert cli.main(["datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == BUILTIN_DATASETS
    assert lines[2] == f"{'cifar100':<14} {data.get_dataset('cifar100').description}"


def test_a_registered_dataset_loads_like_a_builtin(scratch_datasets):
    rng = np.random.default_rng(0)

    def read(data_dir, download):
        x = rng.integers(0, 256, (60, 16, 16, 1), dtype=np.uint8)
        y = np.arange(60) % 3
        return {"x_train": x, "y_train": y, "x_test": x[:12], "y_test": y[:12], "class_names": ["a", "b", "c"]}

    data.register_dataset("toy", description="three classes of noise", read=read, val_size=6, aliases=("toy-3",))
    assert data.list_datasets() == [*BUILTIN_DATASETS, "toy"]
    splits = data.load("TOY-3")
    assert (splits.name, splits.num_train, splits.num_val, splits.num_test) == ("toy", 54, 6, 12)
    assert splits.augment_pad == 2 and not splits.augment_flip  # an eighth of the height; no flip
    with pytest.raises(ValueError, match="a dataset named 'toy' is already registered"):
        data.register_dataset("toy", description="again", read=read)
    with pytest.raises(ValueError, match="the alias 'cifar-10' is already taken"):
        data.register_dataset("toy2", description="x", read=read, aliases=("cifar-10",))
    with pytest.raises(ValueError, match="exactly one of `read` .* and `stream`"):
        data.register_dataset("toy3", description="x")
    assert "toy2" not in data.list_datasets() and "toy3" not in data.list_datasets()


# --- methods -----------------------------------------------------------------------------


def test_methods_are_listed_sorted_and_found_by_name():
    names = training.list_methods()
    assert names == sorted(names) and {"baseline", "l2w", "imta", "l2w_imta", "gating", "hdkd"} <= set(names)
    assert training.get_method("l2w").cls is training.L2W
    with pytest.raises(ValueError, match=r"a training method named 'l2w' is already registered \(by keras_ee"):
        training.register_method("l2w", summary="x")(training.Baseline)
    assert method_registry.get_method("l2w").cls is training.L2W


# --- one error shape -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "get, kind, hint",
    [
        (data.get_dataset, "dataset", "(descriptions: keras-ee datasets)"),
        (training.get_method, "training method", "(or package.module:Class for a method outside keras-ee)"),
    ],
    ids=["dataset", "method"],
)
def test_unknown_names_are_refused_in_one_shape(get, kind, hint):
    with pytest.raises(ValueError) as info:
        get("nope")
    message = str(info.value)
    assert re.fullmatch(rf"unknown {kind} 'nope'; available: [\w:, ]+\. {re.escape(hint)}", message), message
    with pytest.raises(ValueError, match=rf"^a {kind} name must be a string; received 3\.$"):
        get(3)
