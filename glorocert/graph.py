"""The IR: a small typed DAG of the operations that matter to a Lipschitz analysis.

The set of operations is closed. Each op knows its forward pass; the linear
ones also expose their homogeneous part (``linear``: the op with bias/shift
dropped), which is what the Lipschitz analysis bounds. Anything a loader
cannot express with these ops is refused at load time — never assumed to be
1-Lipschitz.

Shapes are per sample (no batch dimension) everywhere except in tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from glorocert.errors import GlorocertError


# --------------------------------------------------------------------------- ops


class Op:
    """Base class. ``arity`` inputs; ``linear`` marks ops that are affine maps."""

    arity = 1
    linear = False

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def homogeneous(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part of an affine op (bias and shift dropped)."""
        raise NotImplementedError(type(self).__name__)

    def describe(self) -> str:
        return type(self).__name__


@dataclass(eq=False)
class Linear(Op):
    """y = x Wᵀ + b on (N, in)."""

    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None = None
    linear = True

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def homogeneous(self, x):
        return F.linear(x, self.weight.to(x.dtype))

    def describe(self):
        return f"Linear {self.weight.shape[1]}→{self.weight.shape[0]}"


@dataclass(eq=False)
class Conv2d(Op):
    """2-D cross-correlation; ``padding`` is (top, bottom, left, right), zeros."""

    weight: torch.Tensor  # (out, in/groups, kh, kw)
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    linear = True

    def _conv(self, x, bias):
        t, b, l, r = self.padding
        if t == b and l == r:
            return F.conv2d(x, self.weight.to(x.dtype), bias, self.stride, (t, l), self.dilation, self.groups)
        return F.conv2d(F.pad(x, (l, r, t, b)), self.weight.to(x.dtype), bias, self.stride, 0, self.dilation, self.groups)

    def forward(self, x):
        return self._conv(x, None if self.bias is None else self.bias.to(x.dtype))

    def homogeneous(self, x):
        return self._conv(x, None)

    def describe(self):
        o, i, kh, kw = self.weight.shape
        extra = "".join(
            [
                f" s{self.stride[0]}" if self.stride != (1, 1) else "",
                f" p{max(self.padding)}" if any(self.padding) else "",
                f" d{self.dilation[0]}" if self.dilation != (1, 1) else "",
                f" g{self.groups}" if self.groups != 1 else "",
            ]
        )
        return f"Conv {i * self.groups}→{o} k{kh}x{kw}{extra}"


