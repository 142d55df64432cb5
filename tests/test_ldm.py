"""eddpm/ldm.py: LDM key names and the LDM-keyed offset file (iclight_offsets_ldm.safetensors).

References: diffusers' own LDM -> diffusers conversion (`convert_ldm_unet_checkpoint`, and
`UNet2DConditionModel.from_single_file`), and key pairs written out by hand from the published SD
correspondence (docs/iclight-facts.md, "LDM-keyed offsets").
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eddpm.iclight import OFFSET_FORMAT
from eddpm.ldm import ldm_unet_keys, save_iclight_offsets_ldm, to_ldm_state_dict
from eddpm.tiny import TINY_UNET_CONFIG
from eddpm.weights import merge_offsets_, save_iclight_offsets, widen_conv_in

# SD1.5's UNet layout (4 blocks, attention in the first three down blocks and the last three up blocks,
# a channel change in down blocks 1 and 2) at tiny widths: the same 686 keys as SD1.5.
SD15_LAYOUT_CONFIG = {
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": (32, 64, 96, 96),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_NUM_KEYS = 686  # docs/iclight-facts.md, "The 8-channel UNet"

# (diffusers, LDM) pairs of SD1.5, from the published correspondence (the original SD UNet's
# input_blocks / middle_block / output_blocks numbering), one per kind of layer.
SD15_PAIRS = [
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("time_embedding.linear_2.bias", "time_embed.2.bias"),
    ("conv_norm_out.weight", "out.0.weight"),
    ("conv_out.bias", "out.2.bias"),
    ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
    ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight"),
    ("down_blocks.0.attentions.1.proj_in.weight", "input_blocks.2.1.proj_in.weight"),
    ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
    ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
     "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
    ("down_blocks.2.resnets.1.time_emb_proj.bias", "input_blocks.8.0.emb_layers.1.bias"),
    ("down_blocks.2.downsamplers.0.conv.bias", "input_blocks.9.0.op.bias"),
    ("down_blocks.3.resnets.1.conv2.weight", "input_blocks.11.0.out_layers.3.weight"),
    ("mid_block.resnets.0.norm2.bias", "middle_block.0.out_layers.0.bias"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
     "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"),
    ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
    ("up_blocks.0.resnets.2.conv_shortcut.bias", "output_blocks.2.0.skip_connection.bias"),
    ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
    ("up_blocks.1.attentions.0.norm.weight", "output_blocks.3.1.norm.weight"),
    ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
    ("up_blocks.2.upsamplers.0.conv.bias", "output_blocks.8.2.conv.bias"),
    ("up_blocks.3.attentions.2.proj_out.weight", "output_blocks.11.1.proj_out.weight"),
]


def _unet(config: dict, seed: int):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module")
def sd15_layout_unet():
    return _unet(SD15_LAYOUT_CONFIG, seed=3)


@pytest.fixture(scope="module")
def fc_and_base():
    """A trained 8-channel tiny UNet and the 4-channel base its offsets are measured from."""
    trained = _unet({**TINY_UNET_CONFIG, "in_channels": 8}, seed=1)
    base = _unet(TINY_UNET_CONFIG, seed=2)
    return trained, base


def test_sd15_names_match_the_published_correspondence(sd15_layout_unet):
    keys = list(sd15_layout_unet.state_dict())
    mapping = ldm_unet_keys(keys)
    assert len(keys) == SD15_NUM_KEYS
    for diffusers_key, ldm_key in SD15_PAIRS:
        assert mapping[diffusers_key] == ldm_key, (diffusers_key, mapping[diffusers_key], ldm_key)


@pytest.mark.parametrize("layout", ["sd15", "tiny_fc"])
def test_every_key_maps_once_and_diffusers_inverts_it(layout, sd15_layout_unet, fc_and_base):
    """diffusers' LDM -> diffusers conversion gives back every key and tensor, bit for bit."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = sd15_layout_unet if layout == "sd15" else fc_and_base[0]
    state = unet.state_dict()
    ldm = to_ldm_state_dict(state)
    assert len(ldm) == len(state)  # injective: no two keys share an LDM name
    assert not any(k.startswith(("model.", "diffusion_model.")) for k in ldm)  # bare names
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()},
                                       dict(unet.config))
    assert set(back) == set(state), sorted(set(back) ^ set(state))[:5]
    for key, value in state.items():
        assert back[key] is value or torch.equal(back[key], value), key


