"""eddpm/relighting.py: the relighter's two passes, checked through what the UNet and the text encoder
receive (forward hooks on the tiny real models), and the input helpers shared by the demo and relight.py.

Expected timesteps are written out by hand from diffusers' img2img rule (StableDiffusionImg2ImgPipeline:
n scheduled steps, the last int(n * strength) run) and IC-Light's round(steps / denoise)
(docs/iclight-facts.md, "Demo behaviour").
"""

import numpy as np
import pytest
import torch

from eddpm.relighting import Relighter, lighting_gradient, prepare_foreground, read_upload
from eddpm.settings import (
    EDDPM_SAMPLERS,
    ICLIGHT_SAMPLER,
    SAMPLERS,
    RelightSettings,
    check_settings,
    highres_size,
)

pytestmark = pytest.mark.filterwarnings(  # diffusers' schedulers on numpy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

KEPT = [999, 700, 400, 100]  # the learned steps of the fixture's EDDPM scheduler
AYS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps, SD1.5 (Sabour et al. 2024)


@pytest.fixture(scope="module")
def learned_scheduler():
    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.scheduler import EDDPMScheduler

    scores = np.full(1000, 0.01)
    scores[KEPT] = 0.9
    return EDDPMScheduler.from_config(SD15_SCHEDULER_CONFIG, scores=scores.tolist(), num_kept_steps=len(KEPT),
                                      mask_mode="respaced")


@pytest.fixture(scope="module")
def relighter(tiny_components, learned_scheduler):
    """The tiny models with 4 learned steps, as load_relighter builds them from a train.py output folder."""
    torch.set_num_threads(1)
    parts = tiny_components
    return Relighter(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(learned_scheduler.config),
                     learned_scheduler)


@pytest.fixture(scope="module")
def base_relighter(tiny_components):
    """The tiny models without learned steps (as with a base model and IC-Light's offsets)."""
    from eddpm.iclight import SD15_SCHEDULER_CONFIG

    parts = tiny_components
    return Relighter(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(SD15_SCHEDULER_CONFIG))


FOREGROUND = np.full((80, 48, 3), 127, np.uint8)  # not the passes' aspect ratio: the condition is cropped
FOREGROUND[10:70, 8:40] = (200, 60, 30)


class UNetCalls:
    """Records, per call of the 8-channel UNet: its timestep, latent size and the condition channels."""

    def __init__(self, unet):
        self.timesteps, self.sizes, self.conditions = [], [], []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        sample = args[0]  # [B, 8, h, w]: noisy latent, then the condition
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timesteps.append(int(torch.as_tensor(timestep).flatten()[0]))
        self.sizes.append(tuple(sample.shape[2:]))
        self.conditions.append(sample[:1, 4:].clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def relight(relighter, **settings):
    values = dict(width=64, height=64, steps=4, num_images=1, guidance_scale=2.0, seed=1)
    with UNetCalls(relighter.unet) as calls:
        images, info = relighter.relight(FOREGROUND, RelightSettings(**{**values, **settings}))
    return images, info, calls


# ---------------------------------------------------------------------------------------------------
# Timesteps each sampler runs, from noise and in img2img passes (issue 14)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["eddpm", "eddpm_dpmpp_2m", "eddpm_ddim"])
def test_learned_step_samplers_run_the_kept_steps_and_the_tail_in_img2img(relighter, sampler):
    # From noise: all 4 kept steps; highres at 0.5: round(4 / 0.5) = 8 capped at 4, the last int(4 * 0.5) = 2.
    _, info, calls = relight(relighter, sampler=sampler, lighting="None", highres_denoise=0.5)
    assert calls.timesteps == KEPT + KEPT[2:], calls.timesteps
    assert info["steps"] == [4, 2]
    # From the gradient at 0.9: round(4 / 0.9) = 4 scheduled, the last int(4 * 0.9) = 3 run.
    _, info, calls = relight(relighter, sampler=sampler, lighting="Left", highres_denoise=0.5)
    assert calls.timesteps == KEPT[1:] + KEPT[2:], calls.timesteps
    # Fewer steps than kept: the EDDPM scheduler's own choice (its config's "leading" spacing on 4 kept
    # steps with steps_offset 1: positions 3 and 1 of the ascending chain [100, 400, 700, 999]).
    _, _, calls = relight(relighter, sampler=sampler, steps=2, highres_denoise=0)
    assert calls.timesteps == [999, 400], calls.timesteps


def test_align_your_steps_runs_its_ten_steps_and_the_tail_in_img2img(relighter):
    _, info, calls = relight(relighter, sampler="ays_dpmpp_2m", steps=10, lighting="None", highres_denoise=0.5)
    assert calls.timesteps == AYS + AYS[5:], calls.timesteps  # highres: 10 scheduled, the last 5 run
    _, info, calls = relight(relighter, sampler="ays_dpmpp_2m", steps=25, lighting="Top", lowres_denoise=0.9,
                             highres_denoise=0)
    assert calls.timesteps == AYS[1:], calls.timesteps  # 10 scheduled (capped), the last int(9.0) = 9 run


def test_fixed_schedule_samplers_use_the_intended_diffusers_schedulers(relighter):
    from diffusers import DPMSolverMultistepScheduler

    from eddpm.samplers import CustomTimestepsDDIMScheduler

    training_betas = relighter.make_scheduler("eddpm").base_betas
    for key in ("eddpm_dpmpp_2m", "ays_dpmpp_2m"):
        scheduler = relighter.make_scheduler(key)
        assert isinstance(scheduler, DPMSolverMultistepScheduler)
        assert (scheduler.config.algorithm_type, scheduler.config.solver_order) == ("dpmsolver++", 2)
        assert not scheduler.config.use_karras_sigmas
        assert torch.allclose(scheduler.betas, training_betas), key
    ddim = relighter.make_scheduler("eddpm_ddim")
    assert isinstance(ddim, CustomTimestepsDDIMScheduler) and torch.allclose(ddim.betas, training_betas)


def test_every_sampler_is_offered_only_where_it_can_run(relighter, base_relighter):
    assert list(relighter.samplers.values()) == list(SAMPLERS.values())
    assert set(base_relighter.samplers.values()) == set(SAMPLERS.values()) - set(EDDPM_SAMPLERS)
    from eddpm.samplers import LEARNED_STEP_SAMPLERS

    assert set(LEARNED_STEP_SAMPLERS) == set(EDDPM_SAMPLERS)
    for key in EDDPM_SAMPLERS:
        with pytest.raises(ValueError, match="needs a trained output folder"):
            base_relighter.relight(FOREGROUND, RelightSettings(width=64, height=64, sampler=key))


# ---------------------------------------------------------------------------------------------------
# IC-Light exactness (issue 14): default sampler, the second pass, the prompt
# ---------------------------------------------------------------------------------------------------


def test_default_sampler_is_iclight_demo_sampler_without_learned_steps(relighter, base_relighter):
    from diffusers import DPMSolverMultistepScheduler

    assert relighter.default_sampler == "eddpm"
    assert base_relighter.default_sampler == ICLIGHT_SAMPLER
    # IC-Light's demo builds this scheduler (no beta_schedule: diffusers' default, linear).
    iclight_demo = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                               algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                                               steps_offset=1)
    ours = base_relighter.make_scheduler(base_relighter.default_sampler)
    assert type(ours) is DPMSolverMultistepScheduler
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.config) == public(iclight_demo.config)
    assert ours.config.beta_schedule == "linear"
    assert torch.equal(ours.betas, torch.linspace(0.00085, 0.012, 1000))
    # The SD1.5-betas variant stays, under a name that says so.
    names = {key: name for name, key in SAMPLERS.items()}
    assert "scaled_linear" in names["dpmpp_2m_sde_karras"] and "IC-Light" in names[ICLIGHT_SAMPLER]
    sd15 = base_relighter.make_scheduler("dpmpp_2m_sde_karras")
    assert sd15.config.beta_schedule == "scaled_linear" and sd15.config.use_karras_sigmas
    assert torch.allclose(sd15.betas, torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def test_second_pass_runs_at_highres_scale_one_at_the_same_size(relighter):
    """IC-Light always runs the second pass; at scale 1 it is img2img at the first pass's size."""
    images, info, calls = relight(relighter, sampler="ddim", highres_scale=1.0, highres_denoise=0.5)
    assert info["steps"] == [4, 4]  # round(4 / 0.5) = 8 scheduled, the last 4 run
    assert calls.sizes == [(8, 8)] * 8 and images[0].shape == (64, 64, 3) and info["size"] == [64, 64]
    images, info, calls = relight(relighter, sampler="ddim", highres_scale=1.5, highres_denoise=0.5)
    assert calls.sizes == [(8, 8)] * 4 + [(16, 16)] * 4 and images[0].shape == (128, 128, 3)
    # highres_denoise 0 (not an IC-Light setting) stops after the first pass.
    images, info, calls = relight(relighter, sampler="ddim", highres_scale=1.5, highres_denoise=0)
    assert info["steps"] == [4] and images[0].shape == (64, 64, 3) and len(calls.timesteps) == 4


def test_each_pass_conditions_on_the_full_resolution_foreground_cropped_to_its_size(relighter):
    """The condition channels equal encode(resize_cover(foreground, w, h)) of each pass's size."""
    from eddpm.conditioning import encode_images
    from eddpm.images import resize_cover

    _, _, calls = relight(relighter, sampler="ddim", highres_scale=1.5, highres_denoise=0.5)
    for index, (width, height) in ((0, (64, 64)), (-1, (128, 128))):
        expected = encode_images(relighter.vae, resize_cover(FOREGROUND, width, height))
        assert torch.allclose(calls.conditions[index], expected, atol=1e-5), (width, height)


@pytest.mark.parametrize("prompt,added,expected", [("", "best quality", ", best quality"),
                                                   ("sunset over sea", "best quality", "sunset over sea, best quality"),
                                                   ("a cat", "", "a cat, ")])
def test_prompt_is_prompt_comma_added_prompt_like_iclight(relighter, prompt, added, expected):
    tokenizer = relighter.tokenizer
    seen = []
    handle = relighter.text_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].tolist()))
    try:
        _, info, _ = relight(relighter, sampler="ddim", prompt=prompt, added_prompt=added, negative_prompt="",
                             highres_denoise=0)
    finally:
        handle.remove()
    assert info["prompt"] == expected
    ids = tokenizer(expected, add_special_tokens=False).input_ids
    width = tokenizer.model_max_length
    chunk = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert seen[0] == chunk + [tokenizer.eos_token_id] * (width - len(chunk)), "the text encoder saw another prompt"


