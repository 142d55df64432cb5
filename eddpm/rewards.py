"""Rewards for EDDPM's mask policy other than the paper's plain loss: `gap` (the training default, Eq. (R1) of
docs/eddpm-algorithm.md) and `step` (Eq. (R2)).

Why: the plain loss of Algorithm 1 at a kept step t does not depend on where the other kept steps lie, so
REINFORCE on it (Eq. 9) has no reason to favour masks that sample well; under `respaced` it prefers the
high-noise steps, where the eps-prediction loss is lowest. This reward charges each kept step t for the
error of the deterministic (DDIM) step from t to the previous kept step s < t, measured against the forward
process at level s with the same (x_0, eps). With x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t):

    x_s^DDIM - x_s = sqrt(a_s) (x0_hat - x_0) + sqrt(1 - a_s) (eps_hat - eps)
                   = (sqrt(a_s (1 - a_t) / a_t) - sqrt(1 - a_s)) (eps - eps_hat),       a = alpha-bar(m)

so ||x_s^DDIM - x_s||^2 = w(t, s) ||eps - eps_hat||^2, a closed-form weight on the plain loss. s = -1 (no
kept step below t) is the final step to x_0: a_s = 1, w = (1 - a_t) / a_t = 1 / SNR_t. The model itself
still trains on the plain loss; only the policy's reward changes. Meant for mask_mode "respaced", where a
kept step keeps the pretrained noise level and the kept steps can drive any deterministic sampler.

`step` (`--pg_reward step`, respaced only) charges the sampler's own discretisation error instead. The gap
reward's ||eps - eps_hat||^2 is mostly the irreducible spread of eps given x_t, the same for every sampler;
what a K-step sampler adds is the error of replacing the ODE path from t to s by one step. `step_doubling_errors`
estimates it as in adaptive ODE solvers (step doubling): one DDIM step t -> s against two, t -> m -> s, with
m = floor((t + max(s, 0)) / 2) and the model evaluated once more at m (the difference is half the one-step
error for a first-order step). No target x_0 enters: the reward is a property of the model's ODE near the
data, the quantity a schedule search (eddpm/schedule_search.py) measures against a teacher.
"""

from __future__ import annotations

import torch

from eddpm import masks as M


