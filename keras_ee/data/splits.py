"""Index arithmetic for dataset splits: stratified hold-out, long-tailed subsampling.

Everything here works on integer label vectors with NumPy and is independent of
TensorFlow, so it is cheap to test and to reuse.
"""

import numbers

import numpy as np
import numpy.typing as npt

from keras_ee import validation as v


def resolve_size(size: float, total: int, what: str = "val_size", most: int | None = None, why: str = "") -> int:
    """Turns an absolute count or a fraction into a count of samples.

    Args:
        size: int >= 1 (a number of samples) or float in (0, 1) (a fraction
            of `total`, rounded to the nearest integer, which must be >= 1).
        total: int. The number of samples the size refers to.
        what: str. Argument name used in error messages.
        most: int. The largest count allowed (default `total`); `why` says why
            in the error message.

    Returns:
        int, the number of samples, in [1, most].
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise TypeError(
            f"Expected `{what}` to be an int or a float in (0, 1). Received {size!r} of type {type(size).__name__}."
        )
    if isinstance(size, numbers.Integral):
        count = int(size)
    elif 0.0 < float(size) < 1.0:
        count = int(round(float(size) * total))
    else:
        raise ValueError(f"Expected a float `{what}` to lie in (0, 1) (a fraction). Received {size!r}.")
    most = total if most is None else most
    if count < 1 or count > most:
        resolved = f" ({count} of {total} samples)" if not isinstance(size, numbers.Integral) else ""
        raise ValueError(
            f"Expected `{what}` in [1, {most}] ({total} samples{why}), or a fraction in (0, 1) of them. "
            f"Received {size!r}{resolved}."
        )
    return count


def _allocate(counts: npt.ArrayLike, total: int, caps: npt.ArrayLike) -> np.ndarray:
    """Splits `total` over classes proportionally to `counts`, each <= `caps`.

    Largest-remainder rounding, then any shortfall from the caps goes to the
    classes with the most room left, so the result always sums to `total`.
    """
    counts = np.asarray(counts, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    if total > caps.sum():
        raise ValueError(
            f"Cannot take {total} samples: at most {int(caps.sum())} can be "
            "taken while leaving at least one sample of every class behind."
        )
    if total == 0 or counts.sum() == 0:
        return np.zeros(len(counts), dtype=np.int64)
    exact = counts * (total / counts.sum())
    alloc = np.minimum(np.floor(exact).astype(np.int64), caps)
    # Hand out the remaining samples one by one: biggest fractional part
    # first (ties by class index, for determinism), respecting the caps.
    order = np.lexsort((np.arange(len(counts)), -(exact - np.floor(exact))))
    while alloc.sum() < total:
        progressed = False
        for c in order:
            if alloc.sum() == total:
                break
            if alloc[c] < caps[c]:
                alloc[c] += 1
                progressed = True
        if not progressed:  # pragma: no cover - excluded by the caps check
            raise RuntimeError("allocation did not converge")
    return alloc


def stratified_split(
    labels: npt.ArrayLike, size: float, seed: int = 0, num_classes: int | None = None, what: str = "size"
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of sample indices into (rest, held-out).

    Each class contributes to the held-out part in proportion to its
    frequency (largest-remainder rounding) and always keeps at least one
    sample in the remaining part. Both parts come back in a seeded random
    order, so a prefix of either is a class mix even when the input is
    sorted by class (as the shared CIFAR-100 copy is).

    Args:
        labels: 1-D integer array of class indices.
        size: int or float. Size of the held-out part: a count, or a
            fraction in (0, 1) of `len(labels)`.
        seed: int. Seed of the random choice.
        num_classes: int, optional. Number of classes (labels are checked
            against it).
        what: str. The size's name in error messages (e.g. "val_size").

    Returns:
        A tuple `(rest_indices, held_out_indices)` of int64 arrays, disjoint,
        together a permutation of `range(len(labels))`.

    Example:

    ```python
    train_idx, val_idx = stratified_split(y_train, 5000, seed=0)
    ```
    """
    labels = v.check_labels(labels, num_classes)
    n = len(labels)
    classes, class_counts = np.unique(labels, return_counts=True)
    caps = np.maximum(class_counts - 1, 0)  # every class keeps a sample in the rest
    why = f"; one of each of the {len(classes)} classes stays behind"
    count = resolve_size(size, n, what, most=int(caps.sum()), why=why)
    rng = np.random.default_rng(seed)
    alloc = _allocate(class_counts, count, caps)
    held_parts, rest_parts = [], []
    for c, k in zip(classes, alloc):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        held_parts.append(idx[:k])
        rest_parts.append(idx[k:])
    held = np.concatenate(held_parts) if held_parts else np.zeros(0, np.int64)
    rest = np.concatenate(rest_parts) if rest_parts else np.zeros(0, np.int64)
    return rest[rng.permutation(len(rest))], held[rng.permutation(len(held))]