def test_empty_prompt_notice_names_the_text_the_model_sees():
    notices = check_settings(RelightSettings(prompt="", sampler="ddim"))
    assert "The prompt is empty: the model sees ', best quality'" in notices[0], notices


# ---------------------------------------------------------------------------------------------------
# Settings, sizes, the gradient
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    (dict(width=100), "multiples of 64"), (dict(highres_scale=0.5), "highres_scale must be in [1, 3]"),
    (dict(highres_denoise=1.5), "highres_denoise must be in [0, 1]"), (dict(lowres_denoise=0), "lowres_denoise"),
    (dict(sampler="euler"), "unknown sampler 'euler'"), (dict(steps=2.5), "steps must be a whole number"),
    (dict(lighting="Up"), "lighting must be one of")])
def test_check_settings_refuses_bad_values(change, message):
    with pytest.raises(ValueError) as caught:
        check_settings(RelightSettings(**{"sampler": "ddim", **change}))
    assert message in str(caught.value)


def test_fixed_schedule_notices_and_no_step_left(relighter):
    notices = check_settings(RelightSettings(prompt="x", steps=25, sampler="eddpm_ddim"), relighter)
    assert notices == ["EDDPM runs its 4 learned steps (asked for 25)."]
    notices = check_settings(RelightSettings(prompt="x", steps=25, sampler="ays_dpmpp_2m"), relighter)
    assert notices == ["Align Your Steps runs its 10 steps (asked for 25)."]
    with pytest.raises(ValueError, match="use a denoise of at least 0.250"):
        relight(relighter, sampler="eddpm", highres_denoise=0.2)  # int(4 * 0.2) = 0 steps


