"""Training methods side by side: every method x every seed, same data, model, epochs and batch.

Each run is an ordinary `keras_ee.experiment.train(config, workdir)` run folder,
`OUT/<label>-s<seed>` (resumable: rerunning the same command continues unfinished runs and
reuses finished ones without training them again). Thresholds are calibrated on the
held-out validation split, accuracy is measured on the test set. The script writes into
`--out`, and prints the table of:

    results.md         one table: test accuracy at fixed Mul-Add budgets and the mean
                       accuracy over the common budget range, anytime accuracy of every
                       exit, training time per epoch; mean ± std over seeds. Below it, the
                       paired per-seed difference of each method to `--reference`.
    results.json       the same, per seed, with the settings and the run folders
    budget_curves.png  all methods' budget curves (mean over seeds, ± std shaded) and
                       every exit's anytime accuracy (mean, ± std error bars)

With `--metric top5` the same tables and curves count a sample correct when its label is among
the exit's five largest logits (the HDKD paper's measure; exits are still chosen by the confidence
score), written as `results_top5.md`, `results_top5.json` and `budget_curves_top5.png` next to the
top-1 files; finished runs are reused, so a top-5 table of earlier runs trains nothing.

A method that saves its own confidence scores (budget-aware gating: the gater's exit
probability, `scores/gater.npz`) gets a second row per label, `LABEL [gater]`: the same runs
with thresholds calibrated on that score instead of the max softmax.

Methods are registered names (`keras-ee methods`; default: all of them) or
`package.module:Class`. `LABEL=METHOD` runs a method under another label, so that one
method can take part twice with different options (`--methods l2w l2w_q05=l2w`).
Options go per label: `--method-option l2w:q=0.5` (`LABEL:KEY=VALUE`, the value read as
JSON if it parses, else as a string; repeatable). Every method name, option, label and
existing run folder is checked before anything is trained.

Training time per epoch is the wall time of each epoch (fit's `on_epoch_begin` to
`on_epoch_end`: training steps, validation, the run's history and backup writes), which
a callback records into the run folder's `epoch_times.json`; for a run trained without
it, `state.json`'s `train_seconds` divided by the epochs that invocation trained. A method
with several phases (`Method.phases`; IMTA: `--epochs` is phase I, phase II adds its own
epochs) trains the sum of its phases' epochs, counted on across the phases; its time per
epoch is given per phase ("12.3 (I) / 5.1 (II)"), each phase being its own training call.

Examples:

    # the CIFAR-100 comparison of docs/benchmarks.md section 4
    python bench/methods.py --dataset cifar100 --data-dir ../shared/data --methods baseline l2w \
        --model multiexit_cnn --epochs 3 --batch-size 128 --seeds 0 1 2 --out bench/out/l2w_vs_baseline
    # smoke scale, built-in digits, a couple of minutes on 2 CPU cores
    python bench/methods.py --dataset digits --epochs 3 --seeds 0 1 --out bench/out/methods_digits
    # an option, and one method twice
    python bench/methods.py --methods baseline l2w l2w_q05=l2w --method-option l2w_q05:q=0.5 ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPOCH_TIMES_FILE = "epoch_times.json"
_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")


class UsageError(ValueError):
    """A bad command line, reported in one line before anything is trained."""


# ----------------------------------------------------------------------------- command line


def _json_or_str(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method_option(text: str) -> tuple[str, str, object]:
    """'l2w:q=0.5' -> ('l2w', 'q', 0.5); 'pkg.mod:Cls:beta=0.3' -> ('pkg.mod:Cls', 'beta', 0.3)."""
    head, eq, value = text.partition("=")
    label, colon, key = head.rpartition(":")
    if not eq or not colon or not label.strip() or not key.strip():
        raise argparse.ArgumentTypeError(f"expected METHOD:KEY=VALUE (e.g. l2w:q=0.5); received {text!r}")
    return label.strip(), key.strip(), _json_or_str(value)


def parse_method_entry(text: str) -> tuple[str, str]:
    """'l2w' -> ('l2w', 'l2w'); 'l2w_q05=l2w' -> ('l2w_q05', 'l2w'); 'pkg.mod:Cls' -> ('pkg.mod:Cls', 'pkg.mod:Cls')."""
    label, eq, method = text.partition("=")
    if not eq:
        label = method = text
    label, method = label.strip(), method.strip()
    if not label or not method:
        raise UsageError(f"--methods entry {text!r}: expected METHOD or LABEL=METHOD.")
    if eq and not _LABEL.fullmatch(label):
        raise UsageError(f"--methods entry {text!r}: a label may hold letters, digits and _ . + - only.")
    return label, method


def folder_label(label: str) -> str:
    """The run-folder prefix of a label (`pkg.mod:Cls` -> `pkg.mod.Cls`)."""
    return label.replace(":", ".")


def _parser() -> argparse.ArgumentParser:
    from keras_ee.cli import parse_budget

    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="registered names, package.module:Class, or LABEL=METHOD (default: every registered method)",
    )
    p.add_argument(
        "--method-option",
        type=parse_method_option,
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="an option of one method (its label), e.g. l2w:q=0.5; repeatable",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g = p.add_argument_group("the runs' settings (the same for every method and seed)")
    g.add_argument(
        "--config",
        type=Path,
        help="a TrainConfig .json/.toml as the base; the flags below override it "
        "(its method, method_options, seed and evaluate are not used)",
    )
    g.add_argument("--dataset", help="default cifar100")
    g.add_argument("--data-dir", help="default ../shared/data next to the repository")
    g.add_argument("--val-size", type=int)
    g.add_argument("--train-size", type=int, help="stratified subset of the training split")
    g.add_argument("--imbalance-factor", type=int)
    g.add_argument(
        "--samples-per-class",
        type=int,
        help="train on X images of every class (the HDKD paper's low-data CIFAR(X); stratified, seeded)",
    )
    g.add_argument("--model", help="default multiexit_cnn")
    g.add_argument("--model-option", type=_model_option, action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--epochs", type=int, help="default 15")
    g.add_argument("--batch-size", type=int, help="default 128")
    g.add_argument("--lr", dest="learning_rate", type=float, help="default 0.1 * batch_size / 64")
    g.add_argument("--schedule", choices=["cosine", "step", "constant"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--confidence", choices=["max_softmax", "margin", "entropy"])
    g = p.add_argument_group("report")
    g.add_argument(
        "--budget",
        dest="budgets",
        type=parse_budget,
        action="append",
        help="a Mul-Add budget of the table (15M, 1.2G; repeatable); default four evenly spaced inside "
        "the range every curve covers",
    )
    g.add_argument(
        "--metric",
        default="top1",
        choices=["top1", "top5"],
        help="top1 (default) or top5 correctness (the HDKD paper's measure) in every table and curve; "
        "the exits are still chosen by the confidence score. Finished runs are reused, so a top-5 "
        "table of runs trained earlier costs no training",
    )
    g.add_argument(
        "--reference",
        nargs="+",
        default=["baseline"],
        metavar="LABEL",
        help="label(s) the per-seed differences are taken against (default baseline, if it is run); "
        "each further label adds its own difference table (e.g. --reference baseline dbt)",
    )
    g.add_argument("--out", type=Path, default=Path("bench/out/methods"))
    g.add_argument("--quiet", action="store_true", help="no per-epoch output from training")
    return p


def _model_option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, received {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _json_or_str(value)


DEFAULTS = dict(
    dataset="cifar100",
    data_dir=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
    model="multiexit_cnn",
    epochs=15,
    batch_size=128,
)
FLAG_FIELDS = (
    "dataset",
    "data_dir",
    "val_size",
    "train_size",
    "samples_per_class",
    "imbalance_factor",
    "model",
    "epochs",
    "batch_size",
    "learning_rate",
    "schedule",
    "weight_decay",
    "confidence",
)


def base_config(args):
    """The settings every run shares: --config (or the defaults), then the flags."""
    from keras_ee.config import TrainConfig

    values = TrainConfig.from_file(args.config).to_dict() if args.config else {**TrainConfig().to_dict(), **DEFAULTS}
    for field in FLAG_FIELDS:
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if args.model_option:
        values["model_options"] = {**values["model_options"], **dict(args.model_option)}
    values.update(method="baseline", method_options={}, seed=0, evaluate=False)
    return TrainConfig.from_dict(values)


def plan(args) -> tuple[list[dict], object, list[dict]]:
    """Every (method, seed) run, checked: methods and options, settings, data, model, run folders.

    Raises:
        UsageError: anything that would fail later, in one line.
    """
    import dataclasses

    from keras_ee import data, experiment, models, training

    try:
        base = base_config(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    try:
        data.get_dataset(base.dataset)
        models.get_preset(base.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds must be distinct integers; received {args.seeds}.")

    entries = [parse_method_entry(t) for t in (args.methods or training.list_methods())]
    labels = [label for label, _ in entries]
    folders = [folder_label(lab) for lab in labels]
    dupes = sorted({f for f in folders if folders.count(f) > 1})
    if dupes:
        raise UsageError(f"--methods names {dupes} more than once; give each a label, e.g. l2w_q05=l2w.")
    options: dict[str, dict] = {label: {} for label in labels}
    for label, key, value in args.method_option:
        if label not in options:
            raise UsageError(f"--method-option {label}:{key}=...: {label!r} is not among --methods {labels}.")
        options[label][key] = value
    methods = []
    for label, name in entries:
        try:
            training.get_method(name).convert(options[label])  # names and types
            experiment.make_method(name, options[label])  # and the constructor's own checks (ranges, combinations)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e).splitlines()[0] if str(e) else repr(e)) from None
        # The config keeps the options as given, like `keras-ee train --method-option` (the
        # method converts them when it is made), so a run folder reads the same either way.
        methods.append(dict(label=label, method=name, options=options[label]))

    runs = []
    for seed in args.seeds:
        for m in methods:
            cfg = dataclasses.replace(base, method=m["method"], method_options=m["options"], seed=seed)
            workdir = args.out / f"{folder_label(m['label'])}-s{seed}"
            try:
                experiment.prepare_workdir(cfg, workdir, write=False)  # an existing folder must hold this run
            except ValueError as e:
                raise UsageError(str(e)) from None
            runs.append(dict(label=m["label"], seed=seed, config=cfg, workdir=workdir))
    return runs, base, methods


# ----------------------------------------------------------------------------- runs


def epoch_timer(workdir: Path):
    """A Keras callback that records each epoch's wall time into `workdir/epoch_times.json`.

    The file holds `epoch_seconds` ({epoch: seconds}) and `traced`, the epochs that were
    the first of their `fit` call (they include tracing the train and test functions).
    A resumed run trains its unfinished epochs again: the newest time of an epoch counts.
    """
    import keras

    from keras_ee.atomic import atomic_write_json

    class EpochTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self._first = True

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._start
            times, traced = read_epoch_times(workdir)
            times[int(epoch)] = round(seconds, 3)
            traced.discard(int(epoch))
            if self._first:
                traced.add(int(epoch))
            self._first = False
            record = {"epoch_seconds": {str(k): v for k, v in sorted(times.items())}, "traced": sorted(traced)}
            atomic_write_json(workdir / EPOCH_TIMES_FILE, record)

    return EpochTimes()


def read_epoch_times(workdir: Path) -> tuple[dict[int, float], set[int]]:
    """({epoch: seconds}, {epochs that include tracing}) from `epoch_times.json`; empty if none."""
    try:
        raw = json.loads((Path(workdir) / EPOCH_TIMES_FILE).read_text())
        return ({int(k): float(v) for k, v in raw["epoch_seconds"].items()}, {int(e) for e in raw.get("traced", [])})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, set()


def _state(workdir: Path) -> dict:
    try:
        state = json.loads((workdir / "state.json").read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def finished(workdir: Path):
    """The run's dump if its training finished and its dump is complete, else None."""
    from keras_ee import dumps

    if not (_state(workdir).get("trained") and (workdir / "model.keras").is_file()):
        return None
    try:
        return dumps.load_dump(workdir / "dump")
    except (OSError, ValueError, TypeError):
        return None


