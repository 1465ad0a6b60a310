"""The IR: a small typed DAG of the operations that matter to a Lipschitz analysis.

The set of operations is closed. Each op knows its forward pass; the linear
ones also expose their homogeneous part (``linear``: the op with bias/shift
dropped), which is what the Lipschitz analysis bounds. Anything a loader
cannot express with these ops is refused at load time — never assumed to be
1-Lipschitz.

Shapes are per sample (no batch dimension) everywhere except in tensors.
"""

from __future__ import annotations

import math
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
    """y = x Wᵀ + b on the last axis: (N, …, in) → (N, …, out).

    On inputs of rank > 2 it is a block-diagonal map of copies of W: its norm is still ‖W‖₂.
    """

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


# sup |f'| of the smooth activations below: computed in closed form or by a dense float64 search of the
# derivative (step 1e-5 on [-20, 20], the maximiser then polished), plus a margin of 5e-6 to 1e-5, which
# also covers the float32-level deviation (≤ 2e-6) that a decomposed activation recognised by the ONNX
# loader may have from the canonical one (tests/test_onnx_ops.py checks each against autograd).
# Monotonicity does not matter to an l2 bound.
GELU_LIPSCHITZ = 1.128910  # f' = Φ(x) + xφ(x), f'' = φ(x)(2 − x²): max at x = √2, Φ(√2) + √2φ(√2) = 1.1289041…
GELU_TANH_LIPSCHITZ = 1.129000  # the tanh approximation of GELU: sup |f'| = 1.1289931… near x = 1.4185
SILU_LIPSCHITZ = 1.099845  # f' = σ(x)(1 + x(1 − σ(x))): max 1.0998393… at x ≈ 2.3994 (min −0.0998)
MISH_LIPSCHITZ = 1.088505  # x·tanh(softplus(x)): sup |f'| = 1.0884982… at x ≈ 1.4906
SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875  # ONNX / torch defaults


def _hardsigmoid(x, p):
    alpha, beta = p
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def _selu(x, p):
    alpha, gamma = p
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0.0)))


ACTIVATIONS = {
    # name: (forward(x, p), Lipschitz constant(p)); p is the slope (one-parameter kinds) or a tuple
    "relu": (lambda x, a: F.relu(x), lambda a: 1.0),
    "leaky_relu": (lambda x, a: F.leaky_relu(x, a), lambda a: max(1.0, abs(a))),
    "tanh": (lambda x, a: torch.tanh(x), lambda a: 1.0),
    "sigmoid": (lambda x, a: torch.sigmoid(x), lambda a: 0.25),
    "identity": (lambda x, a: x, lambda a: 1.0),
    # |x|, clip(x, lo, hi), softsign x/(1+|x|) (f' = 1/(1+|x|)² ≤ 1), softplus log(1+eˣ) (f' = σ(x) < 1)
    "abs": (lambda x, a: torch.abs(x), lambda a: 1.0),
    "clip": (lambda x, p: torch.clamp(x, p[0], p[1]), lambda p: 1.0),
    "softsign": (lambda x, a: F.softsign(x), lambda a: 1.0),
    "softplus": (lambda x, a: torch.logaddexp(x, torch.zeros_like(x)), lambda a: 1.0),
    # elu: f' = 1 (x > 0), α·eˣ ∈ (0, α) or (α, 0) (x < 0) → max(1, |α|); celu (α > 0): f' = e^{x/α} ≤ 1 for x < 0
    "elu": (lambda x, a: F.elu(x, a), lambda a: max(1.0, abs(a))),
    "celu": (lambda x, a: F.celu(x, a), lambda a: 1.0),
    # selu = γ·elu_α: γ·max(1, |α|)
    "selu": (_selu, lambda p: abs(p[1]) * max(1.0, abs(p[0]))),
    # hardsigmoid clamp(αx + β, 0, 1): |α|; hardswish x·relu6(x + 3)/6: f' = (2x + 3)/6 on [−3, 3], sup 1.5 at x = 3
    "hardsigmoid": (_hardsigmoid, lambda p: abs(p[0])),
    "hardswish": (lambda x, a: F.hardswish(x), lambda a: 1.5),
    "gelu": (lambda x, a: F.gelu(x), lambda a: GELU_LIPSCHITZ),
    "gelu_tanh": (lambda x, a: F.gelu(x, approximate="tanh"), lambda a: GELU_TANH_LIPSCHITZ),
    "silu": (lambda x, a: F.silu(x), lambda a: SILU_LIPSCHITZ),
    "mish": (lambda x, a: F.mish(x), lambda a: MISH_LIPSCHITZ),
}


