"""tf.distribute beyond one process: a two-worker MultiWorkerMirroredStrategy on localhost, and
`keras.callbacks.BackupAndRestore` resuming a fit under MirroredStrategy.

The two-worker checks run `tests/multiworker_check.py` in fresh processes (CPU only): a
MultiWorkerMirroredStrategy must be created before TensorFlow initialises, which pytest's process has
already done. The MirroredStrategy resume runs here, on the two logical CPUs of tests/conftest.py.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "multiworker_check.py"
TIMEOUT = 300


def env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", **extra}


def free_ports(n):
    """`n` distinct free localhost ports (bound to port 0 together, then released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_workers(method, tmp_path, mode="worker", extra=(), tag=""):
    """Two workers of a localhost cluster running `multiworker_check.py MODE METHOD worker_r.npz EXTRA`."""
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs, outs = [], []
    try:
        for index in range(2):
            out = tmp_path / f"worker_{index}{tag}.npz"
            log = open(tmp_path / f"worker_{index}{tag}.log", "w")
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, str(CHECK), mode, method, str(out), *extra],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                        env=env(TF_CONFIG=tf_config),
                    ),
                    log,
                )
            )
            outs.append(out)
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            log.close()
    for index, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"worker_{index}{tag}.log").read_text()[-3000:]
    return [dict(np.load(out)) if out.exists() else {} for out in outs]  # none from an interrupted run


def run_single(method, tmp_path):
    """The same training on one device (the default strategy), in this process."""
    import multiworker_check

    out = tmp_path / "single.npz"
    multiworker_check.worker(method, str(out), single=True)
    return dict(np.load(out))


def largest(a, b, prefix):
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys == sorted(k for k in b if k.startswith(prefix))
    return max((float(np.max(np.abs(a[k] - b[k]))) for k in keys), default=0.0)


