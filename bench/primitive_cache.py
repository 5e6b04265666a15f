"""The early-exit pass on a stream of fresh batches, with oneDNN's default primitive cache and keras_ee's.

    PYTHONPATH=. .venv/bin/python bench/primitive_cache.py [--models msdnet_cifar_5 ranet_cifar_c1]
        [--batch 64] [--fraction 0.5] [--warmup 64] [--timed 64] [--capacity N] [--rounds 3]

`bench/inference.py` classifies the same few batches over and over, so every stage sees the
same few survivor counts. A server sees new images in every batch, and each stage of the
early-exit pass runs on however many samples are still there: any count from 1 to the batch
size. oneDNN builds a primitive (a compiled kernel) per convolution and input shape and keeps
them in an LRU cache of `ONEDNN_PRIMITIVE_CACHE_CAPACITY` entries (1024 by default); with
dozens of convolution shapes a stage and up to 64 survivor counts, a stream needs far more.
`import keras_ee` therefore raises the default (`keras_ee.ONEDNN_PRIMITIVE_CACHE_CAPACITY`,
unless the variable is set). This bench measures what that changes.

Two worker processes build the same seeded model and `EarlyExitModel` (thresholds solved for
`--fraction` of the last exit's Mul-Adds on the logits of 1024 random images, as
`bench/inference.py`). One runs with `ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024` (oneDNN's own
default), the other with `--capacity` entries (default: keras_ee's). oneDNN reads the variable
once per process, so the two settings cannot share one. Both serve the same stream of random
batches: `--warmup` batches untimed (a server that has been running a while), then `--timed`
batches, timed in chunks of 8 in alternation between the two workers (one process runs at a
time, the order swapped every chunk), `--rounds` times over the same timed batches, each chunk
counting with its fastest round. Beside the serving pass (`serving_function()`, one batch at a time) each
worker times, on the same batches, the full network on the snapshot (one batch size, so one
primitive per convolution) and the throughput mode (`predict(pooled=True)` over each chunk's 8
batches at once, whose pooled stage calls vary in size too; its exits must equal the serving
pass's). Printed per model: ms per batch of each pass in both workers, the ratio wall saving
/ Mul-Add saving (as in `bench/inference.py`, against the full network on the snapshot), each
early-exit pass with the 1024-entry cache against the other, how many distinct (stage,
survivor count) shapes the serving pass met, and each worker's peak resident memory.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_STREAM_SEED = 1
_CHUNK = 8


def _worker(name, batch, fraction, n_batches):
    """Serve commands from stdin: `warmup N`, `time START STOP`, `quit`; one JSON line each."""
    import resource

    import tensorflow as tf
    from inference import _sync, calibrated_model  # bench/inference.py: the same seeded model and calibration

    c, shape, _, full_snap, ee, _ = calibrated_model(name, 1024)
    ee.set_budget(fraction * c[-1])
    serve = ee.serving_function()
    rng = np.random.default_rng(_STREAM_SEED)
    stream = [rng.normal(size=(batch,) + shape).astype("float32") for _ in range(n_batches)]
    tensors = [tf.constant(b) for b in stream]
    exits = [None] * n_batches

    def run(fn, b):
        out = fn(b)
        _sync(out)
        return out

    def send(**msg):
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    send(ready=True, costs=c.tolist())
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "quit":
            break
        if cmd[0] == "warmup":
            run(full_snap, tensors[0])
            for i in range(int(cmd[1])):
                exits[i] = run(serve, tensors[i])["exit"].numpy()
            for i in range(0, int(cmd[1]), _CHUNK):
                ee.predict(np.concatenate(stream[i : i + _CHUNK]), batch_size=batch, pooled=True)
            send(done=True)
        elif cmd[0] == "time":
            lo, hi = int(cmd[1]), int(cmd[2])
            t_ee = t_full = 0.0
            for i in range(lo, hi):
                t0 = time.perf_counter()
                out = run(serve, tensors[i])
                t_ee += time.perf_counter() - t0
                exits[i] = out["exit"].numpy()
                t0 = time.perf_counter()
                run(full_snap, tensors[i])
                t_full += time.perf_counter() - t0
            t0 = time.perf_counter()
            pooled = ee.predict(np.concatenate(stream[lo:hi]), batch_size=batch, pooled=True)["exit"]
            t_pooled = time.perf_counter() - t0
            if not np.array_equal(pooled, np.concatenate(exits[lo:hi])):
                raise SystemExit("bench/primitive_cache.py: the throughput mode's exits differ from the serving pass's")
            send(
                ee=t_ee,
                full=t_full,
                pooled=t_pooled,
                exits=[e.tolist() for e in exits[lo:hi]],
                rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            )


def _survivor_shapes(exits, num_exits):
    """Distinct (stage, number of samples entering it) pairs over the batches' exit indices."""
    shapes = set()
    for e in exits:
        e = np.asarray(e)
        for k in range(num_exits):
            n = int((e > k).sum())
            if n:
                shapes.add((k, n))
    return len(shapes)


