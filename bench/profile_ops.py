"""Where the time goes: TensorFlow profiler op time by op type.

    PYTHONPATH=. .venv/bin/python bench/profile_ops.py forward            # msdnet_cifar_5 inference
    PYTHONPATH=. .venv/bin/python bench/profile_ops.py train --method l2w  # one training step
    PYTHONPATH=. .venv/bin/python bench/profile_ops.py train --method l2w --batch 64 --strategy mirrored

Runs `--runs` forward passes (batch 256, `training=False`) or training steps
(`--method baseline|l2w|hdkd|naive_dkd`, SGD and batches as `bench/train_step.py`: HDKD's meta
stream is the same random batch again) after warm-up under
`tf.profiler`, then sums the duration of every TensorFlow op on the CPU compute
threads by op type and prints each type's share (thread time, so with 2 threads
the total is about twice the wall time). Wrapper events (executor, thread pool)
are left out so the shares add up to 100%. It also prints the wall time of the profiled runs
and the cores' busy share, op time / (wall time x cores): what is left is waiting (ops that
cannot start yet, synchronisation between replicas, Python).

`--strategy mirrored` trains under `MirroredStrategy` over `--replicas` logical CPU devices
(the global batch `--batch` split between them), as `bench/distributed.py`'s mirrored side.
"""

import argparse
import collections
import contextlib
import glob
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ee import models, training  # noqa: E402

_METHODS = {"baseline": training.Baseline, "l2w": training.L2W, "hdkd": training.HDKD, "naive_dkd": training.NaiveDKD}
_WRAPPERS = {"ExecutorState::Process", "ParallelFor", "ExecutorDoneCallback"}


def op_time_by_type(logdir):
    """{op type: milliseconds} from the newest xplane file under `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                op_type = plane.event_metadata[event.metadata_id].display_name
                if op_type and op_type not in _WRAPPERS and not op_type.startswith("Threadpool"):
                    totals[op_type] += event.duration_ps / 1e9
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["forward", "train"])
    parser.add_argument("--method", choices=sorted(_METHODS), default="l2w")
    parser.add_argument("--model", default="msdnet_cifar_5")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--strategy", choices=["none", "mirrored"], default="none")
    parser.add_argument("--replicas", type=int, default=2, help="logical CPU devices under --strategy mirrored")
    args = parser.parse_args()
    if args.strategy == "mirrored" and args.what != "train":
        parser.error("--strategy mirrored profiles a training step: use `train`")
    strategy = None
    if args.strategy == "mirrored":  # logical devices before TensorFlow initialises them
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
        strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])

    keras.utils.set_random_seed(0)
    backbone = models.create(args.model, num_classes=100)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 32, 32, 3)).astype("float32")
    if args.what == "forward":
        fn = tf.function(lambda t: backbone(t, training=False))

        def run(n):
            for _ in range(n):
                [o.numpy() for o in fn(x)]
    else:
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            if strategy is not None:  # the same weights, made under the strategy
                keras.utils.set_random_seed(0)
                backbone = models.create(args.model, num_classes=100)
            method = _METHODS[args.method]()
            model = training.MultiExitModel(backbone, method=method)
            model.compile(
                optimizer=keras.optimizers.SGD(
                    keras.optimizers.schedules.CosineDecay(0.1, 10_000), momentum=0.9, nesterov=True, weight_decay=1e-4
                )
            )
        y = rng.integers(0, 100, size=(args.batch,)).astype("int32")
        ds = tf.data.Dataset.from_tensors(((x, y), (x, y)) if method.uses_meta_stream else (x, y)).repeat()

        def run(n):
            model.fit(ds, epochs=1, steps_per_epoch=n, verbose=0)

    run(1)  # trace
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        run(args.runs)
        wall = time.perf_counter() - t0
        tf.profiler.experimental.stop()
        totals = op_time_by_type(logdir)
    total = sum(totals.values())
    label = args.what if args.what == "forward" else f"{args.method} train step"
    if strategy is not None:
        label += f" under MirroredStrategy ({args.replicas} logical CPU devices)"
    print(
        f"{args.model} {label}, batch {args.batch}, {args.runs} runs: {total / 1e3:.2f} s op time, "
        f"{wall:.2f} s wall (profiler on); cores busy {total / 1e3 / (wall * os.cpu_count()):.0%}"
    )
    for op_type, ms in totals.most_common(args.top):
        print(f"  {op_type:<28} {ms / args.runs:9.1f} ms/run  {100 * ms / total:5.1f}%")
    conv = sum(v for k, v in totals.items() if "Conv2D" in k)
    print(f"  all Conv2D kernels (forward and gradients): {100 * conv / total:.1f}%")


if __name__ == "__main__":
    main()