def run_phases(config):
    """The run's phases (`Method.phases(config.epochs)` of its method with its options)."""
    from keras_ee import experiment

    return experiment.make_method(config.method, config.method_options).phases(config.epochs)


def _mean_untraced(times: dict, traced: set, epochs) -> float:
    plain = [times[e] for e in epochs if e not in traced] or [times[e] for e in epochs]
    return float(np.mean(plain))


def epoch_seconds(workdir: Path, epochs) -> dict:
    """A finished run's epoch times: `per_epoch` (list, or None if unknown), `steady` (the mean over
    the epochs without tracing, or over all if every epoch has it), `first` (epoch 1's) and `source`.

    `epochs` is the run's epoch count, or the list of its phases' epochs (a multi-phase method:
    `epoch_times.json` counts epochs on across the phases, and every phase is its own training
    call, so its first epoch traces again). With more than one phase, the figures above cover
    all the run's epochs, and `phases` holds each phase's `epochs`, `steady` and `first` (None
    where unknown).
    """
    counts = [int(epochs)] if isinstance(epochs, (int, np.integer)) else [int(n) for n in epochs]
    total = sum(counts)
    starts = np.cumsum([0] + counts[:-1]).tolist()
    times, traced = read_epoch_times(workdir)
    if all(e in times for e in range(total)):
        out = {
            "per_epoch": [times[e] for e in range(total)],
            "traced": sorted(traced),
            "steady": _mean_untraced(times, traced, range(total)),
            "first": times[0],
            "source": EPOCH_TIMES_FILE,
        }
        if len(counts) > 1:
            out["phases"] = [
                {"epochs": n, "steady": _mean_untraced(times, traced, range(b, b + n)), "first": times[b]}
                for b, n in zip(starts, counts)
            ]
        return out
    state = _state(workdir)  # a run trained without the callback: the last invocation's mean
    trained = total - int(state.get("resumed_at_epoch") or 0)
    if state.get("train_seconds") is not None and trained > 0:
        out = {
            "per_epoch": None,
            "traced": None,
            "steady": float(state["train_seconds"]) / trained,
            "first": None,
            "source": "state.json",
        }
    else:
        out = {"per_epoch": None, "traced": None, "steady": None, "first": None, "source": "none"}
    if len(counts) > 1:
        out["phases"] = [{"epochs": n, "steady": None, "first": None} for n in counts]
    return out


