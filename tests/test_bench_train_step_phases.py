"""bench/train_step.py: the IMTA phase workers run a step, and a tree without IMTA is refused in one line."""

import io
import json
import sys
import types
from pathlib import Path

import bench_scripts
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return bench_scripts.load("train_step")


def _messages(text, tag):
    return [json.loads(line[len(tag) :]) for line in text.splitlines() if line.startswith(tag)]


@pytest.mark.parametrize("method", ["imta_phase1", "imta_phase2", "papers_sgd"])
def test_imta_worker_times_steps(bench, method, monkeypatch, capsys):
    args = types.SimpleNamespace(
        expect_root=str(ROOT), model="multiexit_cnn", method=method, batch_size=4, warmup=1, jit=False
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"steps": 2}) + "\n" + json.dumps({"quit": True}) + "\n"))
    bench.worker(args)
    ready, timed = _messages(capsys.readouterr().out, bench._TAG)
    assert ready["ready"] and ready["keras_ee"].startswith(str(ROOT))
    assert len(ready["warmup_steps_s"]) == 1 and ready["memory_step_s"] > 0
    assert len(timed["steps_s"]) == 2 and all(t > 0 for t in timed["steps_s"])


def test_tree_without_imta_is_refused_in_one_line(bench, tmp_path):
    (tmp_path / "keras_ee").mkdir()
    (tmp_path / "keras_ee" / "__init__.py").write_text("")
    (tmp_path / "keras_ee" / "training.py").write_text("class Baseline: pass\nclass L2W: pass\n")
    bench._check_tree(str(tmp_path), ["baseline", "l2w"], "revision OLD")  # nothing IMTA asked: no check
    with pytest.raises(SystemExit) as e:
        bench._check_tree(str(tmp_path), ["l2w", "imta_phase2"], "revision OLD (abc)")
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert "revision OLD (abc) has no keras_ee.training.IMTA" in message and "imta_phase2" in message


def test_note_and_targets(bench):
    assert bench._note(["l2w"]) == (
        "one step = one loaded batch: Baseline takes one optimizer step on it, L2W two "
        "half-batch optimizer steps (each with its meta step)"
    )
    assert bench.TARGETS["imta_phase1"]["time"] == 1.1 and bench.TARGETS["imta_phase2"]["time"] == 0.6
