"""Budget-curve arithmetic, tables and files of keras_ee.evaluation."""

import csv

import numpy as np
import pytest

from keras_ee import dumps, evaluation, formatting
from keras_ee.cli import parse_budget


def test_accuracy_at_interpolates_and_refuses_to_extrapolate():
    cost = np.array([30.0, 10.0, 20.0])  # unsorted on purpose
    acc = np.array([0.9, 0.5, 0.7])
    out = evaluation.accuracy_at(cost, acc, [10, 15, 25, 30, 5, 31])
    np.testing.assert_allclose(out[:4], [0.5, 0.6, 0.8, 0.9])
    assert np.isnan(out[4]) and np.isnan(out[5])


def test_mean_accuracy_over_is_the_normalised_area():
    cost = np.array([0.0, 10.0, 20.0])
    acc = np.array([0.0, 1.0, 1.0])
    # area on [0, 20] = 5 + 10 = 15 -> mean 0.75; on [5, 15]: 3.75 + 5 = 8.75 -> 0.875
    assert evaluation.mean_accuracy_over(cost, acc, 0, 20) == pytest.approx(0.75)
    assert evaluation.mean_accuracy_over(cost, acc, 5, 15) == pytest.approx(0.875)
    assert np.isnan(evaluation.mean_accuracy_over(cost, acc, -1, 20))
    assert np.isnan(evaluation.mean_accuracy_over(cost, acc, 5, 5))


@pytest.mark.parametrize("value, label", [(15e6, "15M"), (1.5e9, "1.5G"), (8000, "8K"), (12, "12")])
def test_budget_labels_round_trip_through_the_cli_parser(value, label):
    assert formatting.budget_label(value) == label
    assert parse_budget(label) == pytest.approx(value)


def _dump(tmp_path, seed=0, k=3, n=400, c=10):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=(2, n))
    logits = rng.normal(size=(2, k, n, c)).astype(np.float32)
    # Later exits see a stronger signal, so accuracy rises with depth.
    for e in range(k):
        for s in range(2):
            logits[s, e, np.arange(n), labels[s]] += 1.0 + e
    return dumps.save_dump(
        tmp_path, logits[0], labels[0], logits[1], labels[1], {"mul_adds": [100, 250, 400], "params": [1, 2, 3]}
    )


def test_evaluate_dump_matches_a_hand_computation_and_writes_files(tmp_path):
    path = _dump(tmp_path / "dump")
    d = dumps.load_dump(path)
    ev = evaluation.evaluate_dump(d, name="x")
    manual = (np.argmax(np.asarray(d.test_logits), axis=-1) == d.test_labels[None]).mean(axis=1)
    np.testing.assert_allclose(ev.test_anytime, manual)
    assert ev.test_anytime[2] > ev.test_anytime[0]
    sw = ev.sweep
    assert sw["q"].shape == (39,) and sw["exit_counts"].shape == (39, 3)
    assert np.all(sw["exit_counts"].sum(axis=1) == d.test_labels.size)
    # The expected cost follows from the exit counts.
    np.testing.assert_allclose(sw["mean_cost"], sw["exit_counts"] @ np.array([100, 250, 400]) / d.test_labels.size)
    paths = evaluation.write_evaluation(ev, tmp_path / "eval")
    rows = list(csv.DictReader(open(paths["budget"])))
    assert len(rows) == 39 and float(rows[0]["q"]) == pytest.approx(0.05)
    assert paths["plot"].stat().st_size > 10_000
    anytime = list(csv.DictReader(open(paths["anytime"])))
    assert [int(r["mul_adds"]) for r in anytime] == [100, 250, 400]
    assert "exit share" in evaluation.format_budget(ev) and "test acc" in evaluation.format_anytime(ev)


def test_compare_reports_budgets_and_common_range(tmp_path):
    a = evaluation.evaluate_dump(dumps.load_dump(_dump(tmp_path / "a", seed=1)), name="a")
    b = evaluation.evaluate_dump(dumps.load_dump(_dump(tmp_path / "b", seed=2)), name="b")
    text, rows = evaluation.compare([a, b], budgets=[200, 300])
    assert [r["name"] for r in rows] == ["a", "b"] and "acc@200 %" in text
    xa, ya = a.curve()
    assert rows[0]["acc@300"] == pytest.approx(float(evaluation.accuracy_at(xa, ya, [300])[0]))
    with pytest.raises(ValueError, match="at least one"):
        evaluation.compare([])