def previous_kept_timesteps(masks: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """s_b = max{i < t_b : m_bi = 1}, or -1 when row b keeps no step below t_b.

    masks: [B, T] of 0/1; timesteps: [B] long. Returns LongTensor [B].
    """
    if masks.dim() != 2 or timesteps.shape != masks.shape[:1]:
        raise ValueError(f"need masks [B, T] and timesteps [B], got {tuple(masks.shape)}, {tuple(timesteps.shape)}")
    steps = torch.arange(masks.shape[-1], device=masks.device).expand_as(masks)  # [B, T]
    last_kept = torch.where(masks > 0, steps, torch.full_like(steps, -1)).cummax(dim=-1).values  # [B, T]
    below = (timesteps.long() - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
    prev = last_kept.gather(1, below).squeeze(1)  # [B], last kept step at or before t-1
    return torch.where(timesteps > 0, prev, torch.full_like(prev, -1))


def ddim_step_weights(alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor) -> torch.Tensor:
    """w(t, s) = (sqrt(a_s (1 - a_t) / a_t) - sqrt(1 - a_s))^2, the DDIM-step error per unit eps error.

    alpha_bar_t, alpha_bar_s: [B] with a_s >= a_t (s below t; a_s = 1 for the step to x_0). Returns [B] float64.
    """
    a_t, a_s = alpha_bar_t.double(), alpha_bar_s.double()
    return ((a_s * (1.0 - a_t) / a_t).sqrt() - (1.0 - a_s).clamp(min=0.0).sqrt()) ** 2


def gap_rewards(
    losses: torch.Tensor, masks: torch.Tensor, timesteps: torch.Tensor, betas: torch.Tensor, mask_mode: str
) -> torch.Tensor:
    """R_b = n_b w(t_b, s_b) L_b: an unbiased estimate of sum_{kept t} w(t, s(t)) E||eps - eps_hat||^2 for mask b.

    t_b is uniform among the n_b kept steps of row b, so n_b times one term estimates the sum over the
    kept steps, a first-order bound on the error a sampler over exactly those steps accumulates.
    losses: [B] plain per-row losses at (t_b, alpha-bar_t(m_b)); masks: [B, T]; timesteps: [B];
    betas: [T] the unmasked schedule. Returns [B] float64, to pass to `MaskPolicy.update` instead of `losses`.
    """
    alphas_cumprod = M.masked_alphas_cumprod(betas, masks, mask_mode)  # [B, T], float64
    prev = previous_kept_timesteps(masks, timesteps)  # [B]
    alpha_bar_t = alphas_cumprod.gather(1, timesteps.long().unsqueeze(1)).squeeze(1)
    alpha_bar_s = alphas_cumprod.gather(1, prev.clamp(min=0).unsqueeze(1)).squeeze(1)
    alpha_bar_s = torch.where(prev >= 0, alpha_bar_s, torch.ones_like(alpha_bar_s))  # step to x_0
    num_kept = masks.to(torch.float64).sum(-1)  # [B]
    return num_kept * ddim_step_weights(alpha_bar_t, alpha_bar_s) * losses.detach().double()


def midpoint_timesteps(timesteps: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """m = floor((t + max(s, 0)) / 2): the step halfway between t and the previous kept step s (or 0)."""
    return torch.div(timesteps.long() + previous.long().clamp(min=0), 2, rounding_mode="floor")


def ddim_to(x: torch.Tensor, alpha_bar_from, eps: torch.Tensor, alpha_bar_to) -> torch.Tensor:
    """DDIM's deterministic update (Song et al. 2021, Eq. 12, sigma = 0) from level alpha_bar_from to alpha_bar_to
    with the eps estimate eps: sqrt(a_to) x0_hat + sqrt(1 - a_to) eps, x0_hat = (x - sqrt(1 - a_from) eps) /
    sqrt(a_from); a_to = 1 gives x0_hat. x, eps: [B, ...]; the levels are floats or [B] tensors (one per row).
    Computed in the widest dtype of the inputs (eddpm/schedule_search.py's search passes float32 and floats)."""
    if torch.is_tensor(alpha_bar_from):
        alpha_bar_from = alpha_bar_from.view((-1,) + (1,) * (x.dim() - 1))
    if torch.is_tensor(alpha_bar_to):
        alpha_bar_to = alpha_bar_to.view((-1,) + (1,) * (x.dim() - 1))
    x0_hat = (x - (1.0 - alpha_bar_from) ** 0.5 * eps) / alpha_bar_from ** 0.5
    return alpha_bar_to ** 0.5 * x0_hat + (1.0 - alpha_bar_to) ** 0.5 * eps


def predicted_eps(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """eps_hat from the model's output: itself (epsilon) or sqrt(a) v + sqrt(1 - a) x_t (v_prediction). Float64."""
    if prediction_type == "epsilon":
        return pred.double()
    if prediction_type != "v_prediction":
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    a = alpha_bar_t.double().view((-1,) + (1,) * (x_t.dim() - 1))
    return a.sqrt() * pred.double() + (1.0 - a).sqrt() * x_t.double()


def step_doubling_errors(
    x_t: torch.Tensor, eps_t: torch.Tensor, x_m: torch.Tensor, eps_m: torch.Tensor,
    alpha_bar_t: torch.Tensor, alpha_bar_m: torch.Tensor, alpha_bar_s: torch.Tensor,
) -> torch.Tensor:
    """||DDIM(x_t: t -> s) - DDIM(x_m: m -> s)||^2 per row (mean over elements), with x_m = DDIM(x_t: t -> m).

    x_t, eps_t: the state at t and the model's eps there; x_m, eps_m: the one-step state at m and the model's
    eps at it; alpha-bars [B], a_s = 1 for the step to x_0. Returns [B] float64 (0 when m = t or m = s)."""
    one = ddim_to(x_t, alpha_bar_t, eps_t, alpha_bar_s)
    two = ddim_to(x_m, alpha_bar_m, eps_m, alpha_bar_s)
    return (one - two).pow(2).flatten(1).mean(1)


def step_rewards(step_errors: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """R_b = n_b e_b: an unbiased estimate of the summed step errors of mask b (t_b is one of its n_b kept
    steps, drawn uniformly), as `gap_rewards`. step_errors [B], masks [B, T]. Returns [B] float64."""
    return masks.to(torch.float64).sum(-1) * step_errors.detach().double()
