"""IC-Light "fc" model plumbing shared by training, the latent cache, the demo and relight.py.

Every number and recipe here comes from /work/shared/reference/iclight-facts.md ("the fact sheet"):
the 8-channel UNet, the strict offset merge, the condition encoding (composite on gray 127,
`x / 127 - 1`, VAE mode times 0.18215), IC-Light's RMBG call and its long-prompt recipe. Training and
the demo call these functions and nothing else, so the two cannot drift apart.

Heavy libraries (diffusers, transformers) are imported inside functions, so importing this module
costs only torch and numpy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

# ---------------------------------------------------------------------------------------------------
# Constants (fact sheet, "Models and files" and "Noise schedule")
# ---------------------------------------------------------------------------------------------------

SCALING_FACTOR = 0.18215  # SD1.5 VAE latent scale
GRAY = 127  # background gray and the zero of IC-Light's pixel mapping x / 127 - 1
LATENT_CHANNELS = 4  # SD1.5 latent channels; the fc UNet sees 2 x 4 = 8
CONDITION_CHANNELS = 4  # one VAE latent of the foreground composited on gray

BASE_REPO = "stablediffusionapi/realistic-vision-v51"
BASE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
ICLIGHT_REPO = "lllyasviel/ic-light"
ICLIGHT_FC_FILENAME = "iclight_sd15_fc.safetensors"
RMBG_REPO = "briaai/RMBG-1.4"
RMBG_FILENAMES = ("config.json", "model.safetensors")

MODELS_DIR = Path("models")
DEFAULT_BASE_DIR = MODELS_DIR / "realistic-vision-v51"
DEFAULT_ICLIGHT_PATH = MODELS_DIR / ICLIGHT_FC_FILENAME
DEFAULT_RMBG_DIR = MODELS_DIR / "RMBG-1.4"

OFFSET_FORMAT = "iclight-offset"  # metadata "format" written by save_iclight_offsets

# SD1.5's training schedule (DDPMScheduler / DDIMScheduler kwargs). alpha_bar at t=999 is 0.00466.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# The IC-Light demo's DPM++ 2M SDE Karras (DPMSolverMultistepScheduler kwargs). The demo built it
# WITHOUT beta_schedule, so it runs on diffusers' default "linear" betas, not SD1.5's scaled_linear;
# written out explicitly here so the difference is visible. Offered for comparison only.
ICLIGHT_DEMO_SAMPLER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "algorithm_type": "sde-dpmsolver++",
    "use_karras_sigmas": True,
    "steps_offset": 1,
}

DOWNLOAD_HINT = "Run `python download_models.py` (see `--help`) on a machine with internet access."


class MissingWeightsError(FileNotFoundError):
    """Model files are not on disk (and cannot be fetched); the message names them."""


# ---------------------------------------------------------------------------------------------------
# The 8-channel UNet: widen, load, merge offsets, export offsets
# ---------------------------------------------------------------------------------------------------


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
            f"{str(err).splitlines()[0] if str(err) else ''}\nIf you are offline, download the weights first. "
            f"{DOWNLOAD_HINT}"
        ) from err


def _check_offset_file(path: Path) -> None:
    """Raise a clear error if `path` is missing or is not a safetensors file (pickles are never opened)."""
    if not path.is_file():
        raise MissingWeightsError(f"IC-Light offset file not found: {path}\n{DOWNLOAD_HINT}")
    if path.suffix.lower() in {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}:
        raise ValueError(
            f"{path} looks like a pickle checkpoint; offsets are only read from .safetensors files "
            "(pickles can run arbitrary code and are never loaded). Convert it to safetensors first."
        )
    # A safetensors file starts with an 8-byte little-endian header length, then a JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if header_len <= 0 or header_len > path.stat().st_size - 8 or head[8:9] != b"{":
        raise ValueError(
            f"{path} is not a safetensors file (a pickle .bin/.ckpt or a broken download?). "
            "Offsets are only read from safetensors; pickles are never loaded."
        )


def _format_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def merge_offsets_(unet: UNet2DConditionModel, offset_path: str | os.PathLike) -> UNet2DConditionModel:
    """In place: unet[k] = unet[k] + offset[k] for EVERY state-dict key, added in float32.

    Strict: a key missing from the file, an extra key in the file or a shape mismatch raises
    ValueError naming the keys, before any weight is changed.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(offset_path)
    _check_offset_file(path)
    state = unet.state_dict()
    try:
        offsets = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{path} could not be read as safetensors: {err}") from err
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
            raise ValueError(
                f"IC-Light offsets {path} do not match the 8-channel UNet (every key must have an "
                "offset of the same shape):\n  " + "\n  ".join(problems)
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
                raise ValueError(
                    f"{path}: single-file checkpoints are only read as .safetensors (pickles are never loaded)."
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
    """(vae, text_encoder, tokenizer) from a diffusers folder or hub id; the tokenizer has model_max_length 77."""
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
    # transformers can return a 2-token stub instead of raising when offline (environment.md).
    if len(tokenizer) <= 3:
        raise MissingWeightsError(
            f"The tokenizer loaded from '{base}' has only {len(tokenizer)} tokens: its vocab files were "
            f"not found. {DOWNLOAD_HINT}"
        )
    return vae.eval(), text_encoder.to(torch_dtype).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------
# Pixels <-> latents and the condition (fact sheet, "Condition encoding")
# ---------------------------------------------------------------------------------------------------


def composite_on_gray(images: np.ndarray | torch.Tensor, alpha: np.ndarray | torch.Tensor):
    """out = 127 + (img - 127) * alpha: the foreground matted over gray 127.

    numpy: images [H, W, 3] or [B, H, W, 3], alpha [H, W] or [B, H, W] (or with a trailing 1).
    torch: images [B, 3, H, W] or [3, H, W], alpha [B, 1, H, W], [B, H, W] or [H, W].
    uint8 images give uint8 (clipped, truncated as IC-Light does); float images give float.
    """
    if isinstance(images, np.ndarray):
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.ndim == images.ndim - 1:
            alpha = alpha[..., None]  # [..., H, W, 1]
        out = GRAY + (images.astype(np.float32) - GRAY) * alpha
        return out.clip(0, 255).astype(np.uint8) if images.dtype == np.uint8 else out.astype(images.dtype)
    alpha = torch.as_tensor(alpha, device=images.device)
    if alpha.ndim == images.ndim - 1:
        alpha = alpha.unsqueeze(-3)  # [B, 1, H, W] (or [1, H, W])
    out = GRAY + (images.float() - GRAY) * alpha.float()
    if images.dtype == torch.uint8:
        return out.clamp(0, 255).to(torch.uint8)
    return out.to(images.dtype)


def pixels_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8/float pixels in 0..255 as a float32 tensor [B, 3, H, W].

    numpy [H, W, 3] or [B, H, W, 3] (channels last, as images are stored) or torch [B, 3, H, W].
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images, dtype=np.float32))  # a writable copy
        if images.ndim == 3:
            images = images[None]
        images = images.permute(0, 3, 1, 2)  # [B, 3, H, W]
    elif images.ndim == 3:
        images = images[None]
    return images.float()


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """latents = mode(E(x / 127 - 1)) * scaling_factor, IC-Light's exact mapping (gray 127 -> 0).

    pixels: [B, 3, H, W] in 0..255 (float or uint8; numpy channels-last also accepted).
    Returns [B, 4, H/8, W/8] on the VAE's device and dtype. The mode, not a sample, as the fact sheet says.
    """
    x = pixels_to_tensor(pixels).to(vae.device) / GRAY - 1.0  # float32, [B, 3, H, W]
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    return dist.mode() * vae.config.scaling_factor  # [B, 4, H/8, W/8]