def per_class_subset(
    labels: npt.ArrayLike, samples_per_class: int, seed: int = 0, num_classes: int | None = None
) -> np.ndarray:
    """Seeded indices of exactly `samples_per_class` samples of every class (low-data CIFAR(X)).

    Every class in `0..num_classes-1` (or every class present, without `num_classes`)
    contributes a seeded random choice of `samples_per_class` of its samples; the
    result comes back in a seeded random order (a class mix in every prefix).

    Args:
        labels: 1-D integer array of class indices.
        samples_per_class: int >= 1.
        seed: int. Seed of the choice and the order.
        num_classes: int, optional. Number of classes.

    Returns:
        int64 array of `samples_per_class * classes` indices into `labels`.

    Raises:
        ValueError: a class has fewer samples, naming the class, its count and the
            number asked for.
    """
    v.check_int("samples_per_class", samples_per_class, 1)
    labels = v.check_labels(labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes or 0)
    classes = np.arange(len(counts)) if num_classes is not None else np.unique(labels)
    short = [int(c) for c in classes if counts[c] < samples_per_class]
    if short:
        c = short[0]
        raise ValueError(
            f"`samples_per_class` is {samples_per_class}, but class {c} has only {int(counts[c])} training "
            f"images after the validation (and meta) hold-outs ({len(short)} class(es) have fewer than "
            f"{samples_per_class}); "
            "expected at most the smallest class's count (or a smaller validation split)."
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(samples_per_class), replace=False) for c in classes]
    keep = np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)
    return keep[rng.permutation(len(keep))]


def long_tail_counts(max_count: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """Per-class sample counts of a long-tailed dataset (Cui et al., 2019).

    `N_c = int(N_max * mu^c)` with `mu = (1 / imbalance_factor)^(1 / (C - 1))`,
    so class 0 keeps `N_max` samples and class `C - 1` keeps
    `N_max / imbalance_factor`: the construction used by the long-tailed
    CIFAR of the L2W-DEN paper (Sec. 4.4 and its supplementary).

    Args:
        max_count: int. Samples of the largest (first) class, `N_max`.
        num_classes: int. Number of classes `C` (>= 2).
        imbalance_factor: float >= 1. Largest class size over smallest.

    Returns:
        int64 array of `num_classes` counts.

    Example:

    ```python
    long_tail_counts(500, 100, 100).sum()  # 10847 (CIFAR-100-LT, factor 100)
    ```
    """
    if isinstance(imbalance_factor, bool) or not isinstance(imbalance_factor, numbers.Real):
        raise TypeError(
            "Expected `imbalance_factor` to be a number >= 1 (the paper uses "
            f"200, 100, 50 and 20). Received {imbalance_factor!r}."
        )
    if not np.isfinite(imbalance_factor) or imbalance_factor < 1:
        raise ValueError(
            "Expected `imbalance_factor` to be a finite number >= 1 (the "
            f"paper uses 200, 100, 50 and 20). Received {imbalance_factor!r}."
        )
    if num_classes < 2:
        raise ValueError(f"A long-tailed split needs at least 2 classes. Received {num_classes}.")
    c = np.arange(num_classes, dtype=np.float64)
    counts = max_count * (1.0 / float(imbalance_factor)) ** (c / (num_classes - 1))
    # A small epsilon so that exact products such as 500 * 0.01 = 5 are not
    # floored to 4 by rounding error.
    return np.floor(counts + 1e-9).astype(np.int64)


def long_tail_indices(labels: npt.ArrayLike, imbalance_factor: float, num_classes: int, seed: int = 0) -> np.ndarray:
    """Indices of a long-tailed subset of a (roughly) balanced dataset.

    Class `c` keeps a seeded random choice of
    `min(n_c, long_tail_counts(N_max, C, imbalance_factor)[c])` of its samples,
    where `N_max` is the size of the largest class.

    Args:
        labels: 1-D integer array of class indices.
        imbalance_factor: float >= 1.
        num_classes: int. Number of classes.
        seed: int. Seed of the per-class choice.

    Returns:
        int64 array of the kept indices, in ascending order.
    """
    labels = v.check_labels(labels, num_classes)
    class_counts = np.bincount(labels, minlength=num_classes)
    targets = long_tail_counts(class_counts.max(), num_classes, imbalance_factor)
    rng = np.random.default_rng(seed)
    kept = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx), int(targets[c]))
        kept.append(np.sort(rng.choice(idx, size=k, replace=False)))
    return np.sort(np.concatenate(kept))


def channel_stats(images: npt.ArrayLike, scale: float = 1.0, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of NHWC images.

    Accumulates in float64 over chunks, so a uint8 CIFAR training set is never
    copied to floating point in one piece.

    Args:
        images: array of shape (N, H, W, C), any real dtype.
        scale: float. Factor applied to the pixels first (1/255 for uint8).
        chunk: int. Images per accumulation chunk.

    Returns:
        A tuple `(mean, std)` of float32 arrays of shape (C,) (population
        standard deviation, as the published CIFAR statistics).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"Expected a non-empty NHWC image array to compute channel statistics. Received shape {images.shape}."
        )
    channels = images.shape[-1]
    if images.dtype == np.uint8:
        # Exact and several times faster: per-channel histograms of the 256
        # possible values, then the moments of the histograms.
        hist = np.zeros((channels, 256), np.int64)
        for start in range(0, images.shape[0], chunk):
            block = images[start : start + chunk].reshape(-1, channels)
            for c in range(channels):
                hist[c] += np.bincount(block[:, c], minlength=256)
        values = np.arange(256, dtype=np.float64) * scale
        count = hist.sum(axis=1)
        mean = hist @ values / count
        var = hist @ np.square(values) / count - np.square(mean)
        return mean.astype(np.float32), np.sqrt(np.maximum(var, 0.0)).astype(np.float32)
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].astype(np.float64).reshape(-1, channels)
        block *= scale
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
        count += block.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)
