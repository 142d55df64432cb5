"""The two updates of one EDDPM iteration (Algorithm 1): the UNet's diffusion loss and the mask-policy step.

`diffusion_loss` is the per-sample loss of Algorithm 1, step 5; `MaskPolicy` owns the keep probabilities s,
draws masks and timesteps (steps 2-4) and applies Eqs. (9), (11), (12). Both are used by train.py and by
bench/, and each is testable alone.
"""

from __future__ import annotations

import torch

from eddpm import masks as M
from eddpm.rewards import gap_rewards

REWARDS = ("loss", "gap")  # what the policy gradient minimises: the plain loss (Eq. 9) or eddpm.rewards'


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
    weights: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """L_b = C_t || y - y_theta([x_t, c], t) ||^2 per sample, mean over the 4 target channels and pixels, where
    the target y is eps (IC-Light, SD1.5) or v = sqrt(alpha_t(m)) eps - sqrt(1 - alpha_t(m)) x_0 (Salimans &
    Ho 2022, Sec. 4; diffusers' "v_prediction"), both at the masked alpha-bar.

    latents, noise: [B, 4, h, w] clean target latents and eps; cond_latents: [B, 4, h, w] the CLEAN condition
    (never noised); prompt_embeds: [B, 77, D]; timesteps: [B] long; alpha_bar_t: [B] masked alpha-bar at t.
    Returns [B] float32 (differentiable). `eps_error` turns a v error into the eps error.
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
    return per_sample if weights is None else per_sample * weights


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


class MaskPolicy:
    """The keep probabilities s in [0,1]^T and their optimiser: draws masks and steps, and updates s.

    s starts at 1 (every step kept). After each optimizer step of the UNet, `update` takes the losses and
    masks of the whole global batch (every micro-batch and every process, gathered), so that every process
    computes the same gradient and holds the same s without another collective.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        mask_mode: str = "respaced",
        baseline: str = "loo",
        lr: float = 0.5,
        optimizer: str = "sgd",
        max_grad_norm: float | None = 3.0,
        reward: str = "loss",
    ):
        if mask_mode not in M.MASK_MODES:
            raise ValueError(f"mask_mode must be one of {M.MASK_MODES}, got {mask_mode!r}")
        self.betas = betas.detach().to(torch.float64).cpu()  # [T]
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        self.mask_mode, self.baseline, self.max_grad_norm, self.reward = mask_mode, baseline, max_grad_norm, reward
        self.scores = torch.ones_like(self.betas)  # [T], s of Algorithm 1, probabilities
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD([self.scores], lr=lr)
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam([self.scores], lr=lr)
        else:
            raise ValueError(f"optimizer must be sgd or adam, got {optimizer!r}")

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Algorithm 1, steps 2-4: masks m ~ Bernoulli(s) (non-empty), alpha_t(m), t uniform among kept steps.

        Returns masks [B, T], timesteps [B] long, alpha_bar_t [B] and alpha_bar_T [B] (float64, on the CPU).
        """
        masks = M.sample_masks(self.scores, batch_size, generator=generator, nonempty=True)
        alphas_cumprod = M.masked_alphas_cumprod(self.betas, masks, self.mask_mode)  # [B, T]
        timesteps = M.sample_timesteps(masks, generator=generator)
        alpha_bar_t = alphas_cumprod.gather(1, timesteps.unsqueeze(1)).squeeze(1)
        return {"masks": masks, "timesteps": timesteps, "alpha_bar_t": alpha_bar_t,
                "alpha_bar_T": alphas_cumprod[:, -1]}

    def update(
        self, losses: torch.Tensor, masks: torch.Tensor, keep_fraction: float, timesteps: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Eqs. (9), (11), (12): s <- proj_S(s - eta_s grad_s Phi) with S = {s in [0,1]^T : sum(s) <= K_e}.

        losses: [N] detached per-sample losses of the global batch; masks: [N, T] their masks; timesteps: [N]
        their t, needed by reward "gap", which replaces each loss by `rewards.gap_rewards` (the error of the
        deterministic step to the previous kept step) and pins s_{T-1} = 1, projecting the other entries onto
        K_e - 1 so that sum(s) <= K_e still holds.
        """
        rewards = losses.cpu()
        if self.reward == "gap":
            if timesteps is None:
                raise ValueError("reward 'gap' needs the timesteps of the rows")
            rewards = gap_rewards(rewards, masks.cpu(), timesteps.cpu(), self.betas, self.mask_mode)
        grad = M.score_gradient(rewards, masks.cpu(), self.scores, baseline=self.baseline)  # [T]
        grad_norm = float(grad.norm())
        if self.max_grad_norm and grad_norm > self.max_grad_norm:
            grad = grad * (self.max_grad_norm / grad_norm)
        self.scores.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        budget = keep_fraction * self.num_train_timesteps  # K_e
        with torch.no_grad():
            if self.reward == "gap":  # t = T-1 always kept (sampling starts there), inside the budget
                self.scores[:-1] = M.project_capped_simplex(self.scores[:-1], max(budget - 1.0, 0.0))
                self.scores[-1] = 1.0
            else:
                self.scores.copy_(M.project_capped_simplex(self.scores, budget))
        return {"score_grad_norm": grad_norm, "budget": budget, "sum_scores": float(self.scores.sum())}

    def state_dict(self) -> dict:
        return {"scores": self.scores.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["scores"].shape != self.scores.shape:
            raise ValueError(f"scores of shape {tuple(state['scores'].shape)} do not match T={self.scores.shape[0]}")
        with torch.no_grad():
            self.scores.copy_(state["scores"].to(torch.float64))
        self.optimizer.load_state_dict(state["optimizer"])


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
