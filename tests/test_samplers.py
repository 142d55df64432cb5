"""eddpm/samplers.py against diffusers: DDIM on custom timesteps, Align Your Steps' list, the subsets run."""

import pytest
import torch

from eddpm.iclight import SD15_SCHEDULER_CONFIG
from eddpm.samplers import (
    AYS_SD15_TIMESTEPS,
    CustomTimestepsDDIMScheduler,
    fixed_timesteps,
    make_scheduler,
    schedule_length,
)

pytestmark = pytest.mark.filterwarnings(  # diffusers' schedulers on numpy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def test_ays_timesteps_are_diffusers_stable_diffusion_list():
    from diffusers.schedulers import AysSchedules

    assert list(AYS_SD15_TIMESTEPS) == AysSchedules["StableDiffusionTimesteps"]
    assert schedule_length("ays_dpmpp_2m") == 10 and schedule_length("ddim") is None
    assert fixed_timesteps("ays_dpmpp_2m", 10) == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    # Fewer steps: "trailing" positions round(10 - 10 i / n) - 1 of the ascending list, from 999 down.
    assert fixed_timesteps("ays_dpmpp_2m", 5) == [999, 736, 545, 343, 124]  # positions 9, 7, 5, 3, 1
    assert fixed_timesteps("ays_dpmpp_2m", 1) == [999]
    with pytest.raises(ValueError, match="1 to 10 steps"):
        fixed_timesteps("ays_dpmpp_2m", 11)
    assert fixed_timesteps("euler_a", 25) is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_custom_timesteps_ddim_matches_diffusers_ddim_on_evenly_spaced_steps(prediction_type):
    """DDIMScheduler ("leading", no offset, 10 steps) runs 900, 800, ..., 0 and steps t -> t - 100; given the
    same list as custom timesteps, the subclass must give the same samples."""
    from diffusers import DDIMScheduler

    config = {**SD15_SCHEDULER_CONFIG, "steps_offset": 0, "timestep_spacing": "leading",
              "prediction_type": prediction_type}
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(10)
    assert reference.timesteps.tolist() == list(range(900, -1, -100))
    ours = CustomTimestepsDDIMScheduler.from_config(config)
    ours.set_timesteps(timesteps=list(range(900, -1, -100)))
    generator = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=generator)
    for t in reference.timesteps:
        output = torch.randn(2, 4, 8, 8, generator=generator)
        x_ref = reference.step(output, t, x_ref).prev_sample
        x_ours = ours.step(output, t, x_ours).prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-6)


def test_custom_timesteps_ddim_steps_between_uneven_steps_and_refuses_what_it_cannot_do():
    """Uneven steps 999 -> 400 -> 100 -> x0: DDIM's deterministic update re-derived in float64."""
    scheduler = CustomTimestepsDDIMScheduler.from_config(SD15_SCHEDULER_CONFIG, clip_sample=False,
                                                         set_alpha_to_one=False)
    scheduler.set_timesteps(timesteps=[999, 400, 100])
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    for t, prev_alpha in ((999, alpha_bar[400]), (400, alpha_bar[100]), (100, alpha_bar[0])):
        eps = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
        x0 = (x - (1 - alpha_bar[t]).sqrt() * eps) / alpha_bar[t].sqrt()
        expected = prev_alpha.sqrt() * x0 + (1 - prev_alpha).sqrt() * eps
        x = scheduler.step(eps.float(), t, x.float()).prev_sample.double()
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)
        x = expected
    with pytest.raises(ValueError, match="eta = 0"):
        scheduler.step(eps.float(), 999, x.float(), eta=0.5)
    with pytest.raises(ValueError, match="descending"):
        scheduler.set_timesteps(timesteps=[100, 400])
    scheduler.set_timesteps(25)  # without custom timesteps it is DDIMScheduler
    assert not scheduler.custom_timesteps and len(scheduler.timesteps) == 25


def test_unknown_and_learned_samplers_without_learned_steps_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_scheduler("euler", SD15_SCHEDULER_CONFIG)
    for key in ("eddpm", "eddpm_dpmpp_2m", "eddpm_ddim"):
        with pytest.raises(ValueError, match="needs a trained output folder"):
            make_scheduler(key, SD15_SCHEDULER_CONFIG)
        with pytest.raises(ValueError, match="needs a trained output folder"):
            fixed_timesteps(key, 4)
