"""EDDPMScheduler against references that do not share its code.

References: values of diffusers' DDPMScheduler (0.42) pinned as literal numbers; float64 formulas and loops
written out here for the beta schedules, alpha-bar(m) and the DDPM posterior (Ho et al. 2020, Eqs. (6)-(7)
and (15)); exact-fraction versions of DDPM's timestep spacing rules; the installed DDPMScheduler wherever
the masked code path (not an inherited method) is under test; save/load round trips; tiny pipelines.
"""

from __future__ import annotations

import inspect
import json
import math
from fractions import Fraction

import pytest
import torch
from diffusers import DDPMScheduler

from eddpm import masks
from eddpm.scheduler import EDDPMScheduler, spaced_positions

T = 1000
SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # SD1.5's schedule
SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_scores(seed: int, num_high: int = 10, low: float = 0.05) -> list[float]:
    """Keep probabilities: `num_high` steps in [0.5, 1], the rest in [0, low]."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, generator=g, dtype=torch.float64) * low
    high = torch.randperm(T, generator=g)[:num_high]
    scores[high] = 0.5 + 0.5 * torch.rand(num_high, generator=g, dtype=torch.float64)
    return scores.tolist()


def fake_model(sample: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the UNet."""
    return torch.tanh(0.5 * sample + float(t) / T)


def sd15_betas() -> list[float]:
    """SD1.5's "scaled_linear" betas in float64: linspace(sqrt(0.00085), sqrt(0.012), T) squared."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    return [(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)]


def reference_alpha_bar(betas: list[float], kept: list[int], mode: str) -> list[float]:
    """alpha-bar_t(m) in float64 by loops: Eq. (6) ("paper") and the two variants of eddpm/masks.py."""
    kept = set(kept)
    log_alphas = [math.log1p(-b) for b in betas]
    c = sum(log_alphas) / sum(log_alphas[i] for i in kept)  # "rescaled": alpha-bar_T(m) = alpha-bar_T
    out, paper, unmasked, last_kept_value, rescaled_log = [], 1.0, 1.0, 1.0, 0.0
    for t, beta in enumerate(betas):
        unmasked *= 1.0 - beta
        if t in kept:
            paper *= 1.0 - beta
            last_kept_value = unmasked
            rescaled_log += c * log_alphas[t]
        out.append({"paper": paper, "respaced": last_kept_value, "rescaled": math.exp(rescaled_log)}[mode])
    return out


def reference_step(x_t, model_output, a_t: float, a_s: float, prediction_type: str):
    """DDPM posterior q(x_s | x_t, x0_hat) for s < t, float64: (x0_hat, mean, small var, large var)."""
    x_t, model_output = x_t.double(), model_output.double()
    if prediction_type == "epsilon":
        x0 = (x_t - math.sqrt(1 - a_t) * model_output) / math.sqrt(a_t)  # Eq. (15)
    elif prediction_type == "v_prediction":
        x0 = math.sqrt(a_t) * x_t - math.sqrt(1 - a_t) * model_output
    else:
        x0 = model_output
    alpha_ts = a_t / a_s  # alpha of the jump t -> s
    beta_ts = 1 - alpha_ts
    mean = math.sqrt(a_s) * beta_ts / (1 - a_t) * x0 + math.sqrt(alpha_ts) * (1 - a_s) / (1 - a_t) * x_t  # Eq. (7)
    return x0, mean, (1 - a_s) / (1 - a_t) * beta_ts, beta_ts


def reference_positions(num_kept: int, n: int, spacing: str, steps_offset: int) -> list[int]:
    """DDPM's spacing rules on K positions in exact fractions (Python's round is half-to-even, as numpy's)."""
    if spacing == "linspace":
        positions = [round(Fraction(i * (num_kept - 1), max(n - 1, 1))) for i in range(n)]
    elif spacing == "leading":
        ratio = num_kept // n
        offset = min(steps_offset, num_kept - 1 - (n - 1) * ratio)  # the documented limit
        positions = [i * ratio + offset for i in range(n)]
    else:
        positions = [round(num_kept - Fraction(i * num_kept, n)) - 1 for i in range(n)][::-1]
    return sorted(positions, reverse=True)


