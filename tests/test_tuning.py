"""keras-tuner search of the budget hyper-parameters, on tiny settings."""

import json

import pytest

from keras_ee.config import TrainConfig
from tuning import search


def test_search_ranks_trials_by_val_budget_auc_and_writes_best(tmp_path, capsys):
    argv = ["--dataset", "digits", "--method", "l2w", "--epochs", "1", "--batch-size", "128", "--trials", "2",
            "--tuner", "random", "--out", str(tmp_path)]
    assert search.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 2
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 100 for s in scores)
    best = TrainConfig.from_file(tmp_path / "best.json")
    assert best.method == "l2w" and 0.5 <= best.method_options["q"] <= 1.0
    assert 0.1 <= best.method_options["delta"] <= 1.0
    # The best config is the top-ranked trial's.
    assert f"q={best.method_options['q']:.3g}" in " ".join(rows[0])


def test_unknown_method_and_bad_trials_are_refused(tmp_path):
    with pytest.raises(ValueError, match="trials"):
        search.search(TrainConfig(method="l2w"), tmp_path, trials=0)
    with pytest.raises(ValueError, match="unknown training method 'imta'"):
        search.make_hypermodel(TrainConfig(method="imta"), splits=None)
