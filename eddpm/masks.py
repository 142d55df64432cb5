"""The masking math of EDDPM (Zhang et al., ICML 2024, Algorithm 1), as pure tensor functions.

Symbols (docs/eddpm-algorithm.md, "Notation"):
    T       number of diffusion steps (1000 for SD1.5), indexed t = 0 .. T-1 here
    beta_t  the noise schedule; alpha-bar_t = prod_{i<=t} (1 - beta_i)
    s       keep probabilities ("scores") in [0, 1]^T. Always probabilities, never logits.
    m       a step mask in {0, 1}^T drawn m_t ~ Bernoulli(s_t); m_t = 1 keeps step t
    gamma   the fraction of steps kept; the budget K = gamma * T bounds sum(s)

Everything is vectorised over batch and time; randomness takes an explicit `generator`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MASK_MODES = ("paper", "respaced", "rescaled")
BASELINES = ("none", "loo")


def keep_rate(progress: float, final_rate: float, warmup: float, ramp_end: float = 1.0) -> float:
    """gamma(progress) of Eq. (10): 1 before `warmup`, the cubic ramp of Zhu & Gupta (2017) to `final_rate`
    at `ramp_end`, `final_rate` after.

    gamma = final + (1 - final) * (1 - (p - warmup) / (ramp_end - warmup))^3 for warmup <= p < ramp_end.
    `progress` is optimizer step / total optimizer steps, in [0, 1]; the result is the fraction of
    steps KEPT (the paper's "mask rate").
    """
    if not 0.0 < final_rate <= 1.0:
        raise ValueError(f"final_rate must be in (0, 1], got {final_rate!r}")
    if not 0.0 <= warmup < ramp_end <= 1.0:
        raise ValueError(f"need 0 <= warmup < ramp_end <= 1, got warmup={warmup!r}, ramp_end={ramp_end!r}")
    if not (math.isfinite(progress) and 0.0 <= progress <= 1.0):
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    if progress < warmup:
        return 1.0
    if progress >= ramp_end:
        return float(final_rate)
    remaining = 1.0 - (progress - warmup) / (ramp_end - warmup)
    return float(final_rate + (1.0 - final_rate) * remaining**3)


def sample_masks(
    scores: torch.Tensor, batch_size: int, generator: torch.Generator | None = None, nonempty: bool = False
) -> torch.Tensor:
    """m_b ~ Bernoulli(s), one independent mask per row (Algorithm 1, line "draw masks").

    scores: [T] keep probabilities in [0, 1]. Returns [B, T] of 0/1 in the dtype of `scores`.
    nonempty=True draws m ~ Bernoulli(s) conditioned on m != 0 by redrawing empty rows (rejection
    sampling): training needs at least one kept step per row. `score_gradient` with the leave-one-out
    baseline, fed such masks, is still an unbiased estimate of grad_s E_{m | m != 0}[L]: the
    conditioning adds -grad ln P(m != 0), the same for every row, and the leave-one-out advantages
    sum to zero over the batch, so that term cancels.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [T], got shape {tuple(scores.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if bool(((scores < 0) | (scores > 1) | ~torch.isfinite(scores)).any()):
        raise ValueError("scores must be probabilities in [0, 1] (not logits)")
    probs = scores.expand(batch_size, -1)  # [B, T]
    masks = torch.bernoulli(probs, generator=generator)
    if nonempty:
        if float(torch.prod(1.0 - scores.double())) > 1.0 - 1e-3:
            raise ValueError("scores keep almost no step: a non-empty mask would take too many redraws")
        empty = masks.sum(-1) == 0  # [B]
        while bool(empty.any()):
            masks[empty] = torch.bernoulli(probs[empty], generator=generator)
            empty = masks.sum(-1) == 0
    return masks


def masked_alphas_cumprod(betas: torch.Tensor, masks: torch.Tensor, mode: str = "paper") -> torch.Tensor:
    """alpha-bar_t(m) for masks [..., T] under one of three readings of Eq. (6); float64 [..., T].

    paper:    prod_{i<=t} (1 - beta_i m_i)                                   (Eq. 6 as written)
    respaced: alpha-bar_t at a kept t; at a masked t the value of the last kept step before it, 1 if
              none (skipped steps' noise is carried into the next kept step, as in DDIM respacing)
    rescaled: prod_{i<=t} (1 - beta_i)^(c m_i), c = sum_i ln(1 - beta_i) / sum_i m_i ln(1 - beta_i), so
              alpha-bar_T(m) equals the unmasked alpha-bar_T (c = 0, all ones, for an empty mask)
    All three equal the unmasked cumulative product when every step is kept.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if masks.shape[-1] != betas.shape[-1]:
        raise ValueError(f"masks [..., {masks.shape[-1]}] do not match betas [{betas.shape[-1]}]")
    betas = betas.to(torch.float64)
    m = masks.to(torch.float64)
    if mode == "paper":
        return torch.cumprod(1.0 - betas * m, dim=-1)
    log_alphas = torch.log1p(-betas)  # [T], ln(1 - beta_t) < 0
    if mode == "rescaled":
        kept_log = (m * log_alphas).sum(-1, keepdim=True)  # [..., 1]
        c = torch.where(kept_log < 0, log_alphas.sum() / kept_log.clamp(max=-1e-300), torch.zeros_like(kept_log))
        return torch.exp(torch.cumsum(c * m * log_alphas, dim=-1))
    # respaced: index of the last kept step at or before t, -1 if none
    steps = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    last_kept = torch.where(m > 0, steps, torch.full_like(steps, -1)).cummax(dim=-1).values  # [..., T]
    alphas_cumprod = torch.exp(torch.cumsum(log_alphas, dim=-1)).expand_as(m)
    carried = alphas_cumprod.gather(-1, last_kept.clamp(min=0))
    return torch.where(last_kept >= 0, carried, torch.ones_like(carried))


def sample_timesteps(masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """t_b uniform among the kept steps of row b (Algorithm 1, "sample a step among the unmasked").

    masks: [B, T] of 0/1. Returns LongTensor [B]. A row that keeps no step has no valid timestep:
    that is a ValueError naming the rows (draw masks with `sample_masks(..., nonempty=True)`).
    """
    if masks.dim() != 2:
        raise ValueError(f"masks must be [B, T], got shape {tuple(masks.shape)}")
    counts = masks.sum(-1)  # [B]
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(f"mask rows {empty.tolist()} keep no step, so no timestep can be drawn for them")
    u = torch.rand(masks.shape[0], generator=generator, dtype=torch.float64, device=masks.device)
    rank = (u * counts.double()).floor().long().clamp(max=counts.long() - 1) + 1  # [B], in 1..count
    cum = masks.long().cumsum(-1)  # [B, T], non-decreasing; first index reaching `rank` is kept
    return torch.searchsorted(cum, rank.unsqueeze(-1)).squeeze(-1)


def score_gradient(
    losses: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, baseline: str = "loo", eps: float = 1e-6
) -> torch.Tensor:
    """grad_s Phi of Eq. (9): mean_b (L_b - baseline_b) * (m_b - s) / (s (1 - s)), s clamped to [eps, 1-eps].

    Entries with s exactly 0 or 1 (where the mask always equals s) get exactly 0, so they stay put.

    losses: [B] per-row losses (detached); masks: [B, T]; scores: [T]. Returns [T] in float64.
    baseline "none" is plain REINFORCE; "loo" subtracts the mean loss of the other rows, which does not
    depend on row b's own mask and so keeps the estimate unbiased (needs B >= 2).
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    batch = losses.shape[0]
    if losses.dim() != 1 or masks.shape != (batch, scores.shape[-1]):
        raise ValueError(f"need losses [B], masks [B, T], scores [T]; got {tuple(losses.shape)}, "
                         f"{tuple(masks.shape)}, {tuple(scores.shape)}")
    losses = losses.detach().to(torch.float64)
    if baseline == "loo":
        if batch < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 rows (use baseline='none')")
        advantage = losses - (losses.sum() - losses) / (batch - 1)  # [B]
    else:
        advantage = losses
    s_raw = scores.detach().to(torch.float64)
    s = s_raw.clamp(eps, 1.0 - eps)
    m = masks.to(torch.float64)
    grad_log_p = (m - s) / (s * (1.0 - s))  # [B, T], d/ds ln p(m_b | s)
    # at s = 0 or 1 the mask always equals s and (m - s) = 0 exactly: such entries stay where they are
    grad_log_p = torch.where(m == s_raw, torch.zeros_like(grad_log_p), grad_log_p)
    return (advantage.unsqueeze(-1) * grad_log_p).mean(0)


def _capped_sum(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_t clip(z_t - v, 0, 1) for one or many shifts v [...]; returns [...]."""
    return (z - v.unsqueeze(-1)).clamp(0.0, 1.0).sum(-1)


def _check_projection_args(z: torch.Tensor, budget: float) -> None:
    if z.dim() != 1:
        raise ValueError(f"z must be 1-D [T], got shape {tuple(z.shape)}")
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z has non-finite entries")


def project_capped_simplex(z: torch.Tensor, budget: float) -> torch.Tensor:
    """proj_S(z) of Eq. (12) onto S = {s in [0,1]^T : sum(s) <= K}, exactly, in O(T log T).

    proj = clip(z - v2, 0, 1), v2 = max(0, v1), f(v1) = sum_t clip(z_t - v1, 0, 1) - K = 0. f is
    piecewise linear and non-increasing with breakpoints {z_t - 1} and {z_t}: sorting them and
    accumulating slopes gives f at every breakpoint, and the root by linear interpolation.
    z: [T]; returns [T] with the dtype and device of z. The breakpoint sweep is a small serial job,
    so it runs in float64 numpy, about twice as fast as the same dozen ops through torch's dispatch.
    """
    _check_projection_args(z, budget)
    z64 = z.detach().to("cpu", torch.float64).numpy()
    clipped = np.clip(z64, 0.0, 1.0)
    if clipped.sum() <= budget:  # v2 = 0: the box clip is feasible
        return torch.from_numpy(clipped).to(z)
    T = z64.shape[0]
    points = np.concatenate([z64 - 1.0, z64])  # [2T]
    # passing z_t - 1 the term clip(z_t - v, 0, 1) starts falling with slope -1; passing z_t it stops
    slope_change = np.concatenate([np.full(T, -1.0), np.ones(T)])
    order = np.argsort(points)  # ties only make zero-width segments, so no stable sort is needed
    points, slope_change = points[order], slope_change[order]
    f = np.empty(2 * T)  # f at each sorted breakpoint; f[0] = T - K > 0 since the clip is infeasible
    f[0] = T - budget
    np.cumsum(np.cumsum(slope_change)[:-1] * np.diff(points), out=f[1:])
    f[1:] += T - budget
    k = int(np.argmax(f <= 0))  # first breakpoint at or past the root; f[-1] = -K <= 0
    v1 = points[k - 1] + (points[k] - points[k - 1]) * f[k - 1] / (f[k - 1] - f[k])
    return torch.from_numpy(np.clip(z64 - max(v1, 0.0), 0.0, 1.0)).to(z)


def project_capped_simplex_bisection(
    z: torch.Tensor, budget: float, tol: float = 1e-10, max_iter: int = 200
) -> torch.Tensor:
    """proj_S(z) of Eq. (12) with v1 found by bisection, as in the paper; |v1 error| <= tol.

    f(v) is T - K > 0 at v = min(z) - 1 and -K <= 0 at v = max(z), so the root lies between.
    z: [T]; returns [T] in the dtype of z.
    """
    _check_projection_args(z, budget)
    z64 = z.to(torch.float64)
    clipped = z64.clamp(0.0, 1.0)
    if float(clipped.sum()) <= budget:
        return clipped.to(z.dtype)
    lo, hi = z64.min() - 1.0, z64.max()
    for _ in range(max_iter):
        if float(hi - lo) <= tol:
            break
        mid = 0.5 * (lo + hi)
        if float(_capped_sum(z64, mid)) > budget:
            lo = mid
        else:
            hi = mid
    v1 = 0.5 * (lo + hi)
    return (z64 - v1.clamp(min=0.0)).clamp(0.0, 1.0).to(z.dtype)


def kept_timesteps(scores: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The deterministic final mask: the `num_steps` largest scores, ties to the larger t, always
    including t = T-1 (sampling starts there); LongTensor [num_steps] in descending order."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [T], got shape {tuple(scores.shape)}")
    T = scores.shape[0]
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    ranked = scores.detach().to(torch.float64).flip(0).clone()  # index i is t = T-1-i
    ranked[0] = math.inf
    order = torch.sort(ranked, descending=True, stable=True).indices  # stable: larger t first on ties
    return torch.sort(T - 1 - order[:num_steps], descending=True).values


def mask_from_timesteps(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The 0/1 mask [T] (float64) that keeps exactly `timesteps`."""
    mask = torch.zeros(num_train_timesteps, dtype=torch.float64)
    mask[timesteps.long()] = 1.0
    return mask