def assert_close(actual, expected, rtol=1e-4, atol=1e-4, what=""):
    actual, expected = (torch.as_tensor(x, dtype=torch.float64) for x in (actual, expected))  # lists too
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------------------------------------------
# The module layout and the config
# ---------------------------------------------------------------------------------------------------


def test_top_level_file_re_exports_the_package_class():
    import eddpm_scheduler

    assert eddpm_scheduler.EDDPMScheduler is EDDPMScheduler
    assert EDDPMScheduler.__module__ == "eddpm.scheduler"


def test_init_is_ddpms_signature_plus_three():
    ddpm = inspect.signature(DDPMScheduler.__init__).parameters
    ours = inspect.signature(EDDPMScheduler.__init__).parameters
    assert set(ours) - set(ddpm) == {"scores", "num_kept_steps", "mask_mode"}, set(ours) ^ set(ddpm)
    for name, param in ddpm.items():
        assert ours[name].default == param.default, f"{name}: {ours[name].default!r} != {param.default!r}"


def test_default_mask_mode_is_trainings():
    from eddpm.config import TrainConfig

    assert TrainConfig().mask_mode == "respaced"
    assert inspect.signature(EDDPMScheduler.__init__).parameters["mask_mode"].default == "respaced"
    sched = EDDPMScheduler(**SD15, scores=make_scores(0), num_kept_steps=6)
    assert sched.config.mask_mode == "respaced"
    expected = reference_alpha_bar(sd15_betas(), sched.kept_timesteps.tolist(), "respaced")
    assert_close(sched.alphas_cumprod, expected, rtol=2e-4, atol=0, what="default alpha-bar(m)")


def test_every_ddpm_argument_reaches_the_config_and_the_schedule():
    """Non-default values for every DDPM argument: each one lands in the config and shapes the schedule."""
    config = {
        "num_train_timesteps": 50, "beta_start": 0.001, "beta_end": 0.03, "beta_schedule": "scaled_linear",
        "variance_type": "fixed_large", "clip_sample": False, "prediction_type": "v_prediction",
        "thresholding": True, "dynamic_thresholding_ratio": 0.9, "clip_sample_range": 2.0,
        "sample_max_value": 3.0, "timestep_spacing": "trailing", "steps_offset": 2,
        "rescale_betas_zero_snr": True,
    }
    sched = EDDPMScheduler(**config)
    assert {k: sched.config[k] for k in config} == config
    lo, hi = math.sqrt(0.001), math.sqrt(0.03)
    betas = [(lo + (hi - lo) * i / 49) ** 2 for i in range(50)]
    alpha_bar = [math.prod(1 - b for b in betas[: t + 1]) for t in range(50)]
    # zero terminal SNR (arXiv 2305.08891, Algorithm 1): shift and scale sqrt(alpha-bar) to end at 0
    first, last = math.sqrt(alpha_bar[0]), math.sqrt(alpha_bar[-1])
    expected = [((math.sqrt(a) - last) * first / (first - last)) ** 2 for a in alpha_bar]
    assert_close(sched.alphas_cumprod, expected, rtol=1e-4, atol=1e-6, what="zero-SNR alpha-bar")
    trained = EDDPMScheduler(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4])
    assert_close(trained.alphas_cumprod, [0.9, 0.72, 0.504, 0.3024], rtol=1e-6, atol=0, what="trained_betas")


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_save_and_load_round_trip(tmp_path, mode):
    scores = torch.tensor(make_scores(4), dtype=torch.float32)  # a tensor is stored as plain floats
    num_kept_steps = {"paper": None, "respaced": 4, "rescaled": 7}[mode]
    sched = EDDPMScheduler(**SD15, timestep_spacing="trailing", steps_offset=1, scores=scores,
                           num_kept_steps=num_kept_steps, mask_mode=mode)
    sched.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EDDPMScheduler" and saved["mask_mode"] == mode
    assert saved["timestep_spacing"] == "trailing" and saved["steps_offset"] == 1
    assert isinstance(saved["scores"], list) and all(type(s) is float for s in saved["scores"])
    assert saved["scores"] == scores.double().tolist()
    assert saved["num_kept_steps"] == len(sched.kept_timesteps) == (num_kept_steps or round(float(scores.sum())))
    loaded = EDDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert dict(loaded.config) | {"_use_default_values": None} == dict(sched.config) | {"_use_default_values": None}
    assert torch.equal(loaded.kept_timesteps, sched.kept_timesteps)
    assert torch.equal(loaded.alphas_cumprod, sched.alphas_cumprod)
    loaded.set_timesteps(3)
    sched.set_timesteps(3)
    assert torch.equal(loaded.timesteps, sched.timesteps)


