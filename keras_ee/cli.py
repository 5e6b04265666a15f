"""The `keras-ee` command line (also `python -m keras_ee`).

```
keras-ee train [--config FILE] [--dataset NAME] [--model PRESET] [--method l2w] ... --out RUN
keras-ee evaluate RUN            anytime + budget tables, RUN/eval/{anytime,budget}.csv, budget.png
                                 (--confidence gater: a gating run's learned gater as the score;
                                 --metric top5: top-5 correctness, into RUN/eval/top5/)
keras-ee compare RUN RUN ...     overlay curves, accuracy at budgets, mean accuracy over the common range
keras-ee plot-weights RUN        L2W-DEN Figure 8 from RUN/l2w_samples.npz
keras-ee sweep DUMP              budget sweep of any dump folder (see keras_ee.dumps)
keras-ee predict RUN --budget 15M --images DIR_OR_NPZ --out predictions.csv
                                 real early exit (keras_ee.inference) on raw images
keras-ee models                  every preset's exits, params and Mul-Adds
keras-ee methods                 every training method: paper, options and defaults
keras-ee datasets                the dataset names
keras-ee import CHECKPOINT --out RUN   an authors' PyTorch MSDNet/RANet checkpoint as a run (keras_ee.interop)
```
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import tensorflow as tf

    from keras_ee.config import TrainConfig

from keras_ee.quiet import quiet_tensorflow_startup


def parse_budget(text: str) -> float:
    """'15M' -> 15e6, '1.5G' -> 1.5e9, '8000' -> 8000.0 (`keras_ee.costs.parse_mul_adds` for argparse)."""
    from keras_ee.costs import parse_mul_adds

    try:
        return parse_mul_adds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, received {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """`keras-ee train`: --config, --out, --quiet and a flag for each setting (`keras_ee.config.settings`)."""
    from keras_ee.config import FLAG_GROUPS, settings

    p = sub.add_parser(
        "train",
        help="train a multi-exit model, dump its logits and evaluate it",
        description="Train a multi-exit model. Flags override --config; an interrupted run "
        "resumes when the same command is run again.",
    )
    p.add_argument("--config", type=Path, help="a .json or .toml file with TrainConfig keys")
    p.add_argument("--out", type=Path, help="run folder (default runs/<model>-<method>-<dataset>-s<seed>)")
    groups = {name: p.add_argument_group(name, description) for name, description in FLAG_GROUPS.items()}
    for setting in settings():
        flag = setting.flag
        if flag is None:
            continue
        options: dict[str, Any] = dict(dest=setting.key, help=flag.help() if callable(flag.help) else flag.help)
        if flag.metavar:
            options["metavar"] = flag.metavar
        if flag.choices:
            options["choices"] = list(flag.choices)
        if setting.type is bool:  # sets the value that is not the default
            options.update(action="store_const", const=not setting.default)
        elif setting.type is dict:
            options.update(action="append", type=_key_value)
        elif setting.type is list:
            options.update(action="append", type=_argument_type(flag.parse))
        elif setting.nested:  # a preset by name (`--recipe`); its fields' flags follow
            options["dest"] = _preset_dest(setting.key)
        else:
            options["type"] = _argument_type(flag.parse) if flag.parse else setting.type
            if options["type"] is str:
                del options["type"]
        groups[flag.group].add_argument(setting.flag_name, **options)
        for option in flag.method_options:
            groups[option.group].add_argument(
                f"--{option.key.replace('_', '-')}",
                dest=_method_option_dest(option.key),
                metavar=option.key.upper(),
                type=option.type,
                help=option.help,
            )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _argument_type(parse: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """`parse` for argparse: its `ValueError` becomes the error message (not "invalid value")."""

    def argument(text: str) -> Any:
        try:
            return parse(text) if parse else text
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    argument.__name__ = getattr(parse, "__name__", "value")
    return argument


def _method_option_dest(key: str) -> str:
    """The dest of a method option's shorthand flag (`--q`), apart from the settings' own."""
    return f"method_option_{key}"


def _preset_dest(key: str) -> str:
    """The dest of a nested setting's preset flag (`--recipe NAME`)."""
    return f"{key}_preset"


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- --config file <- --recipe <- flags (keys the file leaves out keep their defaults)."""
    from keras_ee.config import TrainConfig, recipe_values, settings

    values: dict[str, Any] = {}
    if args.config:
        TrainConfig.from_file(args.config)  # its own errors first, naming the file
        values = TrainConfig.read_values(args.config)
    preset = getattr(args, _preset_dest("recipe"))
    if preset is not None:  # `--recipe NAME`: its values, under every flag
        dataset = args.dataset if args.dataset is not None else values.get("dataset", TrainConfig.dataset)
        values.update(recipe_values(preset, dataset))
    flagged = [s for s in settings() if s.flag is not None and not s.nested]
    shorthands: dict[str, Any] = {}
    for setting in flagged:
        given = getattr(args, setting.key)
        if setting.type is dict:
            values[setting.key] = {**values.get(setting.key, {}), **dict(given or [])}
        elif given is not None:
            values[setting.key] = given
        for option in setting.flag.method_options if setting.flag else ():
            if getattr(args, _method_option_dest(option.key)) is not None:
                shorthands[option.key] = getattr(args, _method_option_dest(option.key))
    values["method_options"] = {**values.get("method_options", {}), **shorthands}  # over --method-option
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> None:
    from keras_ee import experiment

    config = _config_from_args(args)
    out = args.out or Path("runs") / f"{config.model}-{config.method}-{config.dataset.replace(':', '_')}-s{config.seed}"
    experiment.train(config, out, verbose=0 if args.quiet else "progress")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from keras_ee import evaluation
    from keras_ee.interop import run_folder

    data_flags = any(v is not None for v in (args.dataset, args.data_dir, args.val_size))
    if data_flags or (run_folder.is_imported_run(args.run) and not (args.run / "dump").is_dir()):
        dump = run_folder.dump_imported_run(args.run, args.dataset, args.data_dir, args.val_size)
        print(f"[keras-ee] wrote {dump}: the imported model's logits on a hold-out and the test set")
    evaluation.evaluate_run(
        _run_dir(args.run), kind=args.confidence, mode=args.mode, shortfall=args.shortfall, metric=args.metric
    )


def _run_dir(path: Path) -> Path:
    if not (path / "dump").is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} is not a finished run folder: it has no dump/ "
            f"(train it first with `keras-ee train --out {path}`)."
        )
    return path


def cmd_compare(args: argparse.Namespace) -> None:
    from keras_ee import dumps, evaluation, plots
    from keras_ee.atomic import atomic_path, atomic_write_text, check_out_folder, claim_out_folder

    check_out_folder(args.out)
    names = [p.name for p in args.runs]
    if len(set(names)) != len(names):  # distinct labels for the legend
        names = [str(p) for p in args.runs]
    evs = [
        evaluation.evaluate_dump(
            dumps.load_dump(_run_dir(p) / "dump"),
            kind=args.confidence,
            name=n,
            shortfall=args.shortfall,
            metric=args.metric,
        )
        for p, n in zip(args.runs, names)
    ]
    text, rows = evaluation.compare(evs, budgets=args.budgets)
    claim_out_folder(args.out, "compare")
    with atomic_path(args.out / "compare.png") as tmp:
        plots.budget_plot({ev.name: ev for ev in evs}, tmp)
    plot = args.out / "compare.png"
    atomic_write_text(args.out / "compare.json", json.dumps(rows, indent=2) + "\n")  # NaN: a budget off a curve
    print(text)
    print(f"\nwrote {plot} and {args.out / 'compare.json'}")


def cmd_plot_weights(args: argparse.Namespace) -> None:
    import numpy as np

    from keras_ee import plots
    from keras_ee.atomic import atomic_path, check_out_file, writing

    f = args.run / "l2w_samples.npz"
    if not f.is_file():
        raise FileNotFoundError(f"{str(f)!r} not found: plot-weights needs a finished L2W run (method l2w).")
    out = check_out_file(args.out or args.run / "weights.png", expected="the path of the PNG to write")
    stats = np.load(f)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            plots.sample_weight_plot(stats["loss"], stats["weight"], stats["selected_by_exit_1"], tmp)
    print(f"wrote {out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from keras_ee import dumps, evaluation
    from keras_ee.atomic import check_out_folder, claim_out_folder

    dump = dumps.load_dump(args.dump)
    default_out = args.dump if args.metric == "top1" else Path(args.dump) / args.metric
    out = check_out_folder(args.out or default_out, recognise=dumps.is_dump_folder)
    ev = evaluation.evaluate_dump(
        dump,
        kind=args.confidence,
        mode=args.mode,
        name=Path(args.dump).name,
        shortfall=args.shortfall,
        metric=args.metric,
    )
    paths = evaluation.write_evaluation(ev, claim_out_folder(out, "sweep"))
    print(evaluation.format_anytime(ev))
    print()
    print(evaluation.format_budget(ev, every=2))
    print(f"\nwrote {paths['anytime']}, {paths['budget']}, {paths['plot']}")


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_images(source: Path, channels: int) -> tuple[np.ndarray, list[str]]:
    """(images, names) from an .npz (key `x` or `images`, or its only array) or a folder of PNG/JPEG files."""
    import numpy as np

    from keras_ee import inputs

    what = f"--images {str(source)!r}"
    if source.is_dir():
        import tensorflow as tf

        files = sorted(f for f in source.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{what} holds no .png, .jpg or .jpeg files.")
        decoded: list[np.ndarray] = []
        for f in files:
            try:
                img = tf.io.decode_image(f.read_bytes(), channels=channels, expand_animations=False).numpy()
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(f"cannot decode {str(f)!r}: {_tf_error_text(e)}") from None
            if decoded and img.shape != decoded[0].shape:
                raise ValueError(
                    f"{str(f)!r} is {img.shape[1]}x{img.shape[0]}, {str(files[0])!r} is "
                    f"{decoded[0].shape[1]}x{decoded[0].shape[0]}; every image must have the model's size."
                )
            decoded.append(img)
        return np.stack(decoded), [f.name for f in files]
    if not source.is_file():
        raise FileNotFoundError(f"{what} does not exist (a folder of PNG/JPEG files or an .npz).")
    from keras_ee.data import npz

    expected = "an array of images named 'x' or 'images'"
    with npz.open_archive(source, expected, "np.savez(path, x=images)") as z:
        keys = list(z.files)
        key = next((k for k in ("x", "images") if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{what} holds arrays {keys}; expected one named 'x' or 'images'.")
        images = npz.read_member(z, key, source, "a numeric array of images")
    images = inputs.check_numeric(images, f"{what} (array {key!r})")
    if images.ndim == 3 and channels == 1:
        images = images[..., None]
    return images, [str(i) for i in range(len(images))]


def _tf_error_text(e: tf.errors.OpError) -> str:
    """A TensorFlow op error's message without its internals (`{{function_node ...}}`, `[Op:...]`)."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", e.message).splitlines()[0] if e.message else ""
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text).strip() or type(e).__name__