def test_unknown_keys_are_refused(fc_and_base):
    state = dict(fc_and_base[0].state_dict())
    state["class_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="class_embedding.linear_1.weight"):
        ldm_unet_keys(state)
    with pytest.raises(ValueError, match="not a diffusers UNet"):
        ldm_unet_keys(["input_blocks.0.0.weight"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fc_and_base):
    """What train.py's export leaves: unet/ (fp16), iclight_offsets.safetensors and its LDM copy."""
    trained, base = fc_and_base
    out = tmp_path_factory.mktemp("out")
    offsets = save_iclight_offsets(trained, base, out / "iclight_offsets.safetensors", base_name="tiny")
    ldm_path = save_iclight_offsets_ldm(offsets, out / "iclight_offsets_ldm.safetensors")
    _unet({**TINY_UNET_CONFIG, "in_channels": 8}, seed=1).to(torch.float16).save_pretrained(out / "unet")
    return out, offsets, ldm_path


def test_ldm_file_is_the_offset_file_renamed(exported):
    """IC-Light's LDM layout: bare LDM keys, fp16, the very offsets of the diffusers-keyed file."""
    _, offsets_path, ldm_path = exported
    offsets, ldm = load_file(offsets_path), load_file(ldm_path)
    mapping = ldm_unet_keys(offsets)
    assert set(ldm) == set(mapping.values()) and len(ldm) == len(offsets)
    assert all(v.dtype == torch.float16 for v in ldm.values())
    assert ldm["input_blocks.0.0.weight"].shape == (TINY_UNET_CONFIG["block_out_channels"][0], 8, 3, 3)
    for key, ldm_key in mapping.items():
        assert torch.equal(ldm[ldm_key], offsets[key]), key
    with safe_open(str(ldm_path), framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["format"], metadata["keys"], metadata["in_channels"]) == (OFFSET_FORMAT, "ldm", "8")


def test_base_plus_ldm_offsets_loads_with_from_single_file(exported, fc_and_base, tmp_path):
    """An SD checkpoint of base + LDM offsets (conv_in padded with zeros, as the ComfyUI patch does)
    loads with diffusers' single-file loader and equals the diffusers-keyed merge and unet/."""
    from diffusers import UNet2DConditionModel

    out, offsets_path, ldm_path = exported
    base = fc_and_base[1]
    ldm_offsets = load_file(ldm_path)
    checkpoint = {}
    for key, value in to_ldm_state_dict(base.state_dict()).items():
        delta = ldm_offsets[key].float()
        if value.shape != delta.shape:  # conv_in: [C, 4, 3, 3] -> [C, 8, 3, 3], zeros appended
            value = torch.cat([value, value.new_zeros(value.shape[0], delta.shape[1] - value.shape[1],
                                                      *value.shape[2:])], 1)
        checkpoint["model.diffusion_model." + key] = value.float() + delta
    save_file(checkpoint, str(tmp_path / "merged.safetensors"))
    loaded = UNet2DConditionModel.from_single_file(str(tmp_path / "merged.safetensors"), config=str(out),
                                                   subfolder="unet", torch_dtype=torch.float32)

    merged = merge_offsets_(widen_conv_in(_unet(TINY_UNET_CONFIG, seed=2)), offsets_path).state_dict()
    unet_dir = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    trained, offsets = fc_and_base[0].state_dict(), load_file(offsets_path)
    state = loaded.state_dict()
    assert set(state) == set(merged) == set(unet_dir)
    for key, weight in state.items():
        assert torch.equal(weight, merged[key]), key
        # unet/ is the trained weights in fp16 and the merge adds an fp16 offset: each rounded once
        err = (weight - unet_dir[key].float()).abs()
        bound = trained[key].abs() * 2**-11 + offsets[key].float().abs() * 2**-10 + 1e-7
        assert bool((err <= bound).all()), f"{key}: max error {float(err.max()):.3g}"