def run_all(runs, quiet: bool, metric: str = "top1") -> None:
    from keras_ee import dumps, evaluation, experiment

    for i, r in enumerate(runs, 1):
        workdir, tag = r["workdir"], f"[{i}/{len(runs)} {r['label']} seed {r['seed']}]"
        dump = finished(workdir)
        if dump is None:
            print(f"{tag} training into {workdir}", flush=True)
            t0 = time.perf_counter()
            experiment.train(r["config"], workdir, verbose=0 if quiet else "progress", callbacks=[epoch_timer(workdir)])
            print(f"{tag} done in {time.perf_counter() - t0:.0f} s", flush=True)
            dump = dumps.load_dump(workdir / "dump")
        else:
            print(f"{tag} finished earlier: reusing {workdir}", flush=True)
        ev = evaluation.evaluate_dump(
            dump, kind=r["config"].confidence, name=f"{r['label']}-s{r['seed']}", metric=metric
        )
        # The folder `keras-ee evaluate --metric` writes to, so the two never overwrite each other.
        evaluation.write_evaluation(
            ev,
            workdir / "eval" / ("" if metric == "top1" else metric),
            title=f"{r['config'].model} / {r['label']} on {r['config'].dataset}, seed {r['seed']}",
        )
        r["evaluation"] = ev
        phases = run_phases(r["config"])
        r["phases"] = [{"name": p.name, "epochs": p.epochs} for p in phases]
        r["timing"] = epoch_seconds(workdir, [p.epochs for p in phases])


