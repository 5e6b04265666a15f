"""Fixes found by the type checker (mypy over keras_ee/, see pyproject.toml [tool.mypy])."""

import sys

import tomllib

from keras_ee.config import TrainConfig


def test_toml_config_reads_on_python_3_10(tmp_path, monkeypatch):
    # Python 3.10 (supported: requires-python >= 3.10) has no tomllib; the `tomli` package
    # (a dependency there) is the same parser. Simulate 3.10: no tomllib, tomli present.
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    f = tmp_path / "c.toml"
    f.write_text("epochs = 3\n")
    assert TrainConfig.from_file(f).epochs == 3