def _check_predict_flags(args: argparse.Namespace) -> None:
    """`predict`'s numeric flags, before anything is loaded (a run folder's exit count from costs.json)."""
    from keras_ee import inputs

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer; received {args.batch_size}.")
    if args.deadline is not None:
        num_exits = None
        try:
            num_exits = len(json.loads((args.run / "costs.json").read_text())["mul_adds"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not a run folder (a .keras file, a mistake): the deadline's upper end is checked later
        try:
            inputs.check_deadline(args.deadline, num_exits)
        except ValueError as e:
            raise ValueError(f"--deadline {args.deadline}: {e}") from None


def cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np

    from keras_ee import inputs
    from keras_ee.atomic import atomic_write_text, check_out_file, writing
    from keras_ee.formatting import budget_label
    from keras_ee.inference import EarlyExitModel

    check_out_file(args.out, expected="the path of the CSV to write")
    _check_predict_flags(args)
    run = args.run
    if run.is_file():  # a saved EarlyExitModel
        if run.suffix != ".keras":
            raise ValueError(
                f"{str(run)!r} is not a run folder or a .keras model: predict takes the folder of "
                "`keras-ee train` or a .keras file written by EarlyExitModel.save."
            )
        ee = EarlyExitModel.load(run)
        if args.confidence is not None and args.confidence != ee.kind:
            raise ValueError(
                f"{str(run)!r} is calibrated on the {ee.kind} confidence; --confidence {args.confidence} cannot "
                "be applied to a saved model (it keeps only the validation scores of its own confidence): "
                "leave the flag out, or give the run folder."
            )
        if args.budget is not None:
            ee.set_budget(args.budget)
        if ee.preprocessing is None and not args.normalized:
            raise ValueError(
                f"{str(run)!r} is a saved model without its dataset's statistics: pass --normalized "
                "with images already preprocessed as in training, or give the run folder."
            )
        if ee.preprocessing is not None and args.normalized:
            raise ValueError(
                f"{str(run)!r} normalises raw pixels itself (it was saved from a run folder): leave out "
                "--normalized and give images as the dataset stores them."
            )
    else:
        if args.budget is None:
            raise ValueError("predict RUN needs --budget (mean Mul-Adds per image, e.g. 15M).")
        ee = EarlyExitModel.from_run(
            _run_dir(run), budget=args.budget, kind=args.confidence, raw_pixels=not args.normalized
        )
    shape = ee.input_shape_hw
    images, names = _read_images(args.images, shape[-1])
    if tuple(images.shape[1:]) != shape:
        raise ValueError(
            f"--images {str(args.images)!r} has images of shape {tuple(images.shape[1:])}; the model "
            f"takes {shape} (no resizing is done)."
        )
    what = f"--images {str(args.images)!r}"
    inputs.check_finite(images, names, what)
    warning = ee.check_pixels(images, names, what)  # raw pixels: the model normalises them
    if warning:
        print(f"keras-ee predict: warning: {warning}", file=sys.stderr)
    with warnings.catch_warnings():  # told above, naming the files
        warnings.simplefilter("ignore", inputs.PixelRangeWarning)
        out = ee.predict(images, batch_size=args.batch_size, deadline=args.deadline, pooled=args.pooled)
    cost = ee.costs[out["exit"] - 1]
    lines = ["image,label,exit,confidence,mul_adds"]
    for name, label, ex, conf, c in zip(names, out["label"], out["exit"], out["confidence"], cost):
        lines.append(f"{name},{int(label)},{int(ex)},{repr(float(conf))},{int(c) if float(c).is_integer() else c}")
    with writing(args.out):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, "\n".join(lines) + "\n")
    counts = np.bincount(out["exit"], minlength=ee.num_exits + 1)[1:]
    budget = "thresholds as given" if ee.budget is None else f"budget {budget_label(ee.budget)}"
    print(
        f"{len(names)} images, {budget}: mean {budget_label(float(cost.mean()) if len(cost) else 0.0)} Mul-Adds "
        f"per image (the last exit {budget_label(ee.costs[-1])}); per exit {counts.tolist()}"
    )
    print(f"wrote {args.out}")


def cmd_models(args: argparse.Namespace) -> None:
    from keras_ee import costs, models
    from keras_ee.models import presets

    if args.num_classes is None and args.rule == "reference":  # the presets' own costs: data, nothing built
        table = {name: vars(models.get_preset(name)) for name in models.list_presets()}
        print(costs.format_table(table))
    else:
        print(costs.presets_table(num_classes=args.num_classes, rule=args.rule))
    print()
    print(presets.describe_presets())


def cmd_methods(args: argparse.Namespace) -> None:
    from keras_ee.training import registry

    print(registry.methods_table())


def cmd_datasets(args: argparse.Namespace) -> None:
    from keras_ee import data

    print(data.datasets_table())


def _metric_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metric",
        default="top1",
        choices=["top1", "top5"],
        help="what counts as correct: the top-1 prediction (default) or the label among the exit's 5 "
        "largest logits (the HDKD paper's tables); exits are still chosen by the confidence score",
    )


