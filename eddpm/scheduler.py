"""EDDPMScheduler: DDPM sampling over the steps an EDDPM training run learned to keep.

EDDPM (Zhang et al., ICML 2024) learns a keep probability s_t for every one of the T training steps.
After training, the `num_kept_steps` largest scores (always including t = T-1) give a deterministic
mask m, and the model was trained on the masked noise schedule alpha-bar_t(m). This scheduler samples
with exactly that schedule: its `alphas_cumprod` are `eddpm.masks.masked_alphas_cumprod(betas, m, mode)`,
the function training uses, and `step` is the DDPM posterior q(x_s | x_t, x_0) between consecutive
kept steps t > s under that alpha-bar (docs/eddpm-algorithm.md).

Mask modes (`mask_mode`, the three readings of Eq. (6) in eddpm/masks.py). The default is "respaced",
the same as training's default (`mask_mode` in eddpm/config.py), so a scheduler built without naming
the mode samples with the schedule a default training run used:
    respaced  a kept step keeps the unmasked alpha-bar_t; skipped steps' noise goes to the next kept step
    paper     alpha-bar_t(m) = prod_{i<=t} (1 - beta_i m_i), Eq. (6) as written
    rescaled  prod_{i<=t} (1 - beta_i)^(c m_i), with c chosen so that alpha-bar_T(m) is the unmasked value

Without `scores` the scheduler is diffusers' DDPMScheduler with the same config, bit for bit.

Loading the scheduler a train.py run wrote to its output folder:

    from eddpm.scheduler import EDDPMScheduler  # or: from eddpm_scheduler import EDDPMScheduler
    scheduler = EDDPMScheduler.from_pretrained(OUTPUT_DIR, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(..., scheduler=scheduler)
    image = pipe(prompt, num_inference_steps=scheduler.config.num_kept_steps).images[0]

A pipeline saved with this scheduler (`pipe.save_pretrained(DIR)`) loads back with
`StableDiffusionPipeline.from_pretrained(DIR)` once this module is imported: diffusers records the
scheduler as ["eddpm.scheduler", "EDDPMScheduler"] in model_index.json, takes the module from
`sys.modules` (it never imports a module a folder names) and finds the loading method by looking the
names of its loadable base classes up in that module, hence `SchedulerMixin` below.

Design: the class subclasses DDPMScheduler. Without scores every method is DDPMScheduler's own code, so
equivalence is by construction and follows diffusers upgrades. `__init__` repeats DDPMScheduler's
arguments with the same defaults and adds `scores`, `num_kept_steps` and `mask_mode`, so
`save_pretrained` / `from_pretrained` / `from_config` round-trip everything. With scores, four things
change: the schedule arrays (`__init__`), `set_timesteps` (kept steps only, spaced by the config's
`timestep_spacing` and `steps_offset`), `previous_timestep` (the next step of the current schedule) and
the final step of `step` (no noise into x_0, see there). `DDPMScheduler.from_config(scheduler.config)`
gives the unmasked DDPM; diffusers logs the three EDDPM keys as unexpected and keeps them as hidden
config, so converting back restores the mask.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

# Not used here: diffusers' pipeline loader looks this name up in the module model_index.json records for
# the scheduler, and without it `DiffusionPipeline.from_pretrained` finds no loading method.
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: F401

from eddpm.masks import MASK_MODES, mask_from_timesteps, masked_alphas_cumprod
from eddpm.masks import kept_timesteps as select_kept_timesteps

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def spaced_positions(num_kept: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """DDPMScheduler's `timestep_spacing` rule on a chain of K = `num_kept` steps: n positions, descending.

    With K = T this is DDPMScheduler.set_timesteps' list (arXiv 2305.08891, Table 2) wherever that list
    stays inside [0, T-1]; the positions always do:
        linspace  round(linspace(0, K-1, n)), numpy's half-to-even rounding
        leading   i * (K // n) + steps_offset, i = 0 .. n-1; the offset is limited to [0, K-1 - (n-1)(K // n)]
                  (DDPM would return t = T for n = T and steps_offset = 1, a step it cannot run)
        trailing  round(K - i K / n) - 1, the first n values of DDPM's float `arange` (which for some n,
                  e.g. T = 1000 and n = 61, drifts one value past the end and returns t = -1)
    Returns int64 [n], strictly decreasing, within [0, K-1].
    """
    if not 1 <= num_steps <= num_kept:
        raise ValueError(f"num_steps must be in [1, {num_kept}], got {num_steps}")
    if spacing == "linspace":
        positions = np.linspace(0, num_kept - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        ratio = num_kept // num_steps
        offset = min(max(int(steps_offset), 0), num_kept - 1 - (num_steps - 1) * ratio)
        positions = np.arange(num_steps)[::-1] * ratio + offset
    elif spacing == "trailing":
        positions = np.round(np.arange(num_kept, 0, -num_kept / num_steps))[:num_steps] - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return positions.astype(np.int64)


class EDDPMScheduler(DDPMScheduler):
    """DDPM over the kept steps of a learned EDDPM mask; DDPMScheduler itself when `scores` is None.

    Arguments are DDPMScheduler's (same names, same defaults), plus:
        scores (`list[float]`, *optional*): the learned keep probabilities s_t in [0, 1], one per
            training step (length `num_train_timesteps`). Stored in the config as a plain list.
        num_kept_steps (`int`, *optional*): K, how many steps the final mask keeps: the K largest scores,
            ties to the larger t, t = T-1 always included (`eddpm.masks.kept_timesteps`). Defaults to
            round(sum(scores)), at least 1; the resolved value is what the config stores.
        mask_mode (`str`, defaults to `"respaced"`, training's default): which masked alpha-bar the model
            was trained with, one of "respaced", "paper", "rescaled" (`eddpm.masks.masked_alphas_cumprod`).

    With scores:
    - `alphas_cumprod` = masked_alphas_cumprod(base_betas, m, mask_mode) as float32; `alphas` and
      `betas` are the per-step factors of that product (for "paper", betas = base_betas * m), and
      `base_betas` keeps the unmasked schedule of the config.
    - `set_timesteps()` or `set_timesteps(K)` runs all K kept steps in descending order. A smaller
      count n runs the kept steps (ascending) at `spaced_positions(K, n, timestep_spacing, steps_offset)`:
      DDPM's spacing rule applied to the chain of kept steps, so that with every step kept the schedule
      is DDPMScheduler's. ("trailing" always starts at the largest kept step, "linspace" for n >= 2;
      "leading" with n < K starts below it, as DDPM's "leading" starts below T-1.) n > K is a ValueError,
      and so are custom `timesteps=` that are not a descending subset of the kept steps.
    - `step` goes from the current step to the next one of the schedule; the last step goes to x_0
      (alpha-bar = 1), returning the predicted x_0 without added noise.
    - `add_noise` and `get_velocity` use the masked alpha-bar, as in training.

    Pipelines: StableDiffusionPipeline and StableDiffusionImg2ImgPipeline pass `num_inference_steps`
    (default 50) to `set_timesteps`, so call them with `num_inference_steps=scheduler.config.num_kept_steps`
    (or fewer, or `timesteps=` a subset of `scheduler.kept_timesteps.tolist()`). `order` is 1 and
    `init_noise_sigma` is 1: sampling starts from N(0, I) at the first scheduled step, whose alpha-bar is
    `terminal_alpha_bar` when it is the largest kept step (not 0 in "paper" mode with few steps; log it).

    Img2img `strength`: with n scheduled steps the pipeline runs the last int(n * strength) of them and
    noises the input image with `add_noise` at the first of those, i.e. with the masked alpha-bar of that
    kept step. Example with n = K = 10: strength 0.5 runs kept steps 6..10 (indices 5..9 of
    `kept_timesteps`), noising to alpha-bar_{kept[5]}(m); strength 1.0 runs all 10 from the largest kept
    step (the image still leaks through when `terminal_alpha_bar` > 0). A strength below 1/n leaves no
    step, which the pipeline cannot run (it fails inside the UNet, as with any scheduler).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]  # includes "DDPMScheduler"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        scores: list[float] | None = None,
        num_kept_steps: int | None = None,
        mask_mode: str = "respaced",
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.base_betas = self.betas  # the unmasked schedule of the config
        self._kept: torch.Tensor | None = None  # LongTensor [K], descending; None without scores
        if scores is None:
            if num_kept_steps is not None:
                raise ValueError("num_kept_steps needs scores (the learned keep probabilities)")
            return
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")

        keep_probs = _validated_scores(scores, num_train_timesteps)
        if num_kept_steps is None:
            num_kept_steps = max(1, round(float(keep_probs.sum())))
        if isinstance(num_kept_steps, bool) or int(num_kept_steps) != num_kept_steps:
            raise ValueError(f"num_kept_steps must be an integer, got {num_kept_steps!r}")
        num_kept_steps = int(num_kept_steps)
        if not 1 <= num_kept_steps <= num_train_timesteps:
            raise ValueError(f"num_kept_steps must be in [1, {num_train_timesteps}], got {num_kept_steps}")
        # the config holds plain floats and the resolved K, so the JSON file says exactly what runs
        self.register_to_config(scores=keep_probs.tolist(), num_kept_steps=num_kept_steps)

        kept = select_kept_timesteps(keep_probs, num_kept_steps)  # [K], descending
        mask = mask_from_timesteps(kept, num_train_timesteps)  # [T] of 0/1
        alpha_bar = masked_alphas_cumprod(self.base_betas, mask, mask_mode)  # [T], float64
        if not bool(torch.isfinite(alpha_bar).all()):
            raise ValueError(
                f"mask_mode {mask_mode!r} gives a non-finite alpha-bar for this beta schedule "
                "(a zero-terminal-SNR schedule has beta_T = 1, which 'rescaled' cannot rescale)"
            )
        # alpha_t = alpha-bar_t / alpha-bar_{t-1}, so that cumprod(alphas) reproduces alpha-bar
        alphas = alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        self.alphas_cumprod = alpha_bar.to(torch.float32)
        self.alphas = alphas.to(torch.float32)
        self.betas = (1.0 - alphas).to(torch.float32)
        self._kept = kept
        self.timesteps = kept.clone()

    @property
    def kept_timesteps(self) -> torch.Tensor:
        """The steps of the final mask, LongTensor [K] in descending order (all T steps without scores)."""
        if self._kept is None:
            return torch.arange(self.config.num_train_timesteps - 1, -1, -1)
        return self._kept.clone()

    @property
    def terminal_alpha_bar(self) -> float:
        """alpha-bar at the largest kept step: the signal fraction left where sampling starts."""
        return float(self.alphas_cumprod[int(self.kept_timesteps[0])])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        """The sampling schedule: all kept steps, n of them by the config's spacing, or a custom subset.

        Without scores this is DDPMScheduler.set_timesteps. With scores: no arguments or
        `num_inference_steps == num_kept_steps` gives every kept step; a smaller n gives the ascending
        kept steps at `spaced_positions(K, n, timestep_spacing, steps_offset)`; `timesteps` must be a
        descending subset of the kept steps.
        """
        if self._kept is None:
            return super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps`.")
        kept = self._kept
        if timesteps is not None:
            requested = [int(t) for t in timesteps]
            if not requested:
                raise ValueError("`timesteps` is empty")
            if any(b >= a for a, b in zip(requested, requested[1:])):
                raise ValueError(f"`timesteps` must be in descending order, got {requested}")
            not_kept = sorted(set(requested) - set(kept.tolist()), reverse=True)
            if not_kept:
                raise ValueError(
                    f"`timesteps` {not_kept} are not kept steps of this EDDPM mask; "
                    f"choose from scheduler.kept_timesteps = {kept.tolist()}"
                )
            schedule = torch.tensor(requested, dtype=torch.int64)
            self.custom_timesteps = True
        else:
            num_kept = kept.shape[0]
            count = num_kept if num_inference_steps is None else int(num_inference_steps)
            if not 1 <= count <= num_kept:
                raise ValueError(
                    f"`num_inference_steps` must be in [1, {num_kept}] for this EDDPM scheduler, which keeps "
                    f"{num_kept} steps, got {num_inference_steps}; pass "
                    f"num_inference_steps=scheduler.config.num_kept_steps to run them all"
                )
            positions = spaced_positions(num_kept, count, self.config.timestep_spacing, self.config.steps_offset)
            schedule = kept.flip(0)[torch.from_numpy(positions)]  # ascending kept steps at descending positions
            self.num_inference_steps = count
            self.custom_timesteps = False
        self.timesteps = schedule.to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The step after `timestep` in the current schedule, tensor(-1) after the last, as DDPMScheduler's.

        With scores the schedule is `self.timesteps` (the kept steps before any `set_timesteps`), and the
        result is a 0-dim tensor, as DDPMScheduler returns once a schedule is set.
        """
        if self._kept is None:
            return super().previous_timestep(timestep)
        position = (self.timesteps == timestep).nonzero(as_tuple=True)[0]
        if len(position) == 0:
            raise ValueError(
                f"timestep {int(timestep)} is not in the current schedule {self.timesteps.tolist()} "
                "(call set_timesteps first, with kept steps only)"
            )
        index = int(position[0])
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else torch.tensor(-1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """DDPM's step (Ho et al. 2020, Eq. (7)) from `timestep` to the next step of the schedule.

        With scores the last step goes to alpha-bar = 1, where the posterior q(x_0 | x_t, x_0) is a point
        mass at the predicted x_0: it returns that prediction without noise. (DDPMScheduler adds noise
        whenever t > 0, which only coincides with "not the last step" when the chain ends at t = 0; its
        posterior mean there is exactly the predicted x_0 as well. The noise it draws there, from
        `generator`, is discarded.)
        """
        output = super().step(model_output, timestep, sample, generator=generator, return_dict=True)
        if self._kept is not None and int(self.previous_timestep(timestep)) < 0:
            x0 = output.pred_original_sample
            output = DDPMSchedulerOutput(prev_sample=x0, pred_original_sample=x0)
        if not return_dict:
            return (output.prev_sample, output.pred_original_sample)
        return output


def _validated_scores(scores, num_train_timesteps: int) -> torch.Tensor:
    """The keep probabilities as float64 [T], or a ValueError saying what is wrong with them."""
    try:
        keep_probs = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"scores must be a list of {num_train_timesteps} floats: {error}") from error
    if keep_probs.dim() != 1 or keep_probs.shape[0] != num_train_timesteps:
        raise ValueError(
            f"scores has shape {tuple(keep_probs.shape)}, need a flat list of num_train_timesteps = "
            f"{num_train_timesteps} keep probabilities"
        )
    outside = ((keep_probs < 0) | (keep_probs > 1) | ~torch.isfinite(keep_probs)).nonzero().flatten()
    if len(outside):
        first = outside[:5].tolist()
        raise ValueError(
            f"scores must be keep probabilities in [0, 1] (not logits); {len(outside)} are not, "
            f"e.g. t = {first}: {keep_probs[first].tolist()}"
        )
    return keep_probs