@dataclass(eq=False)
class Affine(Op):
    """y = scale ⊙ x + shift, both broadcast against the per-sample shape.

    Folded BatchNorm and input normalisation are per-channel ``(C, 1, 1)``;
    constants of any broadcastable shape are allowed.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    linear = True

    def forward(self, x):
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def homogeneous(self, x):
        return x * self.scale.to(x.dtype)

    def describe(self):
        return f"Affine {tuple(self.scale.shape)}"


ACTIVATIONS = {
    # name: (forward, Lipschitz constant given the slope parameter)
    "relu": (lambda x, a: F.relu(x), lambda a: 1.0),
    "leaky_relu": (lambda x, a: F.leaky_relu(x, a), lambda a: max(1.0, abs(a))),
    "tanh": (lambda x, a: torch.tanh(x), lambda a: 1.0),
    "sigmoid": (lambda x, a: torch.sigmoid(x), lambda a: 0.25),
    "identity": (lambda x, a: x, lambda a: 1.0),
}


@dataclass(eq=False)
class Activation(Op):
    """Elementwise activation with a known Lipschitz constant."""

    kind: str
    slope: float = 0.0  # LeakyReLU's negative slope

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise GlorocertError(f"unknown activation {self.kind!r}; known: {', '.join(ACTIVATIONS)}")

    @property
    def lipschitz(self) -> float:
        return ACTIVATIONS[self.kind][1](self.slope)

    def forward(self, x):
        return ACTIVATIONS[self.kind][0](x, self.slope)

    def describe(self):
        return self.kind if self.kind != "leaky_relu" else f"leaky_relu({self.slope:g})"


@dataclass(eq=False)
class MinMax(Op):
    """MinMax / GroupSort-2: split ``axis`` in two halves a, b; output cat(max(a,b), min(a,b)).

    ``max_first=False`` gives cat(min, max). The two published conventions:

    * channel halves (LiResNet, PyTorch): channel c pairs with c + C/2,
      output [max half, min half] → ``MinMax(axis=1, max_first=True)``;
    * adjacent elements (gloro, TensorFlow): flattened elements (2k, 2k+1) pair,
      output [min, max] per pair → ``Reshape(-1, 2)``, ``MinMax(axis=-1,
      max_first=False)``, ``Reshape`` back.

    Sorting each pair is a permutation of it, so the map is 1-Lipschitz in l2.
    """

    axis: int = 1
    max_first: bool = True

    def forward(self, x):
        a, b = x.chunk(2, dim=self.axis)
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return torch.cat([hi, lo] if self.max_first else [lo, hi], dim=self.axis)

    def describe(self):
        return f"MinMax(axis={self.axis})"


@dataclass(eq=False)
class Add(Op):
    """Sum of its inputs (residual connections)."""

    arity = 2

    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


@dataclass(eq=False)
class Concat(Op):
    """Concatenation along a (batched) axis."""

    axis: int = 1
    arity = 2

    def forward(self, *xs):
        return torch.cat(xs, dim=self.axis)


@dataclass(eq=False)
class Reshape(Op):
    """Reshape each sample to ``shape`` (Flatten is ``shape=(-1,)``); an isometry."""

    shape: tuple[int, ...] = (-1,)
    linear = True

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    homogeneous = forward

    def describe(self):
        return "Flatten" if self.shape == (-1,) else f"Reshape {self.shape}"


@dataclass(eq=False)
class AvgPool(Op):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    linear = True

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    homogeneous = forward

    def describe(self):
        return f"AvgPool k{self.kernel[0]}x{self.kernel[1]} s{self.stride[0]}"


@dataclass(eq=False)
class GlobalAvgPool(Op):
    linear = True

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)

    homogeneous = forward


@dataclass(eq=False)
class MaxPool(Op):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def forward(self, x):
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def describe(self):
        return f"MaxPool k{self.kernel[0]}x{self.kernel[1]} s{self.stride[0]}"


# ------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...]


@dataclass
class Graph:
    """A DAG over named tensors. ``nodes`` are in topological order."""

    input_name: str
    input_shape: tuple[int, ...]
    nodes: list[Node]
    output: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        seen = {self.input_name}
        for node in self.nodes:
            missing = [i for i in node.inputs if i not in seen]
            if missing:
                raise GlorocertError(f"IR node {node.name!r} reads {missing} before they are computed")
            if node.op.arity == 1 and len(node.inputs) != 1:
                raise GlorocertError(f"IR node {node.name!r} takes one input, got {len(node.inputs)}")
            seen.add(node.name)
        if self.output not in seen:
            raise GlorocertError(f"IR output {self.output!r} is not computed by any node")
        if not self.shapes:
            self.shapes = self._infer_shapes()

    def forward(self, x: torch.Tensor, upto: str | None = None) -> torch.Tensor:
        values = {self.input_name: x}
        for node in self.nodes:
            values[node.name] = node.op.forward(*(values[i] for i in node.inputs))
            if node.name == upto:
                return values[node.name]
        return values[self.output]

    __call__ = forward

    def _infer_shapes(self) -> dict[str, tuple[int, ...]]:
        values = {self.input_name: torch.zeros(1, *self.input_shape, dtype=torch.float64)}
        for node in self.nodes:
            try:
                values[node.name] = node.op.forward(*(values[i] for i in node.inputs))
            except RuntimeError as e:
                raise GlorocertError(
                    f"IR node {node.name!r} ({node.op.describe()}) cannot run on input shape "
                    f"{self.input_shape}: {str(e).splitlines()[0]}"
                ) from None
        return {k: tuple(v.shape[1:]) for k, v in values.items()}

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes[self.output]

    @property
    def num_classes(self) -> int:
        if len(self.output_shape) != 1:
            raise GlorocertError(f"the model's output has shape {self.output_shape}; a classifier outputs (classes,)")
        return self.output_shape[0]

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {self.input_name: []}
        for node in self.nodes:
            out.setdefault(node.name, [])
            for i in node.inputs:
                out[i].append(node.name)
        return out

    def with_input_affine(self, scale: Iterable[float], shift: Iterable[float]) -> "Graph":
        """Prepend a per-channel affine map (normalisation applied outside the model)."""
        c = self.input_shape[0]
        scale_t = torch.as_tensor(list(scale), dtype=torch.float64).reshape(-1, *[1] * (len(self.input_shape) - 1))
        shift_t = torch.as_tensor(list(shift), dtype=torch.float64).reshape(scale_t.shape)
        if scale_t.shape[0] not in (1, c):
            raise GlorocertError(f"normalisation has {scale_t.shape[0]} channels; the model input has {c}")
        raw = "raw_input"
        first = Node(self.input_name, Affine(scale_t, shift_t), (raw,))
        return Graph(raw, self.input_shape, [first, *self.nodes], self.output)

__all__ = [
    "Op", "Linear", "Conv2d", "Affine", "Activation", "MinMax", "Add", "Concat", "Reshape",
    "AvgPool", "GlobalAvgPool", "MaxPool", "Node", "Graph", "ACTIVATIONS",
]
