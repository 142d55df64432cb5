"""Relighting with IC-Light fc: the one code path of gradio_demo.py, relight.py and train.py's validation.

IC-Light's demo (docs/iclight-facts.md, "Demo behaviour"): pass 1 is text-to-image from noise, or
image-to-image from a gray gradient that sets the light's side (at `lowres_denoise`); pass 2 always
runs: it decodes, resizes by `highres_scale` to multiples of 64 (the same size at 1.0), re-encodes the
image and the foreground at that size and runs image-to-image at `highres_denoise`. Both passes run in
diffusers' own StableDiffusion pipelines with the 8-channel UNet behind `ConditionedUNet`; each pass's
condition is `conditioning.prepare_condition` of the full-resolution foreground at the pass's size.

The entry points share more than `Relighter.relight`: `read_upload` (reading and downscaling an
upload), `prepare_foreground` (background removal or the upload's alpha), `check_settings` (clear
errors and notices) and the model loaders, so the demo and the CLI accept and refuse the same inputs.
Only the standard library and numpy are imported at module level (torch and diffusers load when a
model does), so `python relight.py --help` stays fast.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from eddpm.settings import (
    EDDPM_SAMPLERS,
    ICLIGHT_SAMPLER,
    SAMPLERS,
    RelightSettings,
    RequestLimits,
    SettingsError,
    check_settings,
    highres_size,
)

if TYPE_CHECKING:
    import torch

MAX_INPUT_SIDE = 2048  # uploads are downscaled to this longest side (with a notice) before anything else
# Files a train.py output folder must hold for relighting (train.py's export writes them).
CHECKPOINT_FILES = ("config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                    "scheduler/scheduler_config.json")

def _cpu():
    import torch

    return torch.device("cpu")


@dataclass
class Relighter:
    """Models plus the training noise schedule; `scheduler_config` is the schedule the UNet was trained on."""

    unet: Any  # 8-channel UNet2DConditionModel
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    eddpm_scheduler: Any = None  # EDDPMScheduler with learned scores, from a train.py output folder
    device: torch.device = field(default_factory=_cpu)
    dtype: torch.dtype | None = None  # the UNet's and text encoder's dtype; float32 when None
    limits: RequestLimits | None = None  # what one request may cost (the demo and relight.py set them)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        import torch
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        from eddpm.conditioned_unet import ConditionedUNet

        self.dtype = self.dtype or torch.float32
        self.cond_unet = ConditionedUNet(self.unet)
        parts = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.cond_unet,
                     scheduler=self.make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
        self.txt2img = StableDiffusionPipeline(**parts)
        self.img2img = StableDiffusionImg2ImgPipeline(**parts)
        for pipe in (self.txt2img, self.img2img):
            pipe.set_progress_bar_config(disable=True)

    @property
    def learned_steps(self) -> int | None:
        return None if self.eddpm_scheduler is None else len(self.eddpm_scheduler.kept_timesteps)

    @property
    def samplers(self) -> dict[str, str]:
        """The entries of SAMPLERS this relighter can run (the EDDPM ones only with learned steps)."""
        return {name: key for name, key in SAMPLERS.items()
                if key not in EDDPM_SAMPLERS or self.eddpm_scheduler is not None}

    @property
    def default_sampler(self) -> str:
        """EDDPM when there are learned steps, else exactly IC-Light's demo sampler."""
        return "eddpm" if self.eddpm_scheduler is not None else ICLIGHT_SAMPLER

    def make_scheduler(self, sampler: str):
        """A fresh diffusers scheduler for a sampler key of SAMPLERS (eddpm/samplers.py)."""
        from eddpm.samplers import make_scheduler

        return make_scheduler(sampler, self.scheduler_config, self.eddpm_scheduler)

    def schedule_length(self, sampler: str) -> int | None:
        """How many steps a fixed-schedule sampler has (learned EDDPM steps, Align Your Steps), else None."""
        from eddpm.samplers import schedule_length

        return schedule_length(sampler, self.eddpm_scheduler)

    def relight(self, foreground: np.ndarray, settings: RelightSettings) -> tuple[list[np.ndarray], dict]:
        """Relight `foreground` (uint8 [H, W, 3], on gray 127, any size) -> (images uint8 [h, w, 3], info).

        info: sampler, unet_calls (network evaluations per image: the batch of images and a CFG pair
        share one call), steps (UNet calls of each pass), seconds (the whole run, all images), size,
        prompt (the text the model saw). Requests are serialised by a lock, so concurrent callers (the
        demo's queue) each get a clean run.
        """
        import torch

        check_settings(settings, self)
        with self._lock, torch.inference_mode():
            return self._relight(foreground, settings)

    def _relight(self, foreground: np.ndarray, s: RelightSettings):
        import torch

        from eddpm.conditioning import decode_latents, prepare_condition
        from eddpm.images import resize_exact
        from eddpm.prompts import encode_prompt_pair

        start = time.perf_counter()
        calls = [0]
        hook = self.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            prompt = f"{s.prompt}, {s.added_prompt}"  # IC-Light's prompt + ', ' + a_prompt, even when empty
            cond, uncond = encode_prompt_pair(self.tokenizer, self.text_encoder, prompt, s.negative_prompt)
            n = s.num_images
            embeds = dict(prompt_embeds=cond.to(self.device, self.dtype).repeat(n, 1, 1),
                          negative_prompt_embeds=uncond.to(self.device, self.dtype).repeat(n, 1, 1))
            generator = torch.Generator(self.device).manual_seed(int(s.seed))
            steps_used = []

            width, height = s.width, s.height
            cond_latents = self._encode(prepare_condition(foreground, None, width, height))
            if s.lighting == "None":
                latents = self._run(self.txt2img, s, embeds, cond_latents, generator, height=height, width=width)
            else:  # the gradient has the pass's size already: IC-Light's resize of it is the identity
                init = self._encode(lighting_gradient(s.lighting, width, height)).repeat(n, 1, 1, 1)
                latents = self._run(self.img2img, s, embeds, cond_latents, generator,
                                    image=init, strength=s.lowres_denoise)
            steps_used.append(calls[0])
            if s.highres_denoise > 0:
                width, height = highres_size(s.width, s.height, s.highres_scale)
                pixels = np.stack([resize_exact(img, width, height) for img in decode_latents(self.vae, latents)])
                init = self._encode(pixels)  # [n, 4, height / 8, width / 8]
                cond_latents = self._encode(prepare_condition(foreground, None, width, height))
                latents = self._run(self.img2img, s, embeds, cond_latents, generator,
                                    image=init, strength=s.highres_denoise)
                steps_used.append(calls[0] - steps_used[0])
            images = list(decode_latents(self.vae, latents))
        finally:
            hook.remove()
        info = {"sampler": s.sampler, "unet_calls": calls[0], "steps": steps_used, "size": [width, height],
                "seconds": round(time.perf_counter() - start, 3), "prompt": prompt}
        return images, info

    def _encode(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] or [B, H, W, 3] -> latents [B, 4, H/8, W/8] in the UNet's dtype."""
        from eddpm.conditioning import encode_images

        return encode_images(self.vae, pixels).to(self.device, self.dtype)

    def _pass_steps(self, s: RelightSettings, strength: float | None) -> int:
        """Steps scheduled for one pass: `steps` from noise; IC-Light's round(steps / denoise) for img2img,
        of which diffusers runs the last int(n * denoise). Fixed schedules cap it at their length.
        Raises a ValueError if an img2img pass would run no step."""
        cap = self.schedule_length(s.sampler)
        if strength is None:
            return min(s.steps, cap) if cap else s.steps
        steps = int(round(s.steps / strength))
        steps = min(steps, cap) if cap else steps
        # diffusers' img2img runs int(steps * strength) steps; zero would fail inside the UNet call.
        while int(steps * strength) < 1 and (cap is None or steps < cap):
            steps += 1
        if int(steps * strength) < 1:
            raise SettingsError(f"denoise {strength} leaves no step of the {cap} steps of the {s.sampler} sampler; "
                             f"use a denoise of at least {1 / cap:.3f}")
        return steps

    def _run(self, pipe, s: RelightSettings, embeds: dict, cond_latents, generator, **kw):
        import torch

        from eddpm.samplers import fixed_timesteps

        pipe.scheduler = self.make_scheduler(s.sampler)
        count = self._pass_steps(s, kw.get("strength"))
        # A fixed schedule goes in as `timesteps=`; an img2img pass runs its tail (eddpm/samplers.py).
        timesteps = fixed_timesteps(s.sampler, count, self.eddpm_scheduler)
        if timesteps is None:
            kw["num_inference_steps"] = count
        else:
            kw["timesteps"] = timesteps
        if "strength" not in kw:
            shape = (s.num_images, 4, kw.pop("height") // 8, kw.pop("width") // 8)
            kw["latents"] = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        with self.cond_unet.condition(cond_latents):
            out = pipe(guidance_scale=s.guidance_scale, generator=generator, output_type="latent", **embeds, **kw)
        return out.images  # [n, 4, h, w]


def lighting_gradient(direction: str, width: int, height: int) -> np.ndarray:
    """IC-Light's initial latent image: a gray ramp from 255 on the lit side to 0, uint8 [H, W, 3].

    Built as IC-Light builds it (np.linspace(255, 0) or np.linspace(0, 255), tiled, truncated to uint8),
    so the truncation of each value matches.
    """
    if direction in ("Left", "Right"):
        ramp = np.linspace(255, 0, width) if direction == "Left" else np.linspace(0, 255, width)
        grid = np.tile(ramp, (height, 1))  # [H, W]
    else:
        ramp = np.linspace(255, 0, height) if direction == "Top" else np.linspace(0, 255, height)
        grid = np.tile(ramp[:, None], (1, width))  # [H, W]
    return np.stack((grid,) * 3, axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Inputs: reading an upload and making the foreground (shared by the demo and relight.py)
# ---------------------------------------------------------------------------------------------------


def read_upload(path: str | os.PathLike, max_side: int = MAX_INPUT_SIDE
                ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """An image file -> (rgb uint8 [H, W, 3], alpha float32 [H, W] or None, notices).

    `eddpm.images.load_image` reads it (ImageError, a ValueError, for anything it cannot read); an
    image whose longest side exceeds `max_side` is then downscaled to it, with a notice.
    """
    from eddpm.images import MAX_PIXELS, ImageError, load_image, resize_exact

    try:
        rgb, alpha = load_image(path)  # refuses more than MAX_PIXELS from the header, before decoding
    except ImageError as err:
        if err.kind != "too large":
            raise
        side = int(MAX_PIXELS**0.5)
        raise ImageError("too large", f"{err.detail}; images up to {side}x{side} pixels are read: downscale "
                                      "it first") from None
    notices = []
    h, w = rgb.shape[:2]
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        rgb = resize_exact(rgb, new_w, new_h)
        if alpha is not None:
            alpha = resize_exact(alpha, new_w, new_h)
        notices.append(f"The image ({w}x{h}) was downscaled to {new_w}x{new_h} (longest side limit {max_side} px).")
    return rgb, alpha, notices


def prepare_foreground(rgb: np.ndarray, alpha: np.ndarray | None = None,
                       matte_fn: Callable | None = None) -> tuple[np.ndarray, str]:
    """The relight input at full resolution: uint8 [H, W, 3] foreground on gray 127, and a notice.

    With `matte_fn` (BriaRMBG) the matte comes from the network, as in IC-Light's demo (an alpha channel
    is first flattened onto gray, so hidden pixels do not leak); without it the upload's `alpha`
    (float [H, W] in [0, 1]) is the matte; an image without either is used as it is, background
    included. Each pass's condition is `conditioning.prepare_condition(foreground, None, w, h)`.
    """
    from eddpm.conditioning import composite_on_gray

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    if alpha is not None:
        if alpha.shape != rgb.shape[:2]:
            raise ValueError(f"alpha {list(alpha.shape)} does not match the image {list(rgb.shape[:2])}")
        rgb = composite_on_gray(rgb, alpha)
    if matte_fn is not None:
        return composite_on_gray(rgb, matte_fn(rgb)), "Background removed with BriaRMBG."
    if alpha is not None:
        return rgb, "No background remover loaded: the upload's alpha channel is the matte."
    return rgb, ("No background remover loaded and the upload has no alpha channel: the image is used as "
                 "it is, background included (upload an RGBA PNG or run with RMBG weights).")


# ---------------------------------------------------------------------------------------------------
# Loading models
# ---------------------------------------------------------------------------------------------------


def check_output_folder(checkpoint: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming what a train.py output folder lacks (before anything heavy loads)."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint folder {checkpoint} not found (pass a train.py --output_dir)")
    missing = [p for p in CHECKPOINT_FILES if not os.path.isfile(os.path.join(checkpoint, p))]
    if missing:
        raise FileNotFoundError(f"{checkpoint} is not a complete train.py output folder: missing {', '.join(missing)}")


def load_relighter(
    checkpoint: str | None = None,
    base_model: str = "tiny",
    offset_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
) -> Relighter:
    """Models for relighting: a train.py output folder (`checkpoint`), or a base model plus IC-Light offsets,
    or base_model='tiny' (tiny models built in code); `lora` (a pytorch_lora_weights.safetensors or its folder,
    with conv_in.safetensors when beside it) is then folded into the UNet times `lora_scale` (eddpm/lora.py
    apply_lora_), in float32 before the cast. The device defaults to CUDA, then MPS, then CPU;
    on CUDA the UNet and text encoder run in float16 and the VAE in bfloat16 (as IC-Light's demo: the
    SD1.5 VAE can overflow in float16)."""
    import torch

    from eddpm import iclight
    from eddpm.models import load_components

    device = torch.device(device) if device else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    scheduler, unet_path = None, None
    if checkpoint is not None:
        check_output_folder(checkpoint)
        try:
            with open(os.path.join(checkpoint, "config.json")) as fh:
                train_cfg = json.load(fh)
            base_model, seed = train_cfg["base_model"], train_cfg.get("seed", seed)
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as err:  # Recursion: nested brackets
            raise ValueError(f"{checkpoint}/config.json is not a train.py config ({err!r})") from err
        offset_path, unet_path = None, os.path.join(checkpoint, "unet")
        from eddpm.scheduler import EDDPMScheduler

        scheduler = EDDPMScheduler.from_pretrained(checkpoint, subfolder="scheduler")
        if scheduler.config.scores is None:
            raise ValueError(f"{checkpoint}/scheduler has no learned scores: not a finished train.py output")
    parts = load_components(base_model, offset_path=offset_path, unet_path=unet_path, seed=seed)
    if lora is not None:
        from eddpm.lora import apply_lora_

        apply_lora_(parts.unet, lora, lora_scale)
    vae_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    for module, wanted in ((parts.vae, vae_dtype), (parts.unet, dtype), (parts.text_encoder, dtype)):
        module.to(device).eval().requires_grad_(False)
        if module.dtype != wanted:  # diffusers warns about every dtype cast, even a no-op one
            module.to(wanted)
    sched_cfg = dict(scheduler.config) if scheduler is not None else dict(iclight.SD15_SCHEDULER_CONFIG)
    return Relighter(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, sched_cfg, scheduler,
                     device=device, dtype=dtype)


def load_background_remover(rmbg_path: str | os.PathLike | None,
                            device: str | torch.device | None = None) -> tuple[Callable | None, str]:
    """(matte_fn or None, a sentence saying which): BriaRMBG from `rmbg_path` when its files are there."""
    from eddpm import iclight

    if rmbg_path is None:
        return None, "No background remover: the upload's alpha channel is used (an RGB upload is used as is)."
    missing = [name for name in iclight.RMBG_FILENAMES if not os.path.isfile(os.path.join(rmbg_path, name))]
    if missing:
        return None, (f"BriaRMBG weights not found in {rmbg_path} (missing {', '.join(missing)}): the upload's "
                      f"alpha channel is used (an RGB upload is used as is). {iclight.DOWNLOAD_HINT}")
    from eddpm.models import load_matte_fn

    return load_matte_fn(str(rmbg_path), device or default_device()), f"Background removal: BriaRMBG ({rmbg_path})."


def default_device() -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
