"""Regression tests for two bugs found while writing the suite (constant Concat inputs, the label named in an out-of-range error).

Earlier finds (TorchScript under inference_mode, torch.export archives, fixed-batch ONNX, power-iteration
plateaus, per-width scales folded as per-channel, broadcasting Affine bound, usage-error tracebacks, late
plot-extension check, silent Ctrl-C) live beside their siblings in test_loaders.py, test_bounds.py and test_cli.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from glorocert.api import certify, load, open_dataset
from glorocert.errors import GlorocertError, UnsupportedOperator
from helpers import SHAPE, make_model, save_as


class ConcatConstantChannels(torch.nn.Module):
    """CoordConv-style: constant coordinate channels concatenated to the input, then a conv net."""

    def __init__(self):
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, SHAPE[1]), torch.linspace(-1, 1, SHAPE[2]), indexing="ij")
        self.register_buffer("coords", torch.stack([ys, xs])[None])
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * SHAPE[1] * SHAPE[2], 10)

    def forward(self, x):
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_onnx_concat_with_a_constant_input_is_refused_by_name_never_a_crash(tmp_path):
    """glorocert/loaders/onnx_loader.py, _Converter.convert_node, branch ``op == "Concat"``:
    ``self.emit(out, Concat(axis), *node.input)`` read ``self.values[i]`` for every input, but a constant
    input (folded from Expand/Constant) lives in ``self.consts`` → KeyError traceback (exit 1 in the CLI).
    The fix (ddbc074) is the minimal one: ``UnsupportedOperator("Concat", node, "concatenating a constant
    tensor …")``, a clear refusal naming the node, which the CLI turns into exit 2. (Converting it — the data
    Concat followed by an Affine shift that inserts the constants — would be a new feature; whoever adds it
    replaces this test with an IR-equals-native check.)"""
    module = ConcatConstantChannels().eval()
    path = save_as(module, "onnx", tmp_path, "coordconv")
    with pytest.raises(UnsupportedOperator, match="constant tensor") as caught:
        load(path)
    assert caught.value.op == "Concat"
    assert caught.value.node and repr(caught.value.node) in str(caught.value)


def test_label_out_of_range_error_names_the_label_of_the_row_it_names(tmp_path):
    """glorocert/certify/pipeline.py native_logits (formerly api.certify's batch loop), label check: the message said
    ``row {first offending row} has label {batch.y.max()}`` — the largest label of the batch, not that
    row's. Fix: ``bad = int(np.argmax(batch.y >= model.num_classes))`` then report ``batch.index[bad]`` and
    ``batch.y[bad]``."""
    model = load(save_as(make_model("chain"), "onnx", tmp_path))
    x = np.random.default_rng(0).random((20, *SHAPE), dtype=np.float32)
    y = np.zeros(20, np.int64)
    y[3], y[5] = 10, 12
    np.savez(tmp_path / "labels.npz", x=x, y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GlorocertError, match=r"row 3 has label 10\b"):
            certify(model, open_dataset(tmp_path / "labels.npz"), [0.1])
