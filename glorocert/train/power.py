"""Persistent power iteration for the layers of a GloRo net during training.

Each ``Conv2d`` / ``Linear`` layer keeps a unit-norm iterate ``x`` (shaped
like the layer's input, batch 1) as a buffer that survives across training
steps, exactly as the GloRo paper prescribes: a few iterations
``x ← WᵀW x / ‖WᵀW x‖`` per step are enough because the weights move slowly.
For a convolution ``W x`` is ``conv2d`` and ``Wᵀ y`` is ``conv_transpose2d``
with the ``output_padding`` that restores the input shape; the bias is not
part of the linear operator and is ignored. A residual block ``x + conv(x)``
(:class:`~glorocert.zoo.Residual`) is ONE operator ``I + W``: ``x + W x`` and
``y + Wᵀ y``, so its estimate approaches ``‖I + W‖``, not ``1 + ‖W‖``.

The normalisation divides by the plain norm — no epsilon is added to it (an
epsilon there made the reference implementation's constant too small for
small weights).

**What this is and is not.** ``‖W x‖`` for a unit ``x`` is a *lower*
estimate of the spectral norm ``σ_max(W)``; power iteration approaches it
from below. These estimates drive the training loss and the per-epoch
metrics only. The frozen, *guaranteed* bound used to certify a shipped model
is computed after training by :mod:`glorocert.lipschitz`, never from here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glorocert.errors import GlorocertError
from glorocert.zoo import MinMax, Residual

_ONE_LIPSCHITZ = (nn.ReLU, MinMax, nn.Flatten, nn.Identity)
_LINEAR = (nn.Conv2d, nn.Linear, Residual)


@contextmanager
def _one_image_kernels(device: torch.device):
    """ATen's own convolution kernels instead of oneDNN's, for the one-image operators of power iteration (CPU).

    oneDNN's per-call set-up (weight reorders; the weights change every step) costs more than a one-image
    convolution: on 2C2F's first layer ≈ 80 µs against 15 µs forward (weight gradient included: 340 against
    180 µs in one measurement, level in another), and a step runs three such ops per conv layer; interleaved
    against oneDNN, GloRo steps took 0.3–1.1 ms less. The batched forward pass of the net keeps oneDNN (twice
    as fast there). Only the on/off switch is touched and restored (not oneDNN's precision or determinism);
    it is process-wide, so the power iteration must not run in two threads at once (it never does).
    """
    if device.type != "cpu":
        yield
        return
    enabled = torch.backends.mkldnn.enabled  # the switch alone: set_flags reads and writes four settings (9 µs a pair)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


class _OneImageConv(torch.autograd.Function):
    """``F.conv2d(x, weight)`` without bias, and its gradients, under :func:`_one_image_kernels`."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        with _one_image_kernels(x.device):
            return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False)
        with _one_image_kernels(x.device):  # the op torch.nn.grad.conv2d_input/_weight call, once for both
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ctx.stride, ctx.padding, (1, 1), False, (0, 0), 1, wanted)
        return grad_x, grad_weight, None, None


@dataclass
class ConvergenceReport:
    """How :meth:`PowerIteration.converge` ended, per layer."""

    iterations: list[int]
    converged: list[bool]
    estimates: list[float]


