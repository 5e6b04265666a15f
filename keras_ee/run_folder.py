"""A run folder: the names of its files, its state, and what a run recorded in it.

A run folder holds:

    config.json          the TrainConfig (a rerun with other settings is refused)
    model.keras          the trained MultiExitModel (custom objects registered)
    history.csv          per-epoch logs (loss and accuracy of every exit, WPN weight stats)
    tensorboard/         TensorBoard logs
    costs.json           per-exit cumulative params and Mul-Adds
    preprocessing.json   the input normalisation: pixel scale and the training split's
                         per-channel mean and std (what `keras-ee predict` applies to raw images),
                         and `pixel_range`, the min and max of its stored pixels (what
                         `keras-ee predict` accepts; absent in older runs: then unchecked)
    dump/                validation and test logits in the calibrator's dump format
    l2w_samples.npz      per-sample (loss, confidence, weight) of an L2W run (Figure 8)
    wpn.npz              an L2W run's WPN, to reuse frozen: --method-option weighting=frozen
                         --method-option wpn_weights_path=RUN/wpn.npz
    scores/              a method's own confidence scores of the dump (gating: gater.npz)
    hdkd.json            an HDKD-family run's final loss weights, moving averages, temperatures and
                         `meta_source` (which split fed the meta batches); hdkd_gamma.png its heat map
    eval/                anytime.csv, budget.csv, budget.png (after evaluation); eval/gater/ for
                         the gater's scores and confidence.png with both curves; eval/top5/ for
                         `keras-ee evaluate --metric top5`
    backup/              the training state after the last finished epoch; gone when done
    state.json           whether training finished, and how long it took
    .lock                the lock of the command working in the folder (see keras_ee.runs)
    .keras-ee.json       keras-ee's mark: a non-empty --out without it (or .lock) is refused

`RunFolder` names these files for the code that writes them (a method's `save_artifacts` hook
gets one). The fault-tolerant pieces (the lock, the backups, the history) are `keras_ee.runs`;
the run's flow is `keras_ee.experiment.train`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_ee import data
from keras_ee._typing import StrPath
from keras_ee.atomic import atomic_write_json
from keras_ee.atomic import check_out_folder as check_out_folder_rule
from keras_ee.config import TrainConfig

if TYPE_CHECKING:
    from keras_ee.data import DatasetSplits

STATE_FILE = "state.json"
SCORES_DIR = "scores"  # a method's own confidence scores of the dump (`scores/<kind>.npz`)
CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
MODEL_FILE = "model.keras"
DUMP_DIR = "dump"
LOCK_FILE = ".lock"
BACKUP_DIR = "backup"
HISTORY_FILE = "history.csv"


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """The run folder at `path` and the paths of its files.

    `folder / name` is `path / name`, and `os.fspath(folder)` is `path`: a method's
    `save_artifacts` written for a plain `pathlib.Path` folder works with one unchanged.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: StrPath) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def dump_dir(self) -> Path:
        return self.path / DUMP_DIR

    @property
    def scores_dir(self) -> Path:
        return self.path / SCORES_DIR


def read_state(workdir: Path) -> dict:
    """`state.json` as a dict: empty for a run without one, or with a damaged one."""
    f = workdir / STATE_FILE
    try:
        state = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}  # a damaged state file: treat the run as unfinished (the backup decides)
    return state if isinstance(state, dict) else {}


def write_state(workdir: Path, **values: Any) -> None:
    """Update `state.json` with `values`, atomically."""
    state = read_state(workdir)
    state.update(values)
    atomic_write_json(workdir / STATE_FILE, state)


def run_started(workdir: Path) -> bool:
    """Whether a run folder holds more than the config of a run that never trained."""
    workdir = Path(workdir)
    return any((workdir / name).exists() for name in (MODEL_FILE, BACKUP_DIR, HISTORY_FILE, STATE_FILE))


def is_run_folder(workdir: StrPath) -> bool:
    """A run folder from before keras-ee marked its folders: `train` left its lock file there, or
    its config.json is exactly as keras-ee writes one (every setting spelled out; older versions
    left one behind when they refused a command). A user's own config.json is not."""
    workdir = Path(workdir)
    if (workdir / LOCK_FILE).is_file():
        return True
    try:
        values = TrainConfig.read_values(workdir / CONFIG_FILE)
        return TrainConfig.from_dict(values).to_dict() == values
    except (OSError, ValueError, TypeError):
        return False


def check_out_folder(workdir: StrPath) -> Path:
    """Refuse an `--out` that is a file, lies under one, or holds files keras-ee did not write,
    before anything is written (`keras_ee.atomic.check_out_folder`; a run folder resumes).

    No write probe: a multi-worker non-chief checks the chief's folder, which it never writes.
    """
    return check_out_folder_rule(
        workdir,
        recognise=is_run_folder,
        hint="use a new --out folder (a run folder keras-ee wrote resumes).",
        probe=False,
    )


