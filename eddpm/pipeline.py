"""Relighting with IC-Light fc: the one code path used by gradio_demo.py, relight.py and train.py's validation.

IC-Light's demo (fact sheet, "Demo behaviour"): pass 1 is text-to-image from noise, or image-to-image
from a gray gradient that sets the light's side (at `lowres_denoise`); pass 2 decodes, upscales by
`highres_scale` to multiples of 64, re-encodes the image and the foreground at the new size and runs
image-to-image at `highres_denoise`. Both passes run inside diffusers' own StableDiffusion pipelines with
the 8-channel UNet behind `ConditionedUNet`.

The entry points share more than `Relighter.relight`: `load_image` (reading and downscaling an upload),
`prepare_foreground` (background removal or the upload's alpha), `check_settings` (clear errors and
notices) and the model loaders, so the demo and the CLI accept and refuse the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
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
MAX_INPUT_SIDE = 2048  # uploads are downscaled to this longest side (with a notice) before anything else
# Files a train.py output folder must hold for relighting (train.py's _export writes them).
CHECKPOINT_FILES = ("config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                    "scheduler/scheduler_config.json")


def _setting(default, help: str):  # noqa: A002 - `help` is argparse's word; relight.py makes flags from it
    return field(default=default, metadata={"help": help})


@dataclass
class RelightSettings:
    """IC-Light fc demo defaults (fact sheet, "Demo behaviour"); sizes in pixels, multiples of 64."""

    prompt: str = _setting("", "What to show. May be empty: then only the added prompt is used.")
    width: int = _setting(512, "Width of the first pass in pixels, a multiple of 64 (64 to 2048).")
    height: int = _setting(640, "Height of the first pass in pixels, a multiple of 64 (64 to 2048).")
    steps: int = _setting(25, "Denoising steps per pass (img2img passes run about this many, as IC-Light). "
                          "EDDPM runs at most its learned steps: fewer gives an evenly spread subset.")
    guidance_scale: float = _setting(2.0, "Classifier-free guidance on the text (0 to 32; 1 or less turns it off).")
    seed: int = _setting(12345, "Seed of the initial noise and of the samplers' noise (0 to 2**63 - 1).")
    num_images: int = _setting(1, "Images per run (1 to 12), relit in one batch.")
    lighting: str = _setting("None", "Initial latent: None starts from noise; Left/Right/Top/Bottom start "
                             "from a gray gradient bright on that side, denoised at lowres_denoise.")
    lowres_denoise: float = _setting(0.9, "Strength of the first pass when lighting is not None (0 to 1].")
    highres_scale: float = _setting(1.5, "Upscale factor of the second pass (1 to 3); 1 skips the highres pass.")
    highres_denoise: float = _setting(0.5, "Strength of the highres pass (0 to 1].")
    added_prompt: str = _setting(DEFAULT_ADDED_PROMPT, "Appended to the prompt, after a comma.")
    negative_prompt: str = _setting(DEFAULT_NEGATIVE_PROMPT, "What guidance steers away from.")
    sampler: str = _setting("eddpm", f"One of {list(SAMPLERS.values())}; eddpm needs a train.py output folder.")


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

    @property
    def samplers(self) -> dict[str, str]:
        """The entries of SAMPLERS this relighter can run (EDDPM only with learned steps)."""
        return {name: key for name, key in SAMPLERS.items() if key != "eddpm" or self.eddpm_scheduler is not None}

    @property
    def default_sampler(self) -> str:
        """EDDPM when there are learned steps, else IC-Light's own DPM++ 2M SDE Karras."""
        return "eddpm" if self.eddpm_scheduler is not None else "dpmpp_2m_sde_karras"

    def make_scheduler(self, sampler: str):
        """A fresh scheduler (schedulers are stateful) for a sampler key of SAMPLERS."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

        # The other samplers share only the training betas: no EDDPM mask, no DDPM-only options.
        shared = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "steps_offset")
        base = {k: self.scheduler_config[k] for k in shared if k in self.scheduler_config}
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
            return DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=False,
                                             set_alpha_to_one=False)
        if sampler == "euler_a":
            return EulerAncestralDiscreteScheduler.from_config(base, timestep_spacing="trailing")
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS.values())}")

    def relight(self, foreground: np.ndarray, settings: RelightSettings) -> tuple[list[np.ndarray], dict]:
        """Relight `foreground` (uint8 [H, W, 3], already on gray 127) -> (images uint8 [h, w, 3], info).

        info: sampler, unet_calls (network evaluations per image: the batch of images and a CFG pair
        share one call), steps (UNet calls of each pass), seconds (the whole run, all images), size.
        Requests are serialised by a lock, so concurrent callers (the demo's queue) each get a clean run.
        """
        check_settings(settings, self)
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
            calls_before = calls[0]
            if s.lighting == "None":
                latents = self._run(self.txt2img, s, embeds, cond_latents, generator, height=s.height, width=s.width)
            else:
                init = self._encode(lighting_gradient(s.lighting, s.width, s.height)).repeat(n, 1, 1, 1)
                latents = self._run(self.img2img, s, embeds, cond_latents, generator,
                                    image=init, strength=s.lowres_denoise)
            steps_used.append(calls[0] - calls_before)
            width, height = s.width, s.height
            if s.highres_scale > 1.0:
                width, height = highres_size(s.width, s.height, s.highres_scale)
                pixels = [resize_exact(img, width, height) for img in iclight.decode_latents(self.vae, latents)]
                init = torch.cat([self._encode(p) for p in pixels])  # [n, 4, h2, w2]
                cond_latents = self._encode(resize_cover(foreground, width, height), condition=True)
                calls_before = calls[0]
                latents = self._run(self.img2img, s, embeds, cond_latents, generator,
                                    image=init, strength=s.highres_denoise)
                steps_used.append(calls[0] - calls_before)
            images = list(iclight.decode_latents(self.vae, latents))
        finally:
            hook.remove()
        info = {"sampler": s.sampler, "unet_calls": calls[0], "steps": steps_used, "size": [width, height],
                "seconds": round(time.perf_counter() - start, 3), "prompt": prompt}
        return images, info

    def _encode(self, pixels: np.ndarray, condition: bool = False) -> torch.Tensor:
        batch = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
        encode = iclight.encode_condition if condition else iclight.encode_images
        return encode(self.vae, batch.to(self.device)).to(self.dtype)  # [1, 4, H/8, W/8]

    def _steps(self, s: RelightSettings, strength: float | None) -> int:
        """num_inference_steps for one pass: IC-Light's round(steps / denoise) for img2img, so that about
        `steps` steps run; EDDPM is capped at its learned steps. Raises if img2img would run no step."""
        cap = self.learned_steps if s.sampler == "eddpm" else None
        if strength is None:
            return min(s.steps, cap) if cap else s.steps
        steps = int(round(s.steps / strength))
        steps = min(steps, cap) if cap else steps
        # diffusers' img2img runs int(steps * strength) steps; zero would fail inside the UNet call.
        while int(steps * strength) < 1 and (cap is None or steps < cap):
            steps += 1
        if int(steps * strength) < 1:
            raise ValueError(f"denoise {strength} leaves no step of the {cap} learned EDDPM steps; "
                             f"use a denoise of at least {1 / cap:.3f}")
        return steps

    def _run(self, pipe, s: RelightSettings, embeds: dict, cond_latents, generator, **kw):
        pipe.scheduler = self.make_scheduler(s.sampler)
        steps = self._steps(s, kw.get("strength"))
        if "strength" not in kw:
            shape = (s.num_images, 4, kw.pop("height") // 8, kw.pop("width") // 8)
            kw["latents"] = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        with self.cond_unet.condition(cond_latents):
            out = pipe(num_inference_steps=steps, guidance_scale=s.guidance_scale, generator=generator,
                       output_type="latent", **embeds, **kw)
        return out.images  # [n, 4, h, w]


def check_settings(s: RelightSettings, relighter: Relighter | None = None) -> list[str]:
    """Clear ValueErrors for settings the pipelines would reject later with a traceback; returns notices
    (one sentence each) about settings that run but may surprise: an empty prompt, capped EDDPM steps."""
    if s.sampler not in SAMPLERS.values():
        raise ValueError(f"unknown sampler {s.sampler!r}; choose from {list(SAMPLERS.values())}")
    if relighter is not None and s.sampler not in relighter.samplers.values():
        raise ValueError("the EDDPM sampler needs a trained output folder (--checkpoint DIR)")
    for name in ("width", "height", "steps", "seed", "num_images"):
        value = getattr(s, name)
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if s.width % 64 or s.height % 64 or not (64 <= s.width <= 2048 and 64 <= s.height <= 2048):
        raise ValueError(f"width and height must be multiples of 64 between 64 and 2048, got {s.width}x{s.height}")
    if s.lighting not in LIGHTING:
        raise ValueError(f"lighting must be one of {LIGHTING}, got {s.lighting!r}")
    if not 1 <= s.num_images <= 12:
        raise ValueError(f"num_images must be 1 to 12, got {s.num_images}")
    if not 1 <= s.steps <= 1000:
        raise ValueError(f"steps must be 1 to 1000, got {s.steps}")
    if not 0 <= s.seed < 2**63:
        raise ValueError(f"seed must be 0 to 2**63 - 1, got {s.seed}")
    if not 0.0 <= s.guidance_scale <= 32.0:
        raise ValueError(f"guidance_scale must be in [0, 32], got {s.guidance_scale}")
    for name in ("lowres_denoise", "highres_denoise"):
        if not 0 < getattr(s, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {getattr(s, name)}")
    if not 1.0 <= s.highres_scale <= 3.0:
        raise ValueError(f"highres_scale must be in [1, 3] (1 skips the highres pass), got {s.highres_scale}")
    notices = []
    if not s.prompt.strip():
        added = s.added_prompt.strip()
        notices.append(f"The prompt is empty: only the added prompt ({added!r}) is used." if added else
                       "The prompt and the added prompt are empty: the relight is unconditional on text.")
    if relighter is not None and s.sampler == "eddpm" and s.steps > relighter.learned_steps:
        notices.append(f"EDDPM runs its {relighter.learned_steps} learned steps (asked for {s.steps}).")
    return notices


def highres_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The highres pass's size: each side times `scale`, rounded to a multiple of 64 (IC-Light)."""
    return tuple(int(round(v * scale / 64.0)) * 64 for v in (width, height))


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


# ---------------------------------------------------------------------------------------------------
# Inputs: reading an upload and making the foreground (shared by the demo and relight.py)
# ---------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, max_side: int = MAX_INPUT_SIDE) -> tuple[np.ndarray, list[str]]:
    """An image file -> (uint8 [H, W, 3] or [H, W, 4] when it has transparency, notices).

    EXIF rotation is applied; an image whose longest side exceeds `max_side` is downscaled to it (with a
    notice). A missing file, a file that is not an image or a decompression bomb is a ValueError.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = os.path.basename(str(path))
    if not os.path.isfile(path):
        raise ValueError(f"input image {path} not found")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            im = im.convert("RGBA" if has_alpha else "RGB")
    except UnidentifiedImageError as err:
        raise ValueError(f"{name} is not an image file that Pillow can read (PNG, JPEG, WebP, ...)") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name} is too large to open safely ({err})") from err
    except OSError as err:  # truncated or corrupt files
        raise ValueError(f"{name} could not be read as an image: {err}") from err
    notices = []
    if max(im.size) > max_side:
        w, h = im.size
        scale = max_side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        notices.append(f"The image ({w}x{h}) was downscaled to {im.size[0]}x{im.size[1]} "
                       f"(longest side limit {max_side} px).")
    return np.asarray(im), notices


def prepare_foreground(image: np.ndarray, matte_fn: Callable | None = None) -> tuple[np.ndarray, str]:
    """The relight input: uint8 [H, W, 3] foreground on gray 127 (fact sheet, condition step 1), and a notice.

    With `matte_fn` (BriaRMBG) the matte comes from the network (an alpha channel is first flattened
    onto gray, so hidden pixels do not leak); without it an RGBA image's own alpha is used; an RGB image
    without a remover is used as it is, background included.
    """
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB or RGBA image, got {image.dtype} {list(image.shape)}")
    rgb = image[..., :3]
    if image.shape[2] == 4:
        rgb = iclight.composite_on_gray(rgb, image[..., 3].astype(np.float32) / 255.0)
    if matte_fn is not None:
        return iclight.composite_on_gray(rgb, matte_fn(rgb)), "Background removed with BriaRMBG."
    if image.shape[2] == 4:
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
) -> Relighter:
    """Models for relighting: a train.py output folder (`checkpoint`), or a base model plus IC-Light offsets,
    or base_model='tiny' (tiny models built in code). The device defaults to CUDA, then MPS, then CPU;
    on CUDA the UNet and text encoder run in float16 and the VAE in bfloat16 (as IC-Light's demo: the
    SD1.5 VAE can overflow in float16)."""
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
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{checkpoint}/config.json is not a train.py config ({err!r})") from err
        offset_path, unet_path = None, os.path.join(checkpoint, "unet")
        from eddpm_scheduler import EDDPMScheduler

        scheduler = EDDPMScheduler.from_pretrained(checkpoint, subfolder="scheduler")
        if scheduler.config.scores is None:
            raise ValueError(f"{checkpoint}/scheduler has no learned scores: not a finished train.py output")
    parts = load_components(base_model, offset_path=offset_path, unet_path=unet_path, seed=seed)
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
    if rmbg_path is None:
        return None, "No background remover: the upload's alpha channel is used (an RGB upload is used as is)."
    missing = [name for name in iclight.RMBG_FILENAMES if not os.path.isfile(os.path.join(rmbg_path, name))]
    if missing:
        return None, (f"BriaRMBG weights not found in {rmbg_path} (missing {', '.join(missing)}): the upload's "
                      f"alpha channel is used (an RGB upload is used as is). {iclight.DOWNLOAD_HINT}")
    from eddpm.models import load_matte_fn

    return load_matte_fn(str(rmbg_path), device or default_device()), f"Background removal: BriaRMBG ({rmbg_path})."


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
