"""Tiny *random* checkpoints saved as diffusers folders: an SD 1.x/2.x pipeline, an SDXL
pipeline, and VAEs alone as the families publish them.

No weights can be downloaded, so tests and the demo build these in-process and load them back
through the real diffusers loaders.  Their images are noise: quality needs real weights.
Presets: "tiny" (tests) and the full-size shapes with random weights (SD 1.5's and SDXL's
pipelines, a VAE alone at SD3's).
"""
from __future__ import annotations

import json
import os

import torch

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
}


def _tokenizer_files(folder: str, vocab_words: list[str], max_length: int) -> None:
    """A byte-pair tokenizer whose vocabulary is a few whole words: enough to encode ""."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in vocab_words:
        vocab[word + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=max_length)
    tokenizer.save_pretrained(folder)


def _text_encoder(cls, config, seed: int):
    """A random CLIP text encoder whose weights are drawn here, not by transformers' initializer
    (which changed between its releases): the same seed gives the same "" embedding, and so the
    same model set, whatever transformers is installed.  Normal(0, 0.02) matrices, as CLIP
    initializes its embeddings; unit norms; zero biases."""
    model = cls(config)
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            if tensor.ndim >= 2:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
            elif name.endswith("weight") and "norm" in name:
                tensor.fill_(1.0)
            elif tensor.ndim == 1:
                tensor.zero_()
    return model


def make_random_sd(path: str, *, preset: str = "tiny", seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Write a random-weight SD pipeline folder (model_index.json, vae/, unet/, ...) to ``path``;
    ``prediction_type`` "v_prediction" as SD 2.x's 768-pixel models have it."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if preset == "tiny":
        # SD's geometry (4 levels: 8x downscale, attention in the mid block) at tiny widths.
        vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=8, sample_size=64)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            # Attention at the lower level only: full-resolution self-attention over a Kodak
            # image's 6144 latent cells would dominate the demo's decode time.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        text = CLIPTextConfig(vocab_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1)
        max_length = 16
    elif preset == "sd15":
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=32, sample_size=512)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
        # The text encoder runs once at export; its size does not reach the model set.
        text = CLIPTextConfig(vocab_size=8, hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1)
        max_length = 77
    else:
        raise ValueError(f"unknown preset {preset!r}")
    os.makedirs(path, exist_ok=True)
    vae.save_pretrained(os.path.join(path, "vae"))
    unet.save_pretrained(os.path.join(path, "unet"))
    _text_encoder(CLIPTextModel, text, seed).save_pretrained(os.path.join(path, "text_encoder"))
    _tokenizer_files(os.path.join(path, "tokenizer"), ["a", "photo"], max_length)
    PNDMScheduler.from_config(SD15_SCHEDULER | {"prediction_type": prediction_type}).save_pretrained(
        os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as fh:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "scheduler": ["diffusers", "PNDMScheduler"]}, fh, indent=1)
    return path


def _vae(channels: int, preset: str, cls=None, **config):
    from diffusers import AutoencoderKL

    if preset not in ("tiny", "full"):
        raise ValueError(f"unknown preset {preset!r}")
    widths = (16, 16, 32, 32) if preset == "tiny" else (128, 256, 512, 512)
    return (cls or AutoencoderKL)(block_out_channels=widths, layers_per_block=1 if preset == "tiny" else 2,
                                  latent_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4,
                                  norm_num_groups=8 if preset == "tiny" else 32, **config)


def make_random_sdxl(path: str, *, preset: str = "tiny", seed: int = 0) -> str:
    """A random-weight SDXL pipeline folder, saved by diffusers' StableDiffusionXLPipeline: two
    text encoders (the second with a projection) and a UNet with text_time conditioning."""
    from diffusers import PNDMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    if preset == "tiny":
        width, time_dim, max_length = 32, 8, 16
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * time_dim + width, cross_attention_dim=2 * width,
            norm_num_groups=32)
        texts = [CLIPTextConfig(vocab_size=8, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=0,
                                eos_token_id=1, pad_token_id=1, projection_dim=width) for _ in range(2)]
    elif preset == "sdxl":
        # SDXL base 1.0's UNet (2.6 B parameters); its text encoders run once at export, so small
        # ones of the right widths (768 + 1280 = 2048, pooled 1280) stand in.
        max_length = 77
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
            projection_class_embeddings_input_dim=2816, cross_attention_dim=2048)
        texts = [CLIPTextConfig(vocab_size=8, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=heads, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                pad_token_id=1, projection_dim=1280) for hidden, heads in ((768, 12), (1280, 20))]
    else:
        raise ValueError(f"unknown preset {preset!r}")
    vae = _vae(4, "tiny" if preset == "tiny" else "full", scaling_factor=0.13025,
               sample_size=64 if preset == "tiny" else 1024)
    tokenizers = []
    for name in ("tokenizer", "tokenizer_2"):
        folder = os.path.join(path, "_" + name)
        _tokenizer_files(folder, ["a", "photo"], max_length)
        tokenizers.append(CLIPTokenizer.from_pretrained(folder))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=_text_encoder(CLIPTextModel, texts[0], seed),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, texts[1], seed + 1),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER))
    pipe.save_pretrained(path)
    import shutil

    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(os.path.join(path, "_" + name))
    return path


def make_random_vae(path: str, *, channels: int = 16, scaling_factor: float | None = 1.5305,
                    shift_factor: float | None = 0.0609, layout: str = "vae-only", flux2: bool = False,
                    preset: str = "tiny", seed: int = 0) -> str:
    """A random-weight VAE as the families publish theirs: ``layout`` "vae-only" (a folder whose
    only model is vae/, as SD3's and FLUX's VAE repositories and pipelines hold it) or "root"
    (config.json at the root, as sd-vae-ft-mse and sdxl-vae).  ``flux2``: FLUX.2's
    AutoencoderKLFlux2 (32 channels, no scaling).  A factor of None leaves it out of config.json."""
    import json

    torch.manual_seed(seed)
    if flux2:
        from diffusers import AutoencoderKLFlux2

        vae = _vae(channels, preset, AutoencoderKLFlux2)
    else:
        config = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
        vae = _vae(channels, preset, **{k: v for k, v in config.items() if v is not None})
    folder = os.path.join(path, "vae") if layout == "vae-only" else path
    vae.save_pretrained(folder)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as fh:
        written = json.load(fh)
    for key, value in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
        if value is None and not flux2:  # not in config.json at all, as in older VAEs' configs
            written.pop(key, None)
    with open(config_path, "w") as fh:
        json.dump(written, fh, indent=1)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a random-weight checkpoint folder (no downloads).")
    parser.add_argument("out")
    parser.add_argument("--preset", choices=["tiny", "sd15", "sdxl", "sd3-vae"], default="tiny",
                        help="tiny: the test SD pipeline; sd15, sdxl: full-size pipelines; sd3-vae: a full-size"
                             " 16-channel VAE alone (SD3's shapes, scaling and shift)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.preset == "sdxl":
        print(make_random_sdxl(args.out, preset="sdxl", seed=args.seed))
    elif args.preset == "sd3-vae":
        print(make_random_vae(args.out, channels=16, preset="full", seed=args.seed))
    else:
        print(make_random_sd(args.out, preset=args.preset, seed=args.seed))