def score_variants(runs, methods, metric: str = "top1") -> tuple[list[dict], list[dict]]:
    """Each method's runs again under every confidence score its method saved, as rows `LABEL [KIND]`.

    A method may save its own confidence scores of the dump (`scores/<kind>.npz`; budget-aware
    gating: the gater's); the same thresholds sweep then calibrates them, and the table and
    plot show both curves of the same runs side by side.
    """
    from keras_ee import dumps, evaluation

    extra_runs, extra_methods = [], []
    for m in methods:
        rs = [r for r in runs if r["label"] == m["label"]]
        kinds = set.intersection(*(set(evaluation.run_score_kinds(r["workdir"])) for r in rs)) if rs else set()
        for kind in sorted(kinds):
            label = f"{m['label']} [{kind}]"
            extra_methods.append({**m, "label": label})
            for r in rs:
                ev = evaluation.evaluate_dump(
                    dumps.load_dump(r["workdir"] / "dump"),
                    kind=kind,
                    name=f"{label}-s{r['seed']}",
                    scores=evaluation.load_run_scores(r["workdir"], kind),
                    metric=metric,
                )
                extra_runs.append({**r, "label": label, "evaluation": ev})
    return extra_runs, extra_methods


# ----------------------------------------------------------------------------- report


def _stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std (ddof=0) and count of the finite values along axis 0."""
    values = np.asarray(values, np.float64)
    ok = np.isfinite(values)
    n = ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(np.where(ok, values, 0), 0) / np.maximum(n, 1), np.nan)
        var = np.where(n > 0, np.nansum(np.where(ok, (values - mean) ** 2, 0), 0) / np.maximum(n, 1), np.nan)
    return mean, np.sqrt(var), n


def _cell(mean, std, n, total, digits=2) -> str:
    if n == 0 or not np.isfinite(mean):
        return "–"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if n == total else f"{text} (n={n})"


def _cells(entry: dict, key: str, total: int, digits: int = 2) -> list[str]:
    """The table cells of `entry[key]`'s mean ± std (one per column, or one for a scalar)."""
    mean, std, n = (np.atleast_1d(entry[f"{key}_{part}"]) for part in ("mean", "std", "n"))
    return [_cell(m, s, c, total, digits) for m, s, c in zip(mean, std, n)]


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def paired_differences(entries: dict, reference: str) -> dict:
    """Every other label's per-seed difference to `reference` (budget accuracies and the mean), with stats."""
    ref = entries[reference]
    differences = {}
    for label, e in entries.items():
        if label == reference:
            continue
        d_acc, d_auc = e["budget_acc"] - ref["budget_acc"], e["mean_acc"] - ref["mean_acc"]
        d = {"budget_acc": d_acc, "mean_acc": d_auc, "seeds_better": int(np.sum(d_auc > 0))}
        for key in ("budget_acc", "mean_acc"):
            mean, std, n = _stats(d[key])
            d[f"{key}_mean"], d[f"{key}_std"], d[f"{key}_n"] = mean, std, n
        differences[label] = d
    return differences


