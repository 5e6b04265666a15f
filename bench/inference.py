"""Real early exit (`keras_ee.inference.EarlyExitModel`) against the full network, on CPU.

    PYTHONPATH=. .venv/bin/python bench/inference.py [--quick] [--models msdnet_cifar_5 ranet_cifar_c1]

For each model (untrained weights: the thresholds are calibrated on the logits of random
validation images, so the exit fractions, not the accuracy, are what matters) and each
budget fraction f of the last exit's Mul-Adds (30%, 50%, 70%), the thresholds are solved
on 1024 random validation images (`EarlyExitModel.set_budget(f * cost_K)`), then 256
other random images are classified at batch 1 (the first 32 images), 64 and 256:

- Mul-Add saving: `1 - mean(cost of each test sample's real exit) / cost_K`, from the
  exits the runtime took;
- wall saving: `1 - time(early exit) / time(full network)`, the full network being
  `model(x, training=False)` in one `tf.function` with a `[None, H, W, C]` signature;
  the two run side by side, batch by batch in alternation (the order swapped every
  round); each batch counts with its fastest of the rounds (the least disturbed by other
  processes), for both alike;
- ratio: wall saving / Mul-Add saving (target >= 0.8 at batch 64 and 256);
- ratio on the snapshot: the same against the full network run on the early-exit model's
  own folded kernels (`InferenceSnapshot`: BatchNorm folded once, not on every call), so
  that the runtime's saving is not credited with what the snapshot alone saves;
- ideal ratio: stage-time saving (below) / Mul-Add saving, the ratio a runtime without any
  cost of its own would reach given how the network's time is spread over its stages;
- stage-time saving: the saving if each stage's time were its share of the full pass
  (measured with every sample running every stage) times the fraction of samples that
  ran it; wall / stage-time is then the runtime's own efficiency, apart from how the
  network's time is spread over its stages (on CPU, MSDNet's first stages take more time
  per Mul-Add than its last ones, so saving late Mul-Adds saves less time);
- per stage: the milliseconds per batch of each stage on the samples it really saw
  (each stage and its exit split compiled on its own and timed separately, so the sum
  differs a little from the fused pass) and the samples that entered it over all the
  batches of the row.

Throughput mode (batches above 1): `predict(pooled=True)` on `--pooled-images` other random
images (default 1024; survivors pooled across batches per stage) against the full network on
the same batches, both timed as whole passes, the fastest of max(3, rounds // 2) alternating
rounds.

Then, at every batch size, the overhead with every sample running to the last exit
(thresholds +inf): `time(early exit) / time(full) - 1` (target at batch 1: <= 10%), against
the full network as `model(x)` runs it and against the full network on the same snapshot of
folded kernels; then, against the latter, three passes in between, timed in the same
alternation (all on the snapshot): the stages chained in one
`tf.function` (what the split alone costs), chained with each stage waiting for the previous
exit's score (what deciding before going on costs: in the full network an exit head runs
beside the next stage), and the throughput mode's stage steps called one after the other
(what running each stage as a graph of its own costs); beside them, against `model(x)`, the
full network on the snapshot and the full network with its weights frozen into constants
(grappler folds everything once); and how many times the early-exit
pass was traced over the whole run (1: one graph for every batch size and survivor count).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402

from keras_ee import costs, models  # noqa: E402
from keras_ee.inference import EarlyExitModel  # noqa: E402


def _sync(out):
    for v in out.values() if isinstance(out, dict) else out:
        v.numpy()


def _time_batches(fn, batches):
    t0 = time.perf_counter()
    for b in batches:
        _sync(fn(b))
    return time.perf_counter() - t0


def _timed_together(fns, batches, rounds):
    """Totals over the batches of each of `fns`, each batch's time the fastest of `rounds`
    tries. They are timed batch by batch in alternation (a, b, a, b, ..., the order reversed
    every round), so that load from other processes hits all alike; the fastest try of a
    batch is the least disturbed one."""
    for f in fns:  # warm-up: traces and oneDNN primitives of every shape
        _time_batches(f, batches)
    t = np.full((len(fns), rounds, len(batches)), np.inf)
    for r in range(rounds):
        for i, b in enumerate(batches):
            for which in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
                t0 = time.perf_counter()
                _sync(fns[which](b))
                t[which, r, i] = time.perf_counter() - t0
    return [float(v) for v in t.min(axis=1).sum(axis=1)]


def _timed_whole(fns, rounds):
    """Fastest of `rounds` runs of each no-argument `fn` (each a whole pass over a set of
    images), alternating the order every round."""
    for f in fns:  # warm-up
        f()
    t = np.full((len(fns), rounds), np.inf)
    for r in range(rounds):
        for which in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
            t0 = time.perf_counter()
            fns[which]()
            t[which, r] = time.perf_counter() - t0
    return [float(v) for v in t.min(axis=1)]


def _on_snapshot(ee, fn):
    """`fn` run on the early-exit model's folded kernels, as its own pass runs."""

    def run(*args):
        with ee._runtime.snapshot.active():
            return fn(*args)

    return run