class PowerIteration(nn.Module):
    """Persistent power-iteration iterates for every linear operator of a Sequential net.

    Only ``Conv2d``, ``Linear``, ``Residual`` and 1-Lipschitz activations (ReLU, MinMax),
    ``Flatten`` are accepted; anything else is refused rather than assumed
    1-Lipschitz. The last module must be the ``Linear`` producing the logits.
    """

    def __init__(self, model: nn.Sequential, input_shape: tuple[int, ...] | list[int], seed: int = 0):
        super().__init__()
        if not isinstance(model, nn.Sequential) or len(model) == 0:
            raise GlorocertError("power iteration needs a non-empty nn.Sequential model")
        for index, module in enumerate(model):
            if not isinstance(module, _LINEAR + _ONE_LIPSCHITZ):
                raise GlorocertError(
                    f"layer {index} ({type(module).__name__}) has no known Lipschitz constant; "
                    "the trainer supports Conv2d, Linear, Residual, ReLU, MinMax and Flatten"
                )
            conv = module.conv if isinstance(module, Residual) else module
            if isinstance(module, Residual) and (conv.stride != (1, 1) or conv.in_channels != conv.out_channels):
                raise GlorocertError(f"layer {index}: a residual conv must keep its input's shape (stride 1)")
            if isinstance(conv, nn.Conv2d) and (conv.dilation != (1, 1) or conv.groups != 1
                                                or conv.padding_mode != "zeros"):
                raise GlorocertError(f"layer {index}: only ungrouped, undilated, zero-padded convs")
        if not isinstance(model[-1], nn.Linear):
            raise GlorocertError("the last layer must be the Linear layer producing the logits")
        self.model = [model]  # a list, so the model's parameters are not registered twice
        self.layer_indices: list[int] = []
        self.input_shapes: dict[int, tuple[int, ...]] = {}
        generator = torch.Generator().manual_seed(int(seed))
        x = torch.zeros(1, *input_shape)
        with torch.no_grad():
            for index, module in enumerate(model):
                if isinstance(module, _LINEAR):
                    self.layer_indices.append(index)
                    self.input_shapes[index] = tuple(x.shape)
                    iterate = torch.randn(x.shape, generator=generator, dtype=torch.float32)
                    self.register_buffer(f"iterate_{index}", iterate / iterate.norm())
                x = module(x)

    # -- the linear operators -------------------------------------------------
    def _module(self, index: int) -> nn.Module:
        return self.model[0][index]

    def iterate(self, index: int) -> torch.Tensor:
        return getattr(self, f"iterate_{index}")

    def _forward_operator(self, index: int, x: torch.Tensor) -> torch.Tensor:
        module = self._module(index)
        if isinstance(module, nn.Linear):
            return F.linear(x, module.weight)
        if isinstance(module, Residual):
            conv = module.conv
            return x + _OneImageConv.apply(x, conv.weight, conv.stride, conv.padding)
        return _OneImageConv.apply(x, module.weight, module.stride, module.padding)

    def _transpose_operator(self, index: int, y: torch.Tensor) -> torch.Tensor:
        module = self._module(index)
        if isinstance(module, nn.Linear):
            return F.linear(y, module.weight.t())
        if isinstance(module, Residual):  # (I + W)ᵀ = I + Wᵀ; stride 1 and 'same' padding need no output_padding
            conv = module.conv
            with _one_image_kernels(y.device):
                return y + F.conv_transpose2d(y, conv.weight, None, conv.stride, conv.padding)
        _, _, height, width = self.input_shapes[index]
        kh, kw = module.kernel_size
        sh, sw = module.stride
        ph, pw = module.padding
        out_h = (y.shape[2] - 1) * sh - 2 * ph + kh
        out_w = (y.shape[3] - 1) * sw - 2 * pw + kw
        output_padding = (height - out_h, width - out_w)
        with _one_image_kernels(y.device):
            return F.conv_transpose2d(y, module.weight, None, module.stride, module.padding, output_padding)

    # -- iterating ------------------------------------------------------------
    @torch.no_grad()
    def _iterate_once(self, index: int, image: torch.Tensor | None = None) -> None:
        """x ← WᵀWx / ‖WᵀWx‖; ``image`` is W x when the caller already has it."""
        x = self.iterate(index)
        v = self._transpose_operator(index, self._forward_operator(index, x) if image is None else image)
        norm = v.norm()
        if 0 < float(norm) < math.inf:  # one read of the scalar (NaN fails too)
            x.copy_(v / norm)  # plain norm: no epsilon (see module docstring)
        # else: W x = 0 for this x (e.g. W = 0); keep x — the estimate is then 0.

    @torch.no_grad()
    def step(self, iterations: int = 1) -> None:
        """Advance every layer's iterate by ``iterations`` power-iteration steps."""
        for _ in range(int(iterations)):
            for index in self.layer_indices:
                self._iterate_once(index)

    def step_estimates(self, iterations: int = 1, *, logits_layer: bool = True) -> torch.Tensor:
        """A training step's power iteration: the differentiable estimates ``‖W x‖`` of the iterates ``x`` the
        last of ``iterations`` advances starts from (as :meth:`layer_estimates`), and the advances.

        The last advance reuses each image ``W x`` of the estimates (detached) as the first half of its step, so
        a training step runs one one-image operator per layer fewer than :meth:`step` then
        :meth:`layer_estimates` (≈ 0.5 ms of a 2C2F step on one CPU thread). The estimate lags the iterate by
        one advance; both approach the same σ_max from below.

        ``logits_layer=False`` leaves the last layer out, neither estimated nor advanced (:meth:`converge` takes
        its iterate from where it is before an evaluation): a loss that reads only :meth:`margin_matrix` uses
        that layer's rows exactly, not its norm, and its step saves the layer's operators and their backward.
        """
        iterations = int(iterations)
        layers = self.layer_indices if logits_layer else self.layer_indices[:-1]
        for _ in range(max(iterations - 1, 0)):
            for index in layers:
                self._iterate_once(index)
        values = []
        for index in layers:
            image = self._forward_operator(index, self.iterate(index).clone())  # the graph keeps x; it is overwritten below
            values.append(image.norm())
            if iterations > 0:
                self._iterate_once(index, image.detach())
        return torch.stack(values) if values else self.iterate(self.layer_indices[0]).new_ones(0)

    def layer_estimates(self, *, logits_layer: bool = True) -> torch.Tensor:
        """Differentiable estimates ``‖W x‖`` per layer (gradient flows through W, not x); the last layer's left
        out when ``logits_layer`` is False.

        A lower estimate of each spectral norm; see the module docstring.
        """
        values = []
        for index in self.layer_indices if logits_layer else self.layer_indices[:-1]:
            x = self.iterate(index).detach()
            values.append(self._forward_operator(index, x).norm())
        return torch.stack(values) if values else self.iterate(self.layer_indices[0]).new_ones(0)

    @torch.no_grad()
    def converge(self, tol: float = 1e-6, max_iterations: int = 10_000) -> ConvergenceReport:
        """Iterate each layer until the relative change of its estimate is below ``tol``.

        Stops at ``max_iterations`` per layer (reported as not converged).
        """
        iterations, converged, estimates = [], [], []
        for index in self.layer_indices:
            image = self._forward_operator(index, self.iterate(index))  # W x: the estimate, and half the next step
            previous = image.norm().item()
            done, count, current = False, 0, previous
            while count < max_iterations:
                self._iterate_once(index, image)
                count += 1
                image = self._forward_operator(index, self.iterate(index))
                current = image.norm().item()
                if abs(current - previous) <= tol * max(abs(current), 1e-300):
                    done = True
                    break
                previous = current
            iterations.append(count)
            converged.append(done)
            estimates.append(current)
        return ConvergenceReport(iterations, converged, estimates)

    # -- what the loss needs --------------------------------------------------
    def margin_lipschitz(self) -> torch.Tensor:
        """Estimated margin matrix ``K[j, i]`` ≈ Lipschitz constant of ``y_j − y_i`` (C×C, differentiable), from
        the current iterates: :meth:`margin_matrix` of the estimates of the layers before the logits layer."""
        return self.margin_matrix(self.layer_estimates(logits_layer=False))

    def margin_matrix(self, hidden: torch.Tensor) -> torch.Tensor:
        """``K[j, i] = ‖W_last[j] − W_last[i]‖₂ · ∏ hidden`` from the estimates ``hidden`` of every layer before
        the last (the logits) layer; the diagonal is exactly 0. The last layer's bias does not matter. An
        estimate, not a bound: see the module docstring.
        """
        weight = self._module(self.layer_indices[-1]).weight
        # cdist's direct mode: an exact 0 diagonal with a zero (not NaN) gradient, in one op (the mm mode that
        # torch picks for more than 25 classes rounds the diagonal off zero)
        return torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist") * torch.prod(hidden)

    def lipschitz_estimate(self) -> float:
        """Product of the per-layer estimates: an estimate of the whole network's constant."""
        with torch.no_grad():
            return float(torch.prod(self.layer_estimates()).item())

    def iterate_state(self) -> dict[str, torch.Tensor]:
        """The iterates, for checkpointing (``iterate_<layer index>`` → tensor)."""
        return {f"iterate_{i}": self.iterate(i).detach().clone() for i in self.layer_indices}

    def load_iterate_state(self, state: dict[str, torch.Tensor]) -> None:
        for index in self.layer_indices:
            key = f"iterate_{index}"
            if key not in state or tuple(state[key].shape) != tuple(self.iterate(index).shape):
                raise GlorocertError(f"power-iteration state is missing or has the wrong shape: {key}")
            self.iterate(index).copy_(state[key])