def test_from_config_both_ways():
    ddpm = DDPMScheduler(**SD15, clip_sample=False, timestep_spacing="trailing")
    plain = EDDPMScheduler.from_config(ddpm.config)
    assert plain.config.scores is None and torch.equal(plain.alphas_cumprod, ddpm.alphas_cumprod)
    assert plain.config.timestep_spacing == "trailing" and plain.config.clip_sample is False
    scored = EDDPMScheduler.from_config(ddpm.config, scores=make_scores(5), num_kept_steps=5, mask_mode="rescaled")
    assert len(scored.kept_timesteps) == 5 and scored.config.mask_mode == "rescaled"
    assert scored.config.timestep_spacing == "trailing"
    back = DDPMScheduler.from_config(scored.config)
    assert type(back) is DDPMScheduler
    assert torch.equal(back.alphas_cumprod, ddpm.alphas_cumprod) and back.config.timestep_spacing == "trailing"
    # diffusers keeps the unknown keys as hidden config, so EDDPM -> DDPM -> EDDPM keeps the mask
    again = EDDPMScheduler.from_config(back.config)
    assert torch.equal(again.kept_timesteps, scored.kept_timesteps)
    assert torch.equal(again.alphas_cumprod, scored.alphas_cumprod)
    assert DDPMScheduler in scored.compatibles


# ---------------------------------------------------------------------------------------------------
# Without scores: DDPM, checked against pinned numbers and float64 formulas
# ---------------------------------------------------------------------------------------------------


def test_unmasked_alphas_cumprod_pinned_and_by_formula():
    sched = EDDPMScheduler(**SD15)
    # DDPMScheduler(**SD15).alphas_cumprod[[0, 1, 499, 998, 999]] in diffusers 0.42 (float32)
    pinned = [0.9991499781608582, 0.9982960224151611, 0.27766942977905273, 0.004716695751994848,
              0.00466009508818388]
    assert_close(sched.alphas_cumprod[[0, 1, 499, 998, 999]], pinned, rtol=0, atol=1e-8, what="SD1.5 alpha-bar")
    alpha_bar = torch.cumprod(1 - torch.tensor(sd15_betas(), dtype=torch.float64), 0)
    assert_close(sched.alphas_cumprod, alpha_bar, rtol=2e-4, atol=0, what="SD1.5 alpha-bar vs float64")
    linear = EDDPMScheduler()  # DDPM's defaults: linear betas 1e-4 .. 0.02
    assert_close(linear.alphas_cumprod[[0, 499, 999]], [0.9998999834060669, 0.07858723402023315, 4.035830352222547e-05],
                 rtol=0, atol=1e-8, what="linear alpha-bar")
    assert torch.equal(sched.kept_timesteps, torch.arange(T - 1, -1, -1))
    assert sched.terminal_alpha_bar == pytest.approx(0.00466009508818388, abs=1e-9)