def _overhead_parts(ee, shape):
    """Compiled passes between the full network and the early exit with everyone running to
    the last exit: the stages chained (what splitting alone costs), and the stages chained
    with each waiting for the previous exit's score (what deciding before going on costs:
    in the full network an exit head runs beside the next stage, here before it)."""
    stages = ee._runtime.stages
    spec = [tf.TensorSpec((None,) + shape, tf.float32)]

    def chain(x, wait):
        out = stages[0](x, training=False)
        res = [ee._score(out[0], 0)[0]]
        for k, st in enumerate(stages[1:]):
            state = list(out[1:])
            if wait:
                with tf.control_dependencies([res[-1]]):
                    state = [tf.identity(t) for t in state]
            out = st(state, training=False)
            res.append(ee._score(out[0], k + 1)[0])
        return res

    def apart(x):
        # The throughput mode's per-stage steps, called one after the other from Python on
        # the whole batch (it syncs on each step's exit decision, as predict(pooled=True)).
        state, valid = [x], ee._finite_images(x)  # everyone runs to the last exit: one flag per row
        for k in range(ee.num_exits):
            out = ee._pool_step(k, k == ee.num_exits - 1)(*state, valid)
            out[0].numpy()
            state = list(out[3:])
        return out[:2]

    return (
        tf.function(_on_snapshot(ee, lambda x: chain(x, False)), input_signature=spec),
        tf.function(_on_snapshot(ee, lambda x: chain(x, True)), input_signature=spec),
        apart,
    )


def _stage_breakdown(ee, batches):
    """Per-stage ms per batch on the samples each stage really saw, and samples entering."""
    stages = ee._runtime.stages
    fns = []
    for k, st in enumerate(stages):
        spec = [tf.TensorSpec((None,) + tuple(i.shape[1:]), i.dtype) for i in st.inputs]
        if k == 0:
            fns.append(tf.function(_on_snapshot(ee, lambda x, st=st: st(x, training=False)), input_signature=spec))
        else:
            fns.append(
                tf.function(_on_snapshot(ee, lambda *xs, st=st: st(list(xs), training=False)), input_signature=spec)
            )
    thr = ee.thresholds

    def split(k):
        @tf.function(reduce_retracing=True)
        def f(logits, *state):
            score, _ = ee._score(logits, k)
            stay = tf.where(tf.logical_not(ee._leaves(score, thr, k)))[:, 0]
            return [tf.gather(s, stay) for s in state]

        return f

    splits = [split(k) for k in range(len(stages) - 1)]
    times = np.zeros(len(stages))
    seen = np.zeros(len(stages), int)
    best = None
    for rnd in range(3):  # the first round traces every shape; the faster of the other two counts
        times[:] = 0
        seen[:] = 0
        for b in batches:
            state = [b]
            for k in range(len(stages)):
                if int(state[0].shape[0]) == 0:
                    break
                seen[k] += int(state[0].shape[0])
                t0 = time.perf_counter()
                out = fns[k](*state)
                if k + 1 < len(stages):
                    state = splits[k](out[0], *out[1:])
                    _sync(state)
                else:
                    _sync(out)
                times[k] += time.perf_counter() - t0
        if rnd > 0 and (best is None or times.sum() < best.sum()):
            best = times.copy()
    return best * 1e3 / len(batches), seen


