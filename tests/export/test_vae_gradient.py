"""The SD VAE decoder's gradient graph (``sdc_export.vae_gradient``) against torch's autograd
on tiny random diffusers VAEs: SD's four channels with its post-quant convolution, and a
16-channel one without it, in the diffusion model's units (scaling and shift)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdc_export.graphs import VaeDecoder
from sdc_export.vae_gradient import VaeDecoderGradient
from sdc_runtime.errors import SdcExportError


def _vae(channels: int, post_quant: bool, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=channels,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, use_post_quant_conv=post_quant, use_quant_conv=post_quant)
    with torch.no_grad():  # random weights large enough that every nonlinearity is off its linear part
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def _reference(vae, scaling, shift, latent, image, weight):
    z = torch.from_numpy(latent).requires_grad_()
    decoded = VaeDecoder(vae, scaling, shift)(z)
    error = (torch.from_numpy(weight) * (decoded.clamp(-1, 1) - torch.from_numpy(image)) ** 2).sum()
    error.backward()
    return z.grad.numpy(), float(error)


@pytest.mark.parametrize("channels, post_quant, scaling, shift", [(4, True, 0.18215, 0.0), (16, False, 1.5305, 0.0609)])
def test_the_vae_decoder_gradient_is_autograds(channels, post_quant, scaling, shift):
    vae = _vae(channels, post_quant)
    rng = np.random.default_rng(1)
    latent = rng.normal(0, 1, (1, channels, 6, 10)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, 12, 20)).astype(np.float32)
    weight = np.ones((1, 1, 12, 20), np.float32)
    weight[..., 9:, :] = 0  # pixels that do not count
    expected, expected_error = _reference(vae, scaling, shift, latent, image, weight)
    with torch.no_grad():
        gradient, error = VaeDecoderGradient(vae, scaling, shift)(*map(torch.from_numpy, (latent, image, weight)))
    assert float(error[0]) == pytest.approx(expected_error, rel=1e-5)
    assert np.abs(gradient.numpy() - expected).max() <= 1e-4 * np.abs(expected).max()
    # and the gradient is not trivially small: the test would fail on a wrong backward
    assert np.abs(expected).max() > 1e-3


def test_a_decoder_it_does_not_cover_is_refused():
    vae = _vae(4, True)
    vae.decoder.conv_act = torch.nn.GELU()
    with pytest.raises(SdcExportError, match="no decoder gradient"):
        VaeDecoderGradient(vae)
