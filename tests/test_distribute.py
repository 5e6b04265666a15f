"""tf.distribute: under MirroredStrategy a method takes the step of one device on the same global batch.

Two logical CPU devices must be configured before TensorFlow initialises, so each check runs
`tests/distributed_check.py` in a fresh process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_check(method):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed_check.py"), method],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Without the division by the replica count in `MultiExitModel.scale_loss`, baseline ends about
# 7 (relative) away from one device: two replicas take twice the step.
@pytest.mark.parametrize("method", ["baseline", "naive_dkd"])
def test_two_replicas_take_the_step_of_one_device(method):
    out = run_check(method)
    assert out["replicas"] == 2
    assert out["moved"] > 0.05  # the weights really trained
    assert out["max_relative_difference"] < 1e-4, out
    assert out["loss_two"] == pytest.approx(out["loss_one"], rel=1e-5)  # logged over the global batch
