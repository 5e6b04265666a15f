"""tf.distribute: under MirroredStrategy a method takes the step of one device on the same global batch.

The checks (`tests/distributed_check.py`) run a MirroredStrategy over the two logical CPU devices
that tests/conftest.py configures before TensorFlow initialises.
"""

import json

import distributed_check
import pytest


def run_check(what, *args):
    """`what`: a method name (`method_check`), "allocation" or "experiment"; `args` as on the
    script's command line (options as JSON, "--sync-batchnorm", the experiment's folder)."""
    if what == "allocation":
        return distributed_check.allocation_check()
    if what == "experiment":
        return distributed_check.experiment_check(str(args[0]))
    options = [a for a in args if a != "--sync-batchnorm"]
    return distributed_check.method_check(
        what, json.loads(options[0]) if options else {}, sync_bn="--sync-batchnorm" in args
    )


# Without the division by the replica count in `MultiExitModel.scale_loss`, baseline ends about
# 7 (relative) away from one device: two replicas take twice the step.
@pytest.mark.parametrize("method", ["baseline", "naive_dkd"])
def test_two_replicas_take_the_step_of_one_device(method):
    out = run_check(method)
    assert out["replicas"] == 2
    assert out["moved"] > 0.05  # the weights really trained
    assert out["max_relative_difference"] < 1e-4, out
    assert out["loss_two"] == pytest.approx(out["loss_one"], rel=1e-5)  # logged over the global batch


# The bilevel methods: optimizer steps inside conditions (`bilevel.replica_cond`), the auxiliary
# optimizers' gradients shared by the replicas (`bilevel.global_mean_gradients`), the look-ahead on
# the all-reduced gradient, L2W's allocation over the global meta batch and HDKD's meta means over
# it. With the global batch fed so that the replicas' halves make up the one-device halves, each is
# then the one-device computation on the same samples, summed in another order: measured (2026-12)
# backbone ~2e-7 and auxiliary ~2e-5 of their movement (the auxiliary Adam divides by tiny second
# moments). Each fix missing leaves L2W's WPN 0.17-1.2 of its movement away, so 1e-3 separates them.
@pytest.mark.parametrize(
    "method, options",
    [
        ("l2w", {}),  # half-batch exchange, meta step every batch, WPN Adam
        ("gating", {"gater_interval": 2}),  # gater batches (halves) and backbone batches, 2 of each
        ("hdkd", {}),  # a meta stream, gamma
    ],
    ids=["l2w", "gating", "hdkd"],
)
def test_bilevel_methods_train_under_mirrored_strategy_as_on_one_device(method, options):
    out = run_check(method, json.dumps(options))
    assert out["replicas"] == 2 and out["aux_replicas"] == 2
    assert out["moved"] > 0.05 and out["aux_moved"] > 0  # both networks trained
    assert out["aux_replica_spread"] == 0.0, out  # one auxiliary network: the same on every replica
    assert out["difference_over_moved"] < 1e-4, out
    assert out["aux_difference_over_moved"] < 1e-3, out
    assert out["loss_two"] == pytest.approx(out["loss_one"], rel=1e-5)


def test_allocation_over_replicas_is_the_allocation_of_the_concatenated_batch():
    out = run_check("allocation")
    assert out["replicas"] == 2 and out["sizes"] == [5, 7]
    for q, result in out["results"].items():
        assert result["equal"], (q, result)
        assert result["shapes"] == [5, 7]
    assert any(result["alone_differs"] for result in out["results"].values())  # the gather mattered


# IMTA under MirroredStrategy, both phases (phase II with a new optimizer, the teacher snapshot
# assigned in the cross-replica context). Without inline collaboration the model is BN-free, so
# the replicas take the one-device steps: measured (2026-12) 1.3e-7 of the movement (backbone)
# and 4e-8 (the teacher). The transfer paths have BatchNorm: with per-replica statistics the
# run ends 0.066 of its movement away from one device, with synchronized BN 1.4e-6.
@pytest.mark.parametrize(
    "options, sync_bn", [({"inline_collaboration": False}, False), ({}, True)], ids=["ge+ofa", "ge+isc+ofa-sync-bn"]
)
def test_imta_trains_under_mirrored_strategy_as_on_one_device(options, sync_bn):
    out = run_check("imta", json.dumps(options), *(["--sync-batchnorm"] if sync_bn else []))
    assert out["replicas"] == 2 and out["aux_replicas"] == 2
    assert out["moved"] > 0.05 and out["aux_moved"] > 0  # both phases trained, the teacher was set
    assert out["aux_replica_spread"] == 0.0, out  # the teacher: the same on every replica
    assert out["difference_over_moved"] < 1e-4, out
    assert out["aux_difference_over_moved"] < 1e-4, out
    assert out["loss_two"] == pytest.approx(out["loss_one"], rel=1e-5)


# L2W's step on IMTA's network, both phases (~1-2.5 min on the shared 2-core machine). Measured
# (2026-12, synchronized BN in the transfer paths): backbone 4.7e-5 of its movement, WPN 1.6e-7,
# the WPN the same on both replicas.
@pytest.mark.slow
def test_l2w_imta_trains_under_mirrored_strategy_as_on_one_device():
    out = run_check("l2w_imta", "{}", "--sync-batchnorm")
    assert out["replicas"] == 2 and out["aux_replicas"] == 2
    assert out["moved"] > 0.05 and out["aux_moved"] > 0
    assert out["aux_replica_spread"] == 0.0, out
    assert out["difference_over_moved"] < 1e-3, out
    assert out["aux_difference_over_moved"] < 1e-3, out
    assert out["loss_two"] == pytest.approx(out["loss_one"], rel=1e-5)


# Synchronized BatchNorm (`synchronized_batchnorm=True`, `--sync-batchnorm`): a
# multiexit_cnn with a conv-BN-ReLU unit per stage ends with the one-device weights and moving
# statistics. Measured (2026-12): 2.9e-7 of the movement; per-replica BN ends 0.027 away.
@pytest.mark.parametrize("sync_bn", [True, False], ids=["synchronized", "per-replica"])
def test_synchronized_batchnorm_normalises_the_global_batch(sync_bn):
    out = run_check("sync_bn", "{}", *(["--sync-batchnorm"] if sync_bn else []))
    assert out["replicas"] == 2 and out["moved"] > 0.05 and out["stats_moved"] > 0.01, out
    if sync_bn:
        assert out["difference_over_moved"] < 1e-5, out
        assert out["stats_difference"] < 1e-5, out
        assert out["loss_two"] == pytest.approx(out["loss_one"], rel=1e-6)
    else:  # the test can tell: each replica's own statistics differ from the global batch's
        assert out["difference_over_moved"] > 1e-3, out


# `experiment.train(config)` with `strategy="mirrored"` (what `keras-ee train --strategy mirrored`
# runs) on two logical CPUs: L2W on a BatchNorm multiexit_cnn, 2 epochs; interrupted after epoch 1
# and resumed by the same call, it ends exactly where the uninterrupted run ends.
def test_experiment_train_under_mirrored_strategy_resumes_exactly(tmp_path):
    out = run_check("experiment", str(tmp_path))
    assert out["replicas"] == [2, 2] and out["strategy"] == ["mirrored", "mirrored"], out
    assert out["interrupted"] and out["resumed_at_epoch"] == 1 and out["history_rows"] == 2, out
    assert out["max_difference"] == 0.0, out
    assert out["dtype_policy"] == "float32", out
