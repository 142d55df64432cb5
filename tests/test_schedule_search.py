"""eddpm/schedule_search.py: the dynamic programme against hand optima and brute force, the teacher and the
search on a Gaussian data distribution whose eps is known exactly, and Align Your Steps' interpolation."""

import numpy as np
import pytest
import torch

from eddpm.schedule_search import (
    END,
    best_path,
    brute_force_path,
    cost_matrix,
    path_cost,
    search_schedule,
    searched_scheduler,
    snap_to_grid,
    teacher_grid,
    teacher_states,
    uniform_timesteps,
)

SD15_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
ALPHAS_CUMPROD = torch.cumprod(1 - SD15_BETAS, 0)


def test_best_path_on_a_hand_cost_matrix():
    inf = np.inf
    # 5 nodes. Two edges: 0-2-4 costs 1 + 1 = 2, 0-1-4 costs 0.5 + 5, 0-3-4 costs 3 + 0.1. One edge: 0-4 costs 4.
    # Three edges: 0-1-2-4 = 0.5 + 0.2 + 1 = 1.7 beats 0-2-3-4 = 1 + 1 + 0.1 and 0-1-3-4 = 0.5 + 9 + 0.1.
    cost = np.array([
        [inf, 0.5, 1.0, 3.0, 4.0],
        [inf, inf, 0.2, 9.0, 5.0],
        [inf, inf, inf, 1.0, 1.0],
        [inf, inf, inf, inf, 0.1],
        [inf, inf, inf, inf, inf],
    ])
    assert best_path(cost, 1) == ([0, 4], 4.0)
    assert best_path(cost, 2) == ([0, 2, 4], 2.0)
    path, total = best_path(cost, 3)
    assert path == [0, 1, 2, 4] and total == pytest.approx(1.7)
    assert best_path(cost, 4)[0] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        best_path(cost, 5)


@pytest.mark.parametrize("seed", range(5))
def test_best_path_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    G = 9
    cost = np.where(np.triu(np.ones((G, G)), 1) > 0, rng.exponential(size=(G, G)), np.inf)
    for k in range(1, G):
        path, total = best_path(cost, k)
        ref_path, ref_total = brute_force_path(cost, k)
        assert total == pytest.approx(ref_total, rel=1e-12), (k, path, ref_path)
        assert path[0] == 0 and path[-1] == G - 1 and len(path) == k + 1
        assert path_cost(cost, path) == pytest.approx(total)


def gaussian_eps_fn(mu: torch.Tensor, s: float):
    """Exact E[eps | x_t] for data x_0 ~ N(mu, s^2 I): x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I) and eps, x_t
    are jointly Gaussian with Cov(eps, x_t) = sqrt(1 - a) I."""

    def eps_fn(x, t):
        a = float(ALPHAS_CUMPROD[t])
        return ((1 - a) ** 0.5 * (x.double() - a ** 0.5 * mu) / (a * s * s + 1 - a)).to(x.dtype)

    return eps_fn


