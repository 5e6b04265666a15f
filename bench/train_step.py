"""Time and peak memory of a Baseline step vs an L2W step, side by side.

Same model (msdnet_cifar_5 with 100 classes when `keras_ee.models` is
available, else a representative conv CNN), same data, same loaded batch
size, CPU. One "step" is one loaded batch: Baseline takes one optimizer step
on it; L2W takes two (half-batch exchange), each with its meta step, so the
ratio of times per loaded batch is the ratio of times per epoch.

Each (method, batch size) runs in its own subprocess so peak memory is
measured cleanly: after warm-up (tracing/compilation done), the process's
RSS high-water mark is reset (`/proc/self/clear_refs`), one more step runs,
and the peak growth over the pre-step RSS is reported.

Usage:
    python bench/train_step.py [--batch-sizes 64 256] [--steps 3]
        [--warmup 1] [--model msdnet_cifar_5] [--jit]
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    # Return freed heap pages first, so the step's peak shows as RSS growth
    # instead of hiding in memory cached from the warm-up step.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build_backbone(name, num_classes):
    import keras

    try:
        from keras_ee import models
    except ImportError:
        models = None
    if models is not None and name in models.available():
        return models.create(name, num_classes=num_classes), name
    # Fallback: a conv CNN with 4 exits.
    inp = keras.Input((32, 32, 3))
    h = inp
    outs = []
    for k, width in enumerate((32, 64, 128, 128)):
        h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(h)
        h = keras.layers.ReLU()(h)
        if k < 3:
            h = keras.layers.MaxPooling2D()(h)
        g = keras.layers.GlobalAveragePooling2D()(h)
        outs.append(keras.layers.Dense(num_classes, name=f"exit_{k + 1}")(g))
    return keras.Model(inp, outs), "fallback_cnn"


def worker(args):
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_ee import training

    keras.utils.set_random_seed(0)
    backbone, model_name = _build_backbone(args.model, 100)
    method = (
        training.L2W() if args.method == "l2w" else training.Baseline()
    )
    model = training.MultiExitModel(backbone, method=method)
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.1, 10_000),
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-4,
        ),
        jit_compile=args.jit,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 100, size=(args.batch_size,)).astype("int32")
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()

    t0 = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=args.warmup, verbose=0)
    trace_s = time.perf_counter() - t0

    resettable = _reset_peak_rss()
    rss_before = _status_kb("VmRSS")
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    peak = _status_kb("VmHWM")
    step_peak_mb = (peak - rss_before) / 1024 if resettable else float("nan")

    t0 = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0)
    step_s = (time.perf_counter() - t0) / args.steps
    print(
        json.dumps(
            dict(
                model=model_name,
                method=args.method,
                batch_size=args.batch_size,
                jit=args.jit,
                step_s=step_s,
                first_call_s=trace_s,
                step_peak_mb=step_peak_mb,
                process_peak_mb=_status_kb("VmPeak") / 1024,
                rss_mb=rss_before / 1024,
            )
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="msdnet_cifar_5")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        default=[64, 256])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--jit", action="store_true",
                        help="compile the train step with XLA")
    parser.add_argument("--worker", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["baseline", "l2w"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    rows = []
    for bs in args.batch_sizes:
        for method in ("baseline", "l2w"):
            cmd = [
                sys.executable, __file__, "--worker", "--method", method,
                "--batch-size", str(bs), "--model", args.model,
                "--steps", str(args.steps), "--warmup", str(args.warmup),
            ] + (["--jit"] if args.jit else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"worker failed: {' '.join(cmd)}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{row['model']:>16} {method:>8} batch {bs:4d} jit={row['jit']!s:5}"
                f" step {row['step_s']:8.3f} s  first call "
                f"{row['first_call_s']:7.1f} s  step peak "
                f"{row['step_peak_mb']:8.1f} MB  (RSS {row['rss_mb']:.0f} MB)",
                flush=True,
            )
    print()
    print("batch  time L2W/baseline (target <= 4)  "
          "peak memory L2W/baseline (target <= 2)")
    for bs in args.batch_sizes:
        base = next(r for r in rows if r["batch_size"] == bs
                    and r["method"] == "baseline")
        l2w = next(r for r in rows if r["batch_size"] == bs
                   and r["method"] == "l2w")
        print(
            f"{bs:5d}  {l2w['step_s'] / base['step_s']:8.2f}x"
            f"                        "
            f"{l2w['step_peak_mb'] / base['step_peak_mb']:8.2f}x"
        )


if __name__ == "__main__":
    main()
