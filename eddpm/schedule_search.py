"""Step schedules chosen for a frozen model, without training: a searched schedule and Align Your Steps.

The searched schedule follows the geometric-optimal-timesteps search (GITS; Chen et al. 2024, as described
in docs/eddpm-algorithm.md, "Related methods a user may compare against", and README "Learned steps
against the best step schedules"):

1. run N teacher trajectories of the frozen model from pure noise with many fine DDIM steps, and keep
   each trajectory's state at every point of a coarse time grid t_0 = T-1 > t_1 > ... > t_{G-2} plus the
   end of sampling (alpha-bar = 1, the clean sample), so G grid points in all;
2. cost matrix C[i, j], i < j: one coarse DDIM step from the teacher's state at t_i straight to t_j,
   compared with the teacher's state at t_j (root mean square over the elements, averaged over the N
   trajectories); one model call per grid point and trajectory gives the whole row i, since a DDIM step
   is closed form once eps(x_{t_i}, t_i) is known;
3. dynamic programming over the grid for the K-edge path from t_0 to the end with the least summed cost;
   its K start points are the K timesteps (the K model calls of a sampler).

The local step is DDIM's (first order; DPM-Solver++ 1 in data prediction is the same update). The
schedule is then run with DPM-Solver++ 2M, whose second-order correction needs the previous point of the
path and so has no cost that depends on one pair (i, j) alone; GITS likewise searches with a one-step
cost and samples with a multistep solver.

Symbols: a_t = alpha-bar_t of the training schedule, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from eddpm.rewards import ddim_to

# Align Your Steps (Sabour et al., 2024): the published 10 SD1.5 timesteps (docs/eddpm-algorithm.md, "Related methods")
from eddpm.samplers import AYS_SD15_TIMESTEPS

# eps_fn(x [N, ...], t) -> eps [N, ...]: the frozen model as a noise predictor at integer step t.
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
END = -1  # the grid point after the last step: the clean sample, alpha-bar = 1



# ---- Align Your Steps at other step counts ----------------------------------------------------------------

def sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - a_t) / a_t), the noise level of x_t / sqrt(a_t); float64 [T]."""
    a = alphas_cumprod.to(torch.float64).numpy()
    return np.sqrt((1.0 - a) / a)


def loglinear_interp(values: Sequence[float], num: int) -> np.ndarray:
    """Decreasing positive `values` resampled to `num` points, linear in log(value) against an evenly
    spaced position in [0, 1] (the AYS authors' rule for step counts other than the published one)."""
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])  # increasing
    xs = np.linspace(0.0, 1.0, len(ys))
    return np.exp(np.interp(np.linspace(0.0, 1.0, num), xs, ys))[::-1].copy()


