"""EDDPMScheduler: DDPM bit for bit without scores; the masked schedule of eddpm.masks with scores.

References are independent of the code under test: diffusers' installed DDPMScheduler, eddpm.masks
(the functions training uses), and float64 loops written out here for alpha-bar(m) and the DDPM
posterior (Ho et al. 2020, Eqs. (6)-(7) and (15)).
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # eddpm_scheduler.py is a top-level file of the repository
    sys.path.insert(0, str(REPO_ROOT))

from eddpm import masks  # noqa: E402
from eddpm_scheduler import EDDPMScheduler  # noqa: E402

T = 1000
SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # SD1.5's schedule
EXTRA_ARGS = {"scores", "num_kept_steps", "mask_mode"}
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def make_scores(seed: int, num_high: int = 10, low: float = 0.05, num_train_timesteps: int = T) -> list[float]:
    """Keep probabilities: `num_high` steps in [0.5, 1], the rest in [0, low]."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_train_timesteps, generator=g, dtype=torch.float64) * low
    high = torch.randperm(num_train_timesteps, generator=g)[:num_high]
    scores[high] = 0.5 + 0.5 * torch.rand(num_high, generator=g, dtype=torch.float64)
    return scores.tolist()


def fake_model(sample: torch.Tensor, t, learned: bool) -> torch.Tensor:
    """A deterministic stand-in for the UNet; 2x channels (output, variance in (0, 1)) when learned."""
    out = torch.tanh(0.5 * sample + float(t) / T)
    return torch.cat([out, torch.sigmoid(sample)], dim=1) if learned else out


def reference_alpha_bar(betas: list[float], kept: list[int], mode: str) -> list[float]:
    """alpha-bar_t(m) in float64 by loops: Eq. (6) ("paper") and the two variants of the fact sheet."""
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


def assert_close(actual, expected, rtol=1e-4, atol=1e-4, what=""):
    actual, expected = (torch.as_tensor(x, dtype=torch.float64) for x in (actual, expected))  # lists too
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------------------------------------------
# Without scores: DDPMScheduler, bit for bit
# ---------------------------------------------------------------------------------------------------


def test_init_signature_is_ddpms_plus_three():
    ddpm = inspect.signature(DDPMScheduler.__init__).parameters
    ours = inspect.signature(EDDPMScheduler.__init__).parameters
    assert set(ours) - set(ddpm) == EXTRA_ARGS, f"extra args {set(ours) - set(ddpm)}"
    assert set(ddpm) <= set(ours), f"missing DDPM args {set(ddpm) - set(ours)}"
    for name, param in ddpm.items():
        assert ours[name].default == param.default, f"{name}: {ours[name].default!r} != {param.default!r}"
    assert ours["scores"].default is None and ours["num_kept_steps"].default is None
    assert ours["mask_mode"].default == "paper"


CONFIGS = {
    "default": {},
    "sd15": SD15,
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "sigmoid": {"beta_schedule": "sigmoid"},
    "linear_zero_snr": {"rescale_betas_zero_snr": True},
    "sd15_zero_snr": {**SD15, "rescale_betas_zero_snr": True},
    "trained_betas": {"num_train_timesteps": 50, "trained_betas": torch.linspace(1e-3, 0.2, 50).tolist()},
    "short_linear": {"num_train_timesteps": 37, "beta_end": 0.1},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_schedule_arrays_equal_ddpm(config):
    ours, ref = EDDPMScheduler(**config), DDPMScheduler(**config)
    for name in ("betas", "alphas", "alphas_cumprod", "timesteps"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert (ours.init_noise_sigma, ours.order, len(ours)) == (ref.init_noise_sigma, ref.order, len(ref))
    n = ref.config.num_train_timesteps
    assert torch.equal(ours.kept_timesteps, torch.arange(n - 1, -1, -1))
    assert ours.terminal_alpha_bar == float(ref.alphas_cumprod[-1])


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 10, 25, 50, 333, 999, 1000])
def test_set_timesteps_equal_ddpm(spacing, steps_offset, num_steps):
    config = {**SD15, "timestep_spacing": spacing, "steps_offset": steps_offset}
    ours, ref = EDDPMScheduler(**config), DDPMScheduler(**config)
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.num_inference_steps == ref.num_inference_steps == num_steps
    for t in ref.timesteps[:: max(1, num_steps // 20)].tolist() + [int(ref.timesteps[-1])]:
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t)), t


