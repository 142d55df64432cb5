"""eddpm/sd15.py and scripts/make_random_sd15.py: SD1.5's published sizes (docs/real-size.md), the tokenizer
files, and offsets that the repository's strict loader accepts. The models are built on the "meta" device
(shapes only), so nothing here allocates the real weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from eddpm import sd15

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_random_sd15  # noqa: E402


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_real_sizes_match_the_published_models():
    base, fc = sd15.build_unet(4, device="meta"), sd15.build_unet(device="meta")
    assert count(base) == 859_520_964  # SD1.5's UNet, 859.5M
    # widening conv_in adds 320 output channels x 4 input channels x 3 x 3 weights
    assert count(fc) - count(base) == 320 * 4 * 3 * 3
    assert len(fc.state_dict()) == len(base.state_dict()) == 686  # IC-Light's offset file has 686 tensors
    assert fc.conv_in.weight.shape == (320, 8, 3, 3)
    assert count(sd15.build_vae(device="meta")) == 83_653_863
    assert count(sd15.build_text_encoder(device="meta")) == 123_060_480


def test_bytes_to_unicode_is_gpt2s_map():
    table = make_random_sd15.bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))  # printable ASCII is itself
    assert (table[ord(" ")], table[ord("\n")]) == ("\u0120", "\u010a")  # "Ġ" and "Ċ", as in GPT-2's vocab


def test_stand_in_tokenizer_has_clips_size_and_special_ids(tmp_path):
    from transformers import CLIPTokenizer

    make_random_sd15.write_tokenizer(tmp_path, make_random_sd15.stand_in_merges())
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    assert len(tok) == 49408
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert (ids[0], len(ids), tok.eos_token_id, tok.pad_token_id) == (49406, 77, 49407, 49407)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 77


@pytest.mark.slow
def test_real_clip_vocabulary_gives_clips_ids(tmp_path):
    """The real CLIP vocabulary, fetched from the open-clip-torch wheel (pip download, never installed; or the
    file CLIP_VOCAB names), tokenises as CLIP does. Slow: it downloads the wheel from the package index."""
    from transformers import CLIPTokenizer

    path = os.environ.get("CLIP_VOCAB") or make_random_sd15.fetch_clip_vocab(tmp_path / "wheel")
    assert path is not None, "could not fetch open-clip-torch's wheel from the package index"
    make_random_sd15.write_tokenizer(tmp_path, make_random_sd15.clip_merges_from_vocab_file(Path(path)))
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own


def test_random_offsets_load_with_the_strict_merge(tmp_path):
    """write_offsets on a base (4-channel) UNet gives one float16 offset per key of the 8-channel UNet."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from eddpm.tiny import TINY_UNET_CONFIG
    from eddpm.weights import merge_offsets_, widen_conv_in

    base = UNet2DConditionModel(**TINY_UNET_CONFIG)
    path = tmp_path / "offsets.safetensors"
    make_random_sd15.write_offsets(path, base, seed=0)
    offsets = load_file(path)
    assert set(offsets) == set(base.state_dict()) and {t.dtype for t in offsets.values()} == {torch.float16}
    assert offsets["conv_in.weight"].shape[1] == 8
    widened = widen_conv_in(UNet2DConditionModel(**TINY_UNET_CONFIG))
    before = widened.state_dict()["conv_in.weight"].clone()
    merge_offsets_(widened, path)
    assert torch.equal(widened.state_dict()["conv_in.weight"], before + offsets["conv_in.weight"].float())
