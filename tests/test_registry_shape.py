"""keras_ee.registry: the one lookup rule of presets, datasets and methods."""

import pytest

from keras_ee.registry import Registry


def test_register_get_and_list_in_order():
    reg: Registry[int] = Registry("widget")
    reg.register("b", 2)
    reg.register("a", 1)
    assert reg.get("a") == 1 and reg.names() == ["b", "a"] and "a" in reg and len(reg) == 2


def test_unknown_and_duplicate_names_are_refused_with_the_names():
    reg: Registry[int] = Registry("widget", hint="(register_widget adds one)")
    reg.register("a", 1)
    with pytest.raises(ValueError, match=r"unknown widget 'z'; available: a\. \(register_widget"):
        reg.get("z")
    with pytest.raises(ValueError, match="must be a string; received 3"):
        reg.get(3)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 5)
    assert reg.register("a", 5, replace=True) == 5


def test_load_runs_before_lookups():
    calls = []
    reg: Registry[int] = Registry("widget", load=lambda: calls.append(1) or reg.register("x", 1, replace=True))
    assert reg.get("x") == 1 and calls


def test_a_copy_is_independent():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    twin = reg.copy()
    twin.register("b", 2)
    assert reg.names() == ["a"] and twin.names() == ["a", "b"] and twin.kind == "widget"
