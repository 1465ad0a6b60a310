"""GloRo training: losses, persistent power iteration and the loop (architectures live in glorocert.zoo).

Public entry points::

    from glorocert.train import TrainConfig, train
"""

from glorocert.train.loop import EpochRecord, TrainConfig, TrainProgress, TrainResult, evaluate, train

__all__ = ["EpochRecord", "TrainConfig", "TrainProgress", "TrainResult", "evaluate", "train"]
