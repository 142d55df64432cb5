"""IC-Light "fc" facts as constants: model locations, latent sizes, schedules, the offset file format.

Every value is documented in docs/iclight-facts.md; the code that uses them lives in `weights` (UNet and
offsets), `conditioning` (pixels <-> latents, the condition, RMBG), `prompts` (long prompts) and
`conditioned_unet` (the 8-channel UNet inside diffusers pipelines). This module imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# docs/iclight-facts.md, "Condition encoding": the SD1.5 VAE's latent scale, and gray 127, which is both
# the background the foreground is composited on and the zero of the encoder's pixel mapping x / 127 - 1.
SCALING_FACTOR = 0.18215
GRAY = 127
LATENT_CHANNELS = 4  # SD1.5 latent channels; the fc UNet sees [noisy latent (4), condition (4)] = 8
CONDITION_CHANNELS = 4  # one VAE latent of the foreground composited on gray

# docs/iclight-facts.md, "Models and files".
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

OFFSET_FORMAT = "iclight-offset"  # metadata "format" written by weights.save_iclight_offsets

# SD1.5's training schedule (DDPMScheduler / DDIMScheduler kwargs); docs/iclight-facts.md, "Noise schedule".
# alpha_bar at t=999 is 0.00466.
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
# WITHOUT beta_schedule, so it runs on diffusers' default "linear" betas, not SD1.5's scaled_linear
# (docs/iclight-facts.md, "Noise schedule"); written out here so the difference is visible. Offered for
# comparison only.
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


class BadWeightsError(ValueError):
    """A model file that is on disk but is refused: pickled, not safetensors, keys or shapes that do not match,
    NaN or Inf values; the message names the file (and the tensors)."""
