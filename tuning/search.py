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

With `--distributed` the same command runs one process of keras-tuner's chief/worker search,
its role read from KERASTUNER_TUNER_ID / KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT
(`tuning.distributed`): the chief ("chief") serves the oracle, waits until every trial has
been given out and finished, then prints the ranking and writes `best.json`, once; each
worker ("tuner0", "tuner1", ...) trains the trials it is given, prints them and exits 0.
docs/distributed_tuning.md shows how to run it on one machine and across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from keras_ee import validation
from keras_ee.quiet import quiet_tensorflow_startup
from tuning import distributed

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
    from keras_ee.training import registry
    from keras_ee.training.registry import SearchRange

    space = search_space(config.method)
    aliases = registry.get_method(config.method).aliases

    class BudgetHyperModel(kt.HyperModel):
        def trial_config(self, hp) -> TrainConfig:
            options = dict(config.method_options)
            for name, rng in space.items():
                # The searched value replaces the option under any of its names (a run's config.json
                # writes `cost_weight`, the search `lambda`; `reference=code` writes the code's value).
                option = aliases.get(name, name)
                options = {k: v for k, v in options.items() if aliases.get(k, k) != option}
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
            return experiment.fit_run(
                trial, splits, model, callbacks, verbose=kwargs.get("verbose", 0), validation_data=val_ds
            )

    return BudgetHyperModel()


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """A trial a worker ran, as the chief's oracle scored it."""

    trial_id: str
    status: str
    score: float | None
    values: dict


def _tracking(tuner_class):
    """`tuner_class` recording each trial it ran (its id, status and score from the oracle)."""

    class Tracking(tuner_class):
        def __init__(self, *args, report=None, **kwargs):
            self.ran_trials = []
            self._report = report
            super().__init__(*args, **kwargs)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)  # reports the trial to the oracle (the chief's, on a worker)
            scored = self.oracle.get_trial(trial.trial_id)
            record = TrialRecord(trial.trial_id, scored.status, scored.score, dict(scored.hyperparameters.values))
            self.ran_trials.append(record)
            if self._report is not None:
                self._report(record)

    Tracking.__name__ = Tracking.__qualname__ = tuner_class.__name__
    return Tracking


def search(config, workdir, trials: int = 8, tuner: str = "bayesian", overwrite: bool = False, role=None, report=None):
    """Run the search; return (best TrainConfig, list of (score, hyper-parameters)).

    `role` (a `tuning.distributed.Role`) makes this process one of a distributed search:
    the chief blocks until the oracle has given out and received every trial and returns
    as above; a worker returns `(None, [TrialRecord of each trial it ran])`. `report`, if
    given, is called with each `TrialRecord` as the trial ends (progress on a worker).
    """
    import keras_tuner as kt

    from keras_ee import data
    from keras_ee.atomic import claim_out_folder

    validation.check_choice("tuner", tuner, TUNERS)
    validation.check_int("trials", trials, 1)
    if role is None:
        distributed.refuse_stray_env()
    else:
        # A worker must never wipe the project: sharing `directory` with the chief, it would
        # delete the chief's oracle.json and trial folders. `overwrite` is the chief's call.
        overwrite = overwrite and role.is_chief
    workdir = check_search_folder(workdir, what=None)
    splits = data.load_configured(config)
    claim_out_folder(workdir, "tuning")
    hypermodel = make_hypermodel(config, splits)
    if not search_space(config.method):
        trials = 1
    # keras-tuner reads its role from the environment (when the tuner is built, searches and saves).
    with role.environment() if role is not None else contextlib.nullcontext():
        objective = kt.Objective("val_budget_auc", direction="max")
        common = dict(
            objective=objective,
            max_trials=trials,
            directory=str(workdir),
            project_name=config.method.replace(":", "_"),
            overwrite=overwrite,
            seed=config.seed,
        )
        tuner_class = _tracking(kt.BayesianOptimization if tuner == "bayesian" else kt.RandomSearch)
        t = tuner_class(hypermodel, report=report, **common)
        try:
            if role is not None and not role.is_chief:
                # Blocks until the chief serves (gRPC wait_for_ready); then a worker started with another
                # --method / --config than the chief's is refused before it trains anything.
                theirs, ours = sorted(hp.name for hp in t.oracle.get_space().space), sorted(search_space(config.method))
                if theirs != ours:
                    raise ValueError(
                        f"--distributed: the chief at {role.address} searches {theirs or 'nothing'}, "
                        f"but this worker's method {config.method!r} searches {ours or 'nothing'}; "
                        "run every process with the same --method/--config."
                    )
            t.search(verbose=0)  # keras-tuner resumes a finished or interrupted search from `directory`
        except RuntimeError as e:
            if role is not None and role.is_chief and str(e).startswith("Failed to bind"):
                raise ValueError(
                    f"--distributed: the chief cannot listen on {role.address} (port in use, or not "
                    "an address of this machine; 0.0.0.0 listens on all of them)."
                ) from None
            raise
        except Exception as e:
            import grpc

            if role is not None and isinstance(e, grpc.RpcError):
                raise ValueError(
                    f"--distributed: lost the chief oracle at {role.address}: {e.code().name} ({e.details()})."
                ) from None
            raise
    if role is not None and not role.is_chief:
        return None, list(t.ran_trials)
    # On the chief, `search` returned once every trial was given out and has ended: the
    # oracle's records are final, and this is the one place that reads the winner.
    ranking = [
        (t.oracle.trials[tr.trial_id].score, tr.hyperparameters.values)
        for tr in t.oracle.get_best_trials(num_trials=trials)
    ]
    best = hypermodel.trial_config(t.get_best_hyperparameters(1)[0])
    return best, ranking