def sigma_to_timestep(sigma: np.ndarray, alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The (fractional) step t with sigma_t = sigma, by linear interpolation in log sigma (as diffusers'
    `_sigma_to_t`), rounded to the nearest integer step; int64, same shape as `sigma`."""
    log_sigmas = np.log(sigmas(alphas_cumprod))  # increasing in t
    t = np.interp(np.log(np.asarray(sigma, dtype=np.float64)), log_sigmas, np.arange(len(log_sigmas)))
    return np.rint(t).astype(np.int64)


def ays_timesteps(num_steps: int, alphas_cumprod: torch.Tensor,
                  published: Sequence[int] = AYS_SD15_TIMESTEPS) -> list[int]:
    """Align Your Steps with `num_steps` steps, descending.

    The published 10 steps are 11 noise levels sigma(999), ..., sigma(24), sigma(0) (the last is where
    sampling ends); they are log-linearly interpolated to num_steps + 1 levels (`loglinear_interp`),
    mapped back to steps (`sigma_to_timestep`) and the last level dropped. With num_steps = 10 this is the
    published list. Duplicates after rounding (only for very many steps) are a ValueError.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    levels = sigmas(alphas_cumprod)[list(published) + [0]]
    steps = sigma_to_timestep(loglinear_interp(levels, num_steps + 1), alphas_cumprod)[:-1]
    if np.any(np.diff(steps) >= 0):
        raise ValueError(f"{num_steps} interpolated AYS steps collide after rounding: {steps.tolist()}")
    return [int(t) for t in steps]


def uniform_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced ("trailing") steps from T-1 down: round(T - i T / n) - 1, i = 0 .. n-1."""
    return [int(t) for t in np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps))[:num_steps] - 1]


# ---- the search ------------------------------------------------------------------------------------------

def alpha_bar_at(alphas_cumprod: torch.Tensor, t: int) -> float:
    """a_t in float64, with a_END = 1 (the clean sample)."""
    return 1.0 if t == END else float(alphas_cumprod[t].to(torch.float64))


def teacher_grid(teacher_steps: int, grid_stride: int, num_train_timesteps: int = 1000) -> tuple[list[int], list[int]]:
    """(fine teacher steps, coarse grid): the teacher runs `uniform_timesteps(teacher_steps)`; the grid is
    every `grid_stride`-th of them from T-1 on, plus END. Both descending; the grid is a subset of the fine steps."""
    fine = uniform_timesteps(teacher_steps, num_train_timesteps)
    return fine, fine[::grid_stride] + [END]


@torch.no_grad()
def teacher_states(eps_fn: EpsFn, x_start: torch.Tensor, fine: Sequence[int], grid: Sequence[int],
                   alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDIM from x_start (pure noise at fine[0]) through every fine step to the clean sample; the states at
    the grid's points. x_start [N, ...] -> [G, N, ...] in float64 (states[g] at grid[g])."""
    wanted = set(grid)
    if not wanted <= set(fine) | {END} or fine[0] != grid[0]:
        raise ValueError("the grid must be a subset of the fine steps and start at the first of them")
    x = x_start.to(torch.float64)
    states = {fine[0]: x}
    for t, t_next in zip(fine, list(fine[1:]) + [END]):
        eps = eps_fn(x.to(x_start.dtype), t).to(torch.float64)
        x = ddim_to(x, alpha_bar_at(alphas_cumprod, t), eps, alpha_bar_at(alphas_cumprod, t_next))
        if t_next in wanted:
            states[t_next] = x
    return torch.stack([states[t] for t in grid])


@torch.no_grad()
def cost_matrix(eps_fn: EpsFn, states: torch.Tensor, grid: Sequence[int], alphas_cumprod: torch.Tensor,
                model_dtype: torch.dtype = torch.float32) -> np.ndarray:
    """C[i, j] = mean over trajectories n of RMS(DDIM(states[i, n], t_i -> t_j) - states[j, n]) for i < j,
    +inf elsewhere. states: [G, N, ...] (teacher_states), float64; eps_fn sees them in `model_dtype`.
    Returns float64 [G, G]; G - 1 model calls."""
    G = len(grid)
    cost = np.full((G, G), np.inf)
    for i in range(G - 1):
        x = states[i]
        eps = eps_fn(x.to(model_dtype), grid[i]).to(torch.float64)
        a_i = alpha_bar_at(alphas_cumprod, grid[i])
        for j in range(i + 1, G):
            diff = ddim_to(x, a_i, eps, alpha_bar_at(alphas_cumprod, grid[j])) - states[j]
            cost[i, j] = float(diff.flatten(1).pow(2).mean(1).sqrt().mean())
    return cost


def best_path(cost: np.ndarray, num_steps: int) -> tuple[list[int], float]:
    """The path 0 = p_0 < p_1 < ... < p_K = G-1 of K = `num_steps` edges minimising sum_k C[p_k, p_{k+1}],
    by dynamic programming over (edges used, node); ties go to the smaller predecessor index.
    cost: [G, G] with +inf where an edge is not allowed. Returns (the K + 1 node indices, the summed cost)."""
    G = cost.shape[0]
    if not 1 <= num_steps <= G - 1:
        raise ValueError(f"num_steps must be in [1, {G - 1}] for a grid of {G} points, got {num_steps}")
    best = np.full(G, np.inf)  # best[j]: least cost of reaching node j with k edges
    best[0] = 0.0
    parents = []
    for _ in range(num_steps):
        totals = best[:, None] + cost  # [i, j]: reach i, then the edge i -> j
        parents.append(np.argmin(totals, axis=0))  # argmin returns the first (smallest i) on ties
        best = totals[parents[-1], np.arange(G)]
    if not np.isfinite(best[G - 1]):
        raise ValueError(f"no path of {num_steps} finite-cost edges reaches the end of the grid")
    path = [G - 1]
    for parent in reversed(parents):
        path.append(int(parent[path[-1]]))
    return path[::-1], float(best[G - 1])


def path_cost(cost: np.ndarray, path: Sequence[int]) -> float:
    """sum_k C[p_k, p_{k+1}] of a path of grid indices."""
    return float(sum(cost[a, b] for a, b in zip(path, path[1:])))


def brute_force_path(cost: np.ndarray, num_steps: int) -> tuple[list[int], float]:
    """`best_path` by enumerating every path (for tests and small grids only)."""
    G = cost.shape[0]
    paths = ([0, *inner, G - 1] for inner in itertools.combinations(range(1, G - 1), num_steps - 1))
    return min(((p, path_cost(cost, p)) for p in paths), key=lambda pc: pc[1])


def snap_to_grid(timesteps: Sequence[int], grid: Sequence[int]) -> list[int]:
    """Grid indices of a schedule (each step to the nearest grid time, then END), for costing a schedule
    that is not on the grid, e.g. uniform steps."""
    times = np.asarray([t for t in grid if t != END])
    return [int(np.argmin(np.abs(times - t))) for t in timesteps] + [len(grid) - 1]


@dataclass
class SearchResult:
    """A searched schedule and what it took: the inputs of the search, so a report can state them."""

    timesteps: list[int]  # descending, K of them, on the grid
    cost: float  # summed cost of the path
    grid: list[int]  # the coarse grid, END last
    cost_matrix: np.ndarray = field(repr=False)  # [G, G]
    num_trajectories: int = 0
    teacher_steps: int = 0
    teacher_seconds: float = 0.0
    cost_seconds: float = 0.0
    model_calls: int = 0  # eps_fn calls (each on all N trajectories)
    cpu_seconds: float = 0.0  # process CPU time of teacher and costs (wall time is inflated on a shared machine)

    def describe(self) -> dict:
        """JSON-ready summary (no matrix)."""
        return {"timesteps": self.timesteps, "cost": self.cost, "grid_points": len(self.grid),
                "num_trajectories": self.num_trajectories, "teacher": f"DDIM, {self.teacher_steps} steps",
                "local_step": "DDIM", "teacher_seconds": round(self.teacher_seconds, 2),
                "cost_seconds": round(self.cost_seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "model_calls": self.model_calls}


def search_schedule(eps_fn: EpsFn, x_start: torch.Tensor, num_steps: int | Sequence[int], alphas_cumprod: torch.Tensor,
                    teacher_steps: int = 250, grid_stride: int = 5) -> dict[int, SearchResult]:
    """The searched schedules for each K in `num_steps` (one teacher run and cost matrix serve all K).

    x_start [N, ...]: the trajectories' initial noise (N(0, I), so the teacher starts at t = T-1 like
    the samplers). Cost: teacher_steps + G - 1 calls of eps_fn on N rows.
    """
    counts = [num_steps] if isinstance(num_steps, int) else list(num_steps)
    fine, grid = teacher_grid(teacher_steps, grid_stride, len(alphas_cumprod))
    cpu_start, start = time.process_time(), time.perf_counter()
    states = teacher_states(eps_fn, x_start, fine, grid, alphas_cumprod)
    teacher_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cost = cost_matrix(eps_fn, states, grid, alphas_cumprod, x_start.dtype)
    cost_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    results = {}
    for k in counts:
        path, total = best_path(cost, k)
        results[k] = SearchResult([grid[p] for p in path[:-1]], total, list(grid), cost, x_start.shape[0],
                                  teacher_steps, teacher_seconds, cost_seconds, len(fine) + len(grid) - 1,
                                  cpu_seconds)
    return results


# ---- the frozen model as eps_fn ---------------------------------------------------------------------------

def guided_eps_fn(cond_unet, cond_latents: torch.Tensor, text: torch.Tensor, negative_text: torch.Tensor,
                  guidance_scale: float, prediction_type: str, alphas_cumprod: torch.Tensor) -> EpsFn:
    """An IC-Light-style conditioned UNet (eddpm/conditioned_unet.py) with classifier-free guidance as eps_fn.

    cond_latents [N, 4, h, w], text / negative_text [N, L, D]: one condition and prompt per trajectory.
    Guidance combines the raw outputs as the pipelines do (uncond + w (cond - uncond)); for v-prediction the
    result becomes eps = sqrt(a_t) v + sqrt(1 - a_t) x_t, which is the same as guiding eps (the map is affine
    in the output with the same x_t term in both halves).
    """
    embeds = torch.cat([negative_text, text])  # [2N, L, D], the pipelines' order

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        dtype = cond_unet.dtype
        with cond_unet.condition(cond_latents.to(dtype)):
            out = cond_unet(torch.cat([x, x]).to(dtype), torch.tensor(t), encoder_hidden_states=embeds.to(dtype)).sample
        uncond, cond = out.float().chunk(2)
        pred = uncond + guidance_scale * (cond - uncond) if guidance_scale > 1 else cond
        if prediction_type == "epsilon":
            return pred
        if prediction_type == "v_prediction":
            a = float(alphas_cumprod[t])
            return a ** 0.5 * pred + (1 - a) ** 0.5 * x.float()
        raise ValueError(f"prediction_type {prediction_type!r} is not supported")

    return eps_fn


def relighter_eps_fn(relighter, conditions: Sequence[np.ndarray], prompts: Sequence[str], guidance_scale: float,
                     negative_prompt: str = "") -> tuple[EpsFn, tuple[int, int, int]]:
    """eps_fn of a Relighter (eddpm/relighting.py) for N relights: conditions uint8 [H, W, 3] (prepared, on
    gray), one prompt each, all the same size. Returns (eps_fn, latent shape [4, H/8, W/8]); no added prompt."""
    from eddpm.conditioning import encode_images
    from eddpm.prompts import encode_prompt_pair

    if len({c.shape for c in conditions}) != 1:
        raise ValueError("all conditions of one search must have the same size")
    device, dtype = relighter.device, relighter.dtype
    cond_latents = encode_images(relighter.vae, np.stack(conditions)).to(device, dtype)  # [N, 4, h, w]
    pairs = [encode_prompt_pair(relighter.tokenizer, relighter.text_encoder, p, negative_prompt) for p in prompts]
    text = torch.cat([c for c, _ in pairs]).to(device)
    negative = torch.cat([u for _, u in pairs]).to(device)
    fn = guided_eps_fn(relighter.cond_unet, cond_latents, text, negative, guidance_scale,
                       relighter.scheduler_config.get("prediction_type", "epsilon"),
                       training_alphas_cumprod(relighter.eddpm_scheduler))
    return fn, tuple(cond_latents.shape[1:])


def training_alphas_cumprod(scheduler) -> torch.Tensor:
    """alpha-bar of the noise levels the UNet was trained on: an EDDPMScheduler's unmasked schedule
    (cumprod(1 - base_betas)), any other diffusers scheduler's alphas_cumprod. float64 [T]."""
    betas = getattr(scheduler, "base_betas", None)
    if betas is None:
        return scheduler.alphas_cumprod.to(torch.float64)
    return torch.cumprod(1.0 - betas.to(torch.float64), 0)


def searched_scheduler(learned, timesteps: Sequence[int]):
    """A searched schedule as an EDDPMScheduler: the training schedule of `learned` (its betas, prediction
    type) with keep probabilities 1 at `timesteps` and 0 elsewhere, so `kept_timesteps` is that schedule and
    every fixed-schedule sampler runs it (eddpm/samplers.py: "eddpm_dpmpp_2m" for the DPM-Solver++ 2M it was
    chosen for)."""
    from eddpm.scheduler import EDDPMScheduler

    T = learned.config.num_train_timesteps
    scores = [0.0] * T
    for t in timesteps:
        scores[int(t)] = 1.0
    if scores[T - 1] != 1.0 or len(set(int(t) for t in timesteps)) != len(timesteps):
        raise ValueError(f"a schedule must be distinct steps starting at t = {T - 1}, got {list(timesteps)}")
    return EDDPMScheduler.from_config(learned.config, scores=scores, num_kept_steps=len(timesteps),
                                      mask_mode="respaced")
