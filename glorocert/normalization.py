"""Input normalisation applied outside the model: one frozen type that validates, compares and applies itself.

A user's model often expects ``(x − mean) / std`` per channel, computed by
their pipeline rather than inside the model file. glorocert keeps every
radius in ``[0, 1]`` pixel units, so the normalisation is applied to the
pixels before the native forward pass and folded into the IR as its first
layer (an ``Affine`` with scale ``1/std``), which puts its Lipschitz factor
into the bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glorocert.errors import GlorocertError

__all__ = ["Normalization"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x − mean) / std``; one value stands for every channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.mean or not self.std or not all(math.isfinite(v) for v in self.mean + self.std):
            raise GlorocertError(f"--mean {list(self.mean)} / --std {list(self.std)}: give finite numbers")
        if any(s <= 0 for s in self.std):
            raise GlorocertError(f"--std {list(self.std)}: standard deviations must be > 0")

    @classmethod
    def of(cls, mean: float | Sequence[float] | None, std: float | Sequence[float] | None) -> Normalization | None:
        """None when neither is given; a missing mean is 0 and a missing std is 1."""
        if mean is None and std is None:
            return None
        as_tuple = lambda v, default: (default,) if v is None else tuple(float(x) for x in np.atleast_1d(v))  # noqa: E731
        return cls(as_tuple(mean, 0.0), as_tuple(std, 1.0))

    @classmethod
    def from_json(cls, body: dict | None) -> Normalization | None:
        return None if not body else cls(tuple(map(float, body["mean"])), tuple(map(float, body["std"])))

    def to_json(self) -> dict:
        """How a bound file records it: ``{"mean": [...], "std": [...]}``."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float64 arrays of one value per channel; refuses a count that fits neither 1 nor ``channels``."""
        if len(self.mean) not in (1, channels) or len(self.std) not in (1, channels):
            raise GlorocertError(f"--mean/--std have {len(self.mean)}/{len(self.std)} values; the model input has {channels} channels")
        return (np.broadcast_to(np.asarray(self.mean, np.float64), (channels,)),
                np.broadcast_to(np.asarray(self.std, np.float64), (channels,)))

    @staticmethod
    def same(a: Normalization | None, b: Normalization | None) -> bool:
        """Equal as functions (to 12 digits; one value equals that value repeated per channel)."""
        return _key(a) == _key(b)

    def apply(self, x):
        """``(x − mean) / std`` on a batch (N, C, …): numpy float32 stays numpy, a torch tensor stays torch."""
        view = (1, -1) + (1,) * (x.ndim - 2)
        if isinstance(x, np.ndarray):
            return (x - np.asarray(self.mean, np.float32).reshape(view)) / np.asarray(self.std, np.float32).reshape(view)
        mean = x.new_tensor(self.mean).view(view)
        std = x.new_tensor(self.std).view(view)
        return (x - mean) / std

    def fold_into(self, graph):
        """``graph`` seen from [0, 1] pixels: this normalisation becomes its first layer (an Affine)."""
        mean, std = self.per_channel(graph.input_shape[0])
        return graph.with_input_affine(1.0 / std, -mean / std)


def fold(graph, normalization: Normalization | None):
    """``normalization.fold_into(graph)``, or ``graph`` itself when there is none."""
    return graph if normalization is None else normalization.fold_into(graph)


def _key(norm: Normalization | None):
    if norm is None:
        return None
    n = max(len(norm.mean), len(norm.std))
    widen = lambda v: tuple(round(float(x), 12) for x in (v * n if len(v) == 1 else v))  # noqa: E731
    return widen(norm.mean), widen(norm.std)
