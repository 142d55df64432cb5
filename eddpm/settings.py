"""What one relight asks for, and what it may ask: `RelightSettings` (IC-Light's demo defaults), the sampler and
lighting names, the request limits, and `check_settings`, which gives every bad value a SettingsError naming
its field. The demo, relight.py and train.py's validation all go through it (eddpm/relighting.py runs them).
Only the standard library is imported, so `--help` of the entry points stays fast.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eddpm.relighting import Relighter

# Sampler names as shown in the UI -> internal keys (eddpm/samplers.py builds each one).
SAMPLERS = {
    "EDDPM (learned steps)": "eddpm",
    "DPM-Solver++ 2M on the learned steps": "eddpm_dpmpp_2m",
    "DDIM on the learned steps": "eddpm_ddim",
    "DPM++ 2M SDE Karras (IC-Light demo, linear betas)": "dpmpp_2m_sde_karras_iclight",
    "DPM++ 2M SDE Karras (SD1.5 scaled_linear betas)": "dpmpp_2m_sde_karras",
    "DPM++ 2M, Align Your Steps (10 steps)": "ays_dpmpp_2m",
    "DDIM": "ddim",
    "Euler ancestral": "euler_a",
}
# The samplers that need a train.py output folder's learned steps.
EDDPM_SAMPLERS = ("eddpm", "eddpm_dpmpp_2m", "eddpm_ddim")
# The default without learned steps: the scheduler IC-Light's demo builds (docs/iclight-facts.md,
# "Demo behaviour"), linear betas and all.
ICLIGHT_SAMPLER = "dpmpp_2m_sde_karras_iclight"
LIGHTING = ("None", "Left", "Right", "Top", "Bottom")
DEFAULT_ADDED_PROMPT = "best quality"
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, cropped, worst quality"


def _setting(default, help: str):  # noqa: A002 - `help` is argparse's word; relight.py makes flags from it
    return field(default=default, metadata={"help": help})


@dataclass
class RelightSettings:
    """IC-Light fc demo defaults (docs/iclight-facts.md, "Demo behaviour"); sizes in pixels, multiples of 64."""

    prompt: str = _setting("", "What to show. May be empty: the text is then ', ' + the added prompt, as in IC-Light.")
    width: int = _setting(512, "Width of the first pass in pixels, a multiple of 64 (64 to 2048).")
    height: int = _setting(640, "Height of the first pass in pixels, a multiple of 64 (64 to 2048).")
    steps: int = _setting(25, "Denoising steps per pass (img2img passes run about this many, as IC-Light). "
                          "Samplers with a fixed schedule (learned EDDPM steps, Align Your Steps) run at "
                          "most theirs: fewer gives an evenly spread subset.")
    guidance_scale: float = _setting(2.0, "Classifier-free guidance on the text (0 to 32; 1 or less turns it off).")
    seed: int = _setting(12345, "Seed of the initial noise and of the samplers' noise (0 to 2**63 - 1).")
    num_images: int = _setting(1, "Images per run (1 to 12), relit in one batch.")
    lighting: str = _setting("None", "Initial latent: None starts from noise; Left/Right/Top/Bottom start "
                             "from a gray gradient bright on that side, denoised at lowres_denoise.")
    lowres_denoise: float = _setting(0.9, "Strength of the first pass when lighting is not None (0 to 1].")
    highres_scale: float = _setting(1.5, "Size factor of the second pass (1 to 3), rounded to multiples of 64; "
                                    "at 1 the second pass runs at the first pass's size, as in IC-Light.")
    highres_denoise: float = _setting(0.5, "Strength of the second pass [0 to 1]; 0 skips the second pass "
                                      "(not an IC-Light setting: for validation and benchmarks).")
    added_prompt: str = _setting(DEFAULT_ADDED_PROMPT, "Appended to the prompt after ', ' (IC-Light's a_prompt).")
    negative_prompt: str = _setting(DEFAULT_NEGATIVE_PROMPT, "What guidance steers away from.")
    sampler: str = _setting("eddpm", f"One of {list(SAMPLERS.values())}; the eddpm* samplers need a train.py "
                            "output folder.")


class SettingsError(ValueError):
    """A relight setting or request the user can change: the entry points show it as one line."""


@dataclass(frozen=True)
class RequestLimits:
    """What one relight request may cost; beyond it the request is refused before any work, naming the flag.

    The cost of a pass is images x UNet steps x megapixels; `max_work` bounds the sum over the passes (the
    run time), `max_megapixels` bounds images x the larger pass's megapixels (the VAE decodes them at once:
    the memory), `max_prompt_chars` bounds each of the three texts (every 75 tokens are one more text
    encoder call).
    """

    max_work: float
    max_megapixels: float
    max_prompt_chars: int = 1000


# IC-Light's defaults (512x640, highres 1.5, 25 steps, one image) cost 1 x 25 x (0.33 + 0.74) = 27
# megapixel-steps. A CPU serves about two of those per request; the demo's largest setting (1024x1024,
# highres 3: 9.4 megapixels) took over 20 minutes and 3.6 GB there. A GPU serves a dozen images at the
# defaults, or one image at the largest size and 100 steps.
REQUEST_LIMITS = {"cpu": RequestLimits(max_work=60, max_megapixels=2.5),
                  "cuda": RequestLimits(max_work=2000, max_megapixels=24)}


def request_limits(device_type: str, **overrides) -> RequestLimits:
    """The limits for a device type ("cuda"; anything else gets the CPU's), with `overrides` that are not None."""
    base = REQUEST_LIMITS.get(device_type, REQUEST_LIMITS["cpu"])
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def request_cost(s: RelightSettings, relighter: Relighter | None = None) -> tuple[float, float]:
    """(work, megapixels) of a request under RequestLimits' measures; a fixed schedule (learned EDDPM steps,
    Align Your Steps) caps the steps of each pass at its length."""
    length = relighter.schedule_length(s.sampler) if relighter is not None else None
    steps = min(s.steps, length) if length else s.steps
    sizes = [(s.width, s.height)] + ([highres_size(s.width, s.height, s.highres_scale)] if s.highres_denoise > 0
                                     else [])
    megapixels = [w * h / 1e6 for w, h in sizes]
    return s.num_images * steps * sum(megapixels), s.num_images * max(megapixels)


def check_settings(s: RelightSettings, relighter: Relighter | None = None,
                   limits: RequestLimits | None = None) -> list[str]:
    """Clear SettingsErrors, each naming its field, for settings the pipelines would reject later with a
    traceback or requests beyond `limits` (default: the relighter's); returns notices (one sentence each)
    about settings that run but may surprise: an empty prompt, capped steps."""
    _check_types(s)
    _check_values(s, relighter)
    limits = limits or (relighter.limits if relighter is not None else None)
    if limits is not None:
        _check_limits(s, relighter, limits)
    return _notices(s, relighter)


def _check_types(s: RelightSettings) -> None:
    """Texts are str, numbers are real numbers (not bool), whole where they count things."""
    for name in ("prompt", "added_prompt", "negative_prompt", "lighting", "sampler"):
        if not isinstance(getattr(s, name), str):
            raise SettingsError(f"{name} must be text, got {_shown(getattr(s, name))}")
    for f in dataclasses.fields(RelightSettings):
        value = getattr(s, f.name)
        if isinstance(f.default, (int, float)) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise SettingsError(f"{f.name} must be a number, got {_shown(value)}")
    for name in ("width", "height", "steps", "seed", "num_images"):
        value = getattr(s, name)
        if not isinstance(value, int) and not float(value).is_integer():  # ints may exceed a float's range
            raise SettingsError(f"{name} must be a whole number, got {_shown(value)}")


def _check_values(s: RelightSettings, relighter: Relighter | None) -> None:
    if s.sampler not in SAMPLERS.values():
        raise SettingsError(f"unknown sampler {_shown(s.sampler)}; choose from {list(SAMPLERS.values())}")
    if relighter is not None and s.sampler not in relighter.samplers.values():
        raise SettingsError(f"the {s.sampler} sampler needs a trained output folder (--checkpoint DIR)")
    if s.width % 64 or s.height % 64 or not (64 <= s.width <= 2048 and 64 <= s.height <= 2048):
        raise SettingsError(f"width and height must be multiples of 64 between 64 and 2048, got {s.width}x{s.height}")
    if s.lighting not in LIGHTING:
        raise SettingsError(f"lighting must be one of {LIGHTING}, got {_shown(s.lighting)}")
    if not 1 <= s.num_images <= 12:
        raise SettingsError(f"num_images must be 1 to 12, got {s.num_images}")
    if not 1 <= s.steps <= 1000:
        raise SettingsError(f"steps must be 1 to 1000, got {s.steps}")
    if not 0 <= s.seed < 2**63:
        raise SettingsError(f"seed must be 0 to 2**63 - 1, got {s.seed}")
    if not 0.0 <= s.guidance_scale <= 32.0:
        raise SettingsError(f"guidance_scale must be in [0, 32], got {s.guidance_scale}")
    if not 0 < s.lowres_denoise <= 1:
        raise SettingsError(f"lowres_denoise must be in (0, 1], got {s.lowres_denoise}")
    if not 0 <= s.highres_denoise <= 1:
        raise SettingsError(f"highres_denoise must be in [0, 1] (0 skips the second pass), got {s.highres_denoise}")
    if not 1.0 <= s.highres_scale <= 3.0:
        raise SettingsError(f"highres_scale must be in [1, 3] (1 runs the second pass at the same size), "
                            f"got {s.highres_scale}")


def _notices(s: RelightSettings, relighter: Relighter | None) -> list[str]:
    notices = []
    if not s.prompt.strip():
        notices.append(f"The prompt is empty: the model sees {s.prompt + ', ' + s.added_prompt!r} "
                       "(IC-Light joins the prompt and the added prompt with ', ').")
    if s.highres_denoise == 0:
        notices.append("highres_denoise 0: the second pass is skipped (IC-Light always runs it).")
    if relighter is not None and s.sampler in ("eddpm_dpmpp_2m", "eddpm_ddim"):
        mode = relighter.eddpm_scheduler.config.mask_mode
        if mode != "respaced":  # only "respaced" keeps the unmasked alpha-bar at the kept steps
            notices.append(f"{s.sampler} samples with the unmasked training schedule, but this model was trained "
                           f"with mask_mode {mode!r}, whose alpha-bar differs at the kept steps: the eddpm "
                           "sampler uses the trained one.")
    if relighter is not None:
        length = relighter.schedule_length(s.sampler)
        if length is not None and s.steps > length:
            runs = "EDDPM runs its {} learned" if s.sampler in EDDPM_SAMPLERS else "Align Your Steps runs its {}"
            notices.append(f"{runs.format(length)} steps (asked for {s.steps}).")
    return notices


def _check_limits(s: RelightSettings, relighter: Relighter | None, limits: RequestLimits) -> None:
    for name in ("prompt", "added_prompt", "negative_prompt"):
        if len(getattr(s, name)) > limits.max_prompt_chars:
            raise SettingsError(f"{name} has {len(getattr(s, name))} characters; at most {limits.max_prompt_chars} "
                                "are accepted (--max_prompt_chars raises the limit)")
    work, megapixels = request_cost(s, relighter)
    lower = "lower width, height, highres_scale or num_images"
    if megapixels > limits.max_megapixels:
        raise SettingsError(f"num_images x the larger pass's size is {megapixels:.1f} megapixels, more than the "
                            f"{limits.max_megapixels:g} accepted here: {lower} (--max_megapixels raises the limit)")
    if work > limits.max_work:
        raise SettingsError(f"this request costs {work:.0f} megapixel-steps (images x steps x megapixels of each "
                            f"pass), more than the {limits.max_work:g} accepted here: {lower}, or steps "
                            "(--max_work raises the limit)")


def _shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def highres_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: each side times `scale`, rounded to a multiple of 64 (IC-Light)."""
    return tuple(int(round(v * scale / 64.0)) * 64 for v in (width, height))
