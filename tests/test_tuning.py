"""keras-tuner search of the budget hyper-parameters, on tiny settings."""

import pytest
from tiny_models import TWO_EXIT_CNN

from keras_ee.config import TrainConfig
from tuning import search


def _small_config(path):
    """The search's base config: a two-exit multiexit_cnn on 400 digits (each trial traces and trains once)."""
    TrainConfig(dataset="digits", model_options=TWO_EXIT_CNN, train_size=400, val_size=200).to_json(path)
    return str(path)


def test_search_ranks_trials_by_val_budget_auc_and_writes_best(tmp_path, capsys, eager_steps):
    argv = [
        "--config",
        _small_config(tmp_path / "base.json"),
        "--dataset",
        "digits",
        "--method",
        "l2w",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--trials",
        "2",
        "--tuner",
        "random",
        "--out",
        str(tmp_path / "search"),  # not tmp_path: base.json there is not keras-ee's
    ]
    assert search.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 2
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 100 for s in scores)
    best = TrainConfig.from_file(tmp_path / "search" / "best.json")
    assert best.method == "l2w" and 0.5 <= best.method_options["q"] <= 1.0
    assert 0.1 <= best.method_options["delta"] <= 1.0
    # The best config is the top-ranked trial's.
    assert f"q={best.method_options['q']:.3g}" in " ".join(rows[0])


def test_unknown_method_and_bad_trials_are_refused(tmp_path):
    with pytest.raises(ValueError, match="trials"):
        search.search(TrainConfig(method="l2w"), tmp_path, trials=0)
    with pytest.raises(ValueError, match="unknown training method 'no_such_method'"):
        search.make_hypermodel(TrainConfig(method="no_such_method"), splits=None)


def test_a_method_with_phases_is_tuned_over_all_its_phases(tmp_path, monkeypatch):
    from keras_ee import experiment

    entered = []
    compile_phase = experiment.compile_phase

    def spy(model, config, splits, index, fresh=True):
        entered.append(index)
        return compile_phase(model, config, splits, index, fresh)

    monkeypatch.setattr(experiment, "compile_phase", spy)
    argv = [
        "--config",
        _small_config(tmp_path / "base.json"),
        "--dataset",
        "digits",
        "--method",
        "imta",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--trials",
        "1",
        "--tuner",
        "random",
        "--out",
        str(tmp_path / "search"),  # not tmp_path: base.json there is not keras-ee's
    ]
    assert search.main(argv) == 0
    best = TrainConfig.from_file(tmp_path / "search" / "best.json")
    assert best.method == "imta" and 1.0 <= best.method_options["temperature"] <= 5.0
    assert 0.1 <= best.method_options["distill_weight"] <= 0.95
    # The trial was built for phase I, then trained phase II (whose logs are the objective).
    assert entered[-2:] == [0, 1]
