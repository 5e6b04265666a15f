"""bench/primitive_cache.py: bad options are refused up front with one line naming the option."""

import bench_scripts
import pytest


@pytest.fixture(scope="module")
def bench():
    return bench_scripts.load("primitive_cache")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--batch", "0"], "--batch must be at least 1; received 0"),
        (["--timed", "-3"], "--timed must be at least 1; received -3"),
        (
            ["--capacity", "-1"],
            "--capacity must be 0 (keras_ee's default) or a positive number of entries; received -1",
        ),
        (["--fraction", "1.5"], "--fraction must lie strictly between 0 and 1; received 1.5"),
    ],
)
def test_bad_options_are_refused_before_any_worker_starts(bench, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_survivor_shapes_counts_each_stage_and_count_once(bench):
    # exits 1-based: a sample leaving at exit e entered stages 0..e-1
    exits = [[1, 2, 3], [3, 3, 1], [2, 1, 3]]
    # stage 0: 3 samples in every batch; stage 1: 2, 2, 2; stage 2: 1, 2, 1
    assert bench._survivor_shapes(exits, 3) == 4
