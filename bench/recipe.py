"""What the budget-aware training recipe costs per training epoch on CIFAR-shaped data.

    .venv/bin/python bench/recipe.py [--images 512] [--batch-size 128] [--epochs 3]

Random 32x32x3 uint8 images (10 classes), `multiexit_cnn`, Baseline, SGD. For the recipe off
and on (`--recipe budget-aware` without EMA, then with it, and each augmentation alone), it
prints the seconds per epoch of the input pipeline alone (iterating the batches) and of a
training epoch (`model.fit`, pipeline included), the first epoch (tracing) left out, and the
ratio to the recipe off.
"""

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_ee import experiment  # noqa: E402
from keras_ee.config import RECIPES, TrainConfig  # noqa: E402
from keras_ee.data.base import ArraySplits  # noqa: E402


def splits(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n + 256, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n + 256)
    return ArraySplits(
        "random32",
        x[:n],
        y[:n],
        x[n : n + 128],
        y[n : n + 128],
        x[n + 128 :],
        y[n + 128 :],
        [str(i) for i in range(10)],
        augment_pad=4,
        augment_flip=True,
    )


def measure(cfg, data, epochs):
    """(pipeline seconds per epoch, training seconds per epoch), epoch 0 left out."""
    method = experiment.make_method(cfg.method, cfg.method_options)
    steps = data.train_batches(cfg.batch_size)
    ds = experiment.training_data(cfg, data, method, 0, epochs + 1)
    it = iter(ds)
    for _ in range(steps):
        next(it)
    start = time.perf_counter()
    for _ in range(steps * epochs):
        next(it)
    pipeline = (time.perf_counter() - start) / epochs

    keras.utils.set_random_seed(0)
    model = experiment.build_model(cfg, data, method=method)
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(
        experiment.training_data(cfg, data, method, 0, epochs + 1),
        epochs=epochs + 1,
        steps_per_epoch=steps,
        callbacks=[Clock()],
        verbose=0,
        shuffle=False,
    )
    return pipeline, float(np.mean(times[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    data = splits(args.images)
    base = dict(
        dataset="random32",
        model="multiexit_cnn",
        method="baseline",
        batch_size=args.batch_size,
        epochs=args.epochs + 1,
        evaluate=False,
    )
    recipe = dataclasses.asdict(RECIPES["budget-aware"])
    ema = recipe.pop("ema")
    variants = [("off", {}), ("budget-aware, no EMA", recipe), ("budget-aware", {**recipe, "ema": ema})]
    for key in ("randaugment", "color_jitter", "random_erasing", "mixup", "cutmix", "label_smoothing"):
        variants.append((f"{key} alone", {key: recipe[key]}))
    print(
        f"{args.images} random 32x32x3 images, batch {args.batch_size}, multiexit_cnn, baseline, "
        f"{os.cpu_count()} CPUs; seconds per epoch (mean of {args.epochs}, the first left out)"
    )
    print(f"{'recipe':<24} {'pipeline':>9} {'ratio':>6} {'train':>8} {'ratio':>6}")
    ref = None
    for name, values in variants:
        pipe, train = measure(TrainConfig.from_dict({**base, **values}), data, args.epochs)
        ref = ref or (pipe, train)
        print(f"{name:<24} {pipe:9.3f} {pipe / ref[0]:6.2f} {train:8.3f} {train / ref[1]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
