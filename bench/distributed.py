"""The overhead of `tf.distribute.MirroredStrategy` against no strategy, side by side (issue 16).

The same model (default msdnet_cifar_5, 100 classes, 32x32x3 random inputs), the same SGD, the
same *global* batch: "none" trains it on one device, "mirrored" under a MirroredStrategy over
`--replicas` logical CPU devices (each replica takes its share of the batch, the losses scaled
for the replicas, the gradients all-reduced; L2W's meta steps gather the confidences and
all-reduce the look-ahead and WPN gradients). On a CPU machine the logical devices share the
cores, so there is no speed-up to see: the ratio mirrored/none is what the strategy costs.

One step is one loaded batch (L2W: two half-batch optimizer steps, each with its meta step).
Each side runs in its own worker process (the logical devices are set before TensorFlow
starts), built and traced once, then timed in alternating rounds (A B, B A, ...) with
`bench/train_step.py`'s `Side` and `compare`, so that load from other jobs falls on both
sides alike; the figure is the median step time and the ratio per round. A step is timed
from `on_train_batch_begin` to `on_train_batch_end` (the loss is read back first).

Targets (issue 16): mirrored/none <= 1.2x for the Baseline step, <= 1.3x for the L2W step.

`--serial-halves` adds a third side, "halves": no strategy, each step the `--replicas` shares
of the global batch trained one after the other on one device (batch / replicas per optimizer
step; L2W halves each share again, as each replica does). It is the replicas' own work done
serially, so mirrored/halves is what the strategy adds beyond running smaller kernels
(collectives, synchronisation, two replicas sharing the cores), and halves/none what the
smaller per-replica batches cost by themselves.

Usage:
    python bench/distributed.py [--methods baseline l2w] [--batch-size 64] [--replicas 2]
        [--model msdnet_cifar_5] [--steps 3] [--rounds 3] [--warmup 2] [--json PATH]
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)

import train_step  # noqa: E402  (bench/: its worker protocol, Side, compare and backbones)

TARGETS = {"baseline": 1.2, "l2w": 1.3}
STRATEGIES = ("none", "mirrored", "halves")


def worker(args):
    import tensorflow as tf

    if args.strategy == "mirrored":  # before TensorFlow initialises its devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    import keras
    import numpy as np

    from keras_ee import distribute, training

    strategy = distribute.make_strategy("none" if args.strategy == "halves" else args.strategy)  # mirrored: every
    # logical CPU device; halves: one device, `per` optimizer steps on the shares per timed step
    per = args.replicas if args.strategy == "halves" else 1
    keras.utils.set_random_seed(0)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        method = training.L2W() if args.method == "l2w" else training.Baseline()
        model = training.MultiExitModel(train_step._build_backbone(args.model, 100), method=method)
        model.compile(
            optimizer=keras.optimizers.SGD(
                keras.optimizers.schedules.CosineDecay(0.1, 10_000), momentum=0.9, nesterov=True, weight_decay=1e-4
            )
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size // per, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 100, size=(args.batch_size // per,)).astype("int32")
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps, self.begins, self.ends = [], [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.begins.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.steps.append(self.ends[-1] - self.begins[-1])

    def run(steps):
        timer, t0 = Timer(), time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=steps * per, verbose=0, callbacks=[timer])
        if per > 1:  # one timed step = the `per` optimizer steps on the shares of one global batch
            timer.steps = [sum(timer.steps[i : i + per]) for i in range(0, len(timer.steps), per)]
            timer.begins, timer.ends = timer.begins[::per], timer.ends[per - 1 :: per]
        return timer, t0, time.perf_counter()

    warm, _, _ = run(args.warmup)
    train_step._send(
        dict(
            ready=True,
            replicas=model.distribute_strategy.num_replicas_in_sync,
            warmup_steps_s=warm.steps,
            memory_step_s=warm.steps[-1],
            step_peak_mb=float("nan"),
            rss_mb=train_step._status_kb("VmRSS") / 1024,
        )
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        timer, t0, t1 = run(cmd["steps"])
        train_step._send(
            dict(
                steps_s=timer.steps,
                periods_s=[b - a for a, b in zip(timer.ends, timer.ends[1:])],
                fit_s=t1 - t0,
                before_first_s=timer.begins[0] - t0,
                after_last_s=t1 - timer.ends[-1],
            )
        )


class StrategySide(train_step.Side):
    """One worker of this script: a method under a strategy (train_step's protocol)."""

    def __init__(self, strategy, method, args):
        self.label, self.root, self.method = strategy, _REPO, method
        self.steps, self.periods, self.fit_s, self.outside, self.round_medians = [], [], [], [], []
        self.cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--strategy",
            strategy,
            "--method",
            method,
            "--batch-size",
            str(args.batch_size),
            "--replicas",
            str(args.replicas),
            "--model",
            args.model,
            "--warmup",
            str(args.warmup),
        ]
        self.errfile = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=_REPO,
            env={**os.environ, "PYTHONPATH": _REPO, "CUDA_VISIBLE_DEVICES": ""},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errfile,
            text=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=sorted(TARGETS), default=["baseline", "l2w"])
    p.add_argument(
        "--model",
        default="msdnet_cifar_5",
        help="a keras_ee.models preset, or small_cnn (bench/train_step.py's 4-exit CNN)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="the global batch of both sides")
    p.add_argument("--replicas", type=int, default=2, help="logical CPU devices of the mirrored side")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after building (the first traces)")
    p.add_argument(
        "--serial-halves",
        action="store_true",
        help="also time the replicas' shares one after the other on one device (see above)",
    )
    p.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=sorted(TARGETS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if min(args.steps, args.rounds, args.warmup) < 1 or args.replicas < 2:
        p.error("--steps, --rounds and --warmup must be >= 1 and --replicas >= 2")
    if args.batch_size % (2 * args.replicas):
        p.error(
            f"--batch-size must be a multiple of 2 x --replicas (L2W halves each replica's share); "
            f"received {args.batch_size}"
        )
    print(
        f"{args.model}, global batch {args.batch_size}, mirrored over {args.replicas} logical CPU devices, "
        f"tree {train_step._tree_state(_REPO)}, load {train_step._loadavg()}",
        flush=True,
    )
    rows = []
    for method in args.methods:
        print(f"== {method}", flush=True)
        sides = STRATEGIES if args.serial_halves else STRATEGIES[:2]
        results = train_step._run_sides(
            [lambda m=method, s=s: StrategySide(s, m, args) for s in sides], args, args.batch_size
        )
        rows.append(dict(method=method, **results[0]))
        if args.serial_halves:
            rows[-1]["halves"] = results[1]
    print(f"\nmirrored/none step time at global batch {args.batch_size} ({args.model}, {args.replicas} replicas):")
    for row in rows:
        ratio = row["ratio_of_medians"]
        verdict = "met" if ratio <= TARGETS[row["method"]] else f"missed by {ratio / TARGETS[row['method']] - 1:.0%}"
        print(
            f"  {row['method']:>8}: none {row['a']['median_step_s']:.3f} s, mirrored {row['b']['median_step_s']:.3f} s"
            f" -> {train_step._ratio_text(row)}; target <= {TARGETS[row['method']]}x: {verdict}"
        )
        if "halves" in row:
            h = row["halves"]
            print(
                f"  {'':>8}  halves {h['b']['median_step_s']:.3f} s: halves/none {h['ratio_of_medians']:.3f}x "
                f"(the smaller kernels alone), mirrored/halves {ratio / h['ratio_of_medians']:.3f}x "
                f"(what the strategy adds to the replicas' own work)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
