"""Tiny autoencoders in the TAESD checkpoint format (``*_encoder.pth`` / ``*_decoder.pth``).

Our own torch modules for the architecture, plain (TAESD, for SD 1/2 latents) and the TAEF2
variant, whose three lowest-resolution Blocks first add a pooled 1x1-conv branch
(conv1x1 -> GroupNorm(4) -> ReLU -> conv1x1) of their input.  The variant and the latent
channel count are read from the state dict, never from the file name; loading is strict.
"""
from __future__ import annotations

import glob
import os

import torch
from torch import nn

from sdc_runtime.errors import SdcExportError

from .inputs import find_pair

WIDTH = 64


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, pooled: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        if pooled:
            self.pool = nn.Sequential(nn.Conv2d(n_in, 4 * n_in, 1, bias=False), nn.GroupNorm(4, 4 * n_in), nn.ReLU(),
                                      nn.Conv2d(4 * n_in, n_in, 1, bias=False))

    def forward(self, x):
        if hasattr(self, "pool"):
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder(latent_channels: int, pooled: bool) -> nn.Sequential:
    """image in [0, 1] -> latent at 1/8 resolution."""
    layers = [conv(3, WIDTH), Block(WIDTH, WIDTH)]
    for level in range(3):
        lowest = level == 2
        layers += [conv(WIDTH, WIDTH, stride=2, bias=False)] + [Block(WIDTH, WIDTH, pooled and lowest) for _ in range(3)]
    layers.append(conv(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def make_decoder(latent_channels: int, pooled: bool) -> nn.Sequential:
    """latent -> image in [0, 1] (unclamped)."""
    layers = [Clamp(), conv(latent_channels, WIDTH), nn.ReLU()]
    layers += [Block(WIDTH, WIDTH, pooled) for _ in range(3)]
    for _ in range(2):
        layers += [nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False)] + [Block(WIDTH, WIDTH) for _ in range(3)]
    layers += [nn.Upsample(scale_factor=2), conv(WIDTH, WIDTH, bias=False), Block(WIDTH, WIDTH), conv(WIDTH, 3)]
    return nn.Sequential(*layers)


def tae_splits(encoder: nn.Sequential, decoder: nn.Sequential) -> tuple[int | None, int | None]:
    """Where the graphs split between spatially local layers and the pooled blocks (whose
    GroupNorm needs the whole latent): the encoder before its first pooled block, the decoder
    after its last.  None for plain TAESD, which is local throughout."""
    def pooled(module):
        return isinstance(module, Block) and hasattr(module, "pool")

    encoder_pooled = [i for i, m in enumerate(encoder) if pooled(m)]
    decoder_pooled = [i for i, m in enumerate(decoder) if pooled(m)]
    return (encoder_pooled[0] if encoder_pooled else None, decoder_pooled[-1] + 1 if decoder_pooled else None)


def _state_dict(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SdcExportError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SdcExportError(f"{path} is not a state dict of tensors")
    return state


def _build(path: str, role: str) -> tuple[nn.Sequential, int, bool]:
    state = _state_dict(path)
    pooled = any(".pool." in key for key in state)
    try:
        if role == "encoder":
            channels = state["14.weight"].shape[0]
        else:
            channels = state["1.weight"].shape[1]
    except KeyError:
        raise SdcExportError(f"{path} does not have the TAESD {role} layout") from None
    module = (make_encoder if role == "encoder" else make_decoder)(int(channels), pooled)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SdcExportError(f"{path} does not match the TAESD {role} architecture: "
                          f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}") from None
    return module.eval(), int(channels), pooled


def load_tae_pair(folder: str) -> tuple[nn.Sequential, nn.Sequential, int, str]:
    """(encoder, decoder, latent channels, variant name) of a TAESD-format folder."""
    pair = find_pair(folder)
    if pair is None:
        raise SdcExportError(f"{folder} holds no *_encoder.pth / *_decoder.pth pair")
    encoder, enc_channels, enc_pooled = _build(pair[0], "encoder")
    decoder, dec_channels, dec_pooled = _build(pair[1], "decoder")
    if enc_channels != dec_channels:
        raise SdcExportError(f"encoder ({enc_channels}) and decoder ({dec_channels}) latent channels differ")
    return encoder, decoder, enc_channels, "taef2" if enc_pooled or dec_pooled else "taesd"


def load_tae_decoder(folder: str) -> tuple[nn.Sequential, int]:
    """(decoder, latent channels) of a folder holding one ``*_decoder.pth`` (an encoder may be absent)."""
    decoders = sorted(glob.glob(os.path.join(folder, "*_decoder.pth")))
    if len(decoders) != 1:
        raise SdcExportError(f"{folder} must hold exactly one *_decoder.pth (found {len(decoders)})")
    decoder, channels, _ = _build(decoders[0], "decoder")
    return decoder, channels


class DecoderGradient(nn.Module):
    """(latent, image, weight) -> (the gradient at the latent of E, E), where E, per batch item,
    is sum(weight * (clip(decoder(latent), 0, 1) - image)^2) and ``weight`` (N, 1, H, W) says
    which pixels count: all of them for a whole image, a tile's own for a tile (the runtime
    adds the tiles up), none outside an image grown to the coded minimum.  E scores the latent
    the gradient is taken at, so the closed loop needs no separate decode for it.

    The closed-loop encoder (``effort``) descends this gradient without torch, so the backward
    pass is written out as forward layers ONNX can hold: a convolution's is the transposed
    convolution with the same weights, nearest 2x upsampling's is a 2x2 sum, ReLU's and
    tanh's are masks and derivatives of the forward values, GroupNorm's is written from its
    formula, one group at a time (``_pool``).  It covers exactly the layers ``make_decoder``
    builds (and any run of them); ``tests/test_export.py`` checks it against torch's autograd."""

    def __init__(self, decoder: nn.Sequential):
        super().__init__()
        self.decoder = decoder

    def forward(self, latent, image, weight):
        decoded, tape = _forward(self.decoder, latent)
        inside = (decoded > 0) & (decoded < 1)
        difference = decoded.clamp(0, 1) - image
        error = (weight * difference * difference).sum(dim=(1, 2, 3))
        return _backward(self.decoder, tape, 2 * weight * difference * inside), error


class DecoderBackward(nn.Module):
    """(latent, gradient at the output) -> (gradient at the latent, output) of a run of decoder
    layers: the whole part of a split decoder, whose GroupNorms need the whole latent.  The
    runtime runs it twice: with a zero gradient for the output (the tiles' input), then with
    the gradient the tiles sum up.  At latent resolution both runs cost little."""

    def __init__(self, part: nn.Sequential):
        super().__init__()
        self.part = part

    def forward(self, latent, output_gradient):
        output, tape = _forward(self.part, latent)
        return _backward(self.part, tape, output_gradient), output


def _forward(module: nn.Module, x):
    """module(x) and what ``_backward`` needs of this pass."""
    if isinstance(module, nn.Sequential):
        tape = []
        for layer in module:
            x, saved = _forward(layer, x)
            tape.append(saved)
        return x, tape
    if isinstance(module, Block):
        saved = {}
        if hasattr(module, "pool"):
            saved["pool"] = x
            x = x + _summed(_pool(module.pool, x, None))
        inner, saved["conv"] = _forward(module.conv, x)
        out = module.fuse(inner + module.skip(x))
        saved["fused"] = out > 0
        return out, saved
    out = module(x)
    if isinstance(module, nn.ReLU):
        return out, out > 0
    if isinstance(module, Clamp):
        return out, out / 3  # tanh(x / 3)
    if isinstance(module, (nn.Conv2d, nn.Upsample, nn.Identity)):
        return out, None
    raise SdcExportError(f"no gradient for the decoder layer {type(module).__name__}")


def _pool(pool: nn.Sequential, x, grad):
    """A pooled block's branch (1x1 conv to four times the width, GroupNorm, ReLU, 1x1 conv
    back) as one term per GroupNorm group: without ``grad`` the terms of its output, with it
    those of the gradient at ``x`` (each group recomputed from ``x``, nothing kept from the
    forward pass).  A group's channels see only their own rows of the first convolution and
    columns of the second, so each term computes at the block's width: no tensor of four times
    the width is ever held, which at a 12 MP photo's latent cut the whole part's backward from
    2.1 GB to a fraction of it (BENCHMARKS.md section 16)."""
    widen, norm, _, narrow = pool
    width = widen.out_channels // norm.num_groups
    for group in range(norm.num_groups):
        rows = slice(group * width, (group + 1) * width)
        # The backward's recomputation adds a zero bias: otherwise the ONNX export would merge
        # it with the forward's identical nodes, which then stay alive until the backward.
        wide = nn.functional.conv2d(x, widen.weight[rows], None if grad is None else x.new_zeros(width))
        mean = wide.mean(dim=(1, 2, 3), keepdim=True)
        inv_std = torch.rsqrt(((wide - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True) + norm.eps)
        normed = (wide - mean) * inv_std
        scaled = normed * norm.weight[None, rows, None, None] + norm.bias[None, rows, None, None]
        if grad is None:
            yield nn.functional.conv2d(scaled.clamp(min=0), narrow.weight[:, rows])
            continue
        g = nn.functional.conv2d(grad, narrow.weight[:, rows].transpose(0, 1)) * (scaled > 0)
        g = g * norm.weight[None, rows, None, None]
        g = inv_std * (g - g.mean(dim=(1, 2, 3), keepdim=True)
                       - normed * (g * normed).mean(dim=(1, 2, 3), keepdim=True))
        yield nn.functional.conv2d(g, widen.weight[rows].transpose(0, 1))


def _summed(terms):
    """The terms' sum, each added as it comes, so that each group's tensors die before the next's."""
    total = next(terms)
    for term in terms:
        total = total + term
    return total


def _backward(module: nn.Module, saved, grad):
    """The gradient at ``module``'s input, given ``grad`` at its output."""
    if isinstance(module, nn.Sequential):
        for layer, layer_saved in zip(reversed(module), reversed(saved)):
            grad = _backward(layer, layer_saved, grad)
        return grad
    if isinstance(module, Block):
        grad = grad * saved["fused"]
        grad = _backward(module.conv, saved["conv"], grad) + _backward(module.skip, None, grad)
        if hasattr(module, "pool"):
            grad = grad + _summed(_pool(module.pool, saved["pool"], grad))
        return grad
    if isinstance(module, nn.ReLU):
        return grad * saved
    if isinstance(module, Clamp):
        return grad * (1 - saved * saved)
    if isinstance(module, nn.Conv2d):
        # The transposed convolution, written as the convolution with the kernel flipped and
        # its channel axes swapped (the decoder's convolutions have stride 1): ONNX Runtime
        # runs Conv in its blocked kernels, ConvTranspose through a column buffer of
        # 9 x channels floats per pixel, which would double the gradient's memory.
        return nn.functional.conv2d(grad, module.weight.transpose(0, 1).flip(2, 3), padding=module.padding)
    if isinstance(module, nn.Upsample):
        return nn.functional.avg_pool2d(grad, 2) * 4
    return grad  # nn.Identity
