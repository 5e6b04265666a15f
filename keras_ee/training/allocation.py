"""Meta-data allocation by a budget controller q (L2W-DEN, Sec. 3.2).

Samples of a batch are assigned to exits the way dynamic inference would
assign them: exit k takes `floor(n * f_k)` of the samples not yet taken,
the most confident at exit k first, with geometric fractions
`f_k = q^k / sum_j q^j`; the last exit takes every sample left. The fractions
are the calibrator's (`keras_ee.calibration.geometric_fractions`, one
implementation for both), so training allocates exactly the counts that the
budget sweep calibrates with.
"""

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from keras_ee._typing import Tensor
from keras_ee.calibration import geometric_fractions


def allocate_by_confidence(confidence: Tensor, q: float) -> Tensor:
    """Allocate each sample of a batch to one exit, as early exiting would.

    Exit k (k < K) takes `floor(n * f_k)` of the samples that have not been
    taken by an earlier exit, the most confident at exit k first (ties: the
    lower batch index first); the last exit takes the rest.

    Args:
        confidence: `(n, K)` tensor of per-exit confidences (e.g. max softmax
            probability). Treated as a constant (no gradient).
        q: budget controller, a positive finite number.

    Returns:
        A `(n, K)` float tensor (confidence's dtype), one-hot per row: the
        allocation mask.

    Example:
    >>> mask = allocate_by_confidence(exit_confidence(logits), q=0.75)
    """
    confidence = tf.stop_gradient(tf.convert_to_tensor(confidence))
    if confidence.shape.rank != 2:
        raise ValueError(f"`confidence` must have shape (batch, num_exits); received shape {confidence.shape}.")
    num_exits = confidence.shape[1]
    if num_exits is None:
        raise ValueError("The number of exits (axis 1) must be static.")
    dtype = confidence.dtype
    fractions = geometric_fractions(q, int(num_exits))
    n = tf.shape(confidence)[0]
    n_f = tf.cast(n, tf.float64)
    available = tf.ones([n], dtype=tf.bool)
    columns = []
    for k in range(num_exits - 1):
        count = tf.cast(tf.floor(n_f * fractions[k]), tf.int32)
        score = tf.where(
            available,
            tf.cast(confidence[:, k], tf.float64),
            tf.constant(-np.inf, tf.float64),
        )
        # Rank of every sample by descending score (stable: index breaks ties).
        order = tf.argsort(-score, stable=True)
        rank = tf.scatter_nd(order[:, None], tf.range(n, dtype=tf.int32), shape=[n])
        taken = tf.logical_and(rank < count, available)
        columns.append(taken)
        available = tf.logical_and(available, tf.logical_not(taken))
    columns.append(available)
    return tf.cast(tf.stack(columns, axis=1), dtype)


def allocate_by_confidence_across_replicas(confidence: Tensor, q: float) -> Tensor:
    """`allocate_by_confidence` over the global batch, under `tf.distribute`: this replica's rows.

    In a replica context with more than one replica in sync, the confidences (and the
    replicas' batch sizes, which may differ) are gathered from every replica
    (`all_gather`, in replica order), the whole global batch is allocated at once, and the
    rows of this replica are returned: the mask is that of one device on the concatenated
    batch. Without a strategy (or with one replica) this is `allocate_by_confidence`.
    """
    ctx = tf.distribute.get_replica_context() if tf.distribute.has_strategy() else None
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return allocate_by_confidence(confidence, q)
    confidence = tf.stop_gradient(tf.convert_to_tensor(confidence))
    size = tf.shape(confidence)[:1]
    sizes = ctx.all_gather(size, axis=0)
    # (the gather may lose the static number of exits)
    everything = tf.reshape(ctx.all_gather(confidence, axis=0), [-1, confidence.shape[1]])
    mask = allocate_by_confidence(everything, q)
    replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    start = tf.reduce_sum(sizes[:replica])
    return mask[start : start + size[0]]


def allocate_by_confidence_numpy(confidence: npt.ArrayLike, q: float) -> np.ndarray:
    """NumPy version of `allocate_by_confidence` returning exit indices.

    Returns:
        An int array of shape `(n,)`: the 0-based exit of every sample.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.ndim != 2:
        raise ValueError(f"`confidence` must have shape (batch, num_exits); received shape {confidence.shape}.")
    n, num_exits = confidence.shape
    fractions = geometric_fractions(q, int(num_exits))
    exit_of = np.full(n, num_exits - 1, dtype=np.int64)
    available = np.ones(n, dtype=bool)
    for k in range(num_exits - 1):
        count = int(np.floor(n * fractions[k]))
        idx = np.flatnonzero(available)
        order = idx[np.argsort(-confidence[idx, k], kind="stable")]
        chosen = order[:count]
        exit_of[chosen] = k
        available[chosen] = False
    return exit_of