def summarize(runs, methods, seeds, budgets=None, reference="baseline") -> dict:
    """Per method (label): per-seed and mean ± std of every figure of the table, in percent and seconds."""
    from keras_ee import evaluation, formatting

    curves = [r["evaluation"].curve() for r in runs]
    lo, hi = max(float(c[0][0]) for c in curves), min(float(c[0][-1]) for c in curves)
    if budgets:
        budgets = np.asarray(sorted(budgets), np.float64)
    elif hi > lo:
        budgets = np.linspace(lo, hi, 6)[1:-1]
    else:
        budgets = np.array([lo])
    first = runs[0]["evaluation"]
    out = {
        "seeds": list(seeds),
        "budgets": budgets.tolist(),
        "budget_labels": [formatting.budget_label(b) for b in budgets],
        "mean_range": [lo, hi],
        "mul_adds": list(first.mul_adds),
        "params": list(first.params),
        "methods": {},
    }
    for m in methods:
        rs = sorted((r for r in runs if r["label"] == m["label"]), key=lambda r: seeds.index(r["seed"]))
        acc = np.array([evaluation.accuracy_at(*r["evaluation"].curve(), budgets) for r in rs]) * 100
        auc = np.array([evaluation.mean_accuracy_over(*r["evaluation"].curve(), lo, hi) for r in rs]) * 100
        anytime = np.array([r["evaluation"].test_anytime for r in rs]) * 100
        spe = np.array([np.nan if r["timing"]["steady"] is None else r["timing"]["steady"] for r in rs])
        first_epoch = np.array([np.nan if r["timing"]["first"] is None else r["timing"]["first"] for r in rs])
        entry = {
            "method": m["method"],
            "options": m["options"],
            "runs": [str(r["workdir"]) for r in rs],
            "budget_acc": acc,
            "mean_acc": auc,
            "anytime": anytime,
            "seconds_per_epoch": spe,
            "first_epoch_seconds": first_epoch,
            "epoch_seconds": [r["timing"]["per_epoch"] for r in rs],
            "traced_epochs": [r["timing"]["traced"] for r in rs],
            "timing_source": [r["timing"]["source"] for r in rs],
        }
        keys = ["budget_acc", "mean_acc", "anytime", "seconds_per_epoch", "first_epoch_seconds"]
        if len(rs[0]["phases"]) > 1:  # a multi-phase method: its epochs and times per phase too

            def per_phase(field):
                return np.array(
                    [[np.nan if p[field] is None else p[field] for p in r["timing"]["phases"]] for r in rs], np.float64
                )

            entry["phases"] = rs[0]["phases"]
            entry["epochs"] = sum(p["epochs"] for p in rs[0]["phases"])
            entry["phase_seconds_per_epoch"] = per_phase("steady")
            entry["phase_first_epoch_seconds"] = per_phase("first")
            keys += ["phase_seconds_per_epoch", "phase_first_epoch_seconds"]
        for key in keys:
            mean, std, n = _stats(entry[key])
            entry[f"{key}_mean"], entry[f"{key}_std"], entry[f"{key}_n"] = mean, std, n
        out["methods"][m["label"]] = entry
    # The first reference present is the main one (`reference`, `differences`); any further ones go to
    # `more_differences` with a table each.
    references = [r for r in ([reference] if isinstance(reference, str) else reference) if r in out["methods"]]
    if references and len(methods) > 1:
        out["reference"] = references[0]
        out["differences"] = paired_differences(out["methods"], references[0])
        if len(references) > 1:
            out["more_differences"] = {r: paired_differences(out["methods"], r) for r in references[1:]}
    return out


_ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X")


def _roman(index: int) -> str:
    """Phase `index` (0-based) as I, II, ..."""
    return _ROMAN[index] if index < len(_ROMAN) else str(index + 1)


def _time_cell(entry: dict, key: str, total: int) -> list[str]:
    """The s/epoch or 1st-epoch cell: mean ± std, per phase ("12.3 ± 0.1 (I) / 5.1 ± 0.0 (II)") for a
    multi-phase method whose per-phase times are known."""
    if "phases" in entry:
        parts = _cells(entry, f"phase_{key}", total, 1)
        if any(p != "–" for p in parts):
            return [" / ".join(f"{p} ({_roman(i)})" for i, p in enumerate(parts))]
    return _cells(entry, key, total, 1)


def _phases_text(summary: dict, epochs: int) -> str:
    """The caption's sentence on multi-phase methods ("" if there are none)."""
    groups: dict[str, list[str]] = {}
    most = 1
    for label, e in summary["methods"].items():
        if "phases" in e:
            later = ", ".join(
                f"phase {_roman(i)} {p['epochs']} epoch{'s' if p['epochs'] != 1 else ''}"
                for i, p in enumerate(e["phases"][1:], 1)
            )
            groups.setdefault(later, []).append(label)
            most = max(most, len(e["phases"]))
    if not groups:
        return ""
    return (
        f" For methods with phases, the {epochs} epoch{'s' if epochs != 1 else ''} above "
        f"{'are' if epochs != 1 else 'is'} phase I and later phases add their own ("
        + "; ".join(f"{', '.join(labels)}: {later}" for later, labels in groups.items())
        + "), counted on across the phases; their s/epoch and 1st epoch s are given per phase ("
        + " / ".join(_roman(i) for i in range(most))
        + "), each phase being its own training call."
    )


