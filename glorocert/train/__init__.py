"""GloRo training: the paper's architectures, losses, persistent power iteration and the loop.

Public entry points::

    from glorocert.train import TrainConfig, train, build, load_checkpoint, export_gloro_onnx
"""

from glorocert.train.architectures import MinMax, build, load_checkpoint, save_checkpoint
from glorocert.train.export import export_gloro_onnx, export_onnx, export_torchscript
from glorocert.train.loop import EpochRecord, TrainConfig, TrainProgress, TrainResult, evaluate, train

__all__ = [
    "EpochRecord", "MinMax", "TrainConfig", "TrainProgress", "TrainResult", "build", "evaluate",
    "export_gloro_onnx", "export_onnx", "export_torchscript", "load_checkpoint", "save_checkpoint", "train",
]