def exact_flow(x_start: torch.Tensor, t: int, mu: torch.Tensor, s: float, t_start: int = 999) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data maps x_T affinely: the standardised point is conserved,
    x_t = sqrt(a_t) mu + sqrt(a_t s^2 + 1 - a_t) z; at the end (a = 1) x_0 = mu + s z."""
    a_T = float(ALPHAS_CUMPROD[t_start])
    z = (x_start.double() - a_T ** 0.5 * mu) / (a_T * s * s + 1 - a_T) ** 0.5
    a = 1.0 if t == END else float(ALPHAS_CUMPROD[t])
    return a ** 0.5 * mu + (a * s * s + 1 - a) ** 0.5 * z


def test_teacher_follows_the_exact_flow_of_gaussian_data():
    mu, s = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.3
    x_start = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fine, grid = teacher_grid(500, 25)
    states = teacher_states(gaussian_eps_fn(mu, s), x_start, fine, grid, ALPHAS_CUMPROD)
    assert states.shape == (len(grid), 16, 3) and grid[0] == 999 and grid[-1] == END
    for g, t in enumerate(grid):
        err = float((states[g] - exact_flow(x_start, t, mu, s)).abs().max())
        assert err < 2e-2, (t, err)  # DDIM is first order: 500 steps leave about 1 % of s at the end


def test_search_on_gaussian_data_beats_uniform_steps():
    mu, s = torch.tensor([0.5, -1.0, 2.0, 0.0]), 0.2
    eps_fn = gaussian_eps_fn(mu.double(), s)
    x_start = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = search_schedule(eps_fn, x_start, [5, 10], ALPHAS_CUMPROD, teacher_steps=200, grid_stride=4)
    for k, res in results.items():
        assert len(res.timesteps) == k and res.timesteps[0] == 999
        assert all(a > b for a, b in zip(res.timesteps, res.timesteps[1:]))
        uniform = path_cost(res.cost_matrix, snap_to_grid(uniform_timesteps(k), res.grid))
        assert res.cost <= uniform + 1e-12, (k, res.cost, uniform)
        assert res.num_trajectories == 32 and res.model_calls == 200 + len(res.grid) - 1
    # the cost of an edge is what a DDIM step from the teacher's state costs, recomputed in a float64 loop
    cost, grid = results[5].cost_matrix, results[5].grid
    fine, _ = teacher_grid(200, 4)
    states = teacher_states(eps_fn, x_start, fine, grid, ALPHAS_CUMPROD)
    i, j = 3, 17
    a_i, a_j = float(ALPHAS_CUMPROD[grid[i]]), float(ALPHAS_CUMPROD[grid[j]])
    rms = []
    for n in range(32):
        x = states[i, n].tolist()
        e = eps_fn(states[i, n:n + 1], grid[i])[0].tolist()
        step = [a_j ** 0.5 * (xi - (1 - a_i) ** 0.5 * ei) / a_i ** 0.5 + (1 - a_j) ** 0.5 * ei for xi, ei in zip(x, e)]
        rms.append((sum((u - v) ** 2 for u, v in zip(step, states[j, n].tolist())) / 4) ** 0.5)
    assert cost[i, j] == pytest.approx(sum(rms) / 32, rel=1e-9)
    assert np.isinf(cost[j, i]) and np.isinf(cost[i, i])


def test_cost_matrix_shape_and_uniform_steps():
    assert uniform_timesteps(10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert uniform_timesteps(4) == [999, 749, 499, 249]
    fine, grid = teacher_grid(250, 5)
    assert fine[:3] == [999, 995, 991] and grid[:3] == [999, 979, 959] and grid[-2:] == [19, END] and len(grid) == 51
    # data at one point mu (s = 0): eps = (x_t - sqrt(a) mu) / sqrt(1 - a) is constant along the flow and
    # x0_hat = mu, so one DDIM step of any length is exact and every cost is ~0
    eps_fn = gaussian_eps_fn(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.0)
    states = teacher_states(eps_fn, torch.randn(4, 2, dtype=torch.float64), fine, grid, ALPHAS_CUMPROD)
    cost = cost_matrix(eps_fn, states, grid, ALPHAS_CUMPROD, torch.float64)
    assert cost.shape == (51, 51) and np.isinf(cost[np.tril_indices(51)]).all()
    assert np.isfinite(cost[np.triu_indices(51, 1)]).all()
    assert cost[np.triu_indices(51, 1)].max() < 1e-9


def test_ays_interpolation():
    from diffusers import DDPMScheduler
    from diffusers.schedulers import AysSchedules

    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.schedule_search import ays_timesteps

    a = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    assert ays_timesteps(10, a) == AysSchedules["StableDiffusionTimesteps"]
    # Reference: the AYS authors' published SD1.5 noise levels (11 sigmas, 10 steps), log-linearly
    # interpolated by hand here and mapped to the step with the nearest log sigma.
    published = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]
    log_sigma_t = np.log(np.sqrt((1 - a.double().numpy()) / a.double().numpy()))
    for k in (5, 20):
        ref = []
        for i in range(k):
            pos = i / k * 10  # position of level i of k+1 on the 11 published levels
            lo = int(np.floor(pos))
            frac = pos - lo
            log_s = np.log(published[lo]) * (1 - frac) + (np.log(published[lo + 1]) * frac if frac else 0.0)
            ref.append(int(np.argmin(np.abs(log_sigma_t - log_s))))
        got = ays_timesteps(k, a)
        assert len(got) == k and got[0] == 999
        assert max(abs(g - r) for g, r in zip(got, ref)) <= 1, (k, got, ref)


def test_searched_scheduler_runs_exactly_the_schedule(tmp_path):
    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.samplers import fixed_timesteps
    from eddpm.scheduler import EDDPMScheduler

    learned = EDDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"},
                                         scores=[1.0] * 1000, num_kept_steps=20, timestep_spacing="trailing")
    steps = [999, 760, 512, 301, 133, 40]
    sched = searched_scheduler(learned, steps)
    sched.save_pretrained(tmp_path)
    loaded = EDDPMScheduler.from_pretrained(tmp_path)
    assert loaded.kept_timesteps.tolist() == steps
    assert loaded.config.prediction_type == "v_prediction" and loaded.config.mask_mode == "respaced"
    assert fixed_timesteps("eddpm_dpmpp_2m", 6, loaded) == steps
    with pytest.raises(ValueError):
        searched_scheduler(learned, [998, 500])


def test_train_py_exports_a_searched_schedule(tmp_path):
    """train.py --export_searched_schedule K writes scheduler_searched/ (K steps from 999, loadable, runnable by
    the eddpm_dpmpp_2m sampler) and search.json, and leaves scheduler/ the learned steps."""
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT

    from eddpm.scheduler import EDDPMScheduler

    out = tmp_path / "model"
    command = [sys.executable, "train.py", "--preset", "tiny", "--output_dir", str(out), "--cache_dir",
               str(tmp_path / "cache"), "--max_train_steps", "2", "--lr_warmup_steps", "1", "--checkpointing_steps",
               "0", "--num_validation_images", "1", "--report_to", "none", "--export_searched_schedule", "4",
               "--search_trajectories", "6"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    searched = EDDPMScheduler.from_pretrained(out, subfolder="scheduler_searched")
    learned = EDDPMScheduler.from_pretrained(out, subfolder="scheduler")
    steps = searched.kept_timesteps.tolist()
    assert len(steps) == 4 and steps[0] == 999 and steps == sorted(steps, reverse=True)
    assert len(learned.kept_timesteps) == learned.config.num_kept_steps == 20  # tiny: 2 % of 1000
    info = json.loads((out / "scheduler_searched" / "search.json").read_text())
    assert info["timesteps"] == steps and info["num_trajectories"] == 6 and info["grid_points"] == 51
    assert "eddpm_dpmpp_2m" in info["sampler"]