# --- top-5 (the HDKD paper's measure) -------------------------------------------------------------


def test_top_k_correct_is_argmax_for_k_1_and_a_rank_test_for_k_5():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 500, 12)).astype(np.float32)
    logits[:, :50, :] = np.round(logits[:, :50, :])  # ties
    labels = rng.integers(0, 12, size=500)
    np.testing.assert_array_equal(
        evaluation.top_k_correct(logits, labels, 1, chunk=64), np.argmax(logits, axis=-1) == labels[None]
    )
    top5 = np.argsort(-logits, axis=-1, kind="stable")[..., :5]  # ties: the smaller class first, as argmax
    np.testing.assert_array_equal(
        evaluation.top_k_correct(logits, labels, 5, chunk=64), (top5 == labels[None, :, None]).any(axis=-1)
    )
    assert evaluation.top_k_correct(logits[:, :, :4], labels % 4, 5).all()  # fewer classes than k


def test_top5_evaluation_keeps_the_exits_and_counts_the_label_among_the_five_largest(tmp_path):
    d = dumps.load_dump(_dump(tmp_path / "dump"))
    top1 = evaluation.evaluate_dump(d, name="x")
    top5 = evaluation.evaluate_dump(d, name="x", metric="top5")
    manual = (np.argsort(-np.asarray(d.test_logits), axis=-1)[..., :5] == d.test_labels[None, :, None]).any(-1)
    np.testing.assert_allclose(top5.test_anytime, manual.mean(axis=1))
    assert np.all(top5.test_anytime >= top1.test_anytime) and top5.test_anytime[0] > top1.test_anytime[0]
    # exits are decided by the confidence score, so the same samples leave at the same exits
    np.testing.assert_array_equal(top5.sweep["exit_counts"], top1.sweep["exit_counts"])
    np.testing.assert_array_equal(top5.sweep["mean_cost"], top1.sweep["mean_cost"])
    assert np.all(top5.sweep["test_accuracy"] >= top1.sweep["test_accuracy"])
    assert "test top-5 %" in evaluation.format_anytime(top5) and "val top-5 %" in evaluation.format_budget(top5)
    assert "test acc %" in evaluation.format_anytime(top1)
    text, _ = evaluation.compare([top5], budgets=[200])
    assert "top-5@200 %" in text
    with pytest.raises(ValueError, match="one metric"):
        evaluation.compare([top1, top5])
    with pytest.raises(ValueError, match=r"metric must be one of \['top1', 'top5'\]; received 'top3'"):
        evaluation.evaluate_dump(d, metric="top3")


def test_evaluate_run_writes_top5_to_its_own_folder_and_keeps_the_method_scores_path(tmp_path, capsys):
    from keras_ee import cli

    run = tmp_path / "run"
    _dump(run / "dump")
    assert cli.main(["evaluate", str(run)]) == 0
    before = (run / "eval" / "anytime.csv").read_bytes()
    assert cli.main(["evaluate", str(run), "--metric", "top5"]) == 0
    printed = capsys.readouterr().out
    assert "top-5 accuracy" in printed and "test top-5 %" in printed
    assert (run / "eval" / "anytime.csv").read_bytes() == before  # the top-1 files stay
    rows = list(csv.DictReader(open(run / "eval" / "top5" / "anytime.csv")))
    d = dumps.load_dump(run / "dump")
    expected = evaluation.evaluate_dump(d, metric="top5").test_anytime
    np.testing.assert_allclose([float(r["test_accuracy"]) for r in rows], expected, atol=1e-6)
    assert (run / "eval" / "top5" / "budget.png").is_file()
    # a method's own scores (scores/<kind>.npz, as gating's gater) go to eval/top5/<kind>/
    (run / "scores").mkdir()
    rng = np.random.default_rng(1)
    np.savez(
        run / "scores" / "mine.npz",
        val=rng.random((3, 400)).astype(np.float32),
        test=rng.random((3, 400)).astype(np.float32),
    )
    ev = evaluation.evaluate_run(run, kind="mine", metric="top5", echo=False)
    assert ev.metric == "top5" and (run / "eval" / "top5" / "mine" / "budget.csv").is_file()
    assert cli.main(["sweep", str(run / "dump"), "--metric", "top5"]) == 0
    assert (run / "dump" / "top5" / "budget.csv").is_file()
    assert cli.main(["compare", str(run), str(run), "--metric", "top5", "--out", str(tmp_path / "cmp")]) == 0
    assert "top-5@" in capsys.readouterr().out