@pytest.mark.parametrize("timesteps", [[999], [999, 500, 0], [980, 700, 301, 40, 7], [500, 499, 498]])
def test_custom_timesteps_equal_ddpm(timesteps):
    ours, ref = EDDPMScheduler(**SD15), DDPMScheduler(**SD15)
    ours.set_timesteps(timesteps=timesteps)
    ref.set_timesteps(timesteps=timesteps)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.custom_timesteps
    for t in timesteps:
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t))
    with pytest.raises(ValueError):
        ours.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError):
        ours.set_timesteps(num_inference_steps=3, timesteps=timesteps)


def run_chain(scheduler, timesteps, seed=0, learned=False, shape=(2, 4, 8, 8)):
    """Run `step` over `timesteps` from a seeded sample; returns every (prev_sample, pred_original_sample)."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    outputs = []
    for t in timesteps:
        out = scheduler.step(fake_model(sample, t, learned), t, sample, generator=generator)
        outputs.append((out.prev_sample, out.pred_original_sample))
        sample = out.prev_sample
    return outputs


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clipping", ["none", "clip", "threshold"])
def test_step_equal_ddpm(variance_type, prediction_type, clipping):
    config = {
        **SD15,
        "variance_type": variance_type,
        "prediction_type": prediction_type,
        "clip_sample": clipping == "clip",
        "clip_sample_range": 1.5,
        "thresholding": clipping == "threshold",
        "sample_max_value": 2.0,
        "timestep_spacing": "trailing",
    }
    learned = variance_type.startswith("learned")
    ours, ref = EDDPMScheduler(**config), DDPMScheduler(**config)
    # the untouched schedule (previous step t - 1), then a 6-step schedule ending at t > 0
    chains = [(ours, ref, [999, 998, 500, 1, 0])]
    ours6, ref6 = EDDPMScheduler(**config), DDPMScheduler(**config)
    ours6.set_timesteps(6)
    ref6.set_timesteps(6)
    chains.append((ours6, ref6, ref6.timesteps.tolist()))
    for a, b, timesteps in chains:
        for i, (x, y) in enumerate(zip(run_chain(a, timesteps, learned=learned), run_chain(b, timesteps, learned=learned))):
            # bit for bit; NaN where DDPM itself gives NaN (its fixed_large_log step takes sqrt(log beta))
            where = f"step {i} at t={timesteps[i]}"
            for ours_out, ref_out in zip(x, y):
                torch.testing.assert_close(ours_out, ref_out, rtol=0, atol=0, equal_nan=True, msg=where)
    out = ours.step(fake_model(torch.ones(1, 4, 2, 2), 5, learned), 5, torch.ones(1, 4, 2, 2), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


@pytest.mark.parametrize("config", [CONFIGS["default"], CONFIGS["sd15"], CONFIGS["linear_zero_snr"]])
def test_add_noise_velocity_and_scaling_equal_ddpm(config):
    ours, ref = EDDPMScheduler(**config), DDPMScheduler(**config)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 998, 999])
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    assert torch.equal(ours.scale_model_input(x0, 10), ref.scale_model_input(x0, 10))


# ---------------------------------------------------------------------------------------------------
# With scores: the masked schedule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_kept_steps_and_alphas_cumprod_match_masks(mode):
    scores = make_scores(0)
    sched = EDDPMScheduler(**SD15, scores=scores, num_kept_steps=12, mask_mode=mode)
    kept = masks.kept_timesteps(torch.tensor(scores), 12)
    assert torch.equal(sched.kept_timesteps, kept) and torch.equal(sched.timesteps, kept)
    base_betas = DDPMScheduler(**SD15).betas
    assert torch.equal(sched.base_betas, base_betas)
    alpha_bar = masks.masked_alphas_cumprod(base_betas, masks.mask_from_timesteps(kept, T), mode)
    assert torch.equal(sched.alphas_cumprod, alpha_bar.float())
    assert sched.terminal_alpha_bar == float(alpha_bar.float()[kept[0]])
    # alphas and betas are the per-step factors of that alpha-bar
    assert_close(torch.cumprod(sched.alphas.double(), 0), alpha_bar, rtol=1e-5, atol=0, what="cumprod(alphas)")
    assert_close(sched.betas, 1 - sched.alphas, rtol=0, atol=1e-7, what="betas")
    if mode == "paper":
        assert_close(sched.betas, base_betas * masks.mask_from_timesteps(kept, T), rtol=1e-4, atol=1e-7, what="betas")
    # independent check of masks.py itself, by the loop reference
    ref = reference_alpha_bar(base_betas.double().tolist(), kept.tolist(), mode)
    assert_close(alpha_bar, ref, rtol=1e-10, atol=0, what=f"{mode} alpha-bar vs loop")


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
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDDPMScheduler(**SD15, **kwargs)


def test_rescaled_zero_terminal_snr_is_a_clear_error():
    with pytest.raises(ValueError, match="non-finite"):
        EDDPMScheduler(**SD15, rescale_betas_zero_snr=True, scores=make_scores(0), mask_mode="rescaled")


def expected_subset(kept: list[int], n: int) -> list[int]:
    """The documented rule, by exact fractions: index round_half_up(i (K-1) / (n-1))."""
    if n == 1:
        return kept[:1]
    return [kept[math.floor(Fraction(i * (len(kept) - 1), n - 1) + Fraction(1, 2))] for i in range(n)]


def test_set_timesteps_rules():
    sched = EDDPMScheduler(**SD15, scores=make_scores(1), num_kept_steps=10)
    kept = sched.kept_timesteps.tolist()
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 10 and kept[0] == T - 1
    sched.set_timesteps()
    assert sched.timesteps.tolist() == kept and sched.num_inference_steps == 10
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == kept
    for n in range(1, 11):
        sched.set_timesteps(n)
        got = sched.timesteps.tolist()
        assert got == expected_subset(kept, n), n
        assert got[0] == kept[0] and (n == 1 or got[-1] == kept[-1])
        positions = [kept.index(t) for t in got]
        gaps = [b - a for a, b in zip(positions, positions[1:])]
        assert all(g >= 1 for g in gaps) and (not gaps or max(gaps) - min(gaps) <= 1), (n, positions)
        assert [sched.previous_timestep(t) for t in got] == got[1:] + [-1]
    assert expected_subset(kept, 4) == [kept[0], kept[3], kept[6], kept[9]]
    for bad in (0, 11, 50):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)
    # custom timesteps: a descending subset of the kept steps
    subset = [kept[0], kept[4], kept[5], kept[9]]
    sched.set_timesteps(timesteps=subset)
    assert sched.timesteps.tolist() == subset and sched.custom_timesteps
    assert [sched.previous_timestep(t) for t in subset] == subset[1:] + [-1]
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


@pytest.mark.parametrize("mode", masks.MASK_MODES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_step_is_the_posterior_between_kept_steps(mode, prediction_type, variance_type):
    sched = EDDPMScheduler(
        **SD15, clip_sample=False, prediction_type=prediction_type, variance_type=variance_type,
        scores=make_scores(2), num_kept_steps=8, mask_mode=mode,
    )
    kept = sched.kept_timesteps.tolist()
    alpha_bar = reference_alpha_bar(DDPMScheduler(**SD15).betas.double().tolist(), kept, mode)
    sched.set_timesteps(5)  # a subset: each step jumps to the next step of the schedule
    schedule = sched.timesteps.tolist()
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    for t, s in zip(schedule, schedule[1:] + [-1]):
        model_output = fake_model(sample, t, learned=False)
        out = sched.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        a_s = alpha_bar[s] if s >= 0 else 1.0  # the last step goes to x_0, alpha-bar = 1
        x0, mean, var_small, var_large = reference_step(sample, model_output, alpha_bar[t], a_s, prediction_type)
        assert_close(out.pred_original_sample, x0, what=f"x0 at t={t}")
        if s < 0:
            assert torch.equal(out.prev_sample, out.pred_original_sample), "the last step adds no noise"
        else:
            z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(t)).double()
            var = var_small if variance_type == "fixed_small" else var_large
            assert_close(out.prev_sample, mean + math.sqrt(var) * z, what=f"x_s at t={t} -> s={s}")
        sample = out.prev_sample


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_add_noise_uses_the_masked_alpha_bar(mode):
    sched = EDDPMScheduler(**SD15, scores=make_scores(3), num_kept_steps=6, mask_mode=mode)
    kept = sched.kept_timesteps.tolist()
    alpha_bar = reference_alpha_bar(DDPMScheduler(**SD15).betas.double().tolist(), kept, mode)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    a = torch.tensor([alpha_bar[t] for t in kept], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert_close(sched.add_noise(x0, noise, torch.tensor(kept)), expected, rtol=1e-5, atol=1e-5, what="x_t")
    if mode != "respaced":  # respaced keeps the unmasked alpha-bar at kept steps
        plain = DDPMScheduler(**SD15).add_noise(x0, noise, torch.tensor(kept))
        assert not torch.allclose(sched.add_noise(x0, noise, torch.tensor(kept)), plain, atol=1e-3)


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_all_kept_equals_ddpm(mode):
    sched = EDDPMScheduler(**SD15, scores=[1.0] * T, num_kept_steps=T, mask_mode=mode)
    ref = DDPMScheduler(**SD15)
    assert torch.equal(sched.kept_timesteps, ref.timesteps)
    assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=1e-4, atol=0, what="alphas_cumprod")
    assert_close(sched.betas, ref.betas, rtol=1e-3, atol=1e-8, what="betas")
    sched.set_timesteps()
    assert torch.equal(sched.timesteps, ref.timesteps)
    ref.set_timesteps(T)
    assert torch.equal(sched.timesteps, ref.timesteps)
    timesteps = [999, 998, 600, 599, 2, 1, 0]
    for (x, x0), (y, y0) in zip(run_chain(sched, timesteps), run_chain(ref, timesteps)):
        assert_close(x, y, rtol=1e-4, atol=1e-4, what="prev_sample")
        assert_close(x0, y0, rtol=1e-4, atol=1e-4, what="pred_original_sample")
    x0, noise, t = torch.ones(3, 4, 2, 2), torch.full((3, 4, 2, 2), 0.5), torch.tensor([0, 500, 999])
    assert_close(sched.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6, what="add_noise")


# ---------------------------------------------------------------------------------------------------
# Config: save / load, from_config both ways
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", masks.MASK_MODES)
@pytest.mark.parametrize("num_kept_steps", [None, 4])
def test_save_and_load_round_trip(tmp_path, mode, num_kept_steps):
    scores = torch.tensor(make_scores(4), dtype=torch.float32)  # a tensor is stored as plain floats
    sched = EDDPMScheduler(**SD15, steps_offset=1, scores=scores, num_kept_steps=num_kept_steps, mask_mode=mode)
    sched.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EDDPMScheduler" and saved["mask_mode"] == mode
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
    assert DDPMScheduler in scored.compatibles and "DDPMScheduler" in EDDPMScheduler._compatibles


# ---------------------------------------------------------------------------------------------------
# Inside the Stable Diffusion pipelines
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts():
    """Tokenizer, text encoder and VAE of eddpm.iclight's tiny components, and a 4-channel tiny UNet."""
    from diffusers import UNet2DConditionModel

    from eddpm.iclight import build_tiny_components

    parts = build_tiny_components(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=parts.text_encoder.config.hidden_size,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()
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
