"""Does L2W beat the baseline? Baseline and L2W on real CIFAR-100, several seeds, same budgets.

Every run is an ordinary `keras_ee.experiment.train` run folder (resumable: rerunning the
script continues unfinished runs and reuses finished ones). Thresholds are calibrated on
the held-out validation split, accuracy is measured on the test set. The script prints,
per method, the mean and spread over seeds of the test accuracy at fixed Mul-Add budgets
and of every exit's anytime accuracy, and the per-seed difference L2W - baseline.

    python bench/l2w_vs_baseline.py --data-dir ../shared/data --seeds 0 1 2 \
        --model multiexit_cnn --epochs 15 --train-size 20000 --out bench/out/l2w_vs_baseline

Results and the exact command are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_ee import dumps, evaluation, experiment
    from keras_ee.cli import _key_value, parse_budget
    from keras_ee.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar100")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--model", default="multiexit_cnn")
    p.add_argument("--model-option", type=_key_value, action="append", metavar="KEY=VALUE")
    p.add_argument("--methods", nargs="+", default=["baseline", "l2w"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=None, help="stratified subset of the training split")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--budget", dest="budgets", type=parse_budget, action="append")
    p.add_argument("--out", type=Path, default=Path("bench/out/l2w_vs_baseline"))
    args = p.parse_args(argv)

    results: dict[str, list] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                              model_options=dict(args.model_option or []), method=method, epochs=args.epochs,
                              train_size=args.train_size,
                              batch_size=args.batch_size, learning_rate=args.lr, seed=seed, evaluate=False)
            run = args.out / f"{method}-s{seed}"
            t0 = time.perf_counter()
            experiment.train(cfg, run, verbose=2)
            print(f"[{method} seed {seed}] {time.perf_counter() - t0:.0f} s (0 if it was already trained)", flush=True)
            ev = evaluation.evaluate_dump(dumps.load_dump(run / "dump"), name=f"{method}-s{seed}")
            evaluation.write_evaluation(ev, run / "eval")
            results[method].append(ev)

    first = results[args.methods[0]][0]
    curves = [ev.curve() for evs in results.values() for ev in evs]
    lo, hi = max(float(c[0][0]) for c in curves), min(float(c[0][-1]) for c in curves)
    budgets = np.asarray(args.budgets or np.linspace(lo, hi, 6)[1:-1], np.float64)
    labels = [evaluation.budget_label(b) for b in budgets]
    summary = {"budgets": budgets.tolist(), "seeds": args.seeds, "mul_adds": first.mul_adds, "methods": {}}
    print(f"\nTest accuracy (%) at Mul-Add budgets, mean ± std over seeds {args.seeds}:")
    print(f"{'method':>10}  " + "  ".join(f"{l:>13}" for l in labels) + f"  {'mean acc (range)':>17}")
    for method, evs in results.items():
        acc = np.array([evaluation.accuracy_at(*ev.curve(), budgets) for ev in evs]) * 100
        auc = np.array([evaluation.mean_accuracy_over(*ev.curve(), lo, hi) for ev in evs]) * 100
        anytime = np.array([ev.test_anytime for ev in evs]) * 100
        summary["methods"][method] = {"budget_acc": acc.tolist(), "auc": auc.tolist(), "anytime": anytime.tolist()}
        cells = [f"{m:6.2f} ± {s:4.2f}" for m, s in zip(acc.mean(0), acc.std(0))]
        print(f"{method:>10}  " + "  ".join(cells) + f"  {auc.mean():8.2f} ± {auc.std():4.2f}")
    print("\nAnytime accuracy (%) of every exit, mean ± std:")
    for method in results:
        a = np.array(summary["methods"][method]["anytime"])
        print(f"{method:>10}  " + "  ".join(f"{m:6.2f} ± {s:4.2f}" for m, s in zip(a.mean(0), a.std(0))))
    if {"baseline", "l2w"} <= set(results):
        d = np.array(summary["methods"]["l2w"]["budget_acc"]) - np.array(summary["methods"]["baseline"]["budget_acc"])
        print("\nL2W - baseline per seed (points) at " + ", ".join(labels) + ":")
        for seed, row in zip(args.seeds, d):
            print(f"  seed {seed}: " + "  ".join(f"{v:+.2f}" for v in row))
        print("  mean:   " + "  ".join(f"{v:+.2f}" for v in d.mean(0)))
        summary["l2w_minus_baseline"] = d.tolist()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
