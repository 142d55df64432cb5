"""Tests for eddpm/conditioned_unet.py: the 8-channel UNet inside diffusers' text-to-image and image-to-image
pipelines. The UNet's actual inputs are recorded with a forward pre-hook and compared with the noisy latent
and condition built by hand (docs/iclight-facts.md, "The 8-channel UNet")."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from eddpm.conditioned_unet import ConditionedUNet
from eddpm.conditioning import encode_condition, encode_images
from eddpm.iclight import SD15_SCHEDULER_CONFIG


def make_pipeline(cls, tiny_components, cond_unet):
    pipe = cls(
        vae=tiny_components.vae,
        text_encoder=tiny_components.text_encoder,
        tokenizer=tiny_components.tokenizer,
        unet=cond_unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def recorded_unet_inputs(tiny_components):
    """The samples the inner 8-channel UNet receives (a forward pre-hook, removed afterwards)."""
    seen = []
    handle = tiny_components.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    yield seen
    handle.remove()


def test_conditioned_unet_looks_like_a_4_channel_unet(tiny_components):
    unet = tiny_components.unet
    cond_unet = ConditionedUNet(unet)
    assert cond_unet.config.in_channels == 4 and unet.config.in_channels == 8
    assert cond_unet.config.sample_size == 8 and cond_unet.config.time_cond_proj_dim is None
    assert cond_unet.dtype == torch.float32 and cond_unet.device.type == "cpu"

    gen = torch.Generator().manual_seed(6)
    sample, cond = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(4, 77, 32, generator=gen)
    with pytest.raises(RuntimeError, match="no condition"):
        cond_unet(sample, 10, text)
    with torch.no_grad(), cond_unet.condition(cond):
        got = cond_unet(sample, 10, text, return_dict=False)[0]
        want = unet(torch.cat([sample, torch.cat([cond, cond])], 1), 10, text).sample
    assert torch.equal(got, want)
    assert cond_unet._condition is None, "the context manager restores the previous condition"
    with pytest.raises(ValueError, match="does not fit"), cond_unet.condition(cond):
        cond_unet(sample[:3], 10, text[:3])


def test_conditioned_unet_in_text_to_image_pipeline_with_cfg(tiny_components, recorded_unet_inputs):
    cond_unet = ConditionedUNet(tiny_components.unet)
    pipe = make_pipeline(StableDiffusionPipeline, tiny_components, cond_unet)
    cond = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with cond_unet.condition(cond, num_images_per_prompt=2):
        out = pipe(
            ["a cat", "a dog"],
            negative_prompt=["bad", "bad"],
            guidance_scale=2.0,
            num_inference_steps=2,
            num_images_per_prompt=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
    assert out.images.shape == (4, 64, 64, 3)
    assert len(recorded_unet_inputs) == 2
    per_image = torch.stack([cond[0], cond[0], cond[1], cond[1]])  # pipeline order: p0, p0, p1, p1
    for sample in recorded_unet_inputs:
        assert sample.shape == (8, 8, 8, 8), "CFG doubles 4 images; the UNet sees 8 channels"
        assert torch.equal(sample[:4, 4:], per_image) and torch.equal(sample[4:, 4:], per_image)
        assert torch.equal(sample[:4, :4], sample[4:, :4]), "both CFG halves share the noisy latent"


def test_conditioned_unet_in_img2img_pipeline_takes_encoded_latents(tiny_components, recorded_unet_inputs):
    vae = tiny_components.vae
    cond_unet = ConditionedUNet(tiny_components.unet)
    pipe = make_pipeline(StableDiffusionImg2ImgPipeline, tiny_components, cond_unet)
    gradient = torch.linspace(0, 255, 64).expand(1, 3, 64, 64)  # IC-Light's "Left/Right" style init
    init = encode_images(vae, gradient)  # x / 127 - 1, not the pipeline's x / 127.5 - 1
    cond = encode_condition(vae, torch.full((1, 3, 64, 64), 200.0))
    with cond_unet.condition(cond):
        out = pipe(
            "a cat",
            image=init,
            strength=1.0,
            guidance_scale=2.0,
            num_inference_steps=2,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    assert out.images.shape == (1, 4, 8, 8)
    first = recorded_unet_inputs[0]
    assert first.shape == (2, 8, 8, 8)
    assert torch.equal(first[0, 4:], cond[0]) and torch.equal(first[1, 4:], cond[0])
    # The 4-channel `image` was used as latents directly: x_t = add_noise(init, noise, t0).
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(2)
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(0))
    expected = scheduler.add_noise(init, noise, scheduler.timesteps[:1])
    torch.testing.assert_close(first[:1, :4], expected, rtol=0, atol=1e-6)