def _shortfall_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shortfall",
        default="reference",
        choices=["reference", "exit_all"],
        help="when ties leave an exit fewer samples than its quota: keep its threshold at +inf "
        "(reference, MSDNet's code) or send every remaining sample out there (exit_all)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-ee", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("evaluate", help="anytime and budget evaluation of a run")
    p.add_argument("run", type=Path)
    p.add_argument(
        "--confidence",
        default="max_softmax",
        choices=["max_softmax", "margin", "entropy", "gater"],
        help="confidence score of the thresholds; gater: the learned gater's exit probability of a "
        "run trained with --method gating (written to RUN/eval/gater/)",
    )
    p.add_argument("--mode", default="geometric", choices=["geometric", "per_stage"])
    _shortfall_flag(p)
    p.add_argument(
        "--metric",
        default="top1",
        choices=["top1", "top5"],
        help="top1 (default) or top5: the label among the exit's 5 largest logits counts as correct (the "
        "HDKD paper's measure; written to RUN/eval/top5/); exits are still chosen by the confidence",
    )
    g = p.add_argument_group(
        "a run of `keras-ee import`",
        "its logits are dumped first (dump/): on a hold-out of the dataset's training split and its test set, "
        "normalised as the run's preprocessing.json says; given again, they dump anew",
    )
    g.add_argument("--dataset", help="dataset name or npz:PATH (default: the run's, cifar10/cifar100/imagenet)")
    g.add_argument("--data-dir", help="folder with local copies of the data")
    g.add_argument("--val-size", type=int, help="held-out images of the training split for calibration")
    p = sub.add_parser("compare", help="overlay the budget curves of several runs")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--budget", dest="budgets", type=parse_budget, action="append")
    p.add_argument("--confidence", default="max_softmax", choices=["max_softmax", "margin", "entropy"])
    p.add_argument("--out", type=Path, default=Path("compare"))
    _shortfall_flag(p)
    _metric_flag(p)
    p = sub.add_parser("plot-weights", help="L2W-DEN Figure 8 from an L2W run")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path)
    p = sub.add_parser("sweep", help="budget sweep of a dump folder")
    p.add_argument("dump", type=Path)
    p.add_argument(
        "--out", type=Path, help="folder for the CSVs and plot (default: the dump folder; DUMP/top5 with --metric top5)"
    )
    p.add_argument("--confidence", default="max_softmax", choices=["max_softmax", "margin", "entropy"])
    p.add_argument("--mode", default="geometric", choices=["geometric", "per_stage"])
    _shortfall_flag(p)
    _metric_flag(p)
    p = sub.add_parser(
        "predict",
        help="real early exit on images at a Mul-Add budget (keras_ee.inference)",
        description="Classify images with real early exit: each image stops at the first exit whose "
        "calibrated confidence reaches its threshold for the budget.",
    )
    p.add_argument("run", type=Path, help="a finished run folder, or a .keras file saved by EarlyExitModel.save")
    p.add_argument("--budget", type=parse_budget, help="mean Mul-Adds per image, e.g. 15M (required for a run folder)")
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        help="a folder of PNG/JPEG files (sorted by name) or an .npz (array 'x' or 'images'), raw pixels "
        "as the dataset stores them; normalised with the run's training statistics",
    )
    p.add_argument("--out", type=Path, required=True, help="the CSV: image,label,exit,confidence,mul_adds")
    p.add_argument("--normalized", action="store_true", help="the images are already preprocessed as in training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--pooled",
        action="store_true",
        help="throughput mode: pool the survivors of every batch per stage (the same decisions)",
    )
    p.add_argument("--deadline", type=int, help="anytime mode: every image has its prediction after this stage (1..K)")
    p.add_argument(
        "--confidence",
        default=None,
        choices=["max_softmax", "margin", "entropy"],
        help="confidence score (default: the run's)",
    )
    p = sub.add_parser("models", help="table of the architecture presets")
    p.add_argument(
        "--num-classes", type=int, default=None, help="default: each preset's own (100 CIFAR, 1000 ImageNet)"
    )
    p.add_argument("--rule", default="reference", choices=["reference", "macs"])
    sub.add_parser("methods", help="every training method: paper, options and defaults")
    sub.add_parser("datasets", help="list the dataset names")
    from keras_ee.interop import command as import_command

    import_command.add_parser(sub, _key_value)
    return parser