def test_learned_steps_under_other_solvers_warn_when_the_mask_mode_changes_alpha_bar(tiny_components):
    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.scheduler import EDDPMScheduler

    scores = np.full(1000, 0.01)
    scores[KEPT] = 0.9
    paper = EDDPMScheduler.from_config(SD15_SCHEDULER_CONFIG, scores=scores.tolist(), num_kept_steps=4,
                                       mask_mode="paper")
    parts = tiny_components
    relighter = Relighter(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(paper.config), paper)
    notices = check_settings(RelightSettings(prompt="x", steps=4, sampler="eddpm_ddim"), relighter)
    assert len(notices) == 1 and "trained with mask_mode 'paper'" in notices[0], notices
    assert check_settings(RelightSettings(prompt="x", steps=4, sampler="eddpm"), relighter) == []


def test_highres_size_rounds_to_multiples_of_64():
    assert highres_size(512, 640, 1.5) == (768, 960)
    assert highres_size(64, 64, 1.0) == (64, 64)
    # IC-Light's int(round(side * scale / 64)) * 64, Python's round: halves go to the even neighbour.
    assert highres_size(64, 128, 1.5) == (128, 192)  # 1.5 -> 2, 3 -> 3
    assert highres_size(192, 64, 1.5) == (256, 128)  # 4.5 -> 4, 1.5 -> 2