@dataclass(eq=False)
class Activation(Op):
    """Elementwise activation with a known Lipschitz constant."""

    kind: str
    slope: float = 0.0  # LeakyReLU's negative slope, ELU's / CELU's alpha
    params: tuple[float, ...] = ()  # clip (lo, hi), hardsigmoid (alpha, beta), selu (alpha, gamma)

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise GlorocertError(f"unknown activation {self.kind!r}; known: {', '.join(ACTIVATIONS)}")

    @property
    def parameter(self):
        return self.params if self.params else self.slope

    @property
    def lipschitz(self) -> float:
        return ACTIVATIONS[self.kind][1](self.parameter)

    def forward(self, x):
        return ACTIVATIONS[self.kind][0](x, self.parameter)

    def describe(self):
        if self.params:
            return f"{self.kind}({', '.join(f'{p:g}' for p in self.params)})"
        return self.kind if self.kind not in ("leaky_relu", "elu", "celu") else f"{self.kind}({self.slope:g})"


@dataclass(eq=False)
class PReLU(Op):
    """x for x ≥ 0, slope·x otherwise, with a per-channel constant ``slope`` (per-sample broadcast shape).

    Each coordinate is a piecewise-linear map with slopes 1 and slope_c: Lipschitz max(1, max|slope|).
    """

    slope: torch.Tensor

    @property
    def lipschitz(self) -> float:
        return max(1.0, self.slope.abs().max().item()) if self.slope.numel() else 1.0

    def forward(self, x):
        return torch.where(x >= 0, x, x * self.slope.to(x.dtype))

    def describe(self):
        return f"PReLU {tuple(self.slope.shape)}"


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


