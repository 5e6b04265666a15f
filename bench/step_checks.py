"""What the NaN/inf checks of every training step cost: the same step with and without them.

`MultiExitModel.apply_step` checks, after each real optimizer step, that no gradient and
no updated weight (BatchNorm statistics included) is NaN or inf, so that a run stops at the
first bad step instead of training on garbage. This script times a Baseline and an L2W step
of the same model on the same batch with the checks on and off (the switch
`keras_ee.training.model.CHECK_STEP_VALUES`, read when a step is traced), in alternating
rounds in one process, and prints the median time ratio (checks on / off) per method.

Usage:
    python bench/step_checks.py [--model msdnet_cifar_5] [--batch-size 64] [--rounds 7]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def build(model_name, method, checks, num_classes, input_shape):
    import keras

    from keras_ee import models, training
    from keras_ee.training import model as model_lib

    keras.utils.set_random_seed(0)
    model_lib.CHECK_STEP_VALUES = checks
    backbone = models.create(model_name, num_classes=num_classes, input_shape=input_shape)
    m = training.MultiExitModel(backbone, method=training.L2W() if method == "l2w" else training.Baseline())
    m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-4))
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="msdnet_cifar_5")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps timed per round and variant")
    args = p.parse_args()

    import numpy as np

    from keras_ee.training import model as model_lib

    shape = (32, 32, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, *shape)).astype("float32")
    y = rng.integers(0, 100, args.batch_size)
    for method in ("baseline", "l2w"):
        variants = {}
        for checks in (True, False):
            m = build(args.model, method, checks, 100, shape)
            for _ in range(2):  # traced now, with this variant's switch; then warm
                m.train_on_batch(x, y)
            variants[checks] = m
        model_lib.CHECK_STEP_VALUES = True
        for m in variants.values():  # one more untimed step each, after both exist
            m.train_on_batch(x, y)
        times = {True: [], False: []}
        for r in range(args.rounds):
            for checks in (True, False) if r % 2 == 0 else (False, True):
                start = time.perf_counter()
                for _ in range(args.steps):
                    variants[checks].train_on_batch(x, y)
                times[checks].append((time.perf_counter() - start) / args.steps)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        ratios = [a / b for a, b in zip(times[True], times[False])]
        print(
            f"{method:8s} {args.model} batch {args.batch_size}: step with checks {on * 1e3:.1f} ms, without "
            f"{off * 1e3:.1f} ms; ratio on/off median {statistics.median(ratios):.3f} "
            f"(rounds {min(ratios):.3f}..{max(ratios):.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