def encode_condition(
    vae: AutoencoderKL,
    images: np.ndarray | torch.Tensor,
    alpha: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """The fc condition latent: composite_on_gray(images, alpha) (when alpha is given), then encode_images.

    The one function both training (latent cache) and the demo use. Returns [B, 4, H/8, W/8].
    """
    if alpha is not None:
        images = composite_on_gray(images, alpha)
    return encode_images(vae, images)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """pixels = round((D(z / scaling_factor) + 1) * 127), clipped: the inverse of encode_images' mapping.

    latents [B, 4, h, w] -> uint8 numpy [B, 8h, 8w, 3].
    """
    x = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    pixels = ((x.float() + 1.0) * GRAY).round().clamp(0, 255)  # [B, 3, H, W]
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# Background removal (fact sheet, "RMBG call used by IC-Light")
# ---------------------------------------------------------------------------------------------------


def rmbg_input_size(height: int, width: int, target_area: int = 1024 * 1024) -> tuple[int, int]:
    """(h, w) keeping the aspect ratio, area about `target_area`, each side a multiple of 64 (at least 64)."""
    k = math.sqrt(target_area / (height * width)) / 64.0
    return max(64, 64 * round(height * k)), max(64, 64 * round(width * k))


@torch.no_grad()
def extract_foreground(
    rmbg: nn.Module, image: np.ndarray, *, target_area: int = 1024 * 1024
) -> tuple[np.ndarray, np.ndarray]:
    """IC-Light's RMBG call: alpha = clip(resize(rmbg(x / 127 - 1)[0][0]), 0, 1); fg on gray 127.

    image: uint8 [H, W, 3]. The net sees the image resized (Lanczos, aspect kept) to about
    `target_area` pixels with sides multiples of 64; its finest side output [1, 1, h, w] is resized
    bilinearly back to [H, W]. Returns (fg uint8 [H, W, 3] composited on gray, alpha float32 [H, W]).
    """
    from PIL import Image

    height, width = image.shape[:2]
    feed_h, feed_w = rmbg_input_size(height, width, target_area)
    feed = np.asarray(Image.fromarray(image).resize((feed_w, feed_h), Image.LANCZOS))
    param = next(rmbg.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = pixels_to_tensor(feed).to(device) / GRAY - 1.0  # [1, 3, feed_h, feed_w]
    side_outputs, _features = rmbg(x.to(dtype))
    alpha = side_outputs[0].float()  # [1, 1, feed_h, feed_w], finest first
    alpha = torch.nn.functional.interpolate(alpha, size=(height, width), mode="bilinear")
    alpha = alpha[0, 0].cpu().numpy().clip(0, 1).astype(np.float32)  # [H, W]
    return composite_on_gray(image, alpha), alpha


# ---------------------------------------------------------------------------------------------------
# Prompts (fact sheet, "Long prompts")
# ---------------------------------------------------------------------------------------------------


def prompt_token_chunks(
    tokenizer: CLIPTokenizer, prompt: str, max_chunks: int | None = None
) -> list[list[int]]:
    """Token ids in 77-long chunks: BOS + up to 75 tokens + EOS, padded with EOS.

    Tokenised without truncation; an empty prompt gives one chunk of the empty string.
    `max_chunks=1` is the truncated single-chunk form used for training batches.
    """
    width = tokenizer.model_max_length - 2  # 75 tokens between BOS and EOS
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenizer(prompt, truncation=False, add_special_tokens=False, verbose=False).input_ids
    pieces = [ids[i : i + width] for i in range(0, len(ids), width)] or [[]]
    if max_chunks is not None:
        pieces = pieces[:max_chunks]
    return [[bos, *piece, eos] + [eos] * (width - len(piece)) for piece in pieces]


def _encode_chunks(text_encoder: CLIPTextModel, chunks: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor(chunks, dtype=torch.long, device=text_encoder.device)  # [N, 77]
    return text_encoder(ids).last_hidden_state  # [N, 77, D]


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Single-chunk text embeddings for a training batch (truncated to 75 tokens): [B, 77, D]."""
    chunks = [prompt_token_chunks(tokenizer, p, max_chunks=1)[0] for p in prompts]
    return _encode_chunks(text_encoder, chunks)


def encode_prompt_pair(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str, negative_prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """IC-Light's long-prompt embeddings (cond, uncond), each [1, 77 * n, D].

    Both prompts are split into 75-token chunks; the shorter chunk list is repeated cyclically to
    n = max(count) chunks; each chunk is encoded alone and the results are concatenated along the
    sequence axis.
    """
    pos = prompt_token_chunks(tokenizer, prompt)
    neg = prompt_token_chunks(tokenizer, negative_prompt)
    n = max(len(pos), len(neg))
    pos = [pos[i % len(pos)] for i in range(n)]
    neg = [neg[i % len(neg)] for i in range(n)]
    hidden = _encode_chunks(text_encoder, pos + neg)  # [2n, 77, D]
    cond = hidden[:n].reshape(1, -1, hidden.shape[-1])  # [1, 77n, D]
    uncond = hidden[n:].reshape(1, -1, hidden.shape[-1])  # [1, 77n, D]
    return cond, uncond


# ---------------------------------------------------------------------------------------------------
# Feeding the condition to the UNet inside diffusers pipelines
# ---------------------------------------------------------------------------------------------------


class ConditionedUNet(nn.Module):
    """An 8-channel fc UNet that diffusers pipelines see as a 4-channel one.

    The pipeline makes 4-channel noise (`config.in_channels` reads 4 here); forward appends the
    condition latent along channels, `[noisy latent (4), condition (4)]`, before calling the wrapped
    UNet. The condition is tiled to the sample's batch, so with classifier-free guidance both halves
    get the same condition (guidance acts on text only)::

        cond_unet = ConditionedUNet(unet)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=cond_unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        with cond_unet.condition(encode_condition(vae, fg)):
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=2.0)

    For a condition with one latent per prompt and `num_images_per_prompt > 1`, pass the same
    `num_images_per_prompt` to `condition(...)`: latents are then ordered like the pipeline's
    prompts (p0, p0, p1, p1, ...).
    """

    def __init__(self, unet: UNet2DConditionModel, latent_channels: int = LATENT_CHANNELS):
        super().__init__()
        self.unet = unet
        self.latent_channels = latent_channels
        self.condition_channels = unet.config.in_channels - latent_channels
        if self.condition_channels <= 0:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} channels; a ConditionedUNet needs more than "
                f"{latent_channels} (use widen_conv_in / load_iclight_unet)"
            )
        self._condition: torch.Tensor | None = None

    @property
    def config(self):
        """The wrapped UNet's config with in_channels = latent channels (what pipelines read)."""
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict({**self.unet.config, "in_channels": self.latent_channels})

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def set_condition(self, latents: torch.Tensor | None, num_images_per_prompt: int = 1) -> None:
        """Hold `latents` [Bc, 4, h, w] for the following calls (None clears it)."""
        if latents is not None:
            if latents.ndim != 4 or latents.shape[1] != self.condition_channels:
                raise ValueError(
                    f"condition must be [B, {self.condition_channels}, h, w], got {list(latents.shape)}"
                )
            latents = latents.repeat_interleave(num_images_per_prompt, dim=0)
        self._condition = latents

    @contextlib.contextmanager
    def condition(self, latents: torch.Tensor, num_images_per_prompt: int = 1) -> Iterator[ConditionedUNet]:
        """`with cond_unet.condition(latents): pipe(...)`; the previous condition comes back afterwards."""
        previous = self._condition
        self.set_condition(latents, num_images_per_prompt)
        try:
            yield self
        finally:
            self._condition = previous

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        """UNet(cat([sample, condition tiled to the batch], dim=1), ...); other arguments pass through."""
        if self._condition is None:
            raise RuntimeError(
                "no condition set: call the pipeline inside `with cond_unet.condition(latents):`"
            )
        cond = self._condition.to(device=sample.device, dtype=sample.dtype)
        batch, cond_batch = sample.shape[0], cond.shape[0]
        if batch % cond_batch or cond.shape[2:] != sample.shape[2:]:
            raise ValueError(
                f"condition {list(cond.shape)} does not fit the sample {list(sample.shape)}: the batch must be "
                "a multiple of the condition's and the latent sizes must match"
            )
        cond = cond.repeat(batch // cond_batch, 1, 1, 1)  # [B, 4, h, w]; CFG halves get the same one
        return self.unet(torch.cat([sample, cond], dim=1), timestep, encoder_hidden_states, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Tiny components for tests and CPU smoke runs (same classes as the real ones)
# ---------------------------------------------------------------------------------------------------

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


def describe_offsets(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata and key count of an offset file, read from its header only (no tensor is loaded)."""
    path = Path(path)
    _check_offset_file(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = header.pop("__metadata__", {})
    return {"metadata": metadata, "num_tensors": len(header)}
