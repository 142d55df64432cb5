"""The mask policy of EDDPM: keep probabilities s, the masks drawn from them, and their update (Algorithm 1).

`MaskPolicy` owns s and its optimiser. `draw` is Algorithm 1, steps 2-4; `update` applies Eqs. (9), (11) and
(12) of docs/eddpm-algorithm.md. Its defaults are the training defaults of eddpm/config.py (a test keeps the
two equal), so a bench that builds `MaskPolicy(betas)` runs what `python train.py` runs.
"""

from __future__ import annotations

import torch

from eddpm import masks as M
from eddpm.rewards import gap_rewards, step_rewards

# what the policy gradient minimises: the plain loss (Eq. 9), or eddpm.rewards' gap or step-doubling error
REWARDS = ("loss", "gap", "step")
OPTIMIZERS = ("sgd", "adam")


class MaskPolicy:
    """The keep probabilities s in [0,1]^T and their optimiser: draws masks and steps, and updates s.

    s starts at 1 (every step kept). After each optimizer step of the UNet, `update` takes the losses and
    masks of the whole global batch (every micro-batch and every process, gathered), so that every process
    computes the same gradient and holds the same s without another collective.

    mask_mode: reading of the masked alpha-bar (eddpm.masks.MASK_MODES); baseline: "loo" or "none";
    lr, optimizer: eta_s of Eq. (11) and "sgd" (the paper's step) or "adam"; max_grad_norm: norm clip of
    grad_s Phi (None: no clip); reward: "loss" (Eq. 9), "gap" or "step" (eddpm/rewards.py; "step" needs
    mask_mode "respaced" and the step errors that eddpm.training.train_step measures).
    """

    def __init__(
        self,
        betas: torch.Tensor,
        mask_mode: str = "respaced",
        baseline: str = "loo",
        lr: float = 0.01,
        optimizer: str = "adam",
        max_grad_norm: float | None = 3.0,
        reward: str = "gap",
    ):
        if mask_mode not in M.MASK_MODES:
            raise ValueError(f"mask_mode must be one of {M.MASK_MODES}, got {mask_mode!r}")
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        if reward == "step" and mask_mode != "respaced":
            raise ValueError(f"reward 'step' measures steps between pretrained noise levels: it needs mask_mode "
                             f"'respaced', got {mask_mode!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.betas = betas.detach().to(torch.float64).cpu()  # [T]
        self.mask_mode, self.baseline, self.max_grad_norm, self.reward = mask_mode, baseline, max_grad_norm, reward
        self.scores = torch.ones_like(self.betas)  # [T], s of Algorithm 1, probabilities
        optimizer_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        self.optimizer = optimizer_cls([self.scores], lr=lr)

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
        self, losses: torch.Tensor, masks: torch.Tensor, keep_fraction: float, timesteps: torch.Tensor | None = None,
        step_errors: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Eqs. (9), (11), (12): s <- proj_S(s - eta_s grad_s Phi) with S = {s in [0,1]^T : sum(s) <= K_e}.

        losses: [N] detached per-sample losses of the global batch; masks: [N, T] their masks; timesteps: [N]
        their t, needed by reward "gap", which replaces each loss by `rewards.gap_rewards` (the error of the
        deterministic step to the previous kept step) and pins s_{T-1} = 1 (sampling starts there), projecting
        the other entries onto K_e - 1 so that sum(s) <= K_e still holds. Reward "step" uses `step_errors` [N]
        (`rewards.step_rewards`) instead of the losses, and pins s_{T-1} the same way.

        With baseline "loo" a step of fewer than 2 rows (the last, short optimizer step of an epoch when a
        micro-batch holds one row) has no baseline: s is left unchanged and score_grad_norm is NaN.
        """
        if self.baseline == "loo" and losses.shape[0] < 2:
            return {"score_grad_norm": float("nan"), "budget": keep_fraction * self.num_train_timesteps,
                    "sum_scores": float(self.scores.sum())}
        rewards = losses.detach().cpu()
        if self.reward == "gap":
            if timesteps is None:
                raise ValueError("reward 'gap' needs the timesteps of the rows")
            rewards = gap_rewards(rewards, masks.cpu(), timesteps.cpu(), self.betas, self.mask_mode)
        elif self.reward == "step":
            if step_errors is None:
                raise ValueError("reward 'step' needs the step errors of the rows")
            rewards = step_rewards(step_errors.cpu(), masks.cpu())
        grad = M.score_gradient(rewards, masks.cpu(), self.scores, baseline=self.baseline)  # [T]
        grad_norm = float(grad.norm())
        if self.max_grad_norm and grad_norm > self.max_grad_norm:
            grad = grad * (self.max_grad_norm / grad_norm)
        self.scores.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        budget = keep_fraction * self.num_train_timesteps  # K_e
        with torch.no_grad():
            if self.reward in ("gap", "step"):
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


class UniformTimesteps:
    """Ordinary DDPM training in MaskPolicy's interface: t uniform over all T steps, the unmasked alpha-bar,
    no mask to learn. The baseline that bench/train_overhead.py and bench/steps_vs_quality.py train against."""

    reward = "loss"

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.detach().to(torch.float64).cpu()  # [T]
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)  # [T]
        self.scores = torch.ones_like(self.betas)

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """t ~ U{0..T-1}; masks are all ones [B, T] (as a view: nothing is allocated per row)."""
        timesteps = torch.randint(self.num_train_timesteps, (batch_size,), generator=generator)
        alpha_bar_t = self.alphas_cumprod[timesteps]
        return {"masks": self.scores.expand(batch_size, -1), "timesteps": timesteps, "alpha_bar_t": alpha_bar_t,
                "alpha_bar_T": self.alphas_cumprod[-1].expand(batch_size)}

    def update(self, losses, masks, keep_fraction, timesteps=None, step_errors=None) -> dict[str, float]:
        return {"score_grad_norm": 0.0}
