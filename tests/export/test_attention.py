"""Attention fusion (export/attention.py): the fused graph computes what torch does."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers.models.attention_processor import Attention

from sdc_export.attention import fuse_attention


class _Block(torch.nn.Module):
    def __init__(self, heads: int, cross: bool):
        super().__init__()
        self.cross = cross
        self.attention = Attention(query_dim=32, heads=heads, dim_head=32 // heads,
                                   cross_attention_dim=24 if cross else None)
        self.context = torch.nn.Parameter(torch.randn(1, 7, 24))

    def forward(self, hidden):
        if self.cross:
            return self.attention(hidden, self.context.expand(hidden.shape[0], -1, -1))
        return self.attention(hidden)


def _export(module, example, path):
    torch.onnx.export(module, example, path, dynamo=False, opset_version=17, input_names=["hidden"],
                      output_names=["out"], dynamic_axes={"hidden": {0: "batch", 1: "tokens"}})
    return onnx.load(path)


def _ops(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("heads,cross", [(1, False), (4, False), (4, True)])
def test_fused_attention_matches_torch(heads, cross, tmp_path):
    torch.manual_seed(heads)
    module = _Block(heads, cross).eval()
    model = _export(module, (torch.randn(2, 50, 32),), str(tmp_path / "a.onnx"))
    assert "Softmax" in _ops(model)
    assert fuse_attention(model) == 1
    assert "Softmax" not in _ops(model) and _ops(model).count("MultiHeadAttention") == 1
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # Another batch and token count than exported with: the fused node keeps shapes dynamic.
    hidden = torch.randn(3, 77, 32)
    with torch.no_grad():
        expected = module(hidden).numpy()
    got = session.run(None, {"hidden": hidden.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_a_graph_without_attention_is_left_alone(tmp_path):
    model = _export(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Softmax(-1)),
                    (torch.randn(2, 5, 32),), str(tmp_path / "s.onnx"))
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before


def test_exported_sets_ship_fused_attention(model_set):
    """The tiny SD set's UNet and VAE decoder attend; after export none of it is decomposed
    (the export's torch parity, which passed, ran on these fused graphs)."""
    for name in ("unet.onnx", "vae_decoder.onnx"):
        ops = _ops(onnx.load(os.path.join(model_set, name), load_external_data=False))
        assert "MultiHeadAttention" in ops and "Softmax" not in ops, name


def test_flop_count_is_the_same_fused_or_not(tmp_path):
    """sdc-bench session's roof ratio counts attention whether or not it is fused."""
    from sdc_export.flops import graph_flops

    module = _Block(4, cross=True).eval()
    path = str(tmp_path / "a.onnx")
    model = _export(module, (torch.randn(1, 50, 32),), path)
    decomposed = graph_flops(path, {"hidden": (1, 50, 32)})
    fuse_attention(model)
    onnx.save(model, path)
    fused = graph_flops(path, {"hidden": (1, 50, 32)})
    # Projections q, out: 50x32x32; k, v: 7x24x32; scores and weighting: 4 heads x 50x7x8 each.
    expected = 2 * (2 * 50 * 32 * 32 + 2 * 7 * 24 * 32 + 2 * 4 * 50 * 7 * 8)
    assert decomposed == fused == expected


def test_no_fuse_attention_keeps_plain_onnx_ops(tiny_sd, tmp_path):
    from helpers import run_cli

    out = tmp_path / "plain"
    result = run_cli("sdc-export", "--model", tiny_sd, "--out", str(out), "--quiet", "--no-fuse-attention")
    assert result.returncode == 0, result.stderr.decode()
    ops = _ops(onnx.load(str(out / "unet.onnx"), load_external_data=False))
    assert "Softmax" in ops and "MultiHeadAttention" not in ops
