"""Which weights to load: tiny models built in code, or SD1.5 + IC-Light fc from disk; shared by
train.py, the demo and relight.py so that every entry point builds the same models from the same names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eddpm import conditioning, iclight, tiny, weights

TINY = "tiny"
TINY_VAE_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny" / "vae"


@dataclass
class Components:
    unet: Any  # 8-channel UNet2DConditionModel
    vae: Any
    text_encoder: Any
    tokenizer: Any
    matte_fn: Any = None  # image uint8 [H, W, 3] -> alpha [H, W] (BriaRMBG), for rows without alpha or mask


def load_components(
    base_model: str = TINY,
    offset_path: str | None = None,
    unet_path: str | None = None,
    seed: int = 0,
) -> Components:
    """The four models in float32 on the CPU.

    base_model 'tiny': `tiny.build_tiny_components(seed)` (with the VAE this project trained on the
    synthetic data, models/tiny/vae, when it is there), its UNet merged with `offset_path` when given (a
    tiny run's iclight_offsets.safetensors: fine-tuning a trained tiny model, as IC-Light's file is for SD1.5).
    Otherwise a diffusers SD1.5 folder or hub id, whose UNet is widened to 8 channels and merged with
    `offset_path`. `unet_path` (a train.py output's unet/ folder) replaces the UNet.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if base_model == TINY:
        parts = tiny.build_tiny_components(seed)
        trained_vae = (TINY_VAE_DIR / "config.json").is_file()
        vae = AutoencoderKL.from_pretrained(TINY_VAE_DIR) if trained_vae else parts.vae
        unet, text_encoder, tokenizer = parts.unet, parts.text_encoder, parts.tokenizer
        if offset_path is not None and unet_path is None:
            weights.merge_offsets_(unet, offset_path)
    else:
        vae, text_encoder, tokenizer = weights.load_base_components(base_model)
        unet = None if unet_path else weights.load_iclight_unet(base_model, offset_path)
    if unet_path is not None:
        unet = UNet2DConditionModel.from_pretrained(unet_path, use_safetensors=True)
    return Components(unet=unet, vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer)


def load_base_unet(base_model: str = TINY, seed: int = 0):
    """The UNet that IC-Light offsets are measured from: the SD1.5 base (4 channels), or for 'tiny' the
    freshly built tiny UNet (so a tiny run's offsets are exactly what training changed)."""
    if base_model == TINY:
        return tiny.build_tiny_components(seed).unet
    return weights.load_iclight_unet(base_model, None)


def load_matte_fn(rmbg_path: str | None, device: str | torch.device = "cpu"):
    """`image uint8 [H, W, 3] -> alpha float32 [H, W]` through BriaRMBG, or None without a model path."""
    if rmbg_path is None:
        return None
    if not os.path.isdir(rmbg_path):
        raise iclight.MissingWeightsError(f"BriaRMBG folder {rmbg_path} not found. {iclight.DOWNLOAD_HINT}")
    from eddpm.briarmbg import BriaRMBG

    rmbg = BriaRMBG.from_pretrained(rmbg_path).to(device).eval()

    def matte(image: np.ndarray) -> np.ndarray:
        return conditioning.extract_foreground(rmbg, image)[1]

    return matte