class _Worker:
    def __init__(self, name, args, capacity):
        env = dict(os.environ)
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)  # unset: keras_ee's own default
        if capacity:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
        self.capacity = capacity
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--batch",
                str(args.batch),
                "--fraction",
                str(args.fraction),
                "--warmup",
                str(args.warmup),
                "--timed",
                str(args.timed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, line=None):
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise SystemExit(
                f"bench/primitive_cache.py: the worker (capacity {self.capacity or 'default'}) "
                f"exited with code {self.proc.wait()}"
            )
        return json.loads(reply)

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def bench_model(name, args):
    # Started one after the other: two TensorFlow start-ups at once on a 2-core machine
    # only slow each other down.
    workers = []
    for cap in (1024, args.capacity):
        w = _Worker(name, args, cap)
        costs = w.ask()["costs"]
        w.ask(f"warmup {args.warmup}")
        workers.append(w)
    lo = args.warmup
    chunks = [(s, min(s + _CHUNK, lo + args.timed)) for s in range(lo, lo + args.timed, _CHUNK)]
    best = np.full((2, 3, len(chunks)), np.inf)  # worker, (serving pass, full, throughput mode), chunk
    exits, rss = [None] * len(chunks), [0.0, 0.0]
    flip = False
    for _ in range(args.rounds):
        for j, (s, e) in enumerate(chunks):
            for which in (1, 0) if flip else (0, 1):
                r = workers[which].ask(f"time {s} {e}")
                best[which, :, j] = np.minimum(best[which, :, j], [r["ee"], r["full"], r["pooled"]])
                rss[which] = r["rss_mib"]
                if exits[j] is None:
                    exits[j] = r["exits"]
                elif exits[j] != r["exits"]:
                    raise SystemExit("bench/primitive_cache.py: the two workers' exits differ; the comparison is void")
            flip = not flip
    for w in workers:
        w.close()
    c = np.asarray(costs)
    all_exits = np.concatenate([np.asarray(e).ravel() for e in exits])
    mul_saving = 1 - c[all_exits - 1].mean() / c[-1]
    tot = best.sum(axis=2) * 1e3 / args.timed  # ms per batch
    return dict(
        model=name,
        costs=c,
        mul_saving=mul_saving,
        ms=tot,
        rss=rss,
        shapes=_survivor_shapes([e for ch in exits for e in ch], len(c)),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["msdnet_cifar_5", "ranet_cifar_c1"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.5, help="budget as a fraction of the last exit's Mul-Adds")
    p.add_argument("--warmup", type=int, default=64, help="untimed fresh batches served first")
    p.add_argument("--timed", type=int, default=64, help="timed fresh batches after the warm-up")
    p.add_argument(
        "--capacity",
        type=int,
        default=0,
        help="the second worker's ONEDNN_PRIMITIVE_CACHE_CAPACITY (default: unset, so keras_ee's own "
        "default, keras_ee.ONEDNN_PRIMITIVE_CACHE_CAPACITY)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.capacity < 0:
        p.error(f"--capacity must be 0 (keras_ee's default) or a positive number of entries; received {args.capacity}")
    for k in ("batch", "warmup", "timed", "rounds"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1; received {getattr(args, k)}")
    if not 0 < args.fraction < 1:
        p.error(f"--fraction must lie strictly between 0 and 1; received {args.fraction}")
    if args.worker:
        _worker(args.worker, args.batch, args.fraction, args.warmup + args.timed)
        return
    if not args.capacity:
        import keras_ee

        args.capacity = keras_ee.ONEDNN_PRIMITIVE_CACHE_CAPACITY
    print(
        f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs; "
        f"batch {args.batch}; budget {args.fraction:.0%} of the last exit; {args.warmup} warm-up and "
        f"{args.timed} timed fresh batches, {args.rounds} rounds; cache of 1024 (oneDNN's default) against "
        f"{args.capacity} entries"
    )
    print(
        "| model | distinct (stage, survivors) shapes | Mul-Add saving | cache | full on the snapshot ms/batch | "
        "serving pass ms/batch | ratio | 1024 / other | throughput mode ms/batch | ratio | "
        "1024 / other | max RSS MiB |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        t0 = time.time()
        r = bench_model(name, args)

        def ratio(ms, full_ms):
            return (1 - ms / full_ms) / r["mul_saving"] if r["mul_saving"] > 0 else float("nan")

        for which, label in ((0, "1024 (oneDNN's default)"), (1, str(args.capacity))):
            ee_ms, full_ms, pooled_ms = r["ms"][which]
            rel = [f"{r['ms'][0][i] / r['ms'][1][i]:.3f}x" if which == 0 else "" for i in (0, 2)]
            print(
                f"| {name} | {r['shapes']} | {r['mul_saving']:.1%} | {label} | {full_ms:.1f} | {ee_ms:.1f} | "
                f"{ratio(ee_ms, full_ms):.2f} | {rel[0]} | {pooled_ms:.1f} | {ratio(pooled_ms, full_ms):.2f} | "
                f"{rel[1]} | {r['rss'][which]:.0f} |",
                flush=True,
            )
        print(f"<!-- {name}: {time.time() - t0:.0f} s -->", flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
