"""bench/methods.py: methods x seeds into one table, JSON and plot; bad names and options refused up front."""

import json

import bench_scripts
import pytest
from tiny_models import SMALL_CNN_ARGS

TINY = [
    "--dataset",
    "digits",
    *SMALL_CNN_ARGS,  # three exits
    "--train-size",
    "200",
    "--val-size",
    "200",
    "--epochs",
    "1",
    "--batch-size",
    "128",
    "--seeds",
    "0",
    "--quiet",
]


@pytest.fixture(scope="module")
def bench():
    return bench_scripts.load("methods")


def test_two_methods_one_seed_write_the_table_json_and_plot(bench, tmp_path, capsys):
    out = tmp_path / "out"
    argv = TINY + ["--methods", "baseline", "l2w", "--method-option", "l2w:q=0.5", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("results.md", "results.json", "budget_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "budget_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = (out / "results.md").read_text()
    assert table in printed
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header, methods = rows[0], rows[1:3]  # the main table; the difference table follows
    assert "s/epoch" in header and "exit 3" in header
    assert [r.split("|")[1].strip() for r in methods] == ["baseline", "l2w q=0.5"]
    assert all("±" in cell for r in methods for cell in r.strip("|").split("|")[1:])  # every figure measured

    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["baseline", "l2w"]
    assert results["methods"]["l2w"]["options"] == {"q": 0.5}
    assert len(results["budgets"]) == 4 and results["seeds"] == [0]
    for entry in results["methods"].values():
        assert len(entry["budget_acc"]) == 1 and len(entry["anytime"][0]) == 3
        assert entry["timing_source"] == ["epoch_times.json"] and entry["seconds_per_epoch"][0] > 0
    assert list(results["differences"]) == ["l2w"]
    for run in ("baseline-s0", "l2w-s0"):  # ordinary run folders
        assert (out / run / "model.keras").is_file() and (out / run / "eval" / "budget.csv").is_file()
        assert json.loads((out / run / "epoch_times.json").read_text())["traced"] == [0]

    # Rerunning reuses the finished runs; other settings for the same folders are refused up front.
    assert bench.main(argv) == 0
    assert printed.count("training into") == 2 and capsys.readouterr().out.count("finished earlier: reusing") == 2
    assert bench.main(TINY + ["--epochs", "2", "--methods", "baseline", "--out", str(out)]) == 2
    assert "already holds a run with other settings (epochs: 1 -> 2)" in capsys.readouterr().err

    # Top-5 of the same runs: nothing trained, its own files next to the top-1 ones (left as they were).
    top1_table = (out / "results.md").read_text()
    assert bench.main(argv + ["--metric", "top5", "--reference", "baseline", "l2w"]) == 0
    printed = capsys.readouterr().out
    assert "Paired difference to baseline" in printed and "| baseline − l2w |" in printed
    assert "training into" not in printed and "Top-5 test accuracy" in printed
    assert (out / "results.md").read_text() == top1_table
    top5 = json.loads((out / "results_top5.json").read_text())
    assert top5["metric"] == "top5" and (out / "budget_curves_top5.png").is_file()
    assert list(top5["differences"]) == ["l2w"] and list(top5["more_differences"]) == ["l2w"]
    assert list(top5["more_differences"]["l2w"]) == ["baseline"]
    assert top5["more_differences"]["l2w"]["baseline"]["mean_acc"] == [
        -d for d in top5["differences"]["l2w"]["mean_acc"]
    ]
    assert "Top-5 test accuracy" in (out / "results_top5.md").read_text()
    for label, entry in top5["methods"].items():
        top1_anytime = results["methods"][label]["anytime"][0]
        # Every exit's top-5 accuracy is at least its top-1, and strictly above it somewhere (10 classes).
        assert all(a5 >= a1 for a5, a1 in zip(entry["anytime"][0], top1_anytime))
        assert any(a5 > a1 for a5, a1 in zip(entry["anytime"][0], top1_anytime))
        assert (out / f"{label}-s0" / "eval" / "top5" / "budget.csv").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "baseline", "nope"], "unknown training method 'nope'"),
        (["--methods", "baseline", "l2w", "--method-option", "l2w:qq=1"], "unknown option 'qq'"),
        (["--methods", "l2w", "--method-option", "l2w:q=-1"], "`q` must be"),
        (["--methods", "baseline", "--method-option", "l2w:q=0.5"], "'l2w' is not among --methods"),
        (["--methods", "baseline", "baseline"], "more than once"),
        (["--methods", "keras_ee.training.methods:Nope"], "has no attribute 'Nope'"),
    ],
)
def test_bad_methods_and_options_fail_before_training(bench, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert bench.main(TINY + argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing trained, nothing written


def test_method_option_syntax(bench):
    assert bench.parse_method_option("l2w:q=0.5") == ("l2w", "q", 0.5)
    assert bench.parse_method_option("l2w:weighting=frozen") == ("l2w", "weighting", "frozen")
    assert bench.parse_method_option("pkg.mod:Cls:path=a:b=c") == ("pkg.mod:Cls", "path", "a:b=c")
    assert bench.parse_method_entry("l2w_q05=l2w") == ("l2w_q05", "l2w")
    assert bench.parse_method_entry("pkg.mod:Cls") == ("pkg.mod:Cls", "pkg.mod:Cls")
    with pytest.raises(Exception, match="METHOD:KEY=VALUE"):
        bench.parse_method_option("q=0.5")


def test_epoch_seconds_per_phase(bench, tmp_path):
    # Phase I: epochs 0-2, phase II: epochs 3-4 (counted on); each phase's first epoch traces.
    times = {"0": 10.0, "1": 5.0, "2": 7.0, "3": 8.0, "4": 2.0}
    (tmp_path / bench.EPOCH_TIMES_FILE).write_text(json.dumps({"epoch_seconds": times, "traced": [0, 3]}))
    one = bench.epoch_seconds(tmp_path, 3)  # a one-phase reading of the same file: the first 3 epochs, no phases
    assert one["per_epoch"] == [10.0, 5.0, 7.0] and one["steady"] == 6.0 and "phases" not in one
    two = bench.epoch_seconds(tmp_path, [3, 2])
    assert two["per_epoch"] == [10.0, 5.0, 7.0, 8.0, 2.0] and two["steady"] == pytest.approx(14 / 3)
    assert two["phases"] == [{"epochs": 3, "steady": 6.0, "first": 10.0}, {"epochs": 2, "steady": 2.0, "first": 8.0}]
    assert bench.epoch_seconds(tmp_path, [3, 3])["source"] == "none"  # phase II's last epoch missing


def test_two_phase_method_times_every_phase(bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench.main(TINY + ["--methods", "baseline", "imta", "--out", str(out)]) == 0  # IMTA: 1 + 1 epochs
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    imta, baseline = results["methods"]["imta"], results["methods"]["baseline"]
    assert imta["phases"] == [{"name": "phase_1", "epochs": 1}, {"name": "phase_2", "epochs": 1}]
    assert imta["epochs"] == 2 and len(imta["epoch_seconds"][0]) == 2 and imta["traced_epochs"] == [[0, 1]]
    assert len(imta["phase_seconds_per_epoch"][0]) == 2 and all(t > 0 for t in imta["phase_seconds_per_epoch"][0])
    assert "phases" not in baseline and len(baseline["epoch_seconds"][0]) == 1
    table = (out / "results.md").read_text()
    assert "the 1 epoch above is phase I and later phases add their own (imta: phase II 1 epoch)" in table
    rows = {r.split("|")[1].strip(): r for r in table.splitlines() if r.startswith("| ")}
    assert rows["imta"].count(" (I) / ") == 2 and rows["imta"].count(" (II) |") == 2  # s/epoch and 1st epoch s
    assert "(I)" not in rows["baseline"]


def test_a_method_with_its_own_confidence_gets_a_row_per_score(bench, tmp_path, capsys):
    out = tmp_path / "out"
    argv = TINY + ["--methods", "baseline", "gating", "--method-option", "gating:gater_width=16", "--out", str(out)]
    assert bench.main(argv) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["baseline", "gating", "gating [gater]"]
    same, gater = results["methods"]["gating"], results["methods"]["gating [gater]"]
    assert gater["runs"] == same["runs"] and gater["anytime"] == same["anytime"]  # the same runs, other thresholds
    assert gater["budget_acc"] != same["budget_acc"]
    assert set(results["differences"]) == {"gating", "gating [gater]"}
    rows = [r.split("|")[1].strip() for r in (out / "results.md").read_text().splitlines() if r.startswith("| ")]
    assert any(r.startswith("gating [gater]") for r in rows)


def test_a_run_folder_in_use_is_one_line_not_a_traceback(bench, tmp_path, capsys):
    from keras_ee import runs

    out = tmp_path / "out"
    (out / "baseline-s0").mkdir(parents=True)
    with runs.RunLock(out / "baseline-s0"):  # another command training into it
        assert bench.main(TINY + ["--methods", "baseline", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench/methods.py: error: run folder") and "is in use by" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
