"""The IC-Light fc UNet's weights: widen conv_in to 8 channels, merge and export offset files, load the base.

docs/iclight-facts.md, "The 8-channel UNet": IC-Light's file holds an additive offset for every key of the
8-channel diffusers UNet; the merge is strict. Pickles are never opened. Missing local files raise
MissingWeightsError naming them, before anything heavy is loaded; files that are there but refused (pickled,
mismatched, non-finite) raise BadWeightsError, a ValueError; diffusers and transformers are imported
inside the functions, so importing this module costs only torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eddpm.iclight import (
    BASE_REPO,
    CONDITION_CHANNELS,
    DEFAULT_BASE_DIR,
    DOWNLOAD_HINT,
    LATENT_CHANNELS,
    OFFSET_FORMAT,
    BadWeightsError,
    MissingWeightsError,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int = 8) -> UNet2DConditionModel:
    """Widen `unet.conv_in` to `in_channels`: old input channels keep their weights, new ones are zero.

    The bias is kept (diffusers' InstructPix2Pix example drops it). `unet.config.in_channels` is
    updated so save_pretrained / from_pretrained round-trip the wider layer. Modifies `unet` in place
    and returns it; raises ValueError if conv_in already has `in_channels` or more.
    """
    old = unet.conv_in
    if old.in_channels >= in_channels:
        raise ValueError(
            f"conv_in already has {old.in_channels} input channels (asked for {in_channels}); "
            "widen_conv_in must be applied once, to a base (4-channel) UNet."
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


_CHECKPOINT_SUFFIXES = {".safetensors", ".ckpt", ".bin", ".pt", ".pth"}


def _is_local_path(name: str | os.PathLike) -> bool:
    """True when `name` is meant as a path on disk rather than a hub id such as "owner/repo"."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES or len(path.parts) > 2:
        return True
    # "models/realistic-vision-v51" is a valid hub id too; a first part that is a local folder wins.
    return (len(path.parts) == 2 and Path(path.parts[0]).is_dir()) or path == DEFAULT_BASE_DIR


# Files from_pretrained needs in each subfolder of a diffusers folder; alternatives are tuples.
_REQUIRED_FILES: dict[str, list[tuple[str, ...]]] = {
    "unet": [
        ("config.json",),
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ],
    "vae": [
        ("config.json",),
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ],
    "text_encoder": [("config.json",), ("model.safetensors", "model.safetensors.index.json")],
    "tokenizer": [("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")],
}


def _missing_files(folder: Path, subfolders: dict[str, str]) -> list[str]:
    """Paths (as strings) missing under `folder` for each {kind: subfolder} pair."""
    missing = []
    for kind, sub in subfolders.items():
        for alternatives in _REQUIRED_FILES[kind]:
            if not any((folder / sub / name).is_file() for name in alternatives):
                missing.append(" or ".join(str(folder / sub / name) for name in alternatives))
    return missing


def _raise_missing(missing: list[str], what: str) -> None:
    if missing:
        listing = "\n  ".join(missing)
        raise MissingWeightsError(f"{what}: these files are missing:\n  {listing}\n{DOWNLOAD_HINT}")


def _load_hub_or_dir(load, base: str, subfolder: str, what: str):
    """Call `load()` (a from_pretrained) and turn an offline / not-found failure into a clear error."""
    try:
        return load()
    except (OSError, ValueError) as err:
        raise MissingWeightsError(
            f"Could not load {what} from '{base}' (subfolder '{subfolder}'): {err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\n"
            "If you are offline, download the weights first. "
            f"{DOWNLOAD_HINT}"
        ) from err


def _check_offset_file(path: Path) -> None:
    """Raise a clear error if `path` is missing or is not a safetensors file (pickles are never opened)."""
    if not path.is_file():
        raise MissingWeightsError(f"IC-Light offset file not found: {path}\n{DOWNLOAD_HINT}")
    if path.suffix.lower() in {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}:
        raise BadWeightsError(
            f"{path} looks like a pickle checkpoint; offsets are only read from .safetensors files "
            "(pickles can run arbitrary code and are never loaded). Convert it to safetensors first."
        )
    # A safetensors file starts with an 8-byte little-endian header length, then a JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if header_len <= 0 or header_len > path.stat().st_size - 8 or head[8:9] != b"{":
        raise BadWeightsError(
            f"{path} is not a safetensors file (a pickle .bin/.ckpt or a broken download?). "
            "Offsets are only read from safetensors; pickles are never loaded."
        )


def _format_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def merge_offsets_(unet: UNet2DConditionModel, offset_path: str | os.PathLike) -> UNet2DConditionModel:
    """In place: unet[k] = unet[k] + offset[k] for EVERY state-dict key, added in float32.

    Strict: a key missing from the file, an extra key in the file, a shape mismatch or an offset holding
    NaN or Inf (which would turn every image black) raises BadWeightsError (a ValueError) naming the keys,
    before any weight is changed.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(offset_path)
    _check_offset_file(path)
    state = unet.state_dict()
    try:
        offsets = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise BadWeightsError(f"{path} could not be read as safetensors: {err}") from err
    with offsets:
        file_shapes = {k: tuple(offsets.get_slice(k).get_shape()) for k in offsets.keys()}
        missing = sorted(set(state) - set(file_shapes))
        extra = sorted(set(file_shapes) - set(state))
        wrong = sorted(k for k in set(state) & set(file_shapes) if tuple(state[k].shape) != file_shapes[k])
        problems = []
        if missing:
            problems.append(f"{len(missing)} key(s) missing from the file: {_format_keys(missing)}")
        if extra:
            problems.append(f"{len(extra)} unexpected key(s) in the file: {_format_keys(extra)}")
        if wrong:
            details = [f"{k} file {list(file_shapes[k])} vs model {list(state[k].shape)}" for k in wrong]
            problems.append(f"{len(wrong)} shape mismatch(es): {_format_keys(details)}")
        if problems:
            raise BadWeightsError(
                f"IC-Light offsets {path} do not match the 8-channel UNet (every key must have an "
                "offset of the same shape):\n  " + "\n  ".join(problems)
            )
        # a first pass, one tensor at a time, so that a damaged file leaves the UNet untouched
        nonfinite = [k for k in sorted(state) if not torch.isfinite(offsets.get_tensor(k)).all()]
        if nonfinite:
            raise BadWeightsError(
                f"IC-Light offsets {path} hold NaN or Inf values in {len(nonfinite)} tensor(s): "
                f"{_format_keys(nonfinite)}; the file is damaged (download or export it again)"
            )
        with torch.no_grad():
            for key, weight in state.items():
                delta = offsets.get_tensor(key).to(device=weight.device, dtype=torch.float32)
                weight.copy_(weight.float() + delta)
    return unet


def _load_base_unet(
    base: str | os.PathLike,
    subfolder: str,
    single_file_config: str | os.PathLike | None,
    extra_missing: list[str],
) -> UNet2DConditionModel:
    """The base (4-channel) UNet in float32 from a diffusers folder, a hub id or a single .safetensors."""
    from diffusers import UNet2DConditionModel

    path = Path(base).expanduser()
    if _is_local_path(base):
        if path.is_file() or path.suffix.lower() in _CHECKPOINT_SUFFIXES:
            if not path.is_file():
                _raise_missing([str(path), *extra_missing], "Base model")
            if path.suffix.lower() != ".safetensors":
                raise BadWeightsError(
                    f"{path}: single-file checkpoints are only read as .safetensors "
                    "(pickles are never loaded)."
                )
            _raise_missing(extra_missing, "IC-Light")
            config = str(single_file_config) if single_file_config is not None else None
            if config is None and DEFAULT_BASE_DIR.is_dir():
                config = str(DEFAULT_BASE_DIR)

            def load():
                return UNet2DConditionModel.from_single_file(
                    str(path),
                    config=config,
                    subfolder=subfolder if config is not None else None,
                    torch_dtype=torch.float32,
                )

            return _load_hub_or_dir(
                load,
                str(path),
                subfolder,
                "a single-file UNet (pass single_file_config="
                "a diffusers folder or hub id holding the SD1.5 unet/config.json)",
            )
        _raise_missing(_missing_files(path, {"unet": subfolder}) + extra_missing, f"Base model '{base}'")
    else:
        _raise_missing(extra_missing, "IC-Light")

    def load():
        return UNet2DConditionModel.from_pretrained(
            str(base), subfolder=subfolder, torch_dtype=torch.float32, use_safetensors=True
        )

    return _load_hub_or_dir(load, str(base), subfolder, "the base UNet")


def load_iclight_unet(
    base: str | os.PathLike = DEFAULT_BASE_DIR,
    offset_path: str | os.PathLike | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    subfolder: str = "unet",
    single_file_config: str | os.PathLike | None = None,
) -> UNet2DConditionModel:
    """The IC-Light fc UNet: base SD1.5 UNet, conv_in widened to 8, plus the offsets (strict merge).

    `base` is a diffusers folder or hub id (its `subfolder` is loaded) or a single-file SD1.5
    `.safetensors` (then `single_file_config` names a diffusers folder / hub id with the UNet config;
    by default models/realistic-vision-v51 if present). With `offset_path=None` the result is the
    widened base (condition channels at zero), the starting point for training from scratch.
    The merge runs in float32; the result is cast to `torch_dtype`. Missing local files raise
    MissingWeightsError naming them, before anything heavy is loaded.
    """
    extra_missing = []
    if offset_path is not None and not Path(offset_path).is_file():
        extra_missing.append(f"{offset_path} (IC-Light offsets)")
    unet = _load_base_unet(base, subfolder, single_file_config, extra_missing)
    unet = unet.to(torch.float32)
    widen_conv_in(unet, LATENT_CHANNELS + CONDITION_CHANNELS)
    if offset_path is not None:
        merge_offsets_(unet, offset_path)
    return unet.to(torch_dtype)


def save_iclight_offsets(
    unet: UNet2DConditionModel,
    base_unet: UNet2DConditionModel,
    path: str | os.PathLike,
    *,
    base_name: str = BASE_REPO,
) -> Path:
    """Write offset[k] = unet[k] - base[k] for EVERY key as fp16 safetensors (IC-Light's file format).

    `base_unet` may be the 4-channel base (its conv_in is padded with zeros, as widen_conv_in does)
    or an already widened one; it is not modified. Diffusers key names, so the file loads with
    load_iclight_unet(base, path) here and in ComfyUI nodes that read the original offset file.
    """
    from safetensors.torch import save_file

    trained, base = unet.state_dict(), base_unet.state_dict()
    if set(trained) != set(base):
        diff = sorted(set(trained) ^ set(base))
        raise ValueError(f"unet and base_unet have different keys: {_format_keys(diff)}")
    offsets = {}
    for key, weight in trained.items():
        ref = base[key].detach().to(device="cpu", dtype=torch.float32)
        weight = weight.detach().to(device="cpu", dtype=torch.float32)
        if key == "conv_in.weight" and ref.shape[1] < weight.shape[1]:
            ref = torch.cat(
                [ref, ref.new_zeros(ref.shape[0], weight.shape[1] - ref.shape[1], *ref.shape[2:])], 1
            )
        if ref.shape != weight.shape:
            raise ValueError(f"{key}: unet {list(weight.shape)} vs base {list(ref.shape)}")
        offsets[key] = (weight - ref).to(torch.float16).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": OFFSET_FORMAT,
        "merge": "unet[k] = base[k] + offset[k] for every key; base conv_in widened to 8 channels with zeros",
        "base": base_name,
        "in_channels": str(offsets["conv_in.weight"].shape[1]),
    }
    save_file(offsets, str(path), metadata=metadata)
    return path


def load_base_components(
    base: str | os.PathLike = DEFAULT_BASE_DIR, *, torch_dtype: torch.dtype = torch.float32
) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """(vae, text_encoder, tokenizer) from a diffusers folder or hub id; tokenizer.model_max_length is 77."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    if _is_local_path(base):
        folder = Path(base).expanduser()
        subfolders = {"vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}
        _raise_missing(_missing_files(folder, subfolders), f"Base model '{base}'")
    base = str(base)
    vae = _load_hub_or_dir(
        lambda: AutoencoderKL.from_pretrained(
            base, subfolder="vae", torch_dtype=torch_dtype, use_safetensors=True
        ),
        base,
        "vae",
        "the VAE",
    )
    text_encoder = _load_hub_or_dir(
        lambda: CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True),
        base,
        "text_encoder",
        "the text encoder",
    )
    tokenizer = _load_hub_or_dir(
        lambda: CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", model_max_length=77),
        base,
        "tokenizer",
        "the tokenizer",
    )
    # transformers 5.x can return a 2-token stub instead of raising when the vocab files are missing offline.
    if len(tokenizer) <= 3:
        raise MissingWeightsError(
            f"The tokenizer loaded from '{base}' has only {len(tokenizer)} tokens: its vocab files were "
            f"not found. {DOWNLOAD_HINT}"
        )
    return vae.eval(), text_encoder.to(torch_dtype).eval(), tokenizer


def describe_offsets(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata and key count of an offset file, read from its header only (no tensor is loaded)."""
    path = Path(path)
    _check_offset_file(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = header.pop("__metadata__", {})
    return {"metadata": metadata, "num_tensors": len(header)}
