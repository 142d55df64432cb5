"""One optimizer step of EDDPM training (Algorithm 1 of docs/eddpm-algorithm.md), shared by train.py and bench/.

`train_step` runs the micro-batches of one step (gradient accumulation), then the UNet's optimizer step,
the mask-policy update on the losses and masks of the whole global batch, and the EMA. Whatever calls it
(train.py, bench/train_overhead.py, bench/steps_vs_quality.py) therefore trains exactly what a user trains.
`StatsWindow` turns the steps of one logging window into a stats.jsonl row.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from eddpm import rewards as R
from eddpm.losses import diffusion_loss, eps_error, loss_by_timestep_bucket, loss_weights
from eddpm.policy import MaskPolicy


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the mask/noise generator of optimizer step `step` on process `rank`.

    The generator is re-seeded at every step, so that resuming from a checkpoint needs no RNG state."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


@dataclass
class StepSettings:
    """What one step reads from the training config (eddpm/config.py explains each field)."""

    caption_dropout: float = 0.1
    loss_weighting: str = "none"
    snr_gamma: float = 5.0
    prediction_type: str = "epsilon"
    max_grad_norm: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> StepSettings:
        return cls(cfg.caption_dropout, cfg.loss_weighting, cfg.snr_gamma, cfg.prediction_type, cfg.max_grad_norm)


@dataclass
class Trainee:
    """Everything one step updates. `unet`, `optimizer` and `lr_scheduler` are accelerate-prepared."""

    accelerator: Any
    unet: Any
    optimizer: Any
    lr_scheduler: Any
    policy: MaskPolicy
    ema: Any = None  # diffusers EMAModel, or None
    empty_prompt_embeds: torch.Tensor | None = None  # [77, D], what caption dropout substitutes


@dataclass
class StepOutput:
    """One optimizer step. `losses`, `masks`, `timesteps` cover the global batch (gathered, on the CPU):
    what the policy was given, i.e. the plain eps error with reward "gap", else L_b = C_t times the error."""

    finite: bool
    losses: torch.Tensor  # [N]
    masks: torch.Tensor  # [N, T]
    timesteps: torch.Tensor  # [N]
    alpha_bar_T: torch.Tensor  # [n] this process's rows, float64
    step_errors: torch.Tensor | None = None  # [N] with reward "step": eddpm.rewards.step_doubling_errors
    grad_norm: float = math.nan
    score_grad_norm: float = math.nan


def _micro_batch(trainee: Trainee, batch: dict, generator: torch.Generator, settings: StepSettings,
                 num_micro: int):
    """Algorithm 1, steps 2-6 on one micro-batch: draw, noise, loss, backward (scaled by 1/num_micro).

    Returns (finite on every process, reward input [B], step errors [B] or None, draw); backward is skipped
    when not finite. Step errors (reward "step") cost one more forward pass without gradients, after backward."""
    accelerator, policy = trainee.accelerator, trainee.policy
    latents = batch["latents"]  # [B, 4, h, w]
    B, device = latents.shape[0], latents.device
    draw = policy.draw(B, generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    drop = torch.rand(B, generator=generator) < settings.caption_dropout  # [B]
    prompt_embeds = batch["prompt_embeds"].clone()  # [B, 77, D]
    prompt_embeds[drop.to(device)] = trainee.empty_prompt_embeds.to(prompt_embeds)
    alpha_bar_t = draw["alpha_bar_t"].to(device)
    plain, noisy, pred = diffusion_loss(trainee.unet, latents, batch["cond_latents"], prompt_embeds, noise,
                                        draw["timesteps"].to(device), alpha_bar_t,
                                        prediction_type=settings.prediction_type, return_prediction=True)
    losses = plain * loss_weights(draw["alpha_bar_t"], settings.loss_weighting, settings.snr_gamma).to(device)
    loss = losses.mean()  # L_b = C_t ||y - y_theta||^2, mean over the micro-batch
    finite = bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all())
    if finite:
        accelerator.backward(loss / num_micro)
    step_errors = None
    if policy.reward == "step":
        step_errors = _step_errors(trainee, draw, noisy, pred, batch["cond_latents"], prompt_embeds, settings)
    # the policy minimises L_b (Eq. 9); the gap reward weights the plain eps error itself
    reward_input = eps_error(plain, alpha_bar_t, settings.prediction_type) if policy.reward == "gap" else losses
    return finite, reward_input.detach().float(), step_errors, draw


@torch.no_grad()
def _step_errors(trainee: Trainee, draw: dict, noisy: torch.Tensor, pred: torch.Tensor, cond_latents: torch.Tensor,
                 prompt_embeds: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    """eddpm.rewards.step_doubling_errors of each row's step from t to its previous kept step s, through m.

    Respaced only: every level is the pretrained alpha-bar (a_s = 1 for the step to x_0). [B] float32."""
    device = noisy.device
    alphas_cumprod = torch.cumprod(1.0 - trainee.policy.betas, 0)  # [T] float64, the pretrained levels
    t = draw["timesteps"]
    s = R.previous_kept_timesteps(draw["masks"], t)
    m = R.midpoint_timesteps(t, s)
    a_t, a_m = alphas_cumprod[t], alphas_cumprod[m]
    a_s = torch.where(s >= 0, alphas_cumprod[s.clamp(min=0)], torch.ones_like(a_t))
    eps_t = R.predicted_eps(pred, noisy, a_t.to(device), settings.prediction_type)
    x_m = R.ddim_to(noisy, a_t.to(device), eps_t, a_m.to(device))
    model_input = torch.cat([x_m.to(noisy.dtype), cond_latents], dim=1)
    pred_m = trainee.unet(model_input, m.to(device), encoder_hidden_states=prompt_embeds).sample
    eps_m = R.predicted_eps(pred_m, x_m, a_m.to(device), settings.prediction_type)
    return R.step_doubling_errors(noisy, eps_t, x_m, eps_m, a_t.to(device), a_m.to(device), a_s.to(device)).float()


def train_step(trainee: Trainee, micro_batches: list[dict], generator: torch.Generator, keep_fraction: float,
               settings: StepSettings) -> StepOutput:
    """One optimizer step: the micro-batches (gradients synchronised on the last only), clip, optimizer and
    LR step; then, if every loss was finite, the policy update (Eqs. 9, 11, 12) on the gathered global batch
    and the EMA. A non-finite loss on any process skips the whole step (weights, s and EMA unchanged)."""
    accelerator, unet = trainee.accelerator, trainee.unet
    rewards, masks, timesteps, errors, alpha_T, all_finite = [], [], [], [], [], True
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(unet):
            finite, reward_input, step_errors, draw = _micro_batch(trainee, batch, generator, settings,
                                                                   len(micro_batches))
        all_finite &= finite
        device = reward_input.device
        rewards.append(reward_input)
        masks.append(draw["masks"].float().to(device))
        timesteps.append(draw["timesteps"].to(device))
        errors.append(step_errors if step_errors is not None else torch.zeros(0, device=device))
        alpha_T.append(draw["alpha_bar_T"])
    gathered = [accelerator.gather(torch.cat(x)).cpu() for x in (rewards, masks, timesteps)]
    out = StepOutput(all_finite, *gathered, alpha_bar_T=torch.cat(alpha_T))
    if trainee.policy.reward == "step":
        out.step_errors = accelerator.gather(torch.cat(errors)).cpu()
    if all_finite:
        out.grad_norm = float(accelerator.clip_grad_norm_(unet.parameters(), settings.max_grad_norm))
        trainee.optimizer.step()
    trainee.lr_scheduler.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    if all_finite:
        out.score_grad_norm = trainee.policy.update(out.losses, out.masks, keep_fraction, timesteps=out.timesteps,
                                                    step_errors=out.step_errors)["score_grad_norm"]
        if trainee.ema is not None:
            trainee.ema.step(unet.parameters())
    return out


class StatsWindow:
    """The steps of one logging window, summarised as one stats.jsonl row (train.py's docstring lists keys)."""

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = num_train_timesteps
        self.steps: list[StepOutput] = []

    def add(self, out: StepOutput) -> None:
        self.steps.append(out)

    def row(self) -> dict[str, float]:
        finite = [s for s in self.steps if s.finite]
        kept = torch.cat([s.masks.sum(1) for s in self.steps]).double() if self.steps else torch.zeros(0)
        row = {
            "loss": _mean([float(s.losses.mean()) for s in finite]),
            "kept_per_mask": float(kept.mean()) if kept.numel() else math.nan,
            "alpha_bar_T": _mean([float(s.alpha_bar_T.double().mean()) for s in self.steps]),
            "grad_norm": _mean([s.grad_norm for s in finite]),
            "score_grad_norm": self.steps[-1].score_grad_norm if self.steps else math.nan,
        }
        if finite:
            row.update(loss_by_timestep_bucket(torch.cat([s.losses for s in finite]),
                                               torch.cat([s.timesteps for s in finite]), self.num_train_timesteps))
        self.steps = []
        return row


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
