"""The relighter's samplers: each key of `eddpm.relighting.SAMPLERS` as a diffusers scheduler, and the
fixed timesteps of the samplers that run a given schedule instead of `num_inference_steps`.

Fixed-schedule samplers (the learned EDDPM steps, Align Your Steps) are run through the pipelines'
`timesteps=` argument. In an img2img pass (strength < 1) diffusers' StableDiffusionImg2ImgPipeline
schedules all n given timesteps and runs the last int(n * strength) of them, noising the input to the
first of those (`retrieve_timesteps`, then `get_timesteps`), so a pass with a fixed schedule runs its
tail, as an img2img pass does with any other scheduler.

Imports diffusers at module level: `eddpm.relighting` imports this module only when it builds a scheduler.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from eddpm import iclight
from eddpm.scheduler import spaced_positions

# Align Your Steps (Sabour et al., 2024), the 10 timesteps optimised for SD1.5; the same list as
# diffusers' `AysSchedules["StableDiffusionTimesteps"]` (tests/test_demo.py compares them).
AYS_SD15_TIMESTEPS = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)
# The samplers that run the steps a train.py output folder learned (eddpm.relighting.EDDPM_SAMPLERS
# names the same keys for the UI; tests/test_demo.py checks that they agree).
LEARNED_STEP_SAMPLERS = ("eddpm", "eddpm_dpmpp_2m", "eddpm_ddim")
# What the other samplers take from the training schedule: its betas and prediction type, nothing EDDPM-specific.
_SHARED_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "steps_offset")


class CustomTimestepsDDIMScheduler(DDIMScheduler):
    """DDIM (eta = 0) that also accepts `set_timesteps(timesteps=[...])`, a descending list of steps.

    diffusers' DDIMScheduler assumes evenly spaced steps (it steps from t to t - T // n). With custom
    timesteps this class steps from each timestep to the next one of the list, and from the last to
    `final_alpha_cumprod`, with DDIM's deterministic update (Song et al. 2021, Eq. 12, sigma = 0):
    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_hat. Without custom timesteps it is DDIMScheduler.
    """

    custom_timesteps = False

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None):
        if timesteps is None:
            self.custom_timesteps = False
            return super().set_timesteps(num_inference_steps, device=device)
        if num_inference_steps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps`.")
        steps = [int(t) for t in timesteps]
        if not steps or any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"`timesteps` must be a non-empty descending list, got {steps}")
        if not 0 <= steps[-1] <= steps[0] < self.config.num_train_timesteps:
            raise ValueError(f"`timesteps` must lie in [0, {self.config.num_train_timesteps - 1}], got {steps}")
        self.custom_timesteps = True
        self.num_inference_steps = len(steps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64, device=device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The step after `timestep` in the current list, -1 after the last."""
        schedule = self.timesteps.tolist()
        index = schedule.index(int(timestep))
        return schedule[index + 1] if index + 1 < len(schedule) else -1

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        if not self.custom_timesteps:
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict)
        if eta != 0.0 or self.config.thresholding or self.config.clip_sample:
            raise ValueError("custom timesteps support only eta = 0 without clipping or thresholding")
        prev = self.previous_timestep(timestep)
        alpha_prod_t = self.alphas_cumprod[int(timestep)]
        alpha_prod_t_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            pred_x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            pred_eps = model_output
        elif kind == "sample":
            pred_x0 = model_output
            pred_eps = (sample - alpha_prod_t ** 0.5 * pred_x0) / beta_prod_t ** 0.5
        elif kind == "v_prediction":
            pred_x0 = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
            pred_eps = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
        else:
            raise ValueError(f"prediction_type {kind!r} is not supported")
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_x0 + (1 - alpha_prod_t_prev) ** 0.5 * pred_eps
        if not return_dict:
            return prev_sample, pred_x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)


def make_scheduler(sampler: str, scheduler_config: dict, eddpm_scheduler: Any = None):
    """A fresh scheduler (schedulers are stateful) for a sampler key.

    scheduler_config: the schedule the UNet was trained on (its betas are what every sampler but
    IC-Light's demo sampler uses); eddpm_scheduler: the EDDPMScheduler of a train.py output folder.
    """
    base = {k: scheduler_config[k] for k in _SHARED_KEYS if k in scheduler_config}
    if sampler in LEARNED_STEP_SAMPLERS:
        learned = _learned(sampler, eddpm_scheduler)
        if sampler == "eddpm":
            return learned.__class__.from_config(learned.config)
        if sampler == "eddpm_ddim":
            return CustomTimestepsDDIMScheduler.from_config(base, clip_sample=False, set_alpha_to_one=False)
    if sampler in ("eddpm_dpmpp_2m", "ays_dpmpp_2m"):  # DPM-Solver++ 2M on the given timesteps
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "dpmpp_2m_sde_karras_iclight":  # exactly the scheduler IC-Light's demo builds
        return DPMSolverMultistepScheduler(**iclight.ICLIGHT_DEMO_SAMPLER_CONFIG)
    if sampler == "dpmpp_2m_sde_karras":
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="sde-dpmsolver++",
                                                       use_karras_sigmas=True)
    if sampler == "ddim":
        return DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=False,
                                         set_alpha_to_one=False)
    if sampler == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(base, timestep_spacing="trailing")
    raise ValueError(f"unknown sampler {sampler!r}")


def schedule_length(sampler: str, eddpm_scheduler: Any = None) -> int | None:
    """How many steps a fixed-schedule sampler has (the learned K, Align Your Steps' 10); None for the others."""
    if sampler in LEARNED_STEP_SAMPLERS:
        return len(_learned(sampler, eddpm_scheduler).kept_timesteps)
    if sampler == "ays_dpmpp_2m":
        return len(AYS_SD15_TIMESTEPS)
    return None


def fixed_timesteps(sampler: str, num_steps: int, eddpm_scheduler: Any = None) -> list[int] | None:
    """The descending timesteps a fixed-schedule sampler runs with `num_steps` of its steps (None for the others).

    The EDDPM samplers all take the EDDPM scheduler's own choice (`EDDPMScheduler.set_timesteps(num_steps)`:
    every kept step, or its spacing rule on them), so the three run the same steps. Align Your Steps
    takes `spaced_positions(10, num_steps, "trailing")` of its list: all 10, or a subset that starts at 999.
    """
    length = schedule_length(sampler, eddpm_scheduler)
    if length is None:
        return None
    if not 1 <= num_steps <= length:
        raise ValueError(f"the {sampler} sampler runs 1 to {length} steps, got {num_steps}")
    if sampler in LEARNED_STEP_SAMPLERS:
        learned = eddpm_scheduler.__class__.from_config(eddpm_scheduler.config)  # a fresh one: set_timesteps mutates
        learned.set_timesteps(num_steps)
        return [int(t) for t in learned.timesteps]
    ascending = AYS_SD15_TIMESTEPS[::-1]
    return [ascending[int(i)] for i in spaced_positions(length, num_steps, "trailing")]


def _learned(sampler: str, eddpm_scheduler: Any):
    if eddpm_scheduler is None:
        raise ValueError(f"the {sampler} sampler needs a trained output folder (--checkpoint DIR)")
    return eddpm_scheduler
