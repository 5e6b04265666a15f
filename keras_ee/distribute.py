"""Distributed training: the `tf.distribute` strategies of `--strategy`, who writes the run
folder, Keras 3's multi-worker `fit` workaround, and the dtype policy of `--precision`.

Under a strategy the model, its method and every optimizer are built under `strategy.scope()`
and `fit` distributes the global batches, which the replicas share evenly. Under
`multi_worker` only the chief (worker 0, or the `chief` task) writes the run folder
(`is_chief`); `keras_ee.experiment.train` runs every other worker in a temporary folder of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from keras_ee.config import STRATEGIES

if TYPE_CHECKING:
    from keras_ee.training import MultiExitModel

# One strategy of each kind per process: TensorFlow configures a cluster or a TPU once, and
# numbers the collective operations of every new (MultiWorker)MirroredStrategy from the same
# keys, so a second one's collectives would collide with the first's (see
# `training.model.check_collective_strategy`).
_STRATEGIES: dict[str, Any] = {}


def make_strategy(name: str) -> Any:
    """The `tf.distribute` strategy of `config.strategy`, or None for `none` (one device).

    - `mirrored`: `MirroredStrategy` over every visible GPU; without a GPU, over every
      logical CPU device (one unless `tf.config.set_logical_device_configuration` made more).
    - `multi_worker`: `MultiWorkerMirroredStrategy`, the cluster read from `TF_CONFIG`
      (checked first). Create it before any other TensorFlow op of the process.
    - `tpu`: `TPUStrategy` on the TPU that `TPUClusterResolver` finds.

    Under a strategy the configured batch size is the global batch. Every kind is made once
    per process and returned again: runs that train one after the other in a process (a
    notebook trying baseline, then L2W) share it.
    """
    if name == "none":
        return None
    if name in _STRATEGIES:
        return _STRATEGIES[name]
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    elif name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ValueError(
                f"--strategy tpu: no TPU found ({reason}); expected a TPU VM or a TPU named by TPU_NAME."
            ) from None
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}; received {name!r}.")
    _STRATEGIES[name] = strategy
    return strategy


def check_tf_config(text: str | None) -> dict:
    """The parsed `TF_CONFIG` of a multi-worker run, or a one-line `ValueError` saying what is wrong."""
    example = (
        'expected e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
    )
    if not text:
        raise ValueError(
            f"--strategy multi_worker needs the TF_CONFIG environment variable, which is not set; {example}."
        )
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e.msg}); {example}.") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise ValueError(f"TF_CONFIG has no cluster with workers (received {text!r}); {example}.")
    if any(not isinstance(v, list) or not all(isinstance(a, str) and ":" in a for a in v) for v in cluster.values()):
        raise ValueError(
            f"TF_CONFIG's cluster must map task types to lists of 'host:port' (received {cluster!r}); {example}."
        )
    kind, index = (task.get("type"), task.get("index")) if isinstance(task, dict) else (None, None)
    if (
        kind not in cluster
        or isinstance(index, bool)
        or not isinstance(index, int)
        or not (0 <= index < len(cluster[kind]))
    ):
        raise ValueError(
            f"TF_CONFIG's task must name a type of the cluster and an index in it (received {task!r}); {example}."
        )
    return tf_config


def is_chief(strategy: Any) -> bool:
    """Whether this process writes the run folder: always, except on a multi-worker cluster's non-chiefs."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if strategy is None or resolver is None or not _is_multi_worker(strategy):
        return True
    kind, index = resolver.task_type, resolver.task_id
    if kind in (None, "chief"):
        return True
    return kind == "worker" and index == 0 and "chief" not in resolver.cluster_spec().as_dict()


def _is_multi_worker(strategy: Any) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def needs_multi_worker_fit_workaround(strategy: Any) -> bool:
    """Whether `fit` under this strategy needs `apply_multi_worker_fit_workaround`.

    Keras 3 (3.15, pinned here, and the 3.x releases since the bug was filed) cannot `fit`
    under `MultiWorkerMirroredStrategy` with more than one worker: keras-team/keras#20585,
    tensorflow/tensorflow#72388. Only then, and only on Keras 3 whose TensorFlow trainer has
    the private hook the workaround replaces; check again when Keras is upgraded.
    """
    if strategy is None or not _is_multi_worker(strategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec()
    if sum(spec.num_tasks(kind) for kind in spec.jobs if kind in ("chief", "worker")) < 2:
        return False
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer  # Keras' private API: only where it applies

    return keras.version().startswith("3.") and hasattr(TensorFlowTrainer, "_maybe_symbolic_build")


def apply_multi_worker_fit_workaround(model: MultiExitModel, strategy: Any) -> None:
    """Work around Keras 3's two multi-worker `fit` failures on this `model` instance only.

    1. `TensorFlowTrainer._maybe_symbolic_build` reduces the first distributed batch, a
       tuple, with `strategy.reduce("MEAN", batch, axis=None)`, which the collective ops of
       several workers cannot take ("Attempt to convert a value (PerReplica:{...}) with an
       unsupported type"). The build only needs shapes: this one builds on the replica's
       own part of the batch.
    2. The train and test steps' logs are reduced with `strategy.reduce("MEAN", v, axis=0)`,
       which fails on scalars ("Invalid reduction dimension 0 for input with 0
       dimensions"): the steps here return each log with shape (1,), whose reduction is the
       replicas' mean, a scalar again.
    """

    def local_part(value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:  # as Keras: the first batch of the epoch iterator
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local_part, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def reducible(step: Any) -> Any:
        def step_with_reducible_logs(data: Any) -> dict[str, tf.Tensor]:
            return {k: tf.reshape(v, [1]) if len(v.shape) == 0 else v for k, v in step(data).items()}

        return step_with_reducible_logs

    model._maybe_symbolic_build = maybe_symbolic_build
    # This instance's steps only (the class keeps Keras' own).
    model.train_step = reducible(model.train_step)  # type: ignore[method-assign]
    model.test_step = reducible(model.test_step)  # type: ignore[method-assign]


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to `name` (`float32`, `mixed_float16`, `mixed_bfloat16`) inside."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
