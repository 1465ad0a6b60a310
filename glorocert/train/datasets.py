"""Training data from :func:`glorocert.data.open_dataset`, as in-memory tensors with a held-out split.

Built-in datasets use their own fixed split (``train`` to learn, ``test`` held
out: mnist-5k 4,000 / 1,000 stratified, fashion-mnist the official 60k / 10k,
digits 1,438 / 359). A data file with labels is split here with the same
fixed rule, :func:`glorocert.data.stratified_split` (20 % per class, seed 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from glorocert.data import BUILTINS, open_dataset, stratified_split
from glorocert.errors import GlorocertError


@dataclass
class TrainingData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    description: str  # what the model card says about the data and the split
    notes: list[str] = field(default_factory=list)  # how the file was read (Dataset.notes), for the user to see


def _read_all(dataset) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for batch in dataset.batches(4096):
        if batch.y is None:
            raise GlorocertError(f"{dataset.name} has no labels; training needs labelled data")
        xs.append(batch.x)
        ys.append(batch.y)
    return np.concatenate(xs).astype(np.float32, copy=False), np.concatenate(ys).astype(np.int64, copy=False)


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, None]
    if x.ndim != 4:
        raise GlorocertError(f"training needs images (N×C×H×W); got samples of shape {x.shape[1:]}")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def load_training_data(data: str, limit: int | None = None) -> TrainingData:
    """Load ``data`` (a built-in name or a labelled file) as train / held-out tensors.

    ``limit`` keeps only the first ``limit`` training samples (for quick runs);
    the held-out split is never truncated.
    """
    notes: list[str] = []
    if data in BUILTINS:
        x_train, y_train = _read_all(open_dataset(data, split="train"))
        x_val, y_val = _read_all(open_dataset(data, split="test"))
        split = f"the built-in train split ({len(y_train)}) / held-out test split ({len(y_val)})"
    else:
        dataset = open_dataset(data)
        notes = dataset.notes
        x, y = _read_all(dataset)
        train_index, val_index = stratified_split(y, 0.2, seed=0)
        if len(val_index) == 0:
            raise _empty_validation(data, y)
        x_train, y_train, x_val, y_val = x[train_index], y[train_index], x[val_index], y[val_index]
        split = (f"stratified split of the file, 20 % per class held out, seed 0: "
                 f"{len(y_train)} train / {len(y_val)} held out")
    if limit is not None:
        if limit < 1:
            raise GlorocertError(f"limit must be >= 1, got {limit}")
        x_train, y_train = x_train[:limit], y_train[:limit]
        split += f"; training limited to the first {len(y_train)} samples"
    xt, yt = _tensors(x_train, y_train)
    xv, yv = _tensors(x_val, y_val)
    return TrainingData(xt, yt, xv, yv, split, notes)


def _empty_validation(data: str, y: np.ndarray) -> GlorocertError:
    """Why the 20 % per-class hold-out of a file came out empty, and what to do."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    return GlorocertError(
        f"{data}: the validation split is empty: the file holds {len(y)} labelled samples in {len(counts)} classes "
        f"(at most {counts.max()} per class), and training holds out 20 % of each class (0.2·n rounded, so none of a "
        "class of fewer than 3 samples) to measure accuracy and VRA; give at least 3 samples of a class "
        "(tens per class for a held-out VRA worth reading)"
    )
