"""Time per step and peak memory of training steps (Baseline, L2W, IMTA's phases), side by side.

Same model (msdnet_cifar_5, 100 classes, 32x32x3 inputs), same random data,
same loaded batch size, CPU, `tf.function` (`--jit` for XLA). One "step" is
one loaded batch, so the ratio of times per loaded batch is the ratio of
times per epoch. The worker "methods":
- `baseline`: `training.Baseline()`, one optimizer step on the batch.
- `l2w`: `training.L2W()`, two half-batch optimizer steps (the half-batch
  exchange), each with its meta step.
- `imta_phase1`: `training.IMTA()` in phase I (the model as built), one
  optimizer step of the whole network with gradient equilibrium (the
  inline-collaboration transfer paths are built but closed).
- `imta_phase2`: `training.IMTA()` after `model.enter_phase(1)`, one optimizer
  step of the classifiers and transfer paths only over the frozen network
  (BatchNorm in inference mode), with one-for-all distillation.
- `gating`: `training.BudgetAwareGating()` (interval 10): the median step is
  the common batch, one optimizer step whose loss runs the gater on every
  exit's features; `gating_every_batch` (`gater_interval=1`): every batch is
  a gater batch, a backbone step on one half and a gater step on the other
  (backbone in inference mode). An epoch at the default interval costs 0.9 x
  the first plus 0.1 x the second.
- `hdkd`: `training.HDKD()` (its meta batch: the same random batch again, fed
  as the meta stream); `naive_dkd`: `training.NaiveDKD()`, dense distillation
  with fixed uniform weights (no meta step).
- `papers_sgd`, `l2w_papers_sgd`: `baseline` and `l2w` compiled with the papers'
  SGD, `keras_ee.optimizers.SGD` (PyTorch's step: coupled weight decay, the
  gradient momentum buffer; what `keras-ee train --optimizer sgd` uses), same
  settings. `--vs-baseline papers_sgd l2w l2w_papers_sgd` prints, in one run, the
  papers' SGD against Keras' per Baseline step (target <= 1.05x) and L2W's ratio
  to Baseline with each optimizer.
Every other method compiles the same Keras SGD (cosine schedule, Nesterov
momentum, weight decay); IMTA's phase II compiles it after `enter_phase(1)`.

What is timed: each step on its own. A Keras callback records the time from
`on_train_batch_begin` to `on_train_batch_end` of every batch (the train
function, input fetch included; the loss is read back to Python before
`on_train_batch_end` runs, so the step has finished), and also the period
from one batch end to the next as a check. The figure reported is the median
over the timed steps; the warm-up steps (tracing, first call) and the memory
step are not timed, nor is anything `fit()` does before the first or after
the last step.

How: each side (a method, at one batch size, from one source tree) runs in
its own worker process, started once: it builds and traces the model, runs
`--warmup` steps, then one step with its resident-memory high-water mark
reset (`/proc/self/clear_refs`) to measure that step's peak growth over the
RSS before it, then waits. The parent then asks the sides of a comparison
for `--steps` timed steps each, in alternating rounds (A B, B A, A B, ...;
with more than two sides A B C, C B A, ...), so that load from other jobs on
the machine falls on every side alike, and reports per side the median step
time and, per round, the ratio of each side's median to the first side's
(its median and range over the rounds).

Modes:
- default, `--vs-baseline METHOD ...` (default `l2w`): Baseline against each
  listed method (`l2w`, `imta_phase1`, `imta_phase2`) of the working tree
  this script is in (or, with `--rev REV`, of git revision REV checked out
  into a temporary worktree as below), per batch size, all in the same
  alternating rounds (one Baseline worker per batch size); reports each
  method's METHOD/baseline step time ratio and peak memory ratio next to the
  issues' targets: L2W time <= 4x and memory <= 2x; IMTA phase I (with
  gradient equilibrium) time <= 1.1x; IMTA phase II time <= 0.6x.
- `--compare-with REV`: the same step of one method (`--methods`, default
  l2w; any worker method) from git revision REV ("old", checked out into a
  temporary `git worktree`, with the built extension `keras_ee/_native*.so`
  copied in from the working tree since it is untracked) against the working
  tree ("new"); reports the new/old ratio. The worktree is removed at the end.
  Both sides run this file's worker code; it uses only
  `keras_ee.models.create`, `keras_ee.training.MultiExitModel`,
  `training.L2W()`, `training.Baseline()`, `training.IMTA()` with
  `MultiExitModel.enter_phase` (IMTA workers only), `compile` and `fit`.
  A revision without `keras_ee.training.IMTA` (older than IMTA) can time
  baseline and l2w only: asking it for an IMTA worker (here, or with `--rev`)
  is refused in one line before any worker starts.

The worker imports `keras_ee` from the tree under test (PYTHONPATH is set to
that tree and nothing else) and checks that it did.

Usage:
    python bench/train_step.py [--batch-sizes 64 256] [--steps 3]
        [--rounds 3] [--warmup 1] [--model msdnet_cifar_5] [--jit]
        [[--vs-baseline l2w imta_phase1 imta_phase2] [--rev REV]
         | --compare-with REV [--methods baseline l2w imta_phase1 imta_phase2]]
        [--json PATH]
    # IMTA's phases against a Baseline step:
    python bench/train_step.py --vs-baseline imta_phase1 imta_phase2 --batch-sizes 64
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

_TAG = "@@train_step "  # prefix of the worker's protocol lines on stdout
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The worker methods: what one step (one loaded batch) of each does, its name in
# the report, and the issues' targets for its ratio to a Baseline step.
METHODS = (
    "baseline",
    "l2w",
    "imta_phase1",
    "imta_phase2",
    "gating",
    "gating_every_batch",
    "hdkd",
    "naive_dkd",
    "papers_sgd",
    "l2w_papers_sgd",
)
# The worker methods compiled with the papers' SGD (keras_ee.optimizers.SGD) instead of Keras' SGD.
PAPERS_SGD = {"papers_sgd": "baseline", "l2w_papers_sgd": "l2w"}
_NAMES = dict(
    baseline="Baseline",
    l2w="L2W",
    imta_phase1="IMTA phase I",
    imta_phase2="IMTA phase II",
    gating="gating (interval 10)",
    gating_every_batch="gating (gater every batch)",
    hdkd="HDKD",
    naive_dkd="NaiveDKD",
    papers_sgd="Baseline (papers' SGD)",
    l2w_papers_sgd="L2W (papers' SGD)",
)
_STEPS = dict(
    baseline="one optimizer step on it",
    l2w="two half-batch optimizer steps (each with its meta step)",
    imta_phase1="one optimizer step of the whole network (gradient equilibrium)",
    imta_phase2="one optimizer step of the classifiers and transfer paths over the frozen network (distillation)",
    gating="one optimizer step with the gater in the loss (9 of 10 batches at the default interval)",
    gating_every_batch="a half-batch optimizer step, then a gater step on the other half (every 10th batch by default)",
    hdkd="a look-ahead step, a loss-weight step on a held-out batch of the "
    "same size, then one optimizer step (dense distillation)",
    naive_dkd="one optimizer step with dense distillation, fixed weights",
    papers_sgd="one step of keras_ee.optimizers.SGD (PyTorch's) where Baseline's is Keras' SGD",
    l2w_papers_sgd="L2W's step with keras_ee.optimizers.SGD",
)
TARGETS = dict(
    l2w=dict(time=4, memory=2),
    imta_phase1=dict(time=1.1),
    imta_phase2=dict(time=0.6),
    gating=dict(time=1.3),
    gating_every_batch=dict(time=1.3),
    hdkd=dict(time=3),
    naive_dkd=dict(time=3),
    papers_sgd=dict(time=1.05),
    l2w_papers_sgd=dict(time=4),
)


def _note(methods):
    """'one step = one loaded batch: Baseline takes ..., L2W ...'."""
    methods = ["baseline"] + [m for m in methods if m != "baseline"]
    parts = [f"{_NAMES[m]} {'takes ' if i == 0 else ''}{_STEPS[m]}" for i, m in enumerate(methods)]
    return "one step = one loaded batch: " + ", ".join(parts)


# ---------------------------------------------------------------- worker side


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

    if name != "small_cnn":
        from keras_ee import models

        return models.create(name, num_classes=num_classes, input_shape=(32, 32, 3))
    # A conv CNN with 4 exits, defined here (no keras_ee.models).
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
    return keras.Model(inp, outs)


def _send(obj):
    sys.stdout.write(_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(args):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_ee
    from keras_ee import training

    root = os.path.realpath(args.expect_root)
    here = os.path.realpath(keras_ee.__file__)
    if not here.startswith(root + os.sep):
        raise SystemExit(f"keras_ee imported from {here}, not from {root}")

    class StepTimer(keras.callbacks.Callback):
        """Per-batch times; optionally the peak RSS growth of the batch."""

        def __init__(self, probe_memory=False):
            super().__init__()
            self.probe_memory = probe_memory
            self.steps, self.begins, self.ends = [], [], []
            self.resettable = False
            self.rss_before = self.peak = None

        def on_train_batch_begin(self, batch, logs=None):
            if self.probe_memory:
                self.resettable = _reset_peak_rss()
                self.rss_before = _status_kb("VmRSS")
            self._t0 = time.perf_counter()
            self.begins.append(self._t0)

        def on_train_batch_end(self, batch, logs=None):
            t = time.perf_counter()
            if self.probe_memory:
                self.peak = _status_kb("VmHWM")
            self.steps.append(t - self._t0)
            self.ends.append(t)

    imta = args.method.startswith("imta_")
    gating = args.method.startswith("gating")
    kd = {"hdkd": "HDKD", "naive_dkd": "NaiveDKD"}.get(args.method)
    for needed, cls in ((imta, "IMTA"), (gating, "BudgetAwareGating"), (kd, kd)):
        if needed and not hasattr(training, cls):
            _send(
                dict(
                    error=f"{args.method}: keras_ee.training in {root} has no "
                    f"{cls} (only older methods can be timed there)"
                )
            )
            raise SystemExit(2)
    papers = args.method in PAPERS_SGD
    if papers:
        try:
            from keras_ee import optimizers as ee_optimizers
        except ImportError:
            _send(dict(error=f"{args.method}: {root} has no keras_ee.optimizers (the papers' SGD)"))
            raise SystemExit(2) from None
    keras.utils.set_random_seed(0)
    backbone = _build_backbone(args.model, 100)
    if imta:
        method = training.IMTA()
    elif gating:
        method = training.BudgetAwareGating(gater_interval=1 if args.method == "gating_every_batch" else 10)
    elif kd:
        method = getattr(training, kd)()
    elif PAPERS_SGD.get(args.method, args.method) == "l2w":
        method = training.L2W()
    else:
        method = training.Baseline()
    model = training.MultiExitModel(backbone, method=method)
    if args.method == "imta_phase2":
        model.enter_phase(1)  # freezes the network, opens the transfer paths
    sgd = ee_optimizers.SGD if papers else keras.optimizers.SGD
    model.compile(
        optimizer=sgd(
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
    batch = ((x, y), (x, y)) if method.uses_meta_stream else (x, y)
    ds = tf.data.Dataset.from_tensors(batch).repeat()

    def run(steps, probe_memory=False):
        timer = StepTimer(probe_memory)
        t0 = time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[timer])
        t1 = time.perf_counter()
        # fit()'s own time before the first and after the last timed step
        timer.outside = (timer.begins[0] - t0, t1 - timer.ends[-1])
        return timer, t1 - t0

    warm, warm_fit_s = run(args.warmup)
    mem, _ = run(1, probe_memory=True)
    _send(
        dict(
            ready=True,
            keras_ee=here,
            warmup_steps_s=warm.steps,
            warmup_fit_s=warm_fit_s,
            memory_step_s=mem.steps[0],
            step_peak_mb=((mem.peak - mem.rss_before) / 1024 if mem.resettable else float("nan")),
            rss_mb=mem.rss_before / 1024,
            process_peak_mb=_status_kb("VmPeak") / 1024,
        )
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        timer, fit_s = run(cmd["steps"])
        _send(
            dict(
                steps_s=timer.steps,
                periods_s=[b - a for a, b in zip(timer.ends, timer.ends[1:])],
                fit_s=fit_s,
                before_first_s=timer.outside[0],
                after_last_s=timer.outside[1],
            )
        )


# ---------------------------------------------------------------- parent side


def _git(*argv, cwd=_REPO):
    return subprocess.run(["git", *argv], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _tree_state(root):
    """`abc1234` or `abc1234 + uncommitted changes in keras_ee/`."""
    head = _git("rev-parse", "--short", "HEAD", cwd=root)
    dirty = _git("status", "--porcelain", "--", "keras_ee", cwd=root)
    return head + (" + uncommitted changes in keras_ee/" if dirty else "")


def _loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Side:
    """One worker process: a method at a batch size from a source tree."""

    def __init__(self, label, root, method, batch_size, args):
        self.label, self.root, self.method = label, root, method
        self.steps, self.periods, self.fit_s, self.outside = [], [], [], []
        self.round_medians = []
        env = dict(os.environ, PYTHONPATH=root)
        self.cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--method",
            method,
            "--batch-size",
            str(batch_size),
            "--model",
            args.model,
            "--warmup",
            str(args.warmup),
            "--expect-root",
            root,
        ] + (["--jit"] if args.jit else [])
        self.errfile = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            self.cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errfile, text=True
        )

    def _receive(self):
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                msg = json.loads(line[len(_TAG) :])
                if "error" in msg:
                    raise SystemExit(f"bench/train_step.py: error: {self.label} worker: {msg['error']}")
                return msg
        self.proc.wait()
        self.errfile.seek(0)
        sys.stderr.write(self.errfile.read()[-4000:])
        raise SystemExit(f"{self.label} worker failed (exit code {self.proc.returncode}): {' '.join(self.cmd)}")

    def ready(self):
        self.info = self._receive()
        return self.info

    def timed_round(self, steps):
        self.proc.stdin.write(json.dumps(dict(steps=steps)) + "\n")
        self.proc.stdin.flush()
        r = self._receive()
        self.steps += r["steps_s"]
        self.periods += r["periods_s"]
        self.fit_s.append(r["fit_s"])
        self.outside.append((r["before_first_s"], r["after_last_s"]))
        self.round_medians.append(statistics.median(r["steps_s"]))
        return r

    def close(self, kill=False):
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps(dict(quit=True)) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.errfile.close()

    def summary(self):
        return dict(
            label=self.label,
            root=self.root,
            method=self.method,
            median_step_s=statistics.median(self.steps),
            min_step_s=min(self.steps),
            max_step_s=max(self.steps),
            median_period_s=(statistics.median(self.periods) if self.periods else float("nan")),
            steps_s=self.steps,
            round_medians_s=self.round_medians,
            fit_s=self.fit_s,
            fit_outside_steps_s=self.outside,
            **self.info,
        )


def compare(sides, args, batch_size):
    """Alternating rounds of the sides; each against the first.

    Rounds run the sides in order, then in reverse order, and so on (two
    sides: A B, B A, ...). Returns one result per side after the first: both
    summaries (`a`: the first side, `b`: that side) and the ratios b/a.
    """
    ref, others = sides[0], sides[1:]
    width = max(8, *(len(s.label) for s in sides))
    print(
        f"batch {batch_size}: starting "
        + " and ".join(s.label for s in sides)
        + f" workers (build, trace, {args.warmup} warm-up step(s), memory "
        "step)",
        flush=True,
    )
    for s in sides:
        info = s.ready()
        warm = " ".join(f"{t:.2f}" for t in info["warmup_steps_s"])
        name = s.label if s.label == s.method else f"{s.label} ({s.method})"
        print(
            f"  {name:>{width}}: warm-up steps {warm} s, "
            f"memory step {info['memory_step_s']:.3f} s, step peak "
            f"{info['step_peak_mb']:.0f} MB over RSS "
            f"{info['rss_mb']:.0f} MB",
            flush=True,
        )
    ratios, loads = {s.label: [] for s in others}, []
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for s in order:
            s.timed_round(args.steps)
        for s in others:
            ratios[s.label].append(s.round_medians[-1] / ref.round_medians[-1])
        loads.append(_loadavg())
        print(
            f"  round {r + 1} ({order[0].label} first, load {loads[-1]}): "
            + "  ".join(f"{s.label} " + " ".join(f"{t:.3f}" for t in s.steps[-args.steps :]) for s in sides)
            + "  -> "
            + ", ".join(f"{s.label}/{ref.label} {ratios[s.label][-1]:.3f}" for s in others),
            flush=True,
        )
    summaries = [s.summary() for s in sides]
    for s in summaries:
        pre = " ".join(f"{p:.2f}" for p, _ in s["fit_outside_steps_s"])
        post = " ".join(f"{q:.2f}" for _, q in s["fit_outside_steps_s"])
        print(
            f"  {s['label']:>{width}}: median step {s['median_step_s']:.3f} s "
            f"(n={len(s['steps_s'])}, {s['min_step_s']:.3f}.."
            f"{s['max_step_s']:.3f}), median batch-end period "
            f"{s['median_period_s']:.3f} s; untimed time in fit() before "
            f"the first step {pre} s, after the last {post} s",
            flush=True,
        )
    sa = summaries[0]
    return [
        dict(
            batch_size=batch_size,
            a=sa,
            b=sb,
            round_ratios=ratios[sb["label"]],
            ratio_of_medians=sb["median_step_s"] / sa["median_step_s"],
            memory_ratio=sb["step_peak_mb"] / sa["step_peak_mb"],
            loads=loads,
        )
        for sb in summaries[1:]
    ]


def _ratio_text(res):
    rr = res["round_ratios"]
    return (
        f"{res['ratio_of_medians']:.3f}x (per round: median "
        f"{statistics.median(rr):.3f}x, range {min(rr):.3f}.."
        f"{max(rr):.3f}x over {len(rr)} rounds)"
    )


def _run_sides(makers, args, bs):
    """Starts a worker per maker, times them in alternating rounds, stops them."""
    sides, ok = [], False
    try:
        for make in makers:
            sides.append(make())
        results = compare(sides, args, bs)
        ok = True
        return results
    finally:
        for s in sides:
            s.close(kill=not ok)


_CHECK_IMTA = "import sys\nfrom keras_ee import training\nsys.exit(0 if hasattr(training, 'IMTA') else 3)"


def _print_same_optimizer_ratios(results):
    """L2W / Baseline with the papers' SGD on both sides, from the medians of one run's sides."""
    for bs in sorted({r["batch_size"] for r in results}):
        median = {r["method"]: r["b"]["median_step_s"] for r in results if r["batch_size"] == bs}
        if "papers_sgd" in median and "l2w_papers_sgd" in median:
            ratio = median["l2w_papers_sgd"] / median["papers_sgd"]
            print(f"L2W/Baseline, both with the papers' SGD, batch {bs:4d}: {ratio:.2f}x (ratio of the medians)")


def _check_tree(root, methods, what):
    """One-line error unless the tree at `root` has what `methods` need (IMTA)."""
    imta = [m for m in methods if m.startswith("imta_")]
    if not imta:
        return
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_IMTA],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
    )
    if proc.returncode == 3:
        raise SystemExit(
            f"bench/train_step.py: error: {what} has no keras_ee.training.IMTA, "
            f"so it cannot time {', '.join(imta)} (only baseline and l2w are "
            "valid there)"
        )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench/train_step.py: error: importing keras_ee.training from {what} failed")


def _checkout(rev):
    """Checks REV out into a temporary worktree; returns (commit, tmp, path)."""
    commit = _git("rev-parse", "--verify", rev + "^{commit}")
    sos = glob.glob(os.path.join(_REPO, "keras_ee", "_native*.so"))
    if not sos:
        raise SystemExit("no keras_ee/_native*.so in the working tree: build the extension first (maturin develop)")
    tmp = tempfile.mkdtemp(prefix="keras-ee-old-")
    path = os.path.join(tmp, "tree")
    _git("worktree", "add", "--detach", path, commit)
    for so in sos:
        shutil.copy2(so, os.path.join(path, "keras_ee"))
    return commit, tmp, path


def _remove_worktree(tmp, path):
    try:
        _git("worktree", "remove", "--force", path)
    except subprocess.CalledProcessError as e:
        sys.stderr.write(f"git worktree remove failed: {e.stderr}\n")
    shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="msdnet_cifar_5",
        help="a keras_ee.models preset, or small_cnn (a 4-exit CNN defined in this script)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps after building (the first traces); one untimed memory step follows",
    )
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    parser.add_argument(
        "--vs-baseline",
        nargs="+",
        metavar="METHOD",
        choices=[m for m in METHODS if m != "baseline"],
        help="default mode: methods timed against Baseline (l2w, imta_phase1, imta_phase2; default l2w)",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="with --compare-with: methods to compare (default l2w)"
    )
    parser.add_argument(
        "--compare-with",
        metavar="REV",
        help="time the same step from git revision REV (old) against the working tree (new)",
    )
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="default mode: measure git revision REV "
        "(checked out into a temporary worktree) "
        "instead of the working tree",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect-root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.steps < 1 or args.rounds < 1 or args.warmup < 1:
        parser.error("--steps, --rounds and --warmup must be >= 1")
    if args.rev and args.compare_with:
        parser.error("--rev goes with the default mode, not --compare-with")
    if args.methods and not args.compare_with:
        parser.error(
            "--methods goes with --compare-with (the default mode compares baseline with the --vs-baseline methods)"
        )
    if args.vs_baseline and args.compare_with:
        parser.error("--vs-baseline goes with the default mode, not --compare-with (use --methods there)")

    if args.compare_with:
        methods = list(dict.fromkeys(args.methods or ["l2w"]))
    else:
        methods = list(dict.fromkeys(args.vs_baseline or ["l2w"]))
    note = _note(methods)
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (TF default)")
    print(
        f"model {args.model}, 100 classes, 32x32x3 random data, "
        f"jit={args.jit}, TF_ENABLE_ONEDNN_OPTS={onednn}; {args.warmup} "
        f"warm-up + 1 memory step untimed, then {args.rounds} rounds x "
        f"{args.steps} timed steps per side"
    )
    print(note)
    print(f"load average at start: {_loadavg()}", flush=True)
    results = []
    if not args.compare_with:
        root, tmp = _REPO, None
        if args.rev:
            commit, tmp, root = _checkout(args.rev)
            state = f"{args.rev} = {commit[:12]}, in a temporary worktree"
        else:
            state = f"working tree at {_tree_state(_REPO)}"
        print(f"code: {root} ({state})", flush=True)
        try:
            if args.rev:
                _check_tree(root, methods, f"revision {args.rev} ({commit[:12]})")
            for bs in args.batch_sizes:
                makers = [lambda m=m: Side(m, root, m, bs, args) for m in ["baseline"] + methods]
                for res in _run_sides(makers, args, bs):
                    res["method"] = res["b"]["method"]
                    results.append(res)
        finally:
            if tmp:
                _remove_worktree(tmp, root)
        print()
        print(f"load average at end: {_loadavg()}")
        for method in methods:
            name, target = _NAMES[method], TARGETS.get(method, {})
            print(f"{name}/baseline per loaded batch ({_note([method])}):")
            for res in results:
                if res["method"] != method:
                    continue
                time_target = f" (target <= {target['time']})" if "time" in target else ""
                mem_target = f" (target <= {target['memory']})" if "memory" in target else ""
                print(
                    f"  batch {res['batch_size']:4d}: median step baseline "
                    f"{res['a']['median_step_s']:.3f} s, {name} "
                    f"{res['b']['median_step_s']:.3f} s; time ratio "
                    f"{_ratio_text(res)}{time_target}; step peak memory "
                    f"{res['a']['step_peak_mb']:.0f} -> "
                    f"{res['b']['step_peak_mb']:.0f} MB, "
                    f"{res['memory_ratio']:.2f}x{mem_target}"
                )
        _print_same_optimizer_ratios(results)
        record = dict(
            mode=("baseline_vs_l2w" if methods == ["l2w"] else "vs_baseline"),
            methods=methods,
            code=state,
            targets=TARGETS,
            results=results,
        )
    else:
        commit, tmp, path = _checkout(args.compare_with)
        try:
            state = _tree_state(_REPO)
            print(
                f"old: {args.compare_with} = {commit[:12]}, worktree "
                f"{path} (keras_ee/_native*.so copied from the working "
                f"tree)\nnew: {_REPO} ({state})",
                flush=True,
            )
            _check_tree(path, methods, f"revision {args.compare_with} ({commit[:12]})")
            for method in methods:
                for bs in args.batch_sizes:
                    print(f"{method}:", flush=True)
                    (res,) = _run_sides(
                        [lambda: Side("old", path, method, bs, args), lambda: Side("new", _REPO, method, bs, args)],
                        args,
                        bs,
                    )
                    res["method"] = method
                    results.append(res)
        finally:
            _remove_worktree(tmp, path)
        print()
        print(f"load average at end: {_loadavg()}")
        width = max(8, *(len(m) for m in methods))
        print(f"new/old step time ({note}); old = {args.compare_with} ({commit[:12]}), new = working tree ({state}):")
        for res in results:
            print(
                f"  {res['method']:>{width}} batch {res['batch_size']:4d}: "
                f"median step old {res['a']['median_step_s']:.3f} s, new "
                f"{res['b']['median_step_s']:.3f} s; new/old "
                f"{_ratio_text(res)}; step peak memory "
                f"{res['a']['step_peak_mb']:.0f} -> "
                f"{res['b']['step_peak_mb']:.0f} MB"
            )
        record = dict(mode="compare", old=commit, new=state, results=results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
