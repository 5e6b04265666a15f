"""keras-tuner search of a training method's budget hyper-parameters.

The objective is `val_budget_auc` from `keras_ee.callbacks.BudgetCallback`: the mean
validation accuracy of the budgeted-batch curve over its Mul-Add range, i.e. exactly
what the papers compare. The searched hyper-parameters are the ones the method declares
when it registers (`register_method(..., search_space=...)`; `keras-ee methods` lists
them): L2W searches q (meta-data allocation) and delta (weight perturbation); a method
with none (baseline) runs a single trial, for reference.

    python -m tuning.search --dataset digits --method l2w --trials 8 --epochs 5 --out runs/tuning

writes keras-tuner's trial folder under `--out`, prints the ranking and saves
`best.json` (the winning TrainConfig, ready for `keras-ee train --config best.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TUNERS = ("bayesian", "random")


def search_space(method: str) -> dict:
    """`{hyper-parameter: SearchRange | SearchChoice}` the method registered (may be empty)."""
    from keras_ee.training import registry

    return dict(registry.get_method(method).search_space)


def make_hypermodel(config, splits):
    """A keras-tuner HyperModel training `config` with the searched method options."""
    import keras_tuner as kt

    from keras_ee import experiment
    from keras_ee.callbacks import BudgetCallback
    from keras_ee.config import TrainConfig
    from keras_ee.training.registry import SearchRange

    space = search_space(config.method)

    class BudgetHyperModel(kt.HyperModel):
        def trial_config(self, hp) -> TrainConfig:
            options = dict(config.method_options)
            for name, rng in space.items():
                if isinstance(rng, SearchRange):
                    options[name] = hp.Float(name, rng.low, rng.high, sampling=rng.sampling)
                else:
                    options[name] = hp.Choice(name, list(rng.values))
            return TrainConfig.from_dict({**config.to_dict(), "method_options": options})

        def build(self, hp):
            return experiment.build_model(self.trial_config(hp), splits)

        def fit(self, hp, model, *args, **kwargs):
            val_ds = splits.val_dataset(config.batch_size)
            # BudgetCallback first: the tuner's own callback reads the objective from the same logs.
            callbacks = [BudgetCallback(val_ds), *model.method.callbacks(), *kwargs.pop("callbacks", [])]
            kwargs.pop("validation_data", None)
            trial = self.trial_config(hp)
            # Every phase of the method (IMTA: two); the last phase's logs are the objective.
            return experiment.fit_run(trial, splits, model, callbacks, verbose=kwargs.get("verbose", 0),
                                      validation_data=val_ds)

    return BudgetHyperModel()


def search(config, workdir, trials: int = 8, tuner: str = "bayesian", overwrite: bool = False):
    """Run the search; return (best TrainConfig, list of (score, hyper-parameters))."""
    import keras_tuner as kt

    from keras_ee import experiment

    if tuner not in TUNERS:
        raise ValueError(f"`tuner` must be one of {TUNERS}; received {tuner!r}.")
    if trials < 1:
        raise ValueError(f"`trials` must be >= 1; received {trials}.")
    workdir = Path(workdir)
    splits = experiment.load_data(config)
    hypermodel = make_hypermodel(config, splits)
    if not search_space(config.method):
        trials = 1
    objective = kt.Objective("val_budget_auc", direction="max")
    common = dict(objective=objective, max_trials=trials, directory=str(workdir), project_name=config.method.replace(":", "_"),
                  overwrite=overwrite, seed=config.seed)
    t = kt.BayesianOptimization(hypermodel, **common) if tuner == "bayesian" else kt.RandomSearch(hypermodel, **common)
    t.search(verbose=0)  # keras-tuner resumes a finished or interrupted search from `directory`
    ranking = [(t.oracle.trials[tr.trial_id].score, tr.hyperparameters.values)
               for tr in t.oracle.get_best_trials(num_trials=trials)]
    best = hypermodel.trial_config(t.get_best_hyperparameters(1)[0])
    return best, ranking


def main(argv=None) -> int:
    from keras_ee.config import TrainConfig

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(prog="python -m tuning.search", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="base TrainConfig (.json/.toml)")
    p.add_argument("--dataset")
    p.add_argument("--data-dir")
    p.add_argument("--model")
    p.add_argument("--method", help="a registered method (`keras-ee methods`) or package.module:Class")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--tuner", choices=TUNERS, default="bayesian")
    p.add_argument("--out", type=Path, default=Path("runs/tuning"))
    p.add_argument("--overwrite", action="store_true", help="start the search afresh instead of resuming")
    args = p.parse_args(argv)
    values = TrainConfig.from_file(args.config).to_dict() if args.config else TrainConfig(epochs=5).to_dict()
    for key in ("dataset", "data_dir", "model", "method", "epochs", "batch_size", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    try:
        best, ranking = search(TrainConfig.from_dict(values), args.out, trials=args.trials, tuner=args.tuner,
                               overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"tuning.search: error: {e}", file=sys.stderr)
        return 2
    print("rank  val_budget_auc %  hyper-parameters")
    for i, (score, hp) in enumerate(ranking, 1):
        print(f"{i:>4}  {100 * score:>16.2f}  " + ", ".join(f"{k}={v:.3g}" for k, v in hp.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    best.to_json(args.out / "best.json")
    print(f"\nwrote {args.out / 'best.json'} (train it with: keras-ee train --config {args.out / 'best.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