def cmd_import(args: argparse.Namespace) -> None:
    from keras_ee.interop import command as import_command

    import_command.run(args)


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "compare": cmd_compare,
    "plot-weights": cmd_plot_weights,
    "sweep": cmd_sweep,
    "predict": cmd_predict,
    "models": cmd_models,
    "methods": cmd_methods,
    "datasets": cmd_datasets,
    "import": cmd_import,
}


def main(argv: Sequence[str] | None = None) -> int:
    quiet_tensorflow_startup()
    args = build_parser().parse_args(argv)
    return run_command(f"keras-ee {args.command}", COMMANDS[args.command], args)


def run_command(prog: str, command: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run `command(args)` and turn its failure into one line on stderr and an exit status.

    The one error policy of every command line of keras-ee (`keras-ee ...` and `python -m
    tuning.search`): 0 done; 2 bad input (the message says what was wrong and what was
    expected); 3 non-finite training; 4 a path that cannot be written (full or read-only
    disk, permissions), naming the path; 130 interrupted. `KERAS_EE_DEBUG=1` raises instead.

    Args:
        prog: the message prefix, e.g. "keras-ee train".
        command: `fn(args)`; its return value is ignored.
        args: the parsed arguments.
    """
    try:
        command(args)
    except FloatingPointError as e:  # keras_ee.training.NonFiniteLossError: names the step and the exit
        if os.environ.get("KERAS_EE_DEBUG"):
            raise
        print(
            f"{prog}: training stopped: {e}\n(the last finished epoch is kept in the run's "
            "backup/; lower the learning rate or check the data, in a new --out folder)",
            file=sys.stderr,
        )
        return 3
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, MemoryError) as e:
        # Bad input is the user's to fix: say what, without a traceback.
        if os.environ.get("KERAS_EE_DEBUG"):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, permissions: name the path
        if os.environ.get("KERAS_EE_DEBUG"):
            raise
        print(f"{prog}: error: {_os_error_text(e)}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


def _os_error_text(e: OSError) -> str:
    from keras_ee.atomic import WriteError

    if not e.strerror:  # keras-ee's own message (RunWriteError, ...): it names the path already
        return _one_line(e)
    verb = "cannot write" if isinstance(e, WriteError) else "cannot access"
    where = f" {e.filename!r}" if e.filename else ""
    return f"{verb}{where}: {e.strerror}."