def calibrated_model(name, n_val):
    """The seeded untrained `name`, its exit costs, its input shape, the compiled full network
    (`model(x)` and on the snapshot), and an `EarlyExitModel` calibrated on the logits of
    `n_val` random images (budget: the last exit; `set_budget` picks another), then `rng`,
    the generator those images came from, for the caller's own test images."""
    import keras

    keras.utils.set_random_seed(0)  # the same untrained weights in every run
    model = models.create(name)
    c = np.asarray(costs.exit_costs(model)["mul_adds"], np.float64)
    shape = tuple(model.inputs[0].shape[1:])
    spec = [tf.TensorSpec((None,) + shape, tf.float32)]
    rng = np.random.default_rng(0)
    val = rng.normal(size=(n_val,) + shape).astype("float32")
    full = tf.function(lambda x: model(x, training=False), input_signature=spec)
    val_logits = np.concatenate(
        [np.stack([o.numpy() for o in full(tf.constant(val[i : i + 256]))], 0) for i in range(0, n_val, 256)], axis=1
    )
    ee = EarlyExitModel.from_model(model, val_logits, np.zeros(n_val, np.int32), budget=c[-1], costs=c)
    full_snap = tf.function(_on_snapshot(ee, lambda x: model(x, training=False)), input_signature=spec)
    return c, shape, full, full_snap, ee, rng


