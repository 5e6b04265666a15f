"""Distributed tuning: a chief and two workers on localhost, and the checks of the three variables."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import TWO_EXIT_CNN

from keras_ee.config import TrainConfig
from tuning import distributed, search

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"KERASTUNER_TUNER_ID": "tuner0", "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": "8000"}


@pytest.mark.parametrize("missing", distributed.VARIABLES)
def test_each_missing_variable_is_named(missing):
    env = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ValueError, match=f"{missing} is not set; expected"):
        distributed.role_from_env(env)
    with pytest.raises(ValueError, match=f"{missing} is empty"):
        distributed.role_from_env({**env, missing: " "})


@pytest.mark.parametrize(
    "name,value,problem",
    [
        ("KERASTUNER_ORACLE_PORT", "80x", "'80x', not an integer"),
        ("KERASTUNER_ORACLE_PORT", "0", "0, out of range"),
        ("KERASTUNER_ORACLE_PORT", "70000", "70000, out of range"),
        ("KERASTUNER_TUNER_ID", "mischief", "'mischief'"),  # keras-tuner would take it for the chief
        ("KERASTUNER_TUNER_ID", "tuner 0", "'tuner 0'"),
        ("KERASTUNER_ORACLE_IP", "127.0.0.1:8000", "'127.0.0.1:8000' (a port goes in KERASTUNER_ORACLE_PORT"),
        ("KERASTUNER_ORACLE_IP", "http://host", "'http://host'"),
    ],
)
def test_malformed_values_are_refused_with_the_expected_form(name, value, problem):
    with pytest.raises(ValueError, match="expected") as info:
        distributed.role_from_env({**GOOD, name: value})
    assert f"{name} is {problem}" in str(info.value) and "\n" not in str(info.value)


def test_good_values_give_the_role_and_are_exported():
    worker = distributed.role_from_env({**GOOD, "KERASTUNER_ORACLE_PORT": " 8000 "})
    assert worker == distributed.Role("tuner0", "127.0.0.1", 8000) and not worker.is_chief
    chief = distributed.role_from_env({**GOOD, "KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": "[::1]"})
    assert chief.is_chief and chief.address == "[::1]:8000"
    env = {}
    worker.export(env)
    assert env == GOOD


def test_the_role_environment_is_restored_after_the_search(monkeypatch):
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "before")
    monkeypatch.delenv("KERASTUNER_ORACLE_IP", raising=False)
    with distributed.Role("chief", "127.0.0.1", 8000).environment():
        assert (os.environ["KERASTUNER_TUNER_ID"], os.environ["KERASTUNER_ORACLE_PORT"]) == ("chief", "8000")
    assert os.environ["KERASTUNER_TUNER_ID"] == "before" and "KERASTUNER_ORACLE_IP" not in os.environ


def test_cli_refuses_distributed_without_the_variables(monkeypatch, capsys):
    for name in distributed.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "not-a-port")
    assert search.main(["--distributed", "--method", "l2w"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuning.search: error: --distributed: KERASTUNER_ORACLE_IP is not set; expected")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    assert search.main(["--distributed", "--method", "l2w"]) == 2
    assert "KERASTUNER_ORACLE_PORT is 'not-a-port', not an integer" in capsys.readouterr().err


def test_a_local_search_refuses_stray_keras_tuner_variables(monkeypatch, capsys, tmp_path):
    # keras-tuner would silently go distributed (and wait an hour for a chief): say so instead.
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    assert search.main(["--method", "l2w", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "KERASTUNER_ORACLE_IP is set" in err and "--distributed" in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_config(path):
    # gating: the cheapest method with a search space (lambda, temperature) to trace and train
    TrainConfig(
        dataset="digits",
        model_options=TWO_EXIT_CNN,
        train_size=160,
        val_size=96,
        epochs=1,
        batch_size=64,
        method="gating",
    ).to_json(path)
    return path


def _env(**extra):
    return {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        **extra,
    }


@pytest.mark.slow
def test_a_chief_that_cannot_listen_says_so(tmp_path):
    with socket.socket() as taken:  # no SO_REUSEPORT: gRPC cannot bind next to it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = _env(
            KERASTUNER_TUNER_ID="chief",
            KERASTUNER_ORACLE_IP="127.0.0.1",
            KERASTUNER_ORACLE_PORT=str(taken.getsockname()[1]),
        )
        config = _tiny_config(tmp_path / "c.json")
        argv = [
            sys.executable,
            "-m",
            "tuning.search",
            "--distributed",
            "--config",
            str(config),
            "--tuner",
            "random",
            "--trials",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "tuning.search: error: --distributed: the chief cannot listen on 127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "best.json").exists()


@pytest.mark.slow
def test_a_worker_with_another_method_than_the_chief_is_refused(tmp_path):
    env = _env(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(_free_port()))
    config = str(_tiny_config(tmp_path / "c.json"))  # gating: lambda, temperature
    common = ["--distributed", "--config", config, "--tuner", "random", "--trials", "2", "--out", str(tmp_path / "out")]
    chief = subprocess.Popen(
        [sys.executable, "-m", "tuning.search", *common],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**env, "KERASTUNER_TUNER_ID": "chief"},
    )
    try:
        worker = subprocess.run(
            [sys.executable, "-m", "tuning.search", *common, "--method", "l2w"],
            cwd=ROOT,
            env={**env, "KERASTUNER_TUNER_ID": "tuner0"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        chief.kill()  # no worker ran its trials: the chief would wait for one
        chief.wait(timeout=30)
    assert worker.returncode == 2, worker.stdout + worker.stderr
    assert (
        "the chief at 127.0.0.1:" in worker.stderr
        and "searches ['lambda', 'temperature'], but this worker's method 'l2w' searches ['delta', 'q']"
        in worker.stderr
        and "Traceback" not in worker.stderr
    )
    assert not list(tmp_path.rglob("checkpoint.weights.h5"))


def _wait_for(predicate, procs, deadline, what):
    while not predicate():
        dead = [p for p in procs if p.poll() is not None and p.returncode != 0]
        if dead or time.monotonic() > deadline:
            raise AssertionError(f"timed out or a process failed while waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_chief_and_two_workers_split_the_trials_and_best_json_is_written_once(tmp_path):
    trials = 4
    config = _tiny_config(tmp_path / "base.json")
    shared, own = tmp_path / "shared", tmp_path / "worker1_only"  # worker1: as on a machine of its own
    port = _free_port()
    base_env = _env(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port))
    logs, procs = {}, {}

    def start(tuner_id, out):
        logs[tuner_id] = tmp_path / f"{tuner_id}.log"
        argv = [
            sys.executable,
            "-m",
            "tuning.search",
            "--distributed",
            "--config",
            str(config),
            "--tuner",
            "random",
            "--trials",
            str(trials),
            "--out",
            str(out),
        ]
        with open(logs[tuner_id], "w") as log:
            procs[tuner_id] = subprocess.Popen(
                argv, cwd=ROOT, env={**base_env, "KERASTUNER_TUNER_ID": tuner_id}, stdout=log, stderr=subprocess.STDOUT
            )

    def text(tuner_id):
        return logs[tuner_id].read_text()

    deadline = time.monotonic() + 420
    try:
        # The workers first: they block on the chief's address, so both are waiting when it starts serving.
        start("tuner0", shared)
        start("tuner1", own)
        _wait_for(
            lambda: all("waiting for trials" in text(t) for t in ("tuner0", "tuner1")),
            list(procs.values()),
            deadline,
            "the workers",
        )
        start("chief", shared)
        for proc in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (AssertionError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"{e}\n" + "\n".join(f"--- {t}:\n{text(t)[-3000:]}" for t in logs))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    outputs = {t: text(t) for t in logs}
    assert {t: p.returncode for t, p in procs.items()} == {"chief": 0, "tuner0": 0, "tuner1": 0}, outputs

    # The chief's oracle gave out and scored exactly the requested trials ...
    records = {
        json.loads(p.read_text())["trial_id"]: json.loads(p.read_text())
        for p in (shared / "gating").glob("trial_*/trial.json")
    }
    assert len(records) == trials and all(r["status"] == "COMPLETED" for r in records.values())
    # ... split between the two workers, each trial run by one of them.
    ran = {
        t: [line.split()[2] for line in outputs[t].splitlines() if line.startswith(f"{t}: trial ")]
        for t in ("tuner0", "tuner1")
    }
    assert all(ran.values()), ran
    assert sorted(ran["tuner0"] + ran["tuner1"]) == sorted(records), ran
    assert f"tuner1: done, ran {len(ran['tuner1'])} trial(s)" in outputs["tuner1"]
    # worker1 wrote its own trials' checkpoints in its own folder, the chief's records need nothing from it.
    assert sorted(
        p.parent.name[len("trial_") :] for p in (own / "gating").glob("trial_*/checkpoint.weights.h5")
    ) == sorted(ran["tuner1"])

    # best.json: written once, by the chief, after the search; the workers wrote none.
    assert list(tmp_path.rglob("best.json")) == [shared / "best.json"]
    assert outputs["chief"].count("wrote ") == 1 and "best.json" not in outputs["tuner0"] + outputs["tuner1"]
    best = TrainConfig.from_file(shared / "best.json")
    top = max(records.values(), key=lambda r: r["score"])
    assert best.method == "gating" and best.train_size == 160
    assert best.method_options == pytest.approx(top["hyperparameters"]["values"])
    ranking = [line.split() for line in outputs["chief"].splitlines() if line[:4].strip().isdigit()]
    assert len(ranking) == trials and float(ranking[0][1]) == pytest.approx(100 * top["score"], abs=0.01)
