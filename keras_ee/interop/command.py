"""`keras-ee import CHECKPOINT --out RUN`: the command line of `keras_ee.interop.run_folder`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction[Any], key_value: Callable[[str], tuple[str, Any]]) -> None:
    """Registers `import` on the `keras-ee` subcommand parsers (`key_value` parses KEY=VALUE)."""
    p = sub.add_parser(
        "import",
        help="an authors' PyTorch checkpoint (MSDNet, RANet, IMTA phase II, L2W-DEN with its WPN, gphi_MSDNet with "
        "its gaters) as a run folder, without torch",
        description="Read a torch.save checkpoint of the authors' MSDNet, RANet or IMTA phase-II model, L2W-DEN's "
        "MSDNet with its WPN or gphi_MSDNet's GELU MSDNet with its gaters (zip or legacy, with or without "
        "DataParallel's module.), infer its architecture, and write a run folder like a trained one (model.keras, "
        "costs.json, preprocessing.json, config.json, import.json).",
    )
    p.add_argument("checkpoint", type=Path, help="the .pth / .pth.tar file")
    p.add_argument("--out", type=Path, required=True, help="the new run folder")
    p.add_argument("--model", help="a preset to load into (default: inferred from the checkpoint)")
    p.add_argument(
        "--model-option",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the preset or what was inferred (repeatable), e.g. input_shape=[160,160,3]",
    )
    p.add_argument(
        "--wpn-input",
        choices=("loss", "confidence"),
        help="an L2W-DEN checkpoint's WPN input (its --meta_net_input_type loss / conf; default loss): a WPN of K "
        "inputs does not say which",
    )
    p.add_argument("--dataset", help="cifar10, cifar100 or imagenet: the authors' normalisation (default: guessed)")


def run(args: argparse.Namespace) -> None:
    from keras_ee.interop.run_folder import IMPORT_FILE, import_run

    options = dict(args.model_option)
    if isinstance(options.get("input_shape"), list):
        options["input_shape"] = tuple(options["input_shape"])
    out = import_run(
        args.checkpoint,
        args.out,
        model=args.model,
        model_options=options,
        dataset=args.dataset,
        wpn_input=args.wpn_input,
    )
    import json

    report = json.loads((out / IMPORT_FILE).read_text())
    print(
        f"[keras-ee] imported {report['family']} ({report['preset']}, {report['num_classes']} classes, "
        f"{report['serialisation']} file) into {out}: {report['tensors_used']} of {report['tensors_total']} tensors "
        f"mapped onto {report['keras_weights']} Keras weights; see {out / IMPORT_FILE}."
    )