# Keras 3.15 cannot `fit` under MultiWorkerMirroredStrategy as it is (keras-team/keras#20585):
# the check applies the library's workaround (`distribute.apply_multi_worker_fit_workaround`). Both workers
# build the same global dataset; fit shards it, worker r taking rows [8r, 8r + 8) of each global
# batch of 16. Measured (2026-12, 2-core machine, ~25-35 s each): the two workers end 0.0 apart
# (backbone moved 0.2-0.5, the WPN the same on both) and 6e-8 (baseline) / 1.2e-7 (L2W; WPN
# 3e-8) from one device on the same global batches, fed permuted as in distributed_check.py so
# that L2W's global halves are the one-device halves.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["baseline", "l2w"])
def test_two_workers_end_with_identical_weights(method, tmp_path):
    results = run_workers(method, tmp_path)
    single = run_single(method, tmp_path)
    to_single = largest(results[0], single, "w")
    aux_to_single = largest(results[0], single, "a")
    aux_spread = largest(results[0], results[1], "a")
    print(f"{method}: one device {to_single:.3g} (aux {aux_to_single:.3g}) away, aux spread {aux_spread:.3g}")
    assert [int(r["replicas"]) for r in results] == [2, 2]
    keys = sorted(k for k in results[0] if k.startswith("w"))
    assert keys and keys == sorted(k for k in results[1] if k.startswith("w"))
    difference = max(float(np.max(np.abs(results[0][k] - results[1][k]))) for k in keys)
    moved = max(float(np.max(np.abs(results[0][k] - results[0]["i" + k[1:]]))) for k in keys)
    print(f"{method}: workers {difference:.3g} apart, moved {moved:.3g}")
    assert difference <= 1e-6, difference
    assert moved > 0.05, moved
    assert aux_spread <= 1e-6, aux_spread  # one auxiliary network on every worker
    assert to_single < 1e-5 and aux_to_single < 1e-5, (to_single, aux_to_single)
    assert float(results[0]["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
    assert float(results[0]["loss"]) == pytest.approx(float(results[1]["loss"]), rel=1e-6)


# `experiment.train` with strategy="multi_worker" (`keras-ee train --strategy multi_worker`), both
# workers given the same run folder: the workaround applied by the library, only the chief writing
# the folder, and both workers ending with the same weights, BN moving statistics included: with
# --sync-batchnorm (measured 2026-12: per-replica BN leaves the workers' moving statistics up to 0.012
# apart, every trainable weight 0.0 apart).
@pytest.mark.slow
def test_experiment_train_on_two_workers_ends_with_identical_weights(tmp_path):
    # Interrupted at the start of epoch 1 on both workers, then the same command again: the chief
    # resumes from its backup, the other worker from the chief's.
    run = tmp_path / "run"
    run_workers(str(run), tmp_path, mode="experiment", extra=["1"], tag="_stopped")
    assert (run / "backup").is_dir() and not (run / "model.keras").exists()
    resumed = run_workers(str(run), tmp_path, mode="experiment", tag="_resumed")
    keys = sorted(k for k in resumed[0] if k.startswith("w"))
    assert keys and keys == sorted(k for k in resumed[1] if k.startswith("w"))
    difference = max(float(np.max(np.abs(resumed[0][k] - resumed[1][k]))) for k in keys)
    assert difference <= 1e-6, difference
    state = json.loads((run / "state.json").read_text())
    assert state["trained"] and state["strategy"] == "multi_worker" and state["replicas"] == 2, state
    assert state["resumed_at_epoch"] == 1, state
    assert (run / "model.keras").is_file() and not (run / "backup").exists()
    assert json.loads((run / "config.json").read_text())["strategy"] == "multi_worker"
    # Only the chief wrote it: one history row per epoch, no file of the other worker.
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [
            ".keras-ee.json",
            ".lock",
            "config.json",
            "costs.json",
            "dump",
            "history.csv",
            "model.keras",
            "preprocessing.json",
            "state.json",
            "tensorboard",
        ]
    )
    # A finished run whose model.keras is damaged: every worker must see it and train again from
    # the start (before, the other worker trusted state.json and left, and the chief, retraining
    # alone, died in its first collective with "tasks are unhealthy (stopped sending heartbeats)").
    # That retraining is an uninterrupted run: the resumed one must have ended where it ends.
    model_file = run / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    retrained = run_workers(str(run), tmp_path, mode="experiment", tag="_damaged")
    assert "is damaged" in (tmp_path / "worker_0_damaged.log").read_text()
    state = json.loads((run / "state.json").read_text())
    assert state["trained"] and not state.get("resumed_at_epoch"), state
    assert len((run / "history.csv").read_text().strip().splitlines()) == 3
    for r in retrained:
        assert max(float(np.max(np.abs(r[k] - retrained[0][k]))) for k in keys) <= 1e-6
    for r in resumed:
        assert max(float(np.max(np.abs(r[k] - retrained[0][k]))) for k in keys) <= 1e-6


def run_resume(method, tmp_path):
    """In this process: MirroredStrategy over the two logical CPUs of tests/conftest.py."""
    import multiworker_check

    return multiworker_check.resume(method, str(tmp_path / "backup"))


# Measured (2026-12): the resumed run ends 0.0 from the uninterrupted one, backbone and (L2W) WPN
# with its Adam state: `BackupAndRestore` saves the whole model, the method's variables included.
# baseline ~15 s, l2w ~60 s.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["baseline", "l2w"])
def test_backup_and_restore_resumes_under_mirrored_strategy(method, tmp_path):
    out = run_resume(method, tmp_path)
    assert out["replicas"] == 2
    assert out["interrupted"] and out["backed_up"], out  # stopped at epoch 1 with a backup
    assert out["resumed_epochs"] == [1, 2], out  # the resumed fit skipped epoch 0
    assert out["moved_in_epoch_0"] > 0 and out["moved"] > 0.05, out
    assert out["optimizer_iterations"][0] == out["optimizer_iterations"][1], out
    assert out["max_difference"] < 1e-5, out
    if "aux_difference" in out:  # L2W: the WPN (and its Adam state) restored too
        assert out["aux_moved"] > 0 and out["aux_difference"] < 1e-5, out
