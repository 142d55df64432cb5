"""SD1.5 at its real size: the published architecture configs, and random-weight models built from them.

For what must run at the real size without downloads: bench/memory.py (memory of a training step) and
scripts/make_random_sd15.py (a models/ folder laid out as download_models.py writes it, for the rehearsal in
tests/test_rehearsal.py). Sizes and counts are in docs/real-size.md; the configs are those of every SD1.5
checkpoint's unet/, vae/ and text_encoder/ config.json (realistic-vision-v51 included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from eddpm.iclight import CONDITION_CHANNELS, LATENT_CHANNELS, SCALING_FACTOR

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

# docs/real-size.md, "SD1.5": 859.5M parameters, 686 state-dict tensors (4 or 8 input channels alike).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# 83.7M parameters; 8x downsampling to 4 latent channels.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": SCALING_FACTOR,
}
CLIP_VOCAB_SIZE = 49408  # 256 byte symbols, the same with "</w>", 48894 merges, 2 special tokens
# CLIP ViT-L/14's text tower: 123.1M parameters.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
# The base model's scheduler/scheduler_config.json (a PNDMScheduler); training and sampling use
# eddpm.iclight.SD15_SCHEDULER_CONFIG, which shares its betas.
PNDM_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}


def build_unet(in_channels: int = LATENT_CHANNELS + CONDITION_CHANNELS, seed: int = 0,
               device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """An SD1.5-size UNet with diffusers' default random initialisation, float32, on `device`.

    in_channels 8 is the IC-Light fc UNet that train.py trains (base conv_in widened), 4 the base as saved.
    On device "meta" nothing is allocated: shapes and parameter counts only."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": in_channels})


def build_vae(seed: int = 0, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The SD1.5 VAE with random weights, float32 ("meta": shapes only)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return AutoencoderKL(**VAE_CONFIG)


def build_text_encoder(seed: int = 0, device: str | torch.device = "cpu") -> CLIPTextModel:
    """SD1.5's CLIP ViT-L/14 text encoder with random weights, float32 ("meta": shapes only)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