def is_search_folder(path) -> bool:
    """A search folder from before keras-ee marked its folders: `best.json` and keras-tuner projects."""
    entries = list(Path(path).iterdir())
    return bool(entries) and all(e.name == "best.json" or (e / "oracle.json").is_file() for e in entries)


def check_search_folder(path, what="--out") -> Path:
    """Refuse, before any work, a search folder that is a file or holds files keras-ee did not write
    (`--overwrite` deletes the method's project folder in it), or that cannot be written."""
    from keras_ee.atomic import check_out_folder

    return check_out_folder(path, what=what, recognise=is_search_folder)


def main(argv=None) -> int:
    from keras_ee.cli import run_command

    quiet_tensorflow_startup()
    return run_command("tuning.search", _main, _parser().parse_args(argv))


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start the search afresh instead of resuming "
        "(with --distributed: the chief's only; workers never delete the project)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one process of keras-tuner's chief/worker search, its role from KERASTUNER_TUNER_ID "
        "(chief | tuner0, tuner1, ...), KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT",
    )
    return p


def _main(args) -> None:
    """The command, its errors left to `keras_ee.cli.run_command` (one line and an exit status)."""
    from keras_ee.config import TrainConfig

    role = distributed.role_from_env() if args.distributed else None
    values = TrainConfig.from_file(args.config).to_dict() if args.config else TrainConfig(epochs=5).to_dict()
    for key in ("dataset", "data_dir", "model", "method", "epochs", "batch_size", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = TrainConfig.from_dict(values)
    check_search_folder(args.out)

    def report(record):
        print(f"{role.tuner_id}: trial {record.trial_id} {record.status.lower()}, " + _describe(record), flush=True)

    worker = role is not None and not role.is_chief
    if role is not None:
        what = ("starting the oracle" if role.is_chief else "waiting for trials from the chief") + f" at {role.address}"
        print(f"{role.tuner_id}: {what} ({args.trials} trials, project {args.out})", flush=True)
    best, ranking = search(
        config,
        args.out,
        trials=args.trials,
        tuner=args.tuner,
        overwrite=args.overwrite,
        role=role,
        report=report if worker else None,
    )
    if worker:
        # The chief holds the ranking and writes best.json; a worker only says what it ran.
        ids = ", ".join(r.trial_id for r in ranking) or "none"
        print(f"{role.tuner_id}: done, ran {len(ranking)} trial(s): {ids}", flush=True)
        return
    print("rank  val_budget_auc %  hyper-parameters")
    for i, (score, hp) in enumerate(ranking, 1):
        print(f"{i:>4}  {100 * score:>16.2f}  " + ", ".join(f"{k}={v:.3g}" for k, v in hp.items()))
    best.to_json(args.out / "best.json")  # atomic (keras_ee.atomic): a reader never sees half of it
    print(f"\nwrote {args.out / 'best.json'} (train it with: keras-ee train --config {args.out / 'best.json'})")


def _describe(record) -> str:
    score = "no score" if record.score is None else f"val_budget_auc {100 * record.score:.2f} %"
    values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.values.items())
    return f"{score}: {values}" if values else score


if __name__ == "__main__":
    sys.exit(main())