def test_lighting_gradient_is_iclights_ramp():
    """IC-Light: np.linspace(255, 0, w) (Left) or np.linspace(0, 255, w) (Right), tiled, cast to uint8."""
    left = lighting_gradient("Left", 5, 2)
    assert left.shape == (2, 5, 3) and left.dtype == np.uint8
    assert left[0, :, 0].tolist() == [255, 191, 127, 63, 0] and (left == left[:1, :, :1]).all()
    assert lighting_gradient("Right", 5, 2)[1, :, 2].tolist() == [0, 63, 127, 191, 255]
    assert lighting_gradient("Top", 2, 5)[:, 1, 0].tolist() == [255, 191, 127, 63, 0]
    assert lighting_gradient("Bottom", 2, 5)[:, 0, 1].tolist() == [0, 63, 127, 191, 255]
    # At width 896, 179 * 255 / 895 = 51 exactly, which np.linspace(0, 255, 896) holds as 50.999...: IC-Light's
    # Right ramp has 50 there (a reversed Left ramp would have 51).
    assert lighting_gradient("Right", 896, 1)[0, 179, 0] == 50
    assert np.array_equal(lighting_gradient("Right", 896, 3)[..., 0], np.tile(np.linspace(0, 255, 896), (3, 1))
                          .astype(np.uint8))


# ---------------------------------------------------------------------------------------------------
# Inputs: the upload and the foreground
# ---------------------------------------------------------------------------------------------------


def test_prepare_foreground_uses_alpha_matte_or_image_at_full_resolution():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    alpha = rng.random((37, 53)).astype(np.float32)
    fg, note = prepare_foreground(rgb, alpha)
    expected = np.clip(127 + (rgb.astype(np.float64) - 127) * alpha[..., None], 0, 255).astype(np.uint8)
    assert fg.shape == (37, 53, 3) and np.abs(fg.astype(int) - expected).max() <= 1
    assert "alpha channel is the matte" in note
    fg, note = prepare_foreground(rgb, None)
    assert np.array_equal(fg, rgb) and "used as it is" in note
    # With a remover, hidden pixels (alpha 0) are gray before the remover sees them.
    rgb[:, :10] = (255, 0, 0)
    alpha[:, :10] = 0.0
    seen = []
    fg, note = prepare_foreground(rgb, alpha, lambda image: seen.append(image.copy()) or np.ones(image.shape[:2]))
    assert (seen[0][:, :10] == 127).all() and (fg[:, :10] == 127).all() and note.startswith("Background removed")
    with pytest.raises(ValueError, match="uint8 RGB"):
        prepare_foreground(rgb.astype(np.float32), None)


def test_read_upload_downscales_beyond_the_max_side_with_its_alpha(tmp_path):
    from PIL import Image

    from eddpm.images import ImageError

    rgba = np.zeros((64, 3000, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, :1500, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "wide.png")
    rgb, alpha, notices = read_upload(tmp_path / "wide.png")
    assert rgb.shape == (44, 2048, 3) and alpha.shape == (44, 2048)
    assert notices == ["The image (3000x64) was downscaled to 2048x44 (longest side limit 2048 px)."]
    assert alpha[:, :1000].max() == 0 and alpha[:, 1100:].min() == 1
    rgb, alpha, notices = read_upload(tmp_path / "wide.png", max_side=4096)
    assert rgb.shape == (64, 3000, 3) and notices == []
    with pytest.raises(ImageError, match="missing file"):
        read_upload(tmp_path / "nothing.png")
