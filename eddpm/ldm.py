"""The UNet's LDM (original Stable Diffusion) key names, and the LDM-keyed copy of an offset file.

Tools built on the original SD code read UNet weights by LDM names, not diffusers names
(docs/iclight-facts.md, "LDM-keyed offsets"). The IC-Light file they load, `iclight_sd15_fc_unet_ldm`,
is IC-Light's offset file with every key renamed and nothing else changed: bare LDM names (no
`model.diffusion_model.` or `diffusion_model.` prefix), fp16, one additive offset per key, conv_in's at
its 8-channel shape. Those tools load it as a UNet and add it, key by key, to an SD1.5 model's weights
(conv_in padded with zeros), so the file must hold offsets: full weights would count the base twice.

The renaming is the published diffusers <-> LDM correspondence for SD UNets. Diffusers ships only the
LDM -> diffusers direction; tests/test_ldm.py checks this one against it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The layers outside the down, mid and up blocks: diffusers module -> LDM module.
_OUTER = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a resnet: diffusers layer -> LDM ResBlock layer.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _resnet_layer(rest: str, key: str) -> str:
    """'conv1.weight' -> 'in_layers.2.weight' (the layers inside a resnet)."""
    layer, _, param = rest.partition(".")
    if layer not in _RESNET:
        raise ValueError(f"{key}: no LDM name for the resnet layer {layer!r}")
    return f"{_RESNET[layer]}.{param}"


def ldm_unet_keys(keys: Iterable[str]) -> dict[str, str]:
    """{diffusers key: LDM key} for every key of a diffusers SD UNet state dict (bare LDM names).

    With L resnets per down block (`layers_per_block`, read from the keys), LDM numbers the blocks
    flat: down block i's j-th resnet/attention is input_blocks.{1 + i(L + 1) + j}.{0/1} and its
    downsampler input_blocks.{(i + 1)(L + 1)}.0.op; up block i's j-th resnet/attention is
    output_blocks.{i(L + 1) + j}.{0/1} and its upsampler output_blocks.{i(L + 1) + L}.{1, or 2 when
    the block has attentions}.conv; the mid block's resnets and attentions alternate in middle_block.
    Attention layers keep their inner names. Raises ValueError for a key with no LDM name (class or
    added embeddings, other architectures) or if two keys would get one name.
    """
    keys = list(keys)
    blocks = [m.groups()[:4] for k in keys if (m := _BLOCK.fullmatch(k))]  # (side, block, kind, index)
    down_resnets = [int(i) for side, b, kind, i in blocks if (side, b, kind) == ("down", "0", "resnets")]
    if not down_resnets:
        raise ValueError("not a diffusers UNet state dict: no down_blocks.0.resnets keys")
    per_block = max(down_resnets) + 1  # L; up blocks have L + 1 resnets
    up_with_attention = {b for side, b, kind, _ in blocks if (side, kind) == ("up", "attentions")}
    mapping = {}
    for key in keys:
        outer, _, param = key.rpartition(".")
        if outer in _OUTER:
            mapping[key] = f"{_OUTER[outer]}.{param}"
        elif m := _BLOCK.fullmatch(key):
            side, block, kind, index, rest = m.groups()
            block, index = int(block), int(index)
            if side == "down":
                name = f"input_blocks.{1 + block * (per_block + 1) + index}"
            else:
                name = f"output_blocks.{block * (per_block + 1) + index}"
            resnet = kind == "resnets"
            mapping[key] = f"{name}.0.{_resnet_layer(rest, key)}" if resnet else f"{name}.1.{rest}"
        elif m := _SAMPLER.fullmatch(key):
            side, block, param = m.group(1), int(m.group(2)), m.group(4)
            if side == "down":
                mapping[key] = f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{param}"
            else:
                slot = 2 if m.group(2) in up_with_attention else 1
                mapping[key] = f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{param}"
        elif m := _MID.fullmatch(key):
            kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets":
                mapping[key] = f"middle_block.{2 * index}.{_resnet_layer(rest, key)}"
            else:
                mapping[key] = f"middle_block.{2 * index + 1}.{rest}"
        else:
            raise ValueError(f"{key}: no LDM name (only SD-style UNets without class or added embeddings)")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError("two diffusers keys map to one LDM key; the UNet layout is not an SD one")
    return mapping


def to_ldm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under bare LDM names (`ldm_unet_keys`); shapes and dtypes unchanged.

    SD UNets need no reshaping: their 1x1 attention projections have the same shape in both layouts.
    """
    return {ldm: state_dict[key] for key, ldm in ldm_unet_keys(state_dict).items()}


def save_iclight_offsets_ldm(offset_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the diffusers-keyed offset file `offset_path` again under LDM names: the tensors bit for bit.

    This is the layout of `iclight_sd15_fc_unet_ldm.safetensors` (docs/iclight-facts.md, "LDM-keyed
    offsets"): bare LDM keys, fp16 offsets (not merged weights), one per key. The metadata is the
    source's plus `keys: ldm`.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(offset_path), framework="pt", device="cpu") as source:
        metadata = dict(source.metadata() or {})
        offsets = {key: source.get_tensor(key) for key in source.keys()}
    if any(key.startswith(_PREFIXES) for key in offsets):
        raise ValueError(f"{offset_path} already has LDM-style prefixed keys; expected diffusers names")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_ldm_state_dict(offsets), str(path), metadata={**metadata, "keys": "ldm"})
    return path