@dataclass(eq=False)
class L2Pool(Op):
    """l2-norm pooling: y_w = scale·√(gain·avg_w(x²) + shift), avg_w the AveragePool of window w with its
    divisor d_w (deel-torchlip's ScaledL2NormPool2d: gain = kernel area, shift = 0, scale = its k_coef_lip).

    Lipschitz constant (``compose.l2pool_lipschitz``): with gain > 0, shift ≥ 0,
    y_w = |scale|·√(gain/d_w)·‖(x_w, √(shift·d_w/gain))‖₂ up to sign, and a norm is 1-Lipschitz, so
    |Δy_w| ≤ |scale|·√(gain/d_w)·‖Δx_w‖. Summing squares over the windows,
    ‖Δy‖² ≤ scale²·gain·Σ_i Δx_i²·Σ_{w∋i} 1/d_w ≤ scale²·gain·κ·‖Δx‖², κ = max_i Σ_{w∋i} 1/d_w, the largest
    column sum of the AveragePool's matrix. So L = |scale|·√(gain·κ); κ ≤ m/d_min (m the largest number of
    windows sharing an input, d_min the smallest divisor), with equality when all divisors are equal.
    Non-overlapping windows with gain = kernel area (ScaledL2NormPool2d) give κ = 1/d and L = |scale|.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    gain: float = 1.0
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if not (self.gain > 0 and self.shift >= 0 and math.isfinite(self.gain * self.shift * self.scale)):
            raise GlorocertError(f"L2Pool needs gain > 0 and shift ≥ 0 (got gain {self.gain}, shift {self.shift})")

    def average(self, x):
        """The AveragePool of the windows (linear: its matrix's column sums give κ)."""
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def forward(self, x):
        return self.scale * torch.sqrt(self.gain * self.average(x * x) + self.shift)

    def describe(self):
        return f"L2Pool k{self.kernel[0]}x{self.kernel[1]} s{self.stride[0]}"


@dataclass(eq=False)
class Transpose(Op):
    """Permute the axes of each sample; ``perm`` names batched axes and keeps the batch axis first. An isometry."""

    perm: tuple[int, ...]
    linear = True

    def __post_init__(self):
        if not self.perm or self.perm[0] != 0 or sorted(self.perm) != list(range(len(self.perm))):
            raise GlorocertError(f"Transpose {self.perm}: must permute the per-sample axes and keep the batch axis first")

    def forward(self, x):
        return x.permute(*self.perm)

    homogeneous = forward

    def describe(self):
        return f"Transpose {tuple(p - 1 for p in self.perm[1:])}"


@dataclass(eq=False)
class AxisMaps(Op):
    """A separable linear map: the matrix A_a (out_a × in_a) applied along each listed batched axis a, plus ``shift``.

    Pad in every mode (zero, constant, reflect, edge, wrap) and Resize (nearest, linear, cubic) are of this
    form. The operator is the Kronecker product of the A_a (identity on the other axes), so its norm is
    exactly Π‖A_a‖₂; for a copy matrix (one 1 per row: nearest resize, reflect/edge padding) ‖A_a‖₂ = √(the
    largest number of copies of one input element along a), since AᵀA is then diagonal with those counts.
    """

    maps: tuple[tuple[int, torch.Tensor], ...]
    shift: torch.Tensor | None = None  # per-sample output shape: constant-mode padding with a non-zero value
    label: str = "AxisMaps"
    linear = True

    def homogeneous(self, x):
        for axis, matrix in self.maps:
            x = torch.movedim(torch.movedim(x, axis, -1) @ matrix.to(x.dtype).T, -1, axis)
        return x

    def forward(self, x):
        y = self.homogeneous(x)
        return y if self.shift is None else y + self.shift.to(x.dtype)

    def describe(self):
        return f"{self.label} " + " ".join(f"{m.shape[1]}→{m.shape[0]}@{a}" for a, m in self.maps)


@dataclass(eq=False)
class ConvTranspose2d(Op):
    """2-D transposed convolution; ``padding`` (top, bottom, left, right) crops the full output, and
    ``output_padding`` (h, w) extends it at the end before cropping (ONNX semantics).

    The full (unpadded) transposed convolution is the adjoint of the Conv2d with the same weight, stride,
    dilation and groups; extending with zeros and cropping are a coordinate embedding and projection.
    """

    weight: torch.Tensor  # (in, out/groups, kh, kw)
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    output_padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    linear = True

    def homogeneous(self, x):
        full = F.conv_transpose2d(x, self.weight.to(x.dtype), None, self.stride, 0, 0, self.groups, self.dilation)
        t, b, l, r = self.padding
        return F.pad(full, (-l, self.output_padding[1] - r, -t, self.output_padding[0] - b))

    def forward(self, x):
        y = self.homogeneous(x)
        return y if self.bias is None else y + self.bias.to(x.dtype).view(-1, 1, 1)

    def describe(self):
        i, o, kh, kw = self.weight.shape
        return f"ConvTranspose {i}→{o * self.groups} k{kh}x{kw} s{self.stride[0]}"


@dataclass(eq=False)
class Reduce(Op):
    """Max or min over batched ``axes`` (never the batch axis). 1-Lipschitz in l2: every output is the max
    (min) of its own disjoint group of inputs, and |max a − max b| ≤ max|a − b| ≤ ‖(a − b)_group‖₂."""

    kind: str  # "max" | "min"
    axes: tuple[int, ...]
    keepdims: bool = True

    def forward(self, x):
        reduce = torch.amax if self.kind == "max" else torch.amin
        return reduce(x, dim=self.axes, keepdim=self.keepdims)

    def describe(self):
        return f"Reduce{self.kind.capitalize()} {self.axes}"


@dataclass(eq=False)
class GroupMinMax(Op):
    """cat(min over ``axes``, max over ``axes``) along ``axis`` (deel-torchlip's GroupSort2 / GroupSort(k)).

    (min_g, max_g) are the first and last entries of the sorted group g: a projection of sorting, which is
    1-Lipschitz, and the groups are disjoint — so the whole map is 1-Lipschitz (not √2, as two
    separately 1-Lipschitz reductions concatenated would give). A group of one element is no sort: its
    min and max are the element itself, copied twice, and compose.py gives that √2.
    """

    axes: tuple[int, ...]
    axis: int
    keepdims: bool = True
    min_first: bool = True

    def forward(self, x):
        lo = torch.amin(x, dim=self.axes, keepdim=self.keepdims)
        hi = torch.amax(x, dim=self.axes, keepdim=self.keepdims)
        return torch.cat([lo, hi] if self.min_first else [hi, lo], dim=self.axis)

    def describe(self):
        return f"GroupMinMax {self.axes}"


@dataclass(eq=False)
class Sort(Op):
    """The ``k`` first values of each slice along ``axis`` sorted (TopK; FullSort / GroupSort when k = size).

    Sorting a vector is 1-Lipschitz in l2 (for sorted a, b and any permutation π, Σ a_i b_i ≥ Σ a_i b_π(i),
    so ‖sort a − sort b‖ ≤ ‖a − b‖); keeping k of the sorted values is a projection; slices are disjoint.
    """

    axis: int
    descending: bool = True
    k: int | None = None

    def forward(self, x):
        values = torch.sort(x, dim=self.axis, descending=self.descending).values
        return values if self.k is None else values.narrow(self.axis, 0, self.k)

    def describe(self):
        return f"Sort(axis={self.axis}{'' if self.k is None else f', k={self.k}'})"


@dataclass(eq=False)
class CReLU(Op):
    """cat(relu(x), relu(−x)) along ``axis`` (deel-torchlip's MaxMin). 1-Lipschitz: per coordinate at most one
    of relu(x), relu(−x) is non-zero on each side, and (Δrelu(x))² + (Δrelu(−x))² ≤ (Δx)²."""

    axis: int = 1
    neg_first: bool = False

    def forward(self, x):
        parts = [F.relu(x), F.relu(-x)]
        return torch.cat(parts[::-1] if self.neg_first else parts, dim=self.axis)

    def describe(self):
        return f"CReLU(axis={self.axis})"


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
    "Op", "Linear", "Conv2d", "Affine", "Activation", "PReLU", "MinMax", "Add", "Concat", "Reshape",
    "AvgPool", "GlobalAvgPool", "MaxPool", "L2Pool", "Transpose", "AxisMaps", "ConvTranspose2d", "Reduce", "GroupMinMax",
    "Sort", "CReLU", "Node", "Graph", "ACTIVATIONS",
]
