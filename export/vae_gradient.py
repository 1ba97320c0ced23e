"""The decoder gradient of diffusers' ``AutoencoderKL`` (SD 1.x/2.x/XL, SD3's and FLUX.1's
16-channel VAEs): (latent, image, weight) -> (the gradient at the latent of E, E), as
``tae.DecoderGradient`` is for the tiny autoencoders, with E = sum(weight * (clip(decoded,
-1, 1) - image)^2) in the VAE's [-1, 1] images and the latent in the set's units.

The closed-loop encoder descends it without torch, so the backward pass is written out as
forward layers ONNX can hold: convolutions (transposed: the flipped kernel), nearest 2x
upsampling (a 2x2 sum), SiLU (from its input), GroupNorm (its formula) and the mid block's
single-head attention (softmax and matrix products).  It covers the layers diffusers'
``Decoder`` builds from ``UpDecoderBlock2D`` and ``UNetMidBlock2D``, and refuses any other with
one line; ``tests/export/test_vae_gradient.py`` checks it against torch's autograd.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sdc_runtime.errors import SdcExportError


class VaeDecoderGradient(nn.Module):
    """(latent in the set's units, target image in [-1, 1], per-pixel weight) -> (gradient at
    the latent, E per batch item)."""

    def __init__(self, vae, scaling: float = 1.0, shift: float = 0.0):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder

        decoder = getattr(vae, "decoder", None)
        # Other classes (AutoencoderKLFlux2) decode through more than the decoder.
        if type(vae).__name__ != "AutoencoderKL" or not isinstance(decoder, Decoder):
            raise SdcExportError(f"no decoder gradient for {type(vae).__name__}'s decoder")
        self.vae, self.scaling, self.shift = vae, scaling, shift
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        for module in decoder.modules():  # refused at export, not inside the trace
            _check(module)

    def forward(self, latent, image, weight):
        z = latent / self.scaling + self.shift if (self.scaling, self.shift) != (1.0, 0.0) else latent
        tape = []
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        decoded = _decoder_forward(self.vae.decoder, z, tape)
        inside = (decoded > -1) & (decoded < 1)
        difference = decoded.clamp(-1, 1) - image
        error = (weight * difference * difference).sum(dim=(1, 2, 3))
        grad = _decoder_backward(self.vae.decoder, tape, 2 * weight * difference * inside)
        if self.post_quant_conv is not None:
            grad = _conv_backward(self.post_quant_conv, grad)
        if self.scaling != 1.0:
            grad = grad / self.scaling
        return grad, error


_LEAVES = (nn.Conv2d, nn.GroupNorm, nn.SiLU, nn.Linear, nn.Dropout, nn.Identity, nn.ModuleList, nn.Sequential)


def _check(module: nn.Module) -> None:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D
    from diffusers.models.upsampling import Upsample2D

    if isinstance(module, ResnetBlock2D):
        if module.upsample is not None or module.downsample is not None or module.time_emb_proj is not None:
            raise SdcExportError("no decoder gradient for a resnet block that resamples or takes a time embedding")
        if not isinstance(module.nonlinearity, nn.SiLU):
            raise SdcExportError(f"no decoder gradient for the activation {type(module.nonlinearity).__name__}")
    elif isinstance(module, Attention):
        if (module.heads != 1 or module.spatial_norm is not None or module.group_norm is None
                or not module.residual_connection):
            raise SdcExportError("no decoder gradient for attention other than the VAE's one-head, group-normed kind")
    elif isinstance(module, Upsample2D):
        if not module.use_conv or module.use_conv_transpose or module.norm is not None:
            raise SdcExportError("no decoder gradient for an upsampler other than nearest 2x and a convolution")
    elif isinstance(module, Decoder):
        if getattr(module, "mid_block", None) is None or not isinstance(module.conv_act, nn.SiLU):
            raise SdcExportError("no decoder gradient for a decoder without its mid block or SiLU")
    elif not isinstance(module, (UNetMidBlock2D, UpDecoderBlock2D, *_LEAVES)):
        raise SdcExportError(f"no decoder gradient for the decoder layer {type(module).__name__}")


# --- forward passes that keep what the backward needs (inputs of the nonlinear layers) ---

def _decoder_forward(decoder, z, tape):
    x = decoder.conv_in(z)
    mid = decoder.mid_block
    x = _resnet_forward(mid.resnets[0], x, tape)
    for attention, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attention is not None:
            x = _attention_forward(attention, x, tape)
        x = _resnet_forward(resnet, x, tape)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = _resnet_forward(resnet, x, tape)
        for upsampler in block.upsamplers or []:
            x = upsampler.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    tape.append(x)  # the output norm's input
    x = F.silu(_group_norm(decoder.conv_norm_out, x))
    return decoder.conv_out(x)


def _resnet_forward(resnet, x, tape):
    tape.append(x)
    h = resnet.conv1(F.silu(_group_norm(resnet.norm1, x)))
    tape.append(h)
    h = resnet.conv2(F.silu(_group_norm(resnet.norm2, h)))
    shortcut = resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x
    return (shortcut + h) / resnet.output_scale_factor


def _attention_forward(attention, x, tape):
    tape.append(x)
    n, c, height, width = x.shape
    normed = _group_norm(attention.group_norm, x).reshape(n, c, height * width).transpose(1, 2)
    q, k, v = attention.to_q(normed), attention.to_k(normed), attention.to_v(normed)
    probs = torch.softmax(q @ k.transpose(1, 2) * attention.scale, dim=-1)
    tape.append((q, k, v, probs))
    out = attention.to_out[0](probs @ v).transpose(1, 2).reshape(n, c, height, width)
    return (out + x) / attention.rescale_output_factor


def _group_norm(norm, x):
    """GroupNorm from its formula (its backward below reuses the same statistics)."""
    return _normed(norm, x)[0] * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def _normed(norm, x):
    """(x normalized per group, 1 / std per group) for ``norm``."""
    n = x.shape[0]
    grouped = x.reshape(n, norm.num_groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    inv_std = torch.rsqrt(((grouped - mean) ** 2).mean(dim=2, keepdim=True) + norm.eps)
    return ((grouped - mean) * inv_std).reshape(x.shape), inv_std


# --- backward passes, in reverse order over the tape ---

def _decoder_backward(decoder, tape, grad):
    grad = _conv_backward(decoder.conv_out, grad)
    x = tape.pop()
    grad = _group_norm_backward(decoder.conv_norm_out, x, _silu_backward(_group_norm(decoder.conv_norm_out, x), grad))
    mid = decoder.mid_block
    for block in reversed(decoder.up_blocks):
        for upsampler in reversed(block.upsamplers or []):
            grad = F.avg_pool2d(_conv_backward(upsampler.conv, grad), 2) * 4
        for resnet in reversed(block.resnets):
            grad = _resnet_backward(resnet, tape, grad)
    for attention, resnet in reversed(list(zip(mid.attentions, mid.resnets[1:]))):
        grad = _resnet_backward(resnet, tape, grad)
        if attention is not None:
            grad = _attention_backward(attention, tape, grad)
    grad = _resnet_backward(mid.resnets[0], tape, grad)
    return _conv_backward(decoder.conv_in, grad)


def _resnet_backward(resnet, tape, grad):
    h, x = tape.pop(), tape.pop()
    grad = grad / resnet.output_scale_factor
    shortcut = _conv_backward(resnet.conv_shortcut, grad) if resnet.conv_shortcut is not None else grad
    g = _conv_backward(resnet.conv2, grad)
    g = _group_norm_backward(resnet.norm2, h, _silu_backward(_group_norm(resnet.norm2, h), g))
    g = _conv_backward(resnet.conv1, g)
    g = _group_norm_backward(resnet.norm1, x, _silu_backward(_group_norm(resnet.norm1, x), g))
    return shortcut + g


def _attention_backward(attention, tape, grad):
    (q, k, v, probs), x = tape.pop(), tape.pop()
    n, c, height, width = grad.shape
    grad = grad / attention.rescale_output_factor
    g_out = grad.reshape(n, c, height * width).transpose(1, 2)  # (n, tokens, c)
    g_attended = g_out @ attention.to_out[0].weight  # through the output projection
    g_probs = g_attended @ v.transpose(1, 2)
    g_v = probs.transpose(1, 2) @ g_attended
    g_scores = probs * (g_probs - (g_probs * probs).sum(dim=-1, keepdim=True)) * attention.scale
    g_q, g_k = g_scores @ k, g_scores.transpose(1, 2) @ q
    g_normed = g_q @ attention.to_q.weight + g_k @ attention.to_k.weight + g_v @ attention.to_v.weight
    g_normed = g_normed.transpose(1, 2).reshape(n, c, height, width)
    return grad + _group_norm_backward(attention.group_norm, x, g_normed)


def _silu_backward(x, grad):
    sigmoid = torch.sigmoid(x)
    return grad * sigmoid * (1 + x * (1 - sigmoid))


def _group_norm_backward(norm, x, grad):
    """The gradient at GroupNorm's input ``x``, given ``grad`` at its output."""
    normed, inv_std = _normed(norm, x)
    n = x.shape[0]
    scaled = (grad * norm.weight[None, :, None, None]).reshape(n, norm.num_groups, -1)
    normed = normed.reshape(n, norm.num_groups, -1)
    out = inv_std * (scaled - scaled.mean(dim=2, keepdim=True) - normed * (scaled * normed).mean(dim=2, keepdim=True))
    return out.reshape(x.shape)


def _conv_backward(conv: nn.Conv2d, grad):
    # As tae's: the flipped kernel with its channel axes swapped, stride 1.
    return F.conv2d(grad, conv.weight.transpose(0, 1).flip(2, 3), padding=conv.padding)
