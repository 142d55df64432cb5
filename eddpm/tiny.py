"""Tiny IC-Light components for tests and CPU runs: the real classes (8-channel UNet, SD-style VAE, CLIP text
encoder and tokenizer) at a size that builds in well under a second, offline and deterministically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eddpm.iclight import CONDITION_CHANNELS, LATENT_CHANNELS, SCALING_FACTOR

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


# The base (4-channel) layout; build_tiny_components widens in_channels to 8.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 32, 32),  # 3 downsamplings: 8x, like SD's VAE
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": SCALING_FACTOR,
}


@dataclass
class TinyComponents:
    """Tiny stand-ins with the real classes: 8-channel UNet, SD-style VAE, CLIP text encoder and tokenizer."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


TINY_TOKENIZER_WORDS = (  # eddpm/synthetic.py's caption words, then a few of IC-Light's quick-prompt words
    "left", "right", "top", "bottom", "front", "light", "from", "warm", "neutral", "cool",
    "sphere", "cube", "cylinder", "torus", "cone", "capsule",
    "red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "white", "gray", "brown",
    "sunshine", "window", "neon", "soft", "studio", "shadow", "natural", "lighting", "sunset", "magic",
)


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer built offline that tokenises any text: all 256 byte symbols, with and without </w>."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    # A few merges so words are not all single characters.
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("o", "n</w>"), ("a", "n")]
    # Whole-word tokens for the words of the captions the CPU presets train on, as CLIP's BPE has one token
    # for each common English word: spelt out letter by letter, "left" and "right" differed by only 5-10 %
    # of the random text encoder's output, and the small preset's UNet barely learnt the light direction.
    for word in TINY_TOKENIZER_WORDS:
        for k in range(2, len(word) + 1):
            tail = "</w>" if k == len(word) else ""
            merges.append((word[: k - 1], word[k - 1] + tail))
    merges = list(dict.fromkeys(merges))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_components(seed: int = 0) -> TinyComponents:
    """Tiny, deterministic (per `seed`) components for tests; the global RNG is left untouched."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_UNET_CONFIG["cross_attention_dim"],
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            **{**TINY_UNET_CONFIG, "in_channels": LATENT_CHANNELS + CONDITION_CHANNELS}
        )
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    return TinyComponents(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer
    )
