"""Torch modules -> ONNX graphs: the I/O wrappers, the export itself, fp16 conversion, parity."""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from sdc_runtime.errors import SdcExportError
from sdc_runtime.roles import ROLES

from .attention import fuse_attention

TWO_GB = 2 ** 31
# Ops kept in fp32 inside fp16 graphs: normalizations and softmax accumulate over many
# values and overflow or lose precision in fp16; the timestep embedding needs exp/sin/cos.
FP16_KEEP_FP32 = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax",
                  "Exp", "Sin", "Cos", "Range", "Resize", "Upsample"]
# Parity tolerance: |onnx - torch| <= atol + rtol * max|torch|, elementwise maximum.
TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 3e-2)}


class VaeEncoder(torch.nn.Module):
    """image in [-1, 1] -> latent distribution mean: raw for SD pipelines, whose UNet loop
    scales it; in the diffusion model's units, ``(raw - shift) * scaling``, for VAE-only sets."""

    def __init__(self, vae, scaling: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.vae, self.scaling, self.shift = vae, scaling, shift

    def forward(self, image):
        mean = self.vae.encode(image).latent_dist.mean
        return mean if (self.scaling, self.shift) == (1.0, 0.0) else (mean - self.shift) * self.scaling


class VaeDecoder(torch.nn.Module):
    """latent (in the encoder's units) -> image in [-1, 1]."""

    def __init__(self, vae, scaling: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.vae, self.scaling, self.shift = vae, scaling, shift

    def forward(self, latent):
        if (self.scaling, self.shift) != (1.0, 0.0):
            latent = latent / self.scaling + self.shift
        return self.vae.decode(latent).sample


class UNetEmptyPrompt(torch.nn.Module):
    """(scaled latent, timestep) -> prediction, with the empty-prompt conditioning baked in.

    SDXL's UNet also takes the second text encoder's pooled "" (``pooled``) and the size
    conditioning the pipeline builds: (height, width, 0, 0, height, width) in pixels, here read
    off the latent it runs on (``downscale`` pixels a cell), so one graph serves every size."""

    def __init__(self, unet, embedding: torch.Tensor, pooled: torch.Tensor | None = None, downscale: int = 8):
        super().__init__()
        self.unet = unet
        self.register_buffer("embedding", embedding.clone())
        self.register_buffer("pooled", None if pooled is None else pooled.clone())
        self.downscale = downscale

    def forward(self, sample, timestep):
        batch = sample.shape[0]
        context = self.embedding.expand(batch, -1, -1).to(sample.dtype)
        if self.pooled is None:
            return self.unet(sample, timestep, encoder_hidden_states=context).sample
        # _shape_as_tensor keeps the size symbolic in the traced graph (shape[2] would be a constant).
        size = torch._shape_as_tensor(sample)[2:].to(sample.dtype) * self.downscale
        time_ids = torch.cat([size, torch.zeros_like(size), size]).unsqueeze(0).expand(batch, -1)
        added = {"text_embeds": self.pooled.expand(batch, -1).to(sample.dtype), "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample


@dataclass
class GraphSpec:
    role: str
    module: torch.nn.Module
    input_names: list[str]
    output_name: str
    example: tuple  # example inputs at the parity size, batch 1
    # For an nn.Sequential whose layers at latent resolution need the whole image (GroupNorm
    # statistics): the layer index that splits it into the part at latent resolution, run
    # whole, and the spatially local part the runtime may run in tiles.
    split: int | None = None
    # Outputs after ``output_name`` (per batch item: no spatial axes).
    extra_outputs: tuple[str, ...] = ()
    # The parts, where they are not the module's two halves at ``split`` (the decoder gradient's).
    split_parts: list[GraphSpec] | None = None

    def parts(self) -> list[GraphSpec]:
        """The split graph's two parts, in data-flow order, named '<role>.whole' and
        '<role>.tiled': an encoder is local up to the latent resolution, a decoder from it."""
        if self.split_parts is not None:
            return self.split_parts
        first, second = self.module[:self.split].eval(), self.module[self.split:].eval()
        with torch.no_grad():
            middle = first(*self.example)
        names = ROLES[self.role].split_order
        return [GraphSpec(f"{self.role}.{names[0]}", first, self.input_names, "features", self.example),
                GraphSpec(f"{self.role}.{names[1]}", second, ["features"], self.output_name, (middle,))]


def export_graph(spec: GraphSpec, path: str, opset: int, *, fuse: bool = True) -> None:
    """TorchScript-based export with dynamic batch, height and width.

    (The dynamo exporter cannot yet keep H and W symbolic through diffusers' VAE and UNet.)
    Over 2 GB the exporter scatters one file per tensor; those are gathered into a single
    external-data file ``<graph>.onnx.data`` beside the graph.  With ``fuse``, attention is
    fused into ONNX Runtime's MultiHeadAttention (``attention.py``).
    """
    import onnx

    dynamic = {name: {0: "batch"} for name in spec.input_names}
    dynamic[spec.input_names[0]].update({2: "height", 3: "width"})
    for name, example in list(zip(spec.input_names, spec.example))[1:]:
        if example.ndim == 4:  # a second image-like input (the decoder gradient's target image)
            dynamic[name].update({2: f"{name}_height", 3: f"{name}_width"})
    dynamic[spec.output_name] = {0: "batch", 2: "out_height", 3: "out_width"}
    dynamic.update({name: {0: "batch"} for name in spec.extra_outputs})
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
        scratch_path = os.path.join(scratch, "graph.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(spec.module, spec.example, scratch_path, dynamo=False, opset_version=opset,
                              input_names=spec.input_names, output_names=[spec.output_name, *spec.extra_outputs],
                              dynamic_axes=dynamic, do_constant_folding=True)
        scattered = len(os.listdir(scratch)) > 1
        model = onnx.load(scratch_path)
        if fuse:
            fuse_attention(model)
        if scattered:
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(path) + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, path)


def convert_fp16(path: str) -> None:
    """Rewrite an fp32 graph in place with fp16 weights and compute, fp32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    large = os.path.exists(path + ".data")
    if large:
        # The converter needs every value's type to keep blocked ops consistently fp32; its own
        # shape inference cannot take a graph over 2 GB, the file-based one can.
        inferred = path + ".inferred.onnx"
        onnx.shape_inference.infer_shapes_path(path, inferred)
        model = onnx.load(inferred)
        os.remove(inferred)
    else:
        model = onnx.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FP32)
    _drop_repeated_nodes(model)
    data_path = path + ".data"
    if os.path.exists(data_path):
        os.remove(data_path)
    still_large = sum(t.ByteSize() for t in model.graph.initializer) >= TWO_GB
    onnx.save_model(model, path, save_as_external_data=still_large, all_tensors_to_one_file=True,
                    location=os.path.basename(data_path))


def _drop_repeated_nodes(model) -> None:
    """The converter inserts one identical Cast per fp32 consumer of an fp16 value (Sin and Cos
    of the timestep embedding), giving a graph with a doubly defined name; keep the first."""
    seen, kept = set(), []
    for node in model.graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


@dataclass
class Parity:
    role: str
    precision: str
    max_abs: float
    max_rel: float  # max_abs / max|torch|
    tolerance: float
    passed: bool

    def line(self) -> str:
        mark = "ok" if self.passed else "FAIL"
        return (f"{self.role:12s} {self.precision}: max abs err {self.max_abs:.3e}, rel {self.max_rel:.3e}"
                f" (tolerance {self.tolerance:.3e}) {mark}")


def check_parity(spec: GraphSpec, path: str, precision: str, *, batch: int = 2) -> Parity:
    """Run the graph in ONNX Runtime (CPU) and the torch module on the same random inputs."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(1234)
    inputs = []
    for name, example in zip(spec.input_names, spec.example):
        shape = (batch,) + tuple(example.shape[1:])
        if example.ndim == 1:  # timestep: a mid-schedule value for every batch item
            inputs.append(torch.full(shape, 15.0))
        elif name == "image":
            inputs.append(torch.rand(shape, generator=generator) * 2 - 1)
        elif name == "weight":  # the decoder gradient's per-pixel weights
            inputs.append(torch.rand(shape, generator=generator))
        else:
            inputs.append(torch.randn(shape, generator=generator))
    with torch.no_grad():
        expected = spec.module(*inputs)
    expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SdcExportError(f"onnxruntime cannot load the exported {spec.role}: {str(exc).splitlines()[0]}") from None
    feeds = {name: t.numpy().astype(np.float32) for name, t in zip(spec.input_names, inputs)}
    atol, rtol = TOLERANCE[precision]
    worst = None  # (max_abs / tolerance, max_abs, scale, tolerance, finite) of the output furthest off
    for name, actual, reference in zip([spec.output_name, *spec.extra_outputs], session.run(None, feeds), expected):
        if actual.shape != reference.shape:
            raise SdcExportError(f"{spec.role}: onnx {name} shape {actual.shape} != torch {reference.shape}")
        scale = float(np.abs(reference).max())
        max_abs = float(np.abs(actual.astype(np.float64) - reference).max())
        tolerance = atol + rtol * scale
        entry = (max_abs / tolerance, max_abs, scale, tolerance, bool(np.isfinite(actual).all()))
        worst = entry if worst is None or not entry[4] or entry[0] > worst[0] else worst
    _, max_abs, scale, tolerance, finite = worst
    passed = finite and max_abs <= tolerance
    return Parity(spec.role, precision, max_abs, max_abs / max(scale, 1e-12), tolerance, passed)
