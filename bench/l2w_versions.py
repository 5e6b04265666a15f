"""Does L2W's training step differ between two code versions, beyond float rounding?

Trains the same model (multiexit_cnn, 10 classes, 32x32x3 random data, seed 0, SGD 0.1 momentum
0.9, weight decay 1e-4, batch 64, no shuffling) for 1..N loaded batches with Baseline and with
L2W (q = 0.75, delta = 0.8) under git revision REV (checked out into a temporary worktree, as
`bench/train_step.py --compare-with` does) and under the working tree, each in its own process,
and prints the relative norm of the weight difference (backbone; for L2W also the WPN and its
Adam moments) after each batch count. Equal algorithms differ at the first batches only by float
rounding (~1e-7), and the gap then grows as training amplifies it; a changed algorithm differs
from the first batch on. `--plain-bn` switches the working tree's fused BatchNorm kernel off (for
revisions before it existed), so that both sides run the same kernels.

It also checks, in the working tree, that L2W's meta-gradient with the fused BatchNorm kernel
equals the one without it (max abs difference).

Usage:
    python bench/l2w_versions.py --rev 7631a92 --batches 1 2 3 6 --plain-bn
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)


def worker(args):
    import keras
    import numpy as np

    from keras_ee import models, training

    if args.plain_bn:
        from keras_ee.models import layers

        if hasattr(layers, "_TF_FUSED_BN_DTYPES"):
            layers._TF_FUSED_BN_DTYPES = ()
    rng = np.random.default_rng(0)
    n = max(args.batches) * 64
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    out = {}
    for name in ("baseline", "l2w"):
        for batches in args.batches:
            keras.utils.set_random_seed(0)
            backbone = models.create("multiexit_cnn", input_shape=(32, 32, 3), num_classes=10)
            method = training.Baseline() if name == "baseline" else training.L2W(q=0.75, delta=0.8)
            model = training.MultiExitModel(backbone, method=method)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-4))
            model.fit(x[: 64 * batches], y[: 64 * batches], batch_size=64, epochs=1, shuffle=False, verbose=0)
            out[f"{name}/backbone/{batches}"] = np.concatenate([v.numpy().ravel() for v in backbone.trainable_weights])
            if name == "l2w":
                out[f"l2w/wpn/{batches}"] = np.concatenate([v.numpy().ravel() for v in method.wpn.weights])
                out[f"l2w/wpn_adam/{batches}"] = np.concatenate(
                    [v.numpy().ravel() for v in method.wpn_optimizer.variables if "float" in str(v.dtype)]
                )
    np.savez(args.out, **out)


def fused_check():
    """Max abs difference of L2W's meta-gradients with and without the fused BatchNorm kernel."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_ee import models, training
    from keras_ee.models import layers

    def grads(fused):
        saved = layers._TF_FUSED_BN_DTYPES
        if not fused:
            layers._TF_FUSED_BN_DTYPES = ()
        try:
            keras.utils.set_random_seed(0)
            model = training.MultiExitModel(
                models.create("multiexit_cnn", input_shape=(8, 8, 3), num_classes=5), method=training.L2W()
            )
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
            rng = np.random.default_rng(0)
            x = tf.constant(rng.normal(size=(16, 8, 8, 3)).astype("float32"))
            y = tf.constant(rng.integers(0, 5, 16).astype("int32"))
            g, _ = model.method.meta_gradients(model, x[:8], y[:8], x[8:], y[8:])
            return [v.numpy() for v in g]
        finally:
            layers._TF_FUSED_BN_DTYPES = saved

    return max(float(np.abs(a - b).max()) for a, b in zip(grads(True), grads(False)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="the git revision to compare the working tree with")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 6])
    p.add_argument("--plain-bn", action="store_true", help="fused BatchNorm kernel off in the working tree")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if any(b < 1 for b in args.batches):
        p.error(f"--batches must be positive; received {args.batches}")
    sys.path.insert(0, _HERE)
    import numpy as np
    import train_step

    commit, tmp, path = train_step._checkout(args.rev)
    files = {}
    try:
        for side, root, plain in (("old", path, False), ("new", _REPO, args.plain_bn)):
            files[side] = os.path.join(tempfile.mkdtemp(), f"{side}.npz")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                "--rev",
                args.rev,
                "--out",
                files[side],
                "--batches",
                *map(str, args.batches),
            ] + (["--plain-bn"] if plain else [])
            env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}
            subprocess.run(cmd, env=env, check=True, cwd=tempfile.gettempdir())
    finally:
        train_step._remove_worktree(tmp, path)
    old, new = np.load(files["old"]), np.load(files["new"])
    print(f"old = {args.rev} ({commit[:12]}), new = working tree{' (fused BatchNorm off)' if args.plain_bn else ''}")
    print("relative norm of the difference, ||old - new|| / ||old||, after N loaded batches:")
    rows = {}
    for key in old.files:
        what, n = key.rsplit("/", 1)
        a, b = old[key], new[key]
        rows.setdefault(what, {})[int(n)] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
    for what, by_n in rows.items():
        print(f"  {what:22s} " + "  ".join(f"N={n}: {v:.1e}" for n, v in sorted(by_n.items())))
    print(f"fused vs plain BatchNorm, L2W meta-gradient max abs difference (working tree): {fused_check():.1e}")
    print(json.dumps({"rev": commit, "plain_bn": args.plain_bn, "relative_difference": rows}))


if __name__ == "__main__":
    main()
