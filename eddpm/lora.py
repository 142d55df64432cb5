"""LoRA fine-tuning of the IC-Light UNet through peft, and the files a LoRA run leaves behind.

`add_lora` freezes the UNet, adds low-rank adapters W + (alpha / r) B A to the attention projections (and, if
asked, the ResNet convolutions) with diffusers' `unet.add_adapter`, and keeps `conv_in` fully trainable: the
IC-Light condition enters the UNet only through conv_in's four extra input channels (docs/iclight-facts.md,
"The 8-channel UNet"), so an adapter on the later layers alone could change how the condition is read only
indirectly. The optimizer, the EMA and the checkpoints then see only the trained parameters
(`trainable_state_dict`).

A finished run writes `pytorch_lora_weights.safetensors` (diffusers' LoRA format, alpha / r folded into B so
that every loader, which assumes alpha = r when the file names no alpha, applies the same update),
`conv_in.safetensors` beside it, and, after `merge_lora_`, the usual merged unet/ and offset files.
`apply_lora_` folds such a pair of files into a UNet for relight.py and the demo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# diffusers' Stable Diffusion LoRA training example adapts these four projections of every attention layer
# (self- and cross-attention): 128 layers of SD1.5.
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
# --lora_include_convs: the two 3x3 convolutions of every ResNet block and its 1x1 shortcut where the width
# changes. conv_in (trained whole), conv_out, the down/up-sampling convolutions and time_emb_proj stay as they are.
RESNET_CONV_MODULES = ("conv1", "conv2", "conv_shortcut")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for
CONV_IN_NAME = "conv_in.safetensors"
CONV_IN_KEYS = ("conv_in.weight", "conv_in.bias")
ADAPTER_NAME = "default"  # peft's name for a single adapter; get_peft_model_state_dict strips it


@dataclass(frozen=True)
class LoraSettings:
    """The adapters of a LoRA run (eddpm/config.py explains each flag)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    include_convs: bool = False

    @classmethod
    def from_config(cls, cfg) -> LoraSettings | None:
        """None for full fine-tuning (--lora_rank 0)."""
        if not cfg.lora_rank:
            return None
        return cls(rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank, dropout=cfg.lora_dropout,
                   target_modules=parse_modules(cfg.lora_target_modules), include_convs=cfg.lora_include_convs)

    @property
    def modules(self) -> list[str]:
        """peft target_modules: a name matches a module whose dotted path ends with it."""
        extra = RESNET_CONV_MODULES if self.include_convs else ()
        return list(dict.fromkeys((*self.target_modules, *extra)))