def write_preprocessing(workdir: StrPath, splits: DatasetSplits) -> None:
    """`preprocessing.json`: the input normalisation of the training split `splits` (what
    `read_preprocessing` and `read_pixel_range` read back), written atomically."""
    pixel_range = getattr(splits, "pixel_range", None)  # a DatasetSplits of another package may lack it
    atomic_write_json(
        Path(workdir) / PREPROCESSING_FILE,
        {
            "pixel_scale": float(splits.pixel_scale),
            "mean": np.asarray(splits.mean, np.float64).tolist(),
            "std": np.asarray(splits.std, np.float64).tolist(),
            **({} if pixel_range is None else {"pixel_range": list(pixel_range)}),
        },
    )


def read_preprocessing(workdir: StrPath) -> tuple[float, np.ndarray, np.ndarray]:
    """`(pixel_scale, mean, std)` of a run's inputs: from `preprocessing.json`, or (a run
    from before that file) from its dataset's training split, which is loaded for it."""
    workdir = Path(workdir)
    path = workdir / PREPROCESSING_FILE
    if not path.is_file():
        splits = data.load_configured(TrainConfig.from_file(workdir / CONFIG_FILE))
        return float(splits.pixel_scale), np.asarray(splits.mean, np.float32), np.asarray(splits.std, np.float32)
    try:
        saved = json.loads(path.read_text())
        scale, mean, std = (
            float(saved["pixel_scale"]),
            np.asarray(saved["mean"], np.float32),
            np.asarray(saved["std"], np.float32),
        )
        if mean.ndim != 1 or mean.shape != std.shape or not (np.isfinite(mean).all() and (std > 0).all()):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{str(path)!r} is damaged: expected pixel_scale, and mean and std of one number per "
            "channel (std > 0); rerun `keras-ee train` with the same command to rewrite it."
        ) from None
    return scale, mean, std


def read_pixel_range(workdir: StrPath) -> tuple[float, float] | None:
    """`(min, max)` of the stored pixels a run was trained on (`preprocessing.json`'s
    `pixel_range`), or None for a run from before it was recorded (its input is not checked)."""
    path = Path(workdir) / PREPROCESSING_FILE
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if "pixel_range" not in saved:
            return None
        lo, hi = (float(v) for v in saved["pixel_range"])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise ValueError(
            f"{str(path)!r} is damaged: expected `pixel_range` [min, max] of finite numbers; rerun "
            "`keras-ee train` with the same command to rewrite it."
        ) from None
    return lo, hi


# Model options that a run records in config.json (`canonical_config`), with their default for a
# new run, and the value that a run recorded before the option existed trained with.
RECORDED_MODEL_OPTIONS = {"moving_variance_update": "unbiased"}
LEGACY_MODEL_OPTIONS = {"moving_variance_update": "biased"}


# Model options a run recorded under the builders' former argument names, and their names since
# `MSDNetBackbone` and `RANetBackbone` (the same settings: a run recorded with them resumes).
RENAMED_MODEL_OPTIONS = {
    "num_channels": "channels",
    "growth_factor": "growth_factors",
    "bottleneck_factor": "bottleneck_factors",
}


def recorded_config(stored: TrainConfig) -> TrainConfig:
    """The settings a run folder's config.json `stored` trained with: a model option it does not
    record (written before the option existed) is the value of that time (`LEGACY_MODEL_OPTIONS`),
    and one recorded under a former name takes today's (`RENAMED_MODEL_OPTIONS`)."""
    renamed = {RENAMED_MODEL_OPTIONS.get(k, k): v for k, v in stored.model_options.items()}
    model_options = {**LEGACY_MODEL_OPTIONS, **renamed}
    return stored if model_options == stored.model_options else dataclasses.replace(stored, model_options=model_options)


def resume_settings(config: TrainConfig, workdir: StrPath) -> TrainConfig:
    """`config`, where `workdir` holds a run recorded before a model option existed and `config`
    does not set that option, with the option as that run trained (so that it resumes exactly)."""
    saved = Path(workdir) / CONFIG_FILE
    if not (saved.is_file() and run_started(Path(workdir))):
        return config
    try:
        stored = TrainConfig.read_values(saved).get("model_options")
    except (OSError, ValueError):
        return config  # prepare_workdir reports it
    if not isinstance(stored, dict):
        return config
    adopted = {k: v for k, v in LEGACY_MODEL_OPTIONS.items() if k not in stored and k not in config.model_options}
    return dataclasses.replace(config, model_options={**config.model_options, **adopted}) if adopted else config
