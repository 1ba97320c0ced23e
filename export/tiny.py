"""A tiny *random* Stable Diffusion pipeline saved as a diffusers folder.

No weights can be downloaded, so tests and the demo build this in-process and load it back
through the real diffusers loaders.  Its images are noise: quality needs real weights.
Architecture presets: "tiny" (tests) and "sd15" (the full-size SD 1.5 shapes, random weights).
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


def make_random_sd(path: str, *, preset: str = "tiny", seed: int = 0) -> str:
    """Write a random-weight SD pipeline folder (model_index.json, vae/, unet/, ...) to ``path``."""
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
    CLIPTextModel(text).save_pretrained(os.path.join(path, "text_encoder"))
    _tokenizer_files(os.path.join(path, "tokenizer"), ["a", "photo"], max_length)
    PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as fh:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "scheduler": ["diffusers", "PNDMScheduler"]}, fh, indent=1)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a random-weight SD pipeline folder (no downloads).")
    parser.add_argument("out")
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_random_sd(args.out, preset=args.preset, seed=args.seed))
