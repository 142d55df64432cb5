"""The UNet's side of one EDDPM iteration (Algorithm 1, steps 3 and 5): noising, the target, C_t, the loss.

Pure functions of tensors; `eddpm.training.train_step` composes them with the mask policy
(`eddpm.policy.MaskPolicy`). Equations are those of docs/eddpm-algorithm.md.
"""

from __future__ import annotations

import torch


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_t(m)) x_0 + sqrt(1 - alpha_t(m)) eps, Eq. (6). latents, noise [B, C, H, W]; alpha_bar_t [B]."""
    a = alpha_bar_t.to(torch.float64).view(-1, 1, 1, 1)
    return (a.sqrt() * latents.double() + (1.0 - a).sqrt() * noise.double()).to(latents.dtype)


def loss_weights(alpha_bar_t: torch.Tensor, weighting: str = "none", snr_gamma: float = 5.0) -> torch.Tensor:
    """C_t of Algorithm 1, step 5, with SNR_t = alpha_t(m) / (1 - alpha_t(m)); alpha_bar_t [B] -> [B] float32.

    none           1: the plain eps loss (the paper, IC-Light, SD1.5).
    min_snr        min(SNR_t, gamma) / SNR_t: Min-SNR-gamma for eps prediction (Hang et al. 2023, Eq. 9).
    truncated_snr  max(1, 1 / SNR_t): the x0 error where the noise dominates (SNR_t < 1) and the eps error
                   elsewhere, i.e. the "truncated SNR" loss max(||x0 - x0'||^2 SNR_t, ||x0 - x0'||^2) of
                   Salimans & Ho 2022 (Sec. 4) written for an eps model, since ||x0 - x0'||^2 = ||eps - eps'||^2 / SNR_t.
    The eps loss alone gives the noisiest steps almost no weight on the image (at SD1.5's t = 999 an eps error
    e is an x0 error of e / SNR = 214 e), yet those steps decide the layout and the light; a model trained
    from scratch (the small preset) needs truncated_snr to learn them in minutes.
    """
    if weighting == "none":
        return torch.ones_like(alpha_bar_t, dtype=torch.float32)
    snr = alpha_bar_t.double() / (1.0 - alpha_bar_t.double()).clamp(min=1e-12)
    if weighting == "min_snr":
        return (snr.clamp(max=snr_gamma) / snr.clamp(min=1e-12)).float()
    if weighting == "truncated_snr":
        return (1.0 / snr.clamp(min=1e-12)).clamp(min=1.0).float()
    raise ValueError(f"unknown loss weighting {weighting!r}")


PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' names; IC-Light's UNet predicts epsilon


def diffusion_loss(
    unet,
    latents: torch.Tensor,
    cond_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    prediction_type: str = "epsilon",
    return_prediction: bool = False,
):
    """|| y - y_theta([x_t, c], t) ||^2 per sample, the unweighted loss of Algorithm 1, step 5 (times
    `loss_weights` it is L_b), mean over the 4 target channels and pixels. The target y is eps (IC-Light,
    SD1.5) or v = sqrt(alpha_t(m)) eps - sqrt(1 - alpha_t(m)) x_0 (Salimans & Ho 2022, Sec. 4; diffusers'
    "v_prediction"), both at the masked alpha-bar.

    latents, noise: [B, 4, h, w] clean target latents and eps; cond_latents: [B, 4, h, w] the CLEAN condition
    (never noised); prompt_embeds: [B, 77, D]; timesteps: [B] long; alpha_bar_t: [B] masked alpha-bar at t.
    Returns [B] float32 (differentiable); with return_prediction also x_t and y_theta ([B, 4, h, w], detached).
    `eps_error` turns a v error into the eps error.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    noisy = add_noise(latents, noise, alpha_bar_t)
    model_input = torch.cat([noisy, cond_latents], dim=1)  # [B, 8, h, w]: IC-Light's channel order
    pred = unet(model_input, timesteps, encoder_hidden_states=prompt_embeds).sample  # [B, 4, h, w]
    target = noise.float()
    if prediction_type == "v_prediction":
        a = alpha_bar_t.to(torch.float64).view(-1, 1, 1, 1)
        target = (a.sqrt() * noise.double() - (1.0 - a).sqrt() * latents.double()).float()
    per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))  # [B]
    return (per_sample, noisy.detach(), pred.detach()) if return_prediction else per_sample


def eps_error(losses: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The unweighted loss of `diffusion_loss` as the error of the implied eps prediction, [B].

    A v model implies eps' = sqrt(alpha_t) v' + sqrt(1 - alpha_t) x_t, so eps' - eps = sqrt(alpha_t) (v' - v)
    and ||eps' - eps||^2 = alpha_t ||v' - v||^2. The gap reward (eddpm/rewards.py) is written for eps errors.
    """
    if prediction_type == "epsilon":
        return losses
    if prediction_type == "v_prediction":
        return losses * alpha_bar_t.to(losses.device, losses.dtype)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def loss_by_timestep_bucket(
    losses: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int = 1000, num_buckets: int = 10
) -> dict[str, float]:
    """Mean loss per range of t (keys like 'loss_t000-099'), for the buckets that received samples."""
    width = num_train_timesteps // num_buckets
    bucket = (timesteps.long() // width).clamp(max=num_buckets - 1)
    sums = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, bucket, losses.double())
    counts = torch.bincount(bucket, minlength=num_buckets)
    return {f"loss_t{b * width:03d}-{(b + 1) * width - 1:03d}": float(sums[b] / counts[b])
            for b in range(num_buckets) if counts[b] > 0}
