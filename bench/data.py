"""Throughput of the tf.data pipelines on real CIFAR-100 (images per second).

    .venv/bin/python bench/data.py --data-dir ../shared/data

Compares, in one run, the project's batched training pipeline (gather, augment and normalise a
whole batch in one map) with the usual per-image `tf.image` pipeline doing the same augmentation.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rate(ds, batches):
    it = iter(ds)
    next(it)  # warm-up: the first batch builds the pipeline
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        n += int(x.shape[0])
    return n / (time.perf_counter() - t0)


def main():
    import numpy as np
    import tensorflow as tf

    from keras_ee import data

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=150)
    args = p.parse_args()
    t0 = time.perf_counter()
    splits = data.load("cifar100", data_dir=args.data_dir)
    print(f"load cifar100 (read archive, split, statistics): {time.perf_counter() - t0:.2f} s")

    x = splits._x_train  # uint8 (N, 32, 32, 3): the same arrays the project's pipeline reads
    y = splits.train_labels().astype(np.int32)
    mean, std = splits.mean, splits.std

    def per_image(img, label):
        img = tf.image.convert_image_dtype(img, tf.float32)
        img = tf.image.pad_to_bounding_box(img, 4, 4, 40, 40)
        img = tf.image.random_crop(img, (32, 32, 3))
        img = tf.image.random_flip_left_right(img)
        return (img - mean) / std, label

    usual = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(10_000)
        .repeat()
        .map(per_image, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(args.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    ours = splits.train_dataset(args.batch_size).repeat()
    plain = splits.train_dataset(args.batch_size, augment=False).repeat()
    r_ours, r_usual, r_plain = (_rate(d, args.batches) for d in (ours, usual, plain))
    print(f"keras_ee train pipeline (augmented): {r_ours:,.0f} images/s")
    print(f"per-image tf.image pipeline (same augmentation): {r_usual:,.0f} images/s")
    print(f"keras_ee pipeline without augmentation: {r_plain:,.0f} images/s")
    print(f"ratio keras_ee / per-image: {r_ours / r_usual:.2f}x")


if __name__ == "__main__":
    main()