def bench_model(name, batch_sizes, fractions, rounds, n_val, n_test, n_pooled):
    c, shape, full, full_snap, ee, rng = calibrated_model(name, n_val)
    test = rng.normal(size=(n_test,) + shape).astype("float32")
    serve = ee.serving_function()
    # Each stage's share of the time when every sample runs it (per batch size): the wall
    # saving that stage-proportional timing would give, apart from the runtime's own cost.
    shares = {}
    for bs in batch_sizes:
        imgs = test[:32] if bs == 1 else test
        ee.set_thresholds([np.inf] * (ee.num_exits - 1) + [-np.inf])
        ms, _ = _stage_breakdown(ee, [tf.constant(imgs[i : i + bs]) for i in range(0, len(imgs), bs)])
        shares[bs] = ms / ms.sum()
    pool_set = rng.normal(size=(n_pooled,) + shape).astype("float32")
    rows = []
    for f in fractions:
        solved = ee.set_budget(f * c[-1])
        thresholds = ee.thresholds
        for bs in batch_sizes:
            imgs = test[:32] if bs == 1 else test
            batches = [tf.constant(imgs[i : i + bs]) for i in range(0, len(imgs), bs)]
            tf_med, ts_med, te_med = _timed_together([full, full_snap, serve], batches, rounds)
            exits = np.concatenate([serve(b)["exit"].numpy() for b in batches])
            mul_saving = 1 - c[exits - 1].mean() / c[-1]
            wall_saving = 1 - te_med / tf_med
            snap_saving = 1 - te_med / ts_med
            stage_ms, seen = _stage_breakdown(ee, batches)
            time_saving = 1 - float(np.sum(shares[bs] * seen / len(imgs)))
            pooled = None
            if bs > 1 and n_pooled:
                # Throughput mode on a larger set: survivors pooled across batches per stage.
                pool_batches = [tf.constant(pool_set[i : i + bs]) for i in range(0, n_pooled, bs)]
                t_full, t_snap, t_pool = _timed_whole(
                    [
                        lambda: [_sync(full(b)) for b in pool_batches],
                        lambda: [_sync(full_snap(b)) for b in pool_batches],
                        lambda: ee.predict(pool_set, batch_size=bs, pooled=True),
                    ],
                    max(3, rounds // 2),
                )
                pool_exits = ee.predict(pool_set, batch_size=bs, pooled=True)["exit"]
                pool_mul = 1 - c[pool_exits - 1].mean() / c[-1]
                pooled = dict(
                    mul_saving=pool_mul,
                    wall_saving=1 - t_pool / t_full,
                    ratio=(1 - t_pool / t_full) / pool_mul if pool_mul > 0 else float("nan"),
                    ratio_snap=(1 - t_pool / t_snap) / pool_mul if pool_mul > 0 else float("nan"),
                    full_ms=t_full * 1e3 / len(pool_batches),
                    pool_ms=t_pool * 1e3 / len(pool_batches),
                )
            rows.append(
                dict(
                    model=name,
                    batch=bs,
                    fraction=f,
                    val_cost=solved["val_mean_cost"] / c[-1],
                    time_saving=time_saving,
                    mul_saving=mul_saving,
                    wall_saving=wall_saving,
                    ratio=wall_saving / mul_saving if mul_saving > 0 else float("nan"),
                    ratio_snap=snap_saving / mul_saving if mul_saving > 0 else float("nan"),
                    full_ms=tf_med * 1e3 / len(batches),
                    ee_ms=te_med * 1e3 / len(batches),
                    stage_ms=stage_ms,
                    seen=seen,
                    thresholds=thresholds,
                    pooled=pooled,
                )
            )
    # Everyone to the last exit, at every batch size: the runtime's overhead over the full
    # network (the target is at batch 1), and the passes in between (stages chained; chained
    # and waiting for each exit's score; the throughput mode's stage steps called apart).
    ee.set_thresholds([np.inf] * (ee.num_exits - 1) + [-np.inf])
    chained, waiting, apart = _overhead_parts(ee, shape)
    # The full network with its weights frozen into constants: what ConvBNReLU's folding of
    # BatchNorm into the kernels on every call costs (grappler folds the constants once).
    frozen = convert_variables_to_constants_v2(full.get_concrete_function())
    overheads = []
    for bs in batch_sizes:
        imgs = test[:64] if bs == 1 else test
        batches = [tf.constant(imgs[i : i + bs]) for i in range(0, len(imgs), bs)]
        t = _timed_together([full, full_snap, serve, chained, waiting, apart, frozen], batches, max(rounds, 5))
        overheads.append(
            dict(
                batch=bs,
                full_ms=t[0] * 1e3 / len(batches),
                snap_ms=t[1] * 1e3 / len(batches),
                ee_ms=t[2] * 1e3 / len(batches),
                snap=t[1] / t[0] - 1,
                overhead=t[2] / t[0] - 1,
                overhead_snap=t[2] / t[1] - 1,
                chain=t[3] / t[1] - 1,
                wait=t[4] / t[1] - 1,
                apart=t[5] / t[1] - 1,
                frozen=t[6] / t[0] - 1,
            )
        )
    # One trace of the early-exit pass for every batch size and survivor count of the run.
    traces = serve.experimental_get_tracing_count()
    return c, rows, dict(overheads=overheads, traces=traces), shares


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["msdnet_cifar_5", "ranet_cifar_c1"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--pooled-images",
        type=int,
        default=1024,
        help="images of the throughput-mode rows (predict(pooled=True)); 0 skips them",
    )
    p.add_argument("--quick", action="store_true", help="2 rounds, 256 validation and 64 test images, batches 1 and 64")
    args = p.parse_args(argv)
    n_val, n_test = 1024, 256
    if args.quick:
        args.rounds, n_val, n_test = 2, 256, 64
        args.pooled_images = min(args.pooled_images, 256)
        args.batches = [b for b in args.batches if b <= 64]
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
        f"{os.cpu_count()} CPUs; TensorFlow {tf.__version__}; rounds {args.rounds}"
    )
    for name in args.models:
        t0 = time.time()
        c, rows, last, shares = bench_model(
            name, args.batches, args.fractions, args.rounds, n_val, n_test, args.pooled_images
        )
        print(
            f"\n{name}: exit Mul-Adds {', '.join(f'{v / 1e6:.2f}M' for v in c)} "
            f"(fractions of the last: {', '.join(f'{v / c[-1]:.2f}' for v in c)})"
        )
        print(
            "| batch | budget | val cost | Mul-Add saving | wall saving | ratio | ratio on the snapshot | "
            "stage-time saving | ideal ratio | wall / stage-time | full ms/batch | early exit ms/batch | "
            "per stage ms/batch (samples in) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            stages = " ".join(f"{ms:.1f}({n})" for ms, n in zip(r["stage_ms"], r["seen"]))
            print(
                f"| {r['batch']} | {r['fraction']:.0%} | {r['val_cost']:.1%} | {r['mul_saving']:.1%} | "
                f"{r['wall_saving']:.1%} | {r['ratio']:.2f} | {r['ratio_snap']:.2f} | {r['time_saving']:.1%} | "
                f"{r['time_saving'] / r['mul_saving'] if r['mul_saving'] > 0 else float('nan'):.2f} | "
                f"{r['wall_saving'] / r['time_saving'] if r['time_saving'] > 0 else float('nan'):.2f} | "
                f"{r['full_ms']:.1f} | {r['ee_ms']:.1f} | {stages} |"
            )
        pooled_rows = [r for r in rows if r["pooled"]]
        if pooled_rows:
            print(
                f"\nthroughput mode, predict(pooled=True) on {args.pooled_images} other images against the full "
                f"network on the same batches (whole passes, fastest of {max(3, args.rounds // 2)}):"
            )
            print(
                "| batch | budget | Mul-Add saving | wall saving | ratio | ratio on the snapshot | full ms/batch | "
                "pooled ms/batch |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in pooled_rows:
                q = r["pooled"]
                print(
                    f"| {r['batch']} | {r['fraction']:.0%} | {q['mul_saving']:.1%} | {q['wall_saving']:.1%} | "
                    f"{q['ratio']:.2f} | {q['ratio_snap']:.2f} | {q['full_ms']:.1f} | {q['pool_ms']:.1f} |"
                )
        print(
            "stage time shares with every sample running every stage: "
            + "; ".join(f"batch {bs}: " + " ".join(f"{v:.2f}" for v in sh) for bs, sh in shares.items())
        )
        print("stage Mul-Add shares: " + " ".join(f"{v:.2f}" for v in np.diff(np.concatenate([[0.0], c])) / c[-1]))
        print(
            "\nevery sample to the last exit (thresholds +inf), time against the full network as model(x) runs "
            "it and against the full network on the snapshot (target at batch 1: early exit <= +10%):"
        )
        print(
            "| batch | full ms/batch | early exit | full on the snapshot | full, weights frozen to constants | "
            "early exit against the full network on the snapshot | stages chained | chained, waiting for each "
            "exit's score | stage steps apart (throughput mode's) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for o in last["overheads"]:
            print(
                f"| {o['batch']} | {o['full_ms']:.2f} | {o['overhead']:+.1%} | {o['snap']:+.1%} | "
                f"{o['frozen']:+.1%} | {o['overhead_snap']:+.1%} | {o['chain']:+.1%} | {o['wait']:+.1%} | "
                f"{o['apart']:+.1%} |"
            )
        print(f"early-exit pass traced {last['traces']} time(s)  ({time.time() - t0:.0f} s)")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
