"""The GloRo paper's architectures, MinMax activations, and glorocert's own checkpoint format.

Architectures (Leino et al. 2021, Appendix B; layer sizes as in the reference
scripts, which use ``padding='same'`` everywhere — here symmetric padding 1,
identical to TF ``'same'`` on even spatial sizes such as 28 and 32):

=====  ===================================================================
2C2F   conv16 k4 s2 → conv32 k4 s2 → FC100 → FC C
4C3F   conv32 k3 → conv32 k4 s2 → conv64 k3 → conv64 k4 s2 → FC512 → FC512 → FC C
6C2F   conv32 k3 ×2 → conv32 k4 s2 → conv64 k3 ×2 → conv64 k4 s2 → FC512 → FC C
8C2F   conv64 k3 ×2 → conv64 k4 s2 → conv128 k3 ×2 → conv128 k4 s2 →
       conv256 k3 → conv256 k4 s2 → FC256 → FC C
=====  ===================================================================

Every conv / hidden FC is followed by the activation (ReLU or MinMax); the
last FC produces the logits. Weights are initialised orthogonally, biases to
zero. The model is a plain ``nn.Sequential`` of ``Conv2d``, ``Linear``,
``ReLU`` / :class:`MinMax` and ``Flatten`` so that both of glorocert's front
ends (TorchScript / ONNX) see only operators the IR knows.

LiResNet (Hu et al., NeurIPS 2023, "Unlocking Deterministic Robustness
Certification on ImageNet"), sized for 28×28 data by ``depth`` and ``width``:

========  =================================================================
stem      conv``width`` k4 s2 (28 → 14)
blocks    ``depth`` × [x + conv``width`` k3 s1 (x)] — :class:`Residual`, one
          linear operator I + W whose norm is bounded as a whole
neck      conv``width`` k4 s2 (14 → 7) → FC ``8·width``
head      FC C
========  =================================================================

each conv / block / hidden FC followed by the activation. It is still a
``Sequential``: a residual block is one module, so the trainer's power
iteration treats it as one operator and the export is Conv + Add.

A *spec* is the JSON-serialisable description of a model::

    {"arch": "2c2f", "activation": "relu", "minmax_pairing": "halves",
     "input_shape": [1, 28, 28], "num_classes": 10}

(LiResNet adds ``"depth"`` and ``"width"``; the other architectures have neither.)

:func:`build` turns a spec into a module; :func:`save_checkpoint` /
:func:`load_checkpoint` store weights *and* spec in one safetensors file (no
pickle anywhere).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glorocert.errors import GlorocertError, one_line
from glorocert.files import atomic_write

ARCHITECTURES = ("2c2f", "4c3f", "6c2f", "8c2f", "liresnet")
RESIDUAL_ARCHITECTURES = ("liresnet",)  # specs with "depth" and "width"
LIRESNET_DEFAULTS = {"depth": 4, "width": 16}
ACTIVATIONS = ("relu", "minmax")
MINMAX_PAIRINGS = ("halves", "adjacent")
CHECKPOINT_FORMAT = "1"

# (out_channels, kernel, stride) per conv, then hidden FC widths.
_LAYOUTS: dict[str, tuple[list[tuple[int, int, int]], list[int]]] = {
    "2c2f": ([(16, 4, 2), (32, 4, 2)], [100]),
    "4c3f": ([(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512]),
    "6c2f": (
        [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)],
        [512],
    ),
    "8c2f": (
        [
            (64, 3, 1), (64, 3, 1), (64, 4, 2),
            (128, 3, 1), (128, 3, 1), (128, 4, 2),
            (256, 3, 1), (256, 4, 2),
        ],
        [256],
    ),
}


class Residual(nn.Module):
    """``x + conv(x)`` with a stride-1, size-preserving ``conv`` (odd kernel, padding k // 2).

    The block is one linear operator ``I + W`` (plus the bias): its Lipschitz
    constant is ``‖I + W‖``, which can be far below ``1 + ‖W‖``; the trainer and
    the bounder both treat it as one operator.
    """

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        if kernel % 2 != 1:
            raise GlorocertError(f"a residual conv needs an odd kernel to keep its input's size, got {kernel}")
        self.conv = nn.Conv2d(channels, channels, kernel, 1, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class MinMax(nn.Module):
    """MinMax (GroupSort with groups of 2): sorts pairs of units; 1-Lipschitz in l2.

    Two conventions exist and both are supported exactly:

    * ``pairing="halves"`` (LiResNet / PyTorch convention): channel ``c`` is
      paired with ``c + C/2`` along dim 1, output ``cat([max, min], dim=1)``.
    * ``pairing="adjacent"`` (TF gloro convention): flattened elements
      ``(2k, 2k+1)`` of each sample are paired, output ``[min, max]`` per pair.

    Both are written with plain tensor ops (Split/Max/Min/Concat, or
    Reshape/Slice/Min/Max/Concat/Reshape in ONNX) so the ONNX loader can
    recognise the exported pattern.
    """

    def __init__(self, pairing: str = "halves"):
        super().__init__()
        if pairing not in MINMAX_PAIRINGS:
            raise GlorocertError(
                f"unknown MinMax pairing {pairing!r}; valid: {', '.join(MINMAX_PAIRINGS)}"
            )
        self.pairing = pairing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairing == "halves":
            a, b = x.chunk(2, 1)
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)
        shape = x.shape
        p = x.reshape(shape[0], -1, 2)
        lo = torch.minimum(p[..., 0:1], p[..., 1:2])
        hi = torch.maximum(p[..., 0:1], p[..., 1:2])
        return torch.cat([lo, hi], -1).reshape(shape)

    def extra_repr(self) -> str:
        return f"pairing={self.pairing!r}"


def validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Check a spec and return a normalised copy (lower-case names, defaults filled in)."""
    if not isinstance(spec, dict):
        raise GlorocertError(f"model spec must be a JSON object, got {type(spec).__name__}")
    try:
        arch = str(spec["arch"]).lower()
        activation = str(spec.get("activation", "relu")).lower()
        pairing = str(spec.get("minmax_pairing", "halves")).lower()
        input_shape = [int(v) for v in spec["input_shape"]]
        num_classes = int(spec["num_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GlorocertError(f"invalid model spec {spec!r}: {exc}") from None
    if arch not in ARCHITECTURES:
        raise GlorocertError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if activation not in ACTIVATIONS:
        raise GlorocertError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if pairing not in MINMAX_PAIRINGS:
        raise GlorocertError(
            f"unknown MinMax pairing {pairing!r}; valid: {', '.join(MINMAX_PAIRINGS)}"
        )
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise GlorocertError(f"input_shape must be [channels, height, width], got {input_shape}")
    if num_classes < 2:
        raise GlorocertError(f"num_classes must be at least 2, got {num_classes}")
    normalised = {
        "arch": arch,
        "activation": activation,
        "minmax_pairing": pairing,
        "input_shape": input_shape,
        "num_classes": num_classes,
    }
    if arch in RESIDUAL_ARCHITECTURES:
        normalised.update(_residual_sizes(spec))
    return normalised


def _residual_sizes(spec: dict[str, Any]) -> dict[str, int]:
    try:
        sizes = {key: int(spec.get(key, default)) for key, default in LIRESNET_DEFAULTS.items()}
    except (TypeError, ValueError) as exc:
        raise GlorocertError(f"invalid model spec {spec!r}: {exc}") from None
    if sizes["depth"] < 0 or sizes["width"] < 2 or sizes["width"] % 2:
        raise GlorocertError(f"LiResNet needs depth >= 0 and an even width >= 2 (MinMax pairs channels), got {sizes}")
    return sizes


def _activation(spec: dict[str, Any]) -> nn.Module:
    return nn.ReLU() if spec["activation"] == "relu" else MinMax(spec["minmax_pairing"])


def build(spec: dict[str, Any]) -> nn.Sequential:
    """Build the network described by ``spec`` with orthogonal initialisation (uses torch's RNG)."""
    spec = validate_spec(spec)
    if spec["arch"] == "liresnet":
        return _liresnet(spec)
    convs, hidden = _LAYOUTS[spec["arch"]]
    channels, height, width = spec["input_shape"]
    layers: list[nn.Module] = []
    for out_channels, kernel, stride in convs:
        padding = 1  # 'same' for k3 s1; TF 'same' for k4 s2 on even sizes
        layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), _activation(spec)]
        channels = out_channels
        height = (height + 2 * padding - kernel) // stride + 1
        width = (width + 2 * padding - kernel) // stride + 1
        if height < 1 or width < 1:
            raise GlorocertError(
                f"input shape {spec['input_shape']} is too small for {spec['arch'].upper()}"
            )
    layers.append(nn.Flatten())
    features = channels * height * width
    for units in hidden:
        layers += [nn.Linear(features, units), _activation(spec)]
        features = units
    layers.append(nn.Linear(features, spec["num_classes"]))
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _liresnet(spec: dict[str, Any]) -> nn.Sequential:
    channels, height, width_px = spec["input_shape"]
    width, depth = spec["width"], spec["depth"]
    if min(height, width_px) < 4:
        raise GlorocertError(f"input shape {spec['input_shape']} is too small for LiResNet (two stride-2 convs)")
    stem = nn.Conv2d(channels, width, 4, 2, 1)
    blocks = [Residual(width) for _ in range(depth)]
    neck = nn.Conv2d(width, width, 4, 2, 1)
    size = (height // 2 // 2) * (width_px // 2 // 2)  # k4 s2 p1 halves each side (floor)
    dense = nn.Linear(width * size, 8 * width)
    layers: list[nn.Module] = [stem, _activation(spec)]
    for block in blocks:
        layers += [block, _activation(spec)]
    layers += [neck, _activation(spec), nn.Flatten(), dense, _activation(spec), nn.Linear(8 * width, spec["num_classes"])]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(module.weight)
            nn.init.zeros_(module.bias)
    for block in blocks:
        # Start near the identity: an orthogonal k3 kernel has norm up to 3, so ‖I + W‖ up to 4 per block;
        # scaled by 1/(3·√depth) the product over the blocks starts below e^(1/√depth)-ish, not 4^depth.
        with torch.no_grad():
            block.conv.weight.mul_(1.0 / (3.0 * max(depth, 1) ** 0.5))
    return model


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, spec: dict[str, Any], extra: dict | None = None
) -> Path:
    """Write weights and spec to ONE safetensors file, atomically.

    The header metadata holds ``glorocert_format`` (``"1"``), ``glorocert_spec``
    (the JSON spec) and every ``extra`` item as a string (non-strings are
    JSON-encoded).
    """
    from safetensors.torch import save_file

    spec = validate_spec(spec)
    metadata = {"glorocert_format": CHECKPOINT_FORMAT, "glorocert_spec": json.dumps(spec)}
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Header metadata of a glorocert checkpoint (GlorocertError if it is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except FileNotFoundError:
        raise GlorocertError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise GlorocertError(f"cannot read checkpoint {path}: not a valid safetensors file ({exc})") from None
    if "glorocert_spec" not in metadata or "glorocert_format" not in metadata:
        raise GlorocertError(
            f"{path} is a safetensors file but not a glorocert checkpoint "
            "(no glorocert_spec / glorocert_format metadata)"
        )
    if metadata["glorocert_format"] != CHECKPOINT_FORMAT:
        raise GlorocertError(
            f"{path}: unsupported glorocert checkpoint format {metadata['glorocert_format']!r} "
            f"(this version reads {CHECKPOINT_FORMAT!r})"
        )
    return metadata


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Sequential, dict[str, Any]]:
    """Load a glorocert checkpoint: returns ``(model in eval mode, spec)``.

    Raises :class:`GlorocertError` for a missing or corrupt file, missing
    metadata, an invalid spec, or weights that do not fit the spec.
    """
    from safetensors.torch import load_file

    metadata = read_checkpoint_metadata(path)
    try:
        spec = json.loads(metadata["glorocert_spec"])
    except json.JSONDecodeError as exc:
        raise GlorocertError(f"{path}: glorocert_spec metadata is not valid JSON ({exc})") from None
    spec = validate_spec(spec)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise GlorocertError(f"cannot read checkpoint {path}: {one_line(str(exc))}") from None
    model = build(spec)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise GlorocertError(f"{path}: weights do not match the spec {spec}: {one_line(str(exc))}") from None
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise GlorocertError(f"{path}: tensor {name!r} contains NaN or inf")
    model.eval()
    return model, spec
