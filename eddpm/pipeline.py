"""Relighting with IC-Light fc: the one code path used by gradio_demo.py, relight.py and train.py's validation.

IC-Light's demo (fact sheet, "Demo behaviour"): pass 1 is text-to-image from noise, or image-to-image
from a gray gradient that sets the light's side (at `lowres_denoise`); pass 2 decodes, upscales by
`highres_scale` to multiples of 64, re-encodes the image and the foreground at the new size and runs
image-to-image at `highres_denoise`. Both passes run inside diffusers' own StableDiffusion pipelines with
the 8-channel UNet behind `ConditionedUNet`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eddpm import iclight

# Sampler names as shown in the UI -> internal keys. "eddpm" needs a trained output folder.
SAMPLERS = {
    "EDDPM (learned steps)": "eddpm",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "DPM++ 2M SDE Karras (IC-Light demo betas)": "dpmpp_2m_sde_karras_iclight",
    "DDIM": "ddim",
    "Euler ancestral": "euler_a",
}
LIGHTING = ("None", "Left", "Right", "Top", "Bottom")
DEFAULT_ADDED_PROMPT = "best quality"
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, cropped, worst quality"


@dataclass
class RelightSettings:
    """IC-Light fc demo defaults (fact sheet); sizes in pixels, multiples of 64."""

    prompt: str = ""
    width: int = 512
    height: int = 640
    steps: int = 25  # for "eddpm": at most the learned step count, which is used when this is larger
    guidance_scale: float = 2.0
    seed: int = 12345
    num_images: int = 1
    lighting: str = "None"  # None: text-to-image from noise; Left/Right/Top/Bottom: a gray gradient
    lowres_denoise: float = 0.9
    highres_scale: float = 1.5  # 1.0 skips the highres pass
    highres_denoise: float = 0.5
    added_prompt: str = DEFAULT_ADDED_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    sampler: str = "eddpm"


@dataclass
class Relighter:
    """Models plus the training noise schedule; `scheduler_config` is the schedule the UNet was trained on."""

    unet: Any  # 8-channel UNet2DConditionModel
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    eddpm_scheduler: Any = None  # EDDPMScheduler with learned scores, from a train.py output folder
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        self.cond_unet = iclight.ConditionedUNet(self.unet)
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

    def make_scheduler(self, sampler: str):
        """A fresh scheduler (schedulers are stateful) for a sampler key of SAMPLERS."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

        eddpm_only = {"scores", "num_kept_steps", "mask_mode"}  # the other samplers share only the betas
        base = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_") and k not in eddpm_only}
        if sampler == "eddpm":
            if self.eddpm_scheduler is None:
                raise ValueError("the EDDPM sampler needs a trained output folder (--checkpoint DIR)")
            return self.eddpm_scheduler.__class__.from_config(self.eddpm_scheduler.config)
        if sampler == "dpmpp_2m_sde_karras":
            return DPMSolverMultistepScheduler.from_config(
                base, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
        if sampler == "dpmpp_2m_sde_karras_iclight":
            return DPMSolverMultistepScheduler(**iclight.ICLIGHT_DEMO_SAMPLER_CONFIG)
        if sampler == "ddim":
            return DDIMScheduler.from_config(base, timestep_spacing="trailing")
        if sampler == "euler_a":
            return EulerAncestralDiscreteScheduler.from_config(base, timestep_spacing="trailing")
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS.values())}")

    def relight(self, foreground: np.ndarray, settings: RelightSettings) -> tuple[list[np.ndarray], dict]:
        """Relight `foreground` (uint8 [H, W, 3], already on gray 127) -> (images uint8 [h, w, 3], info).

        info: sampler, unet_calls (network evaluations, a CFG pair counting once), seconds, steps used.
        """
        check_settings(settings)
        with self._lock, torch.inference_mode():
            return self._relight(foreground, settings)

    def _relight(self, foreground: np.ndarray, s: RelightSettings):
        start = time.perf_counter()
        calls = [0]
        hook = self.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            prompt = ", ".join(p for p in (s.prompt.strip(), s.added_prompt.strip()) if p)
            cond, uncond = iclight.encode_prompt_pair(self.tokenizer, self.text_encoder, prompt, s.negative_prompt)
            n = s.num_images
            embeds = dict(prompt_embeds=cond.to(self.device, self.dtype).repeat(n, 1, 1),
                          negative_prompt_embeds=uncond.to(self.device, self.dtype).repeat(n, 1, 1))
            generator = torch.Generator(self.device).manual_seed(int(s.seed))
            steps_used = []

            fg = resize_cover(foreground, s.width, s.height)
            cond_latents = self._encode(fg, condition=True)
            if s.lighting == "None":
                latents = self._run(self.txt2img, s, embeds, cond_latents, generator, steps_used,
                                    height=s.height, width=s.width)
            else:
                init = self._encode(lighting_gradient(s.lighting, s.width, s.height)).repeat(n, 1, 1, 1)
                latents = self._run(self.img2img, s, embeds, cond_latents, generator, steps_used,
                                    image=init, strength=s.lowres_denoise)
            if s.highres_scale > 1.0:
                w2, h2 = (round(v * s.highres_scale / 64) * 64 for v in (s.width, s.height))
                pixels = [resize_exact(img, w2, h2) for img in iclight.decode_latents(self.vae, latents)]
                init = torch.cat([self._encode(p) for p in pixels])
                cond_latents = self._encode(resize_cover(foreground, w2, h2), condition=True)
                latents = self._run(self.img2img, s, embeds, cond_latents, generator, steps_used,
                                    image=init, strength=s.highres_denoise)
            images = list(iclight.decode_latents(self.vae, latents))
        finally:
            hook.remove()
        info = {"sampler": s.sampler, "unet_calls": calls[0], "steps": steps_used,
                "seconds": round(time.perf_counter() - start, 3)}
        return images, info

    def _encode(self, pixels: np.ndarray, condition: bool = False) -> torch.Tensor:
        batch = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
        encode = iclight.encode_condition if condition else iclight.encode_images
        return encode(self.vae, batch.to(self.device)).to(self.dtype)  # [1, 4, H/8, W/8]

    def _run(self, pipe, s: RelightSettings, embeds: dict, cond_latents, generator, steps_used, **kw):
        pipe.scheduler = self.make_scheduler(s.sampler)
        steps = s.steps
        if "strength" in kw and s.sampler != "eddpm":  # IC-Light's round(steps / denoise)
            steps = int(round(s.steps / kw["strength"]))
        if s.sampler == "eddpm":  # the learned steps; img2img strength takes the tail of them
            steps = min(steps, self.learned_steps) if "strength" not in kw else self.learned_steps
        if "strength" not in kw:
            shape = (s.num_images, 4, kw.pop("height") // 8, kw.pop("width") // 8)
            kw["latents"] = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        with self.cond_unet.condition(cond_latents):
            out = pipe(num_inference_steps=steps, guidance_scale=s.guidance_scale, generator=generator,
                       output_type="latent", **embeds, **kw)
        steps_used.append(steps)
        return out.images  # [n, 4, h, w]


def check_settings(s: RelightSettings) -> None:
    """Clear ValueErrors for settings the pipelines would reject later with a traceback."""
    if s.sampler not in SAMPLERS.values():
        raise ValueError(f"unknown sampler {s.sampler!r}")
    if s.width % 64 or s.height % 64 or not (64 <= s.width <= 2048 and 64 <= s.height <= 2048):
        raise ValueError(f"width and height must be multiples of 64 between 64 and 2048, got {s.width}x{s.height}")
    if s.lighting not in LIGHTING:
        raise ValueError(f"lighting must be one of {LIGHTING}, got {s.lighting!r}")
    if not 1 <= s.num_images <= 8:
        raise ValueError(f"num_images must be 1 to 8, got {s.num_images}")
    if not 1 <= s.steps <= 1000:
        raise ValueError(f"steps must be 1 to 1000, got {s.steps}")
    for name in ("lowres_denoise", "highres_denoise"):
        if not 0 < getattr(s, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {getattr(s, name)}")
    if not 1.0 <= s.highres_scale <= 3.0:
        raise ValueError(f"highres_scale must be in [1, 3], got {s.highres_scale}")


def lighting_gradient(direction: str, width: int, height: int) -> np.ndarray:
    """IC-Light's initial latent image: a gray ramp from 255 on the lit side to 0, uint8 [H, W, 3]."""
    ramp_x = np.linspace(255, 0, width)
    ramp_y = np.linspace(255, 0, height)
    grid = {"Left": np.broadcast_to(ramp_x[None, :], (height, width)),
            "Right": np.broadcast_to(ramp_x[None, ::-1], (height, width)),
            "Top": np.broadcast_to(ramp_y[:, None], (height, width)),
            "Bottom": np.broadcast_to(ramp_y[::-1, None], (height, width))}[direction]
    return np.repeat(grid[..., None], 3, axis=2).astype(np.uint8)


def resize_exact(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover width x height, then centre-crop (IC-Light's resize_and_center_crop)."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = resize_exact(image, new_w, new_h)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top:top + height, left:left + width]


def load_relighter(
    checkpoint: str | None = None,
    base_model: str = "tiny",
    offset_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Relighter:
    """Models for relighting: a train.py output folder (`checkpoint`), or a base model plus IC-Light offsets,
    or base_model='tiny' (tiny models built in code). The device defaults to CUDA, then MPS, then CPU."""
    from eddpm.models import load_components

    device = torch.device(device) if device else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    scheduler, unet_path = None, None
    if checkpoint is not None:
        missing = [p for p in ("config.json", "unet/config.json", "scheduler/scheduler_config.json")
                   if not os.path.isfile(os.path.join(checkpoint, p))]
        if missing:
            raise FileNotFoundError(f"{checkpoint} is not a complete train.py output folder: missing {missing}")
        with open(os.path.join(checkpoint, "config.json")) as fh:
            train_cfg = json.load(fh)
        base_model, seed = train_cfg["base_model"], train_cfg.get("seed", seed)
        offset_path, unet_path = None, os.path.join(checkpoint, "unet")
        from eddpm_scheduler import EDDPMScheduler

        scheduler = EDDPMScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    parts = load_components(base_model, offset_path=offset_path, unet_path=unet_path, seed=seed)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sched_cfg = dict(scheduler.config) if scheduler is not None else dict(iclight.SD15_SCHEDULER_CONFIG)
    return Relighter(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, sched_cfg, scheduler,
                     device=device, dtype=dtype)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def settings_from_dict(values: dict) -> RelightSettings:
    names = {f.name for f in dataclasses.fields(RelightSettings)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    return RelightSettings(**values)
