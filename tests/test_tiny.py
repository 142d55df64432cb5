"""Tests for eddpm/tiny.py: the tiny real-class components are deterministic per seed, leave the global RNG
alone, build fast, downsample 8x like SD's VAE and tokenise any caption."""

import time

import torch

from eddpm.conditioning import encode_images
from eddpm.tiny import build_tiny_components


def test_build_tiny_components_is_deterministic_and_fast():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    start = time.perf_counter()
    a = build_tiny_components(seed=0)
    elapsed = time.perf_counter() - start
    assert torch.equal(torch.rand(1), before), "build_tiny_components must not move the global RNG"
    b = build_tiny_components(seed=0)
    c = build_tiny_components(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs for the same seed"
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), f"{name} ignores the seed"
    assert (
        a.unet.config.in_channels == 8
        and a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size
    )
    assert a.vae.config.scaling_factor == 0.18215 and a.tokenizer.model_max_length == 77
    with torch.no_grad():
        assert encode_images(a.vae, torch.zeros(1, 3, 64, 64)).shape == (1, 4, 8, 8), "VAE must downsample 8x"
    ids = a.tokenizer("Golden hour, café; RGB-lit! 42 ünïcödé 日本", add_special_tokens=False).input_ids
    assert a.tokenizer.unk_token_id not in ids, "every caption must tokenise without unknowns"
    assert elapsed < 3.0, f"build_tiny_components took {elapsed:.2f} s"
