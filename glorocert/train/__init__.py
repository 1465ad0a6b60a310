"""Training nets for certification (GloRo, BCP, KW) and randomized-smoothing base models.

One epoch loop (:mod:`glorocert.train.loop`) driven by an objective
(:mod:`glorocert.train.objectives`); the settings are common fields plus one
section per kind of method (:mod:`glorocert.train.config`). Architectures live
in :mod:`glorocert.zoo`.

Public entry points::

    from glorocert.train import RobustSettings, TrainConfig, train
    result = train(TrainConfig(robust=RobustSettings(eps=0.3)), x_train, y_train, x_val, y_val)
"""

from glorocert.train.cards import command_line
from glorocert.train.config import Provenance, RobustSettings, SmoothingSettings, TrainConfig
from glorocert.train.loop import run_training, train
from glorocert.train.losses import METHODS, SMOOTHING_METHODS, parse_method
from glorocert.train.objectives import Objective, evaluate, evaluate_noisy
from glorocert.train.records import EpochRecord, TrainProgress, TrainResult
from glorocert.train.state import TRAIN_FILES, check_out_dir

__all__ = [
    "METHODS", "SMOOTHING_METHODS", "EpochRecord", "Objective", "Provenance", "RobustSettings", "SmoothingSettings", "TrainConfig", "TrainProgress",
    "TRAIN_FILES", "TrainResult", "check_out_dir", "command_line", "evaluate", "evaluate_noisy", "parse_method",
    "run_training", "train",
]