def _accuracy_name(metric: str) -> str:
    return "Test accuracy" if metric == "top1" else f"Top-{metric[3:]} test accuracy"


def result_names(metric: str) -> tuple[str, str, str]:
    """results.md, results.json, budget_curves.png; with a `_top5` suffix for top-5, so both tables coexist."""
    suffix = "" if metric == "top1" else f"_{metric}"
    return f"results{suffix}.md", f"results{suffix}.json", f"budget_curves{suffix}.png"


def markdown(summary: dict, base, command: str, metric: str = "top1") -> str:
    from keras_ee import formatting

    seeds, lo, hi = summary["seeds"], *summary["mean_range"]
    ns = len(seeds)
    k = len(summary["mul_adds"])
    unit, scale = formatting.count_unit(summary["mul_adds"])
    exits = " / ".join(formatting.format_count(c, scale) for c in summary["mul_adds"])
    lines = [
        f"{base.model} on {base.dataset}"
        + (f" (train_size {base.train_size})" if base.train_size else "")
        + (f" ({base.samples_per_class} training images per class)" if base.samples_per_class else "")
        + f", {base.epochs} epoch{'s' if base.epochs != 1 else ''}, batch {base.batch_size}; "
        f"exits at {exits} {unit} Mul-Adds. "
        f"Mean ± std (ddof=0) over seeds {', '.join(map(str, seeds))}. {_accuracy_name(metric)} (%) at Mul-Add "
        "budgets "
        f"(thresholds calibrated on validation, {base.confidence}), the mean accuracy over "
        f"{formatting.budget_label(lo)}-{formatting.budget_label(hi)} (the range every curve covers), "
        "anytime accuracy (%) of every exit on the whole test set, and the wall time of a training epoch (s; "
        "training, validation and the run's writes): s/epoch is the mean over the epochs after the first of each "
        "training call (the first one also traces the train and test functions; it is shown on its own)."
        + _phases_text(summary, base.epochs),
        "",
        "| method | "
        + " | ".join(f"@{b}" for b in summary["budget_labels"])
        + f" | mean {formatting.budget_label(lo)}-{formatting.budget_label(hi)} | "
        + " | ".join(f"exit {j + 1}" for j in range(k))
        + " | s/epoch | 1st epoch s |",
        "|---" * (len(summary["budgets"]) + k + 4) + "|",
    ]
    for label, e in summary["methods"].items():
        cells = (
            _cells(e, "budget_acc", ns)
            + _cells(e, "mean_acc", ns)
            + _cells(e, "anytime", ns)
            + _time_cell(e, "seconds_per_epoch", ns)
            + _time_cell(e, "first_epoch_seconds", ns)
        )
        name = label if label == e["method"] else f"{label} ({e['method']})"
        if e["options"]:
            name += " " + ", ".join(
                f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
                for key, value in e["options"].items()
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tables = {summary["reference"]: summary["differences"]} if summary.get("differences") else {}
    tables.update(summary.get("more_differences", {}))
    for ref, differences in tables.items():
        lines += [
            "",
            f"Paired difference to {ref} (points; per seed, then mean ± std over seeds):",
            "",
            "| method | "
            + " | ".join(f"@{b}" for b in summary["budget_labels"])
            + f" | mean {formatting.budget_label(lo)}-{formatting.budget_label(hi)} | seeds better (mean) |",
            "|---" * (len(summary["budgets"]) + 3) + "|",
        ]
        per_seed_lines = []
        for label, d in differences.items():
            cells = _cells(d, "budget_acc", ns) + _cells(d, "mean_acc", ns)
            per_seed = "; ".join(
                f"s{s}: " + " ".join("–" if not np.isfinite(v) else f"{v:+.2f}" for v in row)
                for s, row in zip(seeds, d["budget_acc"])
            )
            lines.append(f"| {label} − {ref} | " + " | ".join(cells) + f" | {d['seeds_better']}/{ns} |")
            per_seed_lines.append(f"- {label} − {ref} at " + ", ".join(summary["budget_labels"]) + f": {per_seed}")
        lines += ["", *per_seed_lines]
    sources = sorted({s for e in summary["methods"].values() for s in e["timing_source"]})
    lines += ["", f"Epoch times from {', '.join(sources)}. Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(runs, summary: dict, base, path: Path, metric: str = "top1") -> Path:
    """Every method's budget curve (mean over seeds, ± std shaded) and anytime accuracy per exit."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from keras_ee import evaluation, formatting

    unit, scale = formatting.count_unit(summary["mul_adds"])
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    costs = np.asarray(summary["mul_adds"], np.float64) / scale
    for i, (label, e) in enumerate(summary["methods"].items()):
        color = f"C{i}"
        curves = [r["evaluation"].curve() for r in runs if r["label"] == label]
        lo, hi = max(float(c[0][0]) for c in curves), min(float(c[0][-1]) for c in curves)
        grid = np.linspace(lo, hi, 200) if hi > lo else np.array([lo])
        ys = np.array([evaluation.accuracy_at(x, y, grid) for x, y in curves]) * 100
        mean, std = ys.mean(0), ys.std(0)
        ax.plot(grid / scale, mean, "-", color=color, lw=1.8, label=f"{label}: budgeted batch")
        if len(curves) > 1:
            ax.fill_between(grid / scale, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        ax.errorbar(
            costs,
            e["anytime_mean"],
            yerr=e["anytime_std"] if len(curves) > 1 else None,
            fmt="o--",
            color=color,
            ms=4,
            lw=0.8,
            alpha=0.75,
            capsize=3,
            label=f"{label}: single exits",
        )
    for b in summary["budgets"]:
        ax.axvline(b / scale, color="0.6", lw=0.6, ls=":")
    ax.set_xlabel(f"mean Mul-Adds per image ({unit})" if unit else "mean Mul-Adds per image")
    ax.set_ylabel(f"{_accuracy_name(metric).lower()} (%)")
    seeds = summary["seeds"]
    ax.set_title(
        f"{base.model} on {base.dataset}, {base.epochs} epoch{'s' if base.epochs != 1 else ''}: "
        + (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    if len(summary["methods"]) > 2:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.set_size_inches(9.6, 4.6)
    else:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    from keras_ee.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = _parser().parse_args(argv)
    try:
        runs, base, methods = plan(args)
    except UsageError as e:
        print(f"bench/methods.py: error: {e}", file=sys.stderr)
        return 2

    from keras_ee import cli

    # keras-ee's one error policy: a busy run folder, a full disk or bad data is one line and an
    # exit status, not a traceback.
    return cli.run_command("bench/methods.py", lambda a: _run(a, runs, base, methods, argv), args)


def _run(args, runs, base, methods, argv) -> None:
    from keras_ee.atomic import atomic_write_json, atomic_write_text

    command = "python bench/methods.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    print(
        f"{len(methods)} method(s) x {len(args.seeds)} seed(s) = {len(runs)} runs into {args.out}: "
        + ", ".join(m["label"] for m in methods),
        flush=True,
    )
    run_all(runs, args.quiet, args.metric)
    extra_runs, extra_methods = score_variants(runs, methods, args.metric)
    runs, methods = runs + extra_runs, methods + extra_methods
    summary = summarize(runs, methods, list(args.seeds), args.budgets, args.reference)
    table = markdown(summary, base, command, args.metric)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [args.out / n for n in result_names(args.metric)]
    atomic_write_text(names[0], table)
    atomic_write_json(
        names[1],
        _json_safe(
            {
                "command": command,
                "metric": args.metric,
                "settings": {
                    k: v for k, v in base.to_dict().items() if k not in ("method", "method_options", "seed", "evaluate")
                },
                **summary,
            }
        ),
    )
    plot(runs, summary, base, names[2], args.metric)
    print("\n" + table)
    print("wrote " + ", ".join(map(str, names)))


if __name__ == "__main__":
    sys.exit(main())