def parse_modules(text: str) -> tuple[str, ...]:
    """'to_k, to_q' -> ('to_k', 'to_q')."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_lora(unet, settings: LoraSettings, seed: int = 0) -> list[nn.Parameter]:
    """Freeze `unet`, add the adapters (B = 0, so the model's output is unchanged), train conv_in whole.

    The adapters' random A (peft's "gaussian" init, as diffusers' example) is drawn right after
    torch.manual_seed(seed), inside a forked RNG state, so every process starts from the same adapters (and the
    same EMA, which is made before accelerate wraps the model). The frozen weights keep their dtype (float32
    in train.py), so merging the adapters back is exact. Returns the trainable
    parameters: lora_A and lora_B of each adapted layer, then conv_in's weight and bias. Raises ValueError when
    a target name matches no layer."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        init_lora_weights="gaussian", target_modules=settings.modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        except ValueError as err:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"--lora_target_modules {','.join(settings.modules)}: {err}") from None
    found = {name.rsplit(".lora_", 1)[0] for name, _ in unet.named_parameters() if ".lora_A." in name}
    unmatched = [t for t in settings.modules if not any(_matches(name, t) for name in found)]
    if unmatched:
        raise ValueError(f"--lora_target_modules: {', '.join(unmatched)} match(es) no layer of the UNet")
    unet.conv_in.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith(f".{target}")


def has_adapters(unet) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def trainable_state_dict(unet) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the UNet: its whole state dict when every parameter trains (full
    fine-tuning), else the trained parameters only (adapters and conv_in), under their state-dict names."""
    if all(p.requires_grad for p in unet.parameters()):
        return unet.state_dict()
    return {name: p.detach() for name, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """The inverse of `trainable_state_dict`; ValueError (before any weight changes) when the checkpoint was
    written by a run that trained other weights (full vs LoRA, or other adapters)."""
    expected = trainable_state_dict(unet)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        what = "LoRA adapters" if any(".lora_" in k for k in state) else "the whole UNet"
        raise ValueError(
            f"the checkpoint holds {len(state)} UNet tensors ({what}) and this run trains {len(expected)} "
            f"({len(missing)} missing from it, e.g. {missing[:2]}; {len(extra)} unknown, e.g. {extra[:2]}): "
            "resume with the --lora_rank, --lora_target_modules and --lora_include_convs of the run that wrote it")
    bad = [k for k in state if state[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"the checkpoint's {bad[0]} is {list(state[bad[0]].shape)}, this run's is "
                         f"{list(expected[bad[0]].shape)}: resume with the --lora_rank of the run that wrote it")
    unet.load_state_dict(state, strict=False)


# ---- outputs -----------------------------------------------------------------------------------------


def diffusers_lora_state_dict(unet, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The adapters under diffusers' module names in peft's lora_A / lora_B form (no "unet." prefix yet),
    with each layer's alpha / r folded into B: B' = (alpha / r) B, so W + B' A = W + (alpha / r) B A for any
    loader that takes alpha = r. The keys are not converted to the older "lora.down / lora.up" form:
    diffusers' converter renames only the attention projections, and a file that mixes both forms loses
    the renamed layers, silently, in diffusers' loader (tests/test_lora.py loads one with the convolutions)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    state = dict(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.scaling:
            key = f"{name}.lora_B.weight"
            state[key] = state[key].float() * module.scaling[ADAPTER_NAME]
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def save_lora(unet, output_dir: str | os.PathLike, dtype: torch.dtype = torch.float16) -> list[str]:
    """Write pytorch_lora_weights.safetensors (loads with `pipe.load_lora_weights(output_dir)`) and
    conv_in.safetensors; returns their paths."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=diffusers_lora_state_dict(unet, dtype),
                                              weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    conv_in = {f"conv_in.{k}": v.detach().to("cpu", dtype).contiguous()
               for k, v in unet.conv_in.state_dict().items()}  # the UNet's own names: a partial state dict
    conv_path = os.path.join(output_dir, CONV_IN_NAME)
    save_file(conv_in, conv_path,
              metadata={"format": "iclight-conv-in", "in_channels": str(unet.conv_in.in_channels)})
    return [os.path.join(output_dir, LORA_WEIGHT_NAME), conv_path]


def merge_lora_(unet, scale: float = 1.0) -> None:
    """Fold the adapters into the weights (W <- W + scale (alpha / r) B A, in the weights' precision) and
    remove them: `unet` becomes a plain UNet2DConditionModel again (save_pretrained, offsets, pipelines)."""
    unet.fuse_lora(lora_scale=scale)
    unet.unload_lora()


# ---- applying a LoRA for inference -------------------------------------------------------------------


def find_lora_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(the LoRA file, conv_in.safetensors beside it or None) for a file or a folder holding
    pytorch_lora_weights.safetensors; FileNotFoundError / ValueError name what is wrong."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found (pass a {LORA_WEIGHT_NAME} or its folder)")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: LoRA weights are only read from .safetensors files (pickles are never loaded)")
    conv_in = path.parent / CONV_IN_NAME
    return path, conv_in if conv_in.is_file() else None


def apply_lora_(unet, path: str | os.PathLike, scale: float = 1.0) -> str:
    """Fold a LoRA into `unet` in place and return a one-line note of what was applied.

    W <- W + scale * (B A) for each adapted layer (diffusers' loader, then fuse and unload), and when
    conv_in.safetensors lies beside the file, conv_in <- conv_in + scale * (conv_in_file - conv_in), so that
    scale 1 gives the trained run's UNet and scale 0 the UNet as it was. Text-encoder weights in the file are
    not applied (this project's runs write none)."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    lora_path, conv_path = find_lora_files(path)
    state, alphas = StableDiffusionPipeline.lora_state_dict(load_file(str(lora_path)))
    unet_keys = [k for k in state if k.startswith("unet.")]
    if not unet_keys:
        raise ValueError(f"{lora_path} holds no UNet LoRA weights (keys starting with 'unet.')")
    StableDiffusionPipeline.load_lora_into_unet({k: state[k] for k in unet_keys}, alphas, unet=unet,
                                                adapter_name="lora")
    layers = {k.removeprefix("unet.").split(".lora")[0] for k in unet_keys}
    loaded = {name for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    if layers - loaded:
        missing = sorted(layers - loaded)
        raise ValueError(f"{lora_path}: {len(missing)} of its {len(layers)} layers do not fit this UNet "
                         f"(e.g. {missing[0]})")
    merge_lora_(unet, scale)
    note = f"LoRA {lora_path} (scale {scale:g}, {len(layers)} layers)"
    if conv_path is not None:
        trained = load_file(str(conv_path))
        with torch.no_grad():
            for key in CONV_IN_KEYS:
                current = unet.get_parameter(key)
                if key not in trained or trained[key].shape != current.shape:
                    found = list(trained[key].shape) if key in trained else "missing"
                    raise ValueError(f"{conv_path}: {key} is {found}, the UNet's is {list(current.shape)} "
                                     "(an 8-channel IC-Light UNet is needed)")
                current.add_(trained[key].to(current) - current, alpha=scale)
        note += f" + trained conv_in ({conv_path.name})"
    return note
