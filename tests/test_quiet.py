"""The command line starts quietly: TensorFlow's start-up lines are filtered, nothing else is."""

import os
import subprocess
import sys

from keras_ee import quiet


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_EE_DEBUG")}
    return {**env, **extra}


def test_a_command_prints_no_tensorflow_startup_lines():
    out = subprocess.run(
        [sys.executable, "-m", "keras_ee", "methods"], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "baseline:" in out.stdout
    assert out.stderr == ""


def test_the_filter_drops_only_the_startup_lines(capfd):
    with quiet.filtered_native_stderr():
        os.write(2, f"W0000 {quiet.STARTUP_NOISE[0]}\n".encode())
        os.write(2, b"a real error from C++\n")
        print("a Python warning", file=sys.stderr)
        os.write(2, f"I0000 port.cc:153] {quiet.STARTUP_NOISE[1]}. You may see ...\n".encode())
    err = capfd.readouterr().err
    # (capfd collects Python's and the descriptor's writes separately, so only the lines count)
    assert sorted(err.splitlines()) == ["a Python warning", "a real error from C++"]


def test_debug_or_a_users_log_level_leaves_tensorflow_alone(monkeypatch):
    for env in ({"KERAS_EE_DEBUG": "1"}, {"TF_CPP_MIN_LOG_LEVEL": "0"}):
        monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
        monkeypatch.delenv("KERAS_EE_DEBUG", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        before = list(sys.meta_path)
        quiet.quiet_tensorflow_startup()
        assert sys.meta_path == before
        assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == env.get("TF_CPP_MIN_LOG_LEVEL")