# DDPMScheduler(**SD15, timestep_spacing=..., steps_offset=...).set_timesteps(n).timesteps, diffusers 0.42
PINNED_TIMESTEPS = {
    ("linspace", 0, 10): [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    ("linspace", 1, 7): [999, 832, 666, 500, 333, 166, 0],
    ("leading", 0, 10): [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    ("leading", 1, 10): [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
    ("leading", 1, 7): [853, 711, 569, 427, 285, 143, 1],
    ("trailing", 0, 10): [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    ("trailing", 1, 7): [999, 856, 713, 570, 428, 285, 142],
}


@pytest.mark.parametrize("all_kept", [False, True], ids=["no_scores", "all_scores_1"])
def test_timesteps_pinned(all_kept):
    for (spacing, offset, n), expected in PINNED_TIMESTEPS.items():
        extra = {"scores": [1.0] * T, "num_kept_steps": T} if all_kept else {}
        sched = EDDPMScheduler(**SD15, timestep_spacing=spacing, steps_offset=offset, **extra)
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == expected, (spacing, offset, n, sched.timesteps.tolist())
        assert sched.num_inference_steps == n


def test_step_pinned_and_by_hand():
    """One DDPM step t = 500 -> 400 (10 leading steps) on a fixed input, with and without (all-ones) scores."""
    x_t = torch.linspace(-1, 1, 8).view(1, 2, 2, 2)
    eps = torch.linspace(0.5, -0.5, 8).view(1, 2, 2, 2)
    # DDPMScheduler(**SD15, clip_sample=False) after set_timesteps(10), step(eps, 500, x_t, seed 0), diffusers 0.42
    pinned_x0 = [-2.711462, -1.936759, -1.162055, -0.387352, 0.387352, 1.162055, 1.936759, 2.711462]
    pinned_prev = [-0.681793, -1.221488, -1.788017, 0.086095, -0.357993, -0.096702, 1.279397, 1.935163]
    alpha_bar = torch.cumprod(1 - torch.tensor(sd15_betas(), dtype=torch.float64), 0)
    x0, mean, var_small, _ = reference_step(x_t, eps, float(alpha_bar[500]), float(alpha_bar[400]), "epsilon")
    z = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0)).double()
    for extra in ({}, {"scores": [1.0] * T, "num_kept_steps": T}):
        sched = EDDPMScheduler(**SD15, clip_sample=False, **extra)
        sched.set_timesteps(10)
        out = sched.step(eps, 500, x_t, generator=torch.Generator().manual_seed(0))
        what = "with scores" if extra else "without scores"
        assert_close(out.pred_original_sample.flatten(), pinned_x0, rtol=0, atol=2e-5, what=f"x0 pinned, {what}")
        assert_close(out.prev_sample.flatten(), pinned_prev, rtol=0, atol=2e-5, what=f"x_s pinned, {what}")
        assert_close(out.pred_original_sample, x0, rtol=0, atol=1e-4, what=f"x0 by hand, {what}")
        assert_close(out.prev_sample, mean + math.sqrt(var_small) * z, rtol=0, atol=1e-4, what=f"x_s by hand, {what}")


# ---------------------------------------------------------------------------------------------------
# With scores: the masked schedule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_kept_steps_and_alphas_cumprod(mode):
    scores = make_scores(0)
    sched = EDDPMScheduler(**SD15, scores=scores, num_kept_steps=12, mask_mode=mode)
    # the 12 largest scores, largest t first, T-1 always in
    by_hand = sorted(sorted(range(T - 1), key=lambda t: (scores[t], t), reverse=True)[:11] + [T - 1], reverse=True)
    assert sched.kept_timesteps.tolist() == by_hand and sched.timesteps.tolist() == by_hand
    expected = reference_alpha_bar(sd15_betas(), by_hand, mode)
    assert_close(sched.alphas_cumprod, expected, rtol=2e-4, atol=0, what=f"{mode} alpha-bar vs loop")
    assert sched.terminal_alpha_bar == pytest.approx(expected[T - 1], rel=2e-4)
    # alphas and betas are the per-step factors of that alpha-bar
    assert_close(torch.cumprod(sched.alphas.double(), 0), sched.alphas_cumprod, rtol=1e-5, atol=0, what="cumprod")
    assert_close(sched.betas, 1 - sched.alphas, rtol=0, atol=1e-7, what="betas")
    assert_close(sched.base_betas, sd15_betas(), rtol=1e-5, atol=0, what="base_betas")
    if mode == "paper":  # Eq. (6): beta_t m_t
        mask = [1.0 if t in by_hand else 0.0 for t in range(T)]
        assert_close(sched.betas, [b * m for b, m in zip(sd15_betas(), mask)], rtol=1e-4, atol=1e-7, what="betas")


@pytest.mark.parametrize(
    "high_value, expected", [(0.74, 7), (0.76, 8), (0.0, 1)], ids=["rounds_down", "rounds_up", "at_least_one"]
)
def test_default_num_kept_steps_is_rounded_sum(high_value, expected):
    scores = [0.0] * T
    for t in range(0, T, 100):  # 10 steps
        scores[t] = high_value
    sched = EDDPMScheduler(**SD15, scores=scores)
    assert sched.config.num_kept_steps == expected == len(sched.kept_timesteps)
    assert int(sched.kept_timesteps[0]) == T - 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scores": [0.5] * (T - 1)}, "shape"),
        ({"scores": [[0.5] * T]}, "shape"),
        ({"scores": [0.5] * (T - 1) + [1.5]}, "keep probabilities"),
        ({"scores": [-0.1] + [0.5] * (T - 1)}, "keep probabilities"),
        ({"scores": [float("nan")] + [0.5] * (T - 1)}, "keep probabilities"),
        ({"scores": ["a"] * T}, "floats"),
        ({"mask_mode": "sigmoid"}, "mask_mode"),
        ({"scores": [0.5] * T, "mask_mode": "random"}, "mask_mode"),
        ({"scores": [0.5] * T, "num_kept_steps": 0}, r"\[1, 1000\]"),
        ({"scores": [0.5] * T, "num_kept_steps": T + 1}, r"\[1, 1000\]"),
        ({"scores": [0.5] * T, "num_kept_steps": 2.5}, "integer"),
        ({"num_kept_steps": 5}, "needs scores"),
        ({"scores": [0.5] * T, "timestep_spacing": "karras"}, "timestep_spacing"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDDPMScheduler(**SD15, **kwargs)


def test_rescaled_zero_terminal_snr_is_a_clear_error():
    with pytest.raises(ValueError, match="non-finite"):
        EDDPMScheduler(**SD15, rescale_betas_zero_snr=True, scores=make_scores(0), mask_mode="rescaled")


def test_spaced_positions_by_hand():
    # K = 10 positions. linspace: round(9 i / (n-1)), 4.5 -> 4 (half to even)
    assert spaced_positions(10, 4, "linspace").tolist() == [9, 6, 3, 0]
    assert spaced_positions(10, 5, "linspace").tolist() == [9, 7, 4, 2, 0]
    assert spaced_positions(10, 1, "linspace").tolist() == [0]  # np.linspace(0, 9, 1) == [0]
    # leading: i * (10 // n) + offset, the offset limited to keep the grid on the chain
    assert spaced_positions(10, 4, "leading", 0).tolist() == [6, 4, 2, 0]
    assert spaced_positions(10, 4, "leading", 1).tolist() == [7, 5, 3, 1]
    assert spaced_positions(10, 4, "leading", 5).tolist() == [9, 7, 5, 3]
    assert spaced_positions(10, 10, "leading", 1).tolist() == list(range(9, -1, -1))
    # trailing: round(10 - 10 i / n) - 1; n = 8: 10, 8.75, 7.5, 6.25, 5, 3.75, 2.5, 1.25 -> 10, 9, 8, 6, 5, 4, 2, 1
    assert spaced_positions(10, 4, "trailing").tolist() == [9, 7, 4, 1]
    assert spaced_positions(10, 8, "trailing").tolist() == [9, 8, 7, 5, 4, 3, 1, 0]
    assert spaced_positions(10, 3, "trailing").tolist() == [9, 6, 2]
    with pytest.raises(ValueError, match="num_steps"):
        spaced_positions(10, 11, "trailing")
    with pytest.raises(ValueError, match="timestep_spacing"):
        spaced_positions(10, 3, "karras")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_all_kept_set_timesteps_equals_ddpm(spacing):
    """Every score 1: for every n and steps_offset, DDPMScheduler's timesteps wherever they stay in [0, T-1]."""
    outside = []
    for offset in (0, 1, 3):
        ours = EDDPMScheduler(**SD15, timestep_spacing=spacing, steps_offset=offset, scores=[1.0] * T,
                              num_kept_steps=T)
        ref = DDPMScheduler(**SD15, timestep_spacing=spacing, steps_offset=offset)
        for n in range(1, T + 1):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            got, want = ours.timesteps.tolist(), ref.timesteps.tolist()
            if len(want) == n and 0 <= min(want) and max(want) < T:
                assert got == want, (offset, n)
                continue
            outside.append((offset, n, want[0], want[-1], len(want)))
            # DDPM leaves the chain; ours is n distinct steps inside it, DDPM's first n for "trailing"
            assert len(set(got)) == n == len(got) and got == sorted(got, reverse=True) and 0 <= got[-1] < got[0] < T
            if spacing == "trailing":
                assert got == want[:n], n
            if spacing == "leading":  # the grid shifted down by the excess
                assert got == [t - (want[0] - (T - 1)) for t in want], (offset, n)
    # the cases where DDPM's schedule leaves [0, T-1], known here so that a diffusers change shows up
    if spacing == "linspace":
        assert outside == []
    elif spacing == "leading":
        # (n - 1) * (T // n) + offset >= T: n = T for offset 1; n = 500 (499 * 2 + 3) and n >= 998 for offset 3
        assert [(o, n) for o, n, *_ in outside] == [(1, 1000), (3, 500), (3, 998), (3, 999), (3, 1000)]
    else:  # float drift in np.arange: one extra step, t = -1 (e.g. n = 61)
        assert (0, 61, 999, -1, 62) in outside and {o for o, *_ in outside} == {0, 1, 3}


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_set_timesteps_rules(spacing, offset):
    sched = EDDPMScheduler(**SD15, timestep_spacing=spacing, steps_offset=offset, scores=make_scores(1),
                           num_kept_steps=10)
    kept = sched.kept_timesteps.tolist()
    ascending = kept[::-1]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 10 and kept[0] == T - 1
    sched.set_timesteps()
    assert sched.timesteps.tolist() == kept and sched.num_inference_steps == 10
    for n in range(1, 11):
        sched.set_timesteps(n)
        got = sched.timesteps.tolist()
        assert got == [ascending[p] for p in reference_positions(10, n, spacing, offset)], n
        assert sched.num_inference_steps == n and not sched.custom_timesteps
        if n == 10 or spacing == "trailing" or (spacing == "linspace" and n > 1):
            assert got[0] == kept[0], (n, got)  # sampling starts at the largest kept step
        assert [int(sched.previous_timestep(t)) for t in got] == got[1:] + [-1]
    for bad in (0, 11, 50):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)


def test_custom_timesteps_are_a_subset_of_the_kept_steps():
    sched = EDDPMScheduler(**SD15, scores=make_scores(1), num_kept_steps=10)
    kept = sched.kept_timesteps.tolist()
    subset = [kept[0], kept[4], kept[5], kept[9]]
    sched.set_timesteps(timesteps=subset)
    assert sched.timesteps.tolist() == subset and sched.custom_timesteps
    # diffusers' test_custom_timesteps (tests/schedulers/test_scheduler_ddpm.py) calls .item() on each result
    assert [sched.previous_timestep(t).item() for t in sched.timesteps] == subset[1:] + [-1]
    not_kept = next(t for t in range(T) if t not in kept)
    with pytest.raises(ValueError, match="not kept steps"):
        sched.set_timesteps(timesteps=[kept[0], not_kept])
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=subset[::-1])
    with pytest.raises(ValueError, match="one of"):
        sched.set_timesteps(3, timesteps=subset)
    sched.set_timesteps(timesteps=subset)
    with pytest.raises(ValueError, match="not in the current schedule"):
        sched.step(torch.zeros(1, 4, 2, 2), kept[1], torch.zeros(1, 4, 2, 2))


def test_previous_timestep_returns_what_ddpm_returns():
    """All steps kept: the same values and types as DDPMScheduler's, for int and tensor inputs."""
    ours = EDDPMScheduler(**SD15, steps_offset=1, scores=[1.0] * T, num_kept_steps=T)
    ref = DDPMScheduler(**SD15, steps_offset=1)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    for t in ref.timesteps:
        for timestep in (t, int(t)):
            got, want = ours.previous_timestep(timestep), ref.previous_timestep(timestep)
            assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor), (timestep, got, want)
            assert got.dtype == want.dtype and got.shape == want.shape and got.item() == want.item(), (got, want)
    assert ours.previous_timestep(ours.timesteps[-1]).item() == -1


@pytest.mark.parametrize("mode", masks.MASK_MODES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_step_is_the_posterior_between_kept_steps(mode, prediction_type):
    kept = None
    for variance_type in ("fixed_small", "fixed_large"):
        sched = EDDPMScheduler(
            **SD15, clip_sample=False, prediction_type=prediction_type, variance_type=variance_type,
            timestep_spacing="trailing", scores=make_scores(2), num_kept_steps=8, mask_mode=mode,
        )
        kept = sched.kept_timesteps.tolist()
        alpha_bar = reference_alpha_bar(sd15_betas(), kept, mode)
        sched.set_timesteps(5)  # a subset: each step jumps to the next step of the schedule
        schedule = sched.timesteps.tolist()
        assert schedule == [kept[i] for i in (0, 2, 3, 5, 6)]  # trailing, K = 8: positions 7, 5, 4, 2, 1
        sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        for t, s in zip(schedule, schedule[1:] + [-1]):
            model_output = fake_model(sample, t)
            out = sched.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
            a_s = alpha_bar[s] if s >= 0 else 1.0  # the last step goes to x_0, alpha-bar = 1
            x0, mean, var_small, var_large = reference_step(sample, model_output, alpha_bar[t], a_s, prediction_type)
            where = f"{variance_type}, t={t} -> s={s}"
            assert_close(out.pred_original_sample, x0, what=f"x0, {where}")
            if s < 0:
                assert torch.equal(out.prev_sample, out.pred_original_sample), "the last step adds no noise"
            else:
                z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(t)).double()
                var = var_small if variance_type == "fixed_small" else var_large
                assert_close(out.prev_sample, mean + math.sqrt(var) * z, what=f"x_s, {where}")
            sample = out.prev_sample
    out = sched.step(torch.zeros(1, 4, 2, 2), kept[0], torch.ones(1, 4, 2, 2), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_add_noise_uses_the_masked_alpha_bar(mode):
    sched = EDDPMScheduler(**SD15, scores=make_scores(3), num_kept_steps=6, mask_mode=mode)
    kept = sched.kept_timesteps.tolist()
    alpha_bar = reference_alpha_bar(sd15_betas(), kept, mode)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    a = torch.tensor([alpha_bar[t] for t in kept], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert_close(sched.add_noise(x0, noise, torch.tensor(kept)), expected, rtol=1e-4, atol=1e-4, what="x_t")
    velocity = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    assert_close(sched.get_velocity(x0, noise, torch.tensor(kept)), velocity, rtol=1e-4, atol=1e-4, what="v")


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_all_kept_equals_ddpm(mode):
    """Every step kept: the masked code path gives DDPM's schedule and chain in every mode."""
    sched = EDDPMScheduler(**SD15, scores=[1.0] * T, num_kept_steps=T, mask_mode=mode)
    ref = DDPMScheduler(**SD15)
    assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=1e-4, atol=0, what="alphas_cumprod")
    assert_close(sched.betas, ref.betas, rtol=1e-3, atol=1e-8, what="betas")
    sched.set_timesteps(T)
    ref.set_timesteps(T)
    assert torch.equal(sched.timesteps, ref.timesteps)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x, y = sample, sample
    g_ours, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in ref.timesteps[-4:].tolist():  # the last steps, down to t = 0 (where both add no noise)
        x = sched.step(fake_model(x, t), t, x, generator=g_ours).prev_sample
        y = ref.step(fake_model(y, t), t, y, generator=g_ref).prev_sample
        assert_close(x, y, rtol=1e-4, atol=1e-4, what=f"prev_sample at t={t}")


# ---------------------------------------------------------------------------------------------------
# Inside the Stable Diffusion pipelines
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts():
    """Tokenizer, text encoder and VAE of eddpm.tiny, a 4-channel tiny UNet and a 5-step EDDPM scheduler."""
    from diffusers import UNet2DConditionModel

    from eddpm.tiny import TINY_UNET_CONFIG, build_tiny_components

    parts = build_tiny_components(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()  # SD's 4 latent channels in
    scores = [1e-4] * T
    for t in (999, 850, 600, 420, 130):  # sum = 4.5 + 995e-4 ~ 4.6, so the default K is 5
        scores[t] = 0.9
    scheduler = EDDPMScheduler(**SD15, clip_sample=False, steps_offset=1, scores=scores)
    assert scheduler.config.num_kept_steps == 5
    return {"vae": parts.vae, "text_encoder": parts.text_encoder, "tokenizer": parts.tokenizer, "unet": unet,
            "scheduler": scheduler}


def build_pipeline(pipeline_class, parts):
    pipe = pipeline_class(
        **{k: v for k, v in parts.items() if k != "scheduler"},
        scheduler=EDDPMScheduler.from_config(parts["scheduler"].config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    seen = []  # (timestep, batch) of every UNet call
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((int(args[1]), args[0].shape[0])))
    return pipe, seen


def test_text_to_image_pipeline_runs_the_kept_steps(tiny_parts):
    from diffusers import StableDiffusionPipeline

    pipe, seen = build_pipeline(StableDiffusionPipeline, tiny_parts)
    kept = pipe.scheduler.kept_timesteps.tolist()
    assert kept == [999, 850, 600, 420, 130]
    images = pipe(
        "a red cube", num_inference_steps=pipe.scheduler.config.num_kept_steps, guidance_scale=2.0, height=64,
        width=64, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())
    assert seen == [(t, 2) for t in kept], seen  # one batched CFG call per kept step
    seen.clear()
    pipe("a red cube", timesteps=[999, 420], guidance_scale=2.0, height=64, width=64, output_type="latent")
    assert [t for t, _ in seen] == [999, 420]
    with pytest.raises(ValueError, match="num_kept_steps"):  # the pipeline's default of 50 steps
        pipe("a red cube", guidance_scale=2.0, height=64, width=64, output_type="latent")


def test_image_to_image_pipeline_strength_selects_the_last_kept_steps(tiny_parts):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, seen = build_pipeline(StableDiffusionImg2ImgPipeline, tiny_parts)
    kept = pipe.scheduler.kept_timesteps.tolist()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images = pipe(
        "a red cube", image=image, strength=0.6, num_inference_steps=5, guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())
    assert [t for t, _ in seen] == kept[2:], seen  # strength 0.6 of 5 kept steps: the last 3
    seen.clear()
    pipe("a red cube", image=image, strength=1.0, num_inference_steps=5, guidance_scale=2.0, output_type="latent")
    assert [t for t, _ in seen] == kept


def test_saved_pipeline_loads_back(tiny_parts, tmp_path):
    """StableDiffusionPipeline.from_pretrained(dir) rebuilds the EDDPM scheduler, also from a folder saved
    while the class lived in the top-level eddpm_scheduler.py."""
    from diffusers import StableDiffusionPipeline

    import eddpm_scheduler  # noqa: F401  (diffusers takes a folder's named module from sys.modules)

    pipe, _ = build_pipeline(StableDiffusionPipeline, tiny_parts)
    pipe.save_pretrained(tmp_path / "pipe")
    index_path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["scheduler"] == ["eddpm.scheduler", "EDDPMScheduler"]
    for library in ("eddpm.scheduler", "eddpm_scheduler"):
        index_path.write_text(json.dumps({**index, "scheduler": [library, "EDDPMScheduler"]}))
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
        assert type(loaded.scheduler) is EDDPMScheduler, library
        unset = {"_use_default_values": None}
        assert dict(loaded.scheduler.config) | unset == dict(pipe.scheduler.config) | unset, library
        assert loaded.scheduler.kept_timesteps.tolist() == [999, 850, 600, 420, 130]
        assert torch.equal(loaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
