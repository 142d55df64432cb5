"""Tests for eddpm/iclight.py: the IC-Light fc plumbing shared by training and the demo.

Every recipe is re-derived independently inside the test (numpy float64, hand-built token ids,
direct UNet calls) and compared with the library function; all models are tiny and built here.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from eddpm import iclight
from eddpm.iclight import (
    SD15_SCHEDULER_CONFIG,
    TINY_UNET_CONFIG,
    ConditionedUNet,
    MissingWeightsError,
    build_tiny_components,
    composite_on_gray,
    decode_latents,
    encode_condition,
    encode_images,
    encode_prompt_pair,
    encode_prompts,
    extract_foreground,
    load_base_components,
    load_iclight_unet,
    prompt_token_chunks,
    save_iclight_offsets,
    widen_conv_in,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_base_unet(seed: int) -> UNet2DConditionModel:
    """A tiny 4-channel base UNet, like SD1.5's before widening."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def padded_state(unet4: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The base state dict with conv_in.weight zero-padded to 8 input channels, built by hand."""
    state = {k: v.clone().float() for k, v in unet4.state_dict().items()}
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)
    return state


def random_offsets(
    keys_shapes: dict[str, torch.Size], seed: int, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (scale * torch.randn(s, generator=gen)).half() for k, s in keys_shapes.items()}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_components):
    """A complete tiny diffusers folder: 4-channel base unet (seed 1), vae, text_encoder, tokenizer."""
    root = tmp_path_factory.mktemp("tiny-base")
    make_base_unet(1).save_pretrained(root / "unet")
    tiny_components.vae.save_pretrained(root / "vae")
    tiny_components.text_encoder.save_pretrained(root / "text_encoder")
    tiny_components.tokenizer.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def offsets_path(tmp_path_factory):
    """A fake IC-Light offset file with a delta for every key of the 8-channel tiny UNet."""
    shapes = {k: v.shape for k, v in padded_state(make_base_unet(1)).items()}
    path = tmp_path_factory.mktemp("offsets") / "iclight_fake_fc.safetensors"
    save_file(random_offsets(shapes, seed=2), str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# widen_conv_in
# ---------------------------------------------------------------------------------------------------


def test_widen_conv_in_keeps_weights_zeros_new_channels_and_keeps_bias(tmp_path):
    unet = make_base_unet(0)
    old_w, old_b = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(sample, 10, text).sample

    assert widen_conv_in(unet, 8) is unet
    w = unet.conv_in.weight
    assert list(w.shape) == [32, 8, 3, 3]
    assert torch.equal(w[:, :4], old_w)
    assert torch.count_nonzero(w[:, 4:]) == 0, "new condition channels must start at zero"
    assert torch.equal(unet.conv_in.bias, old_b), "the bias must be kept"
    assert unet.config.in_channels == 8

    # Zero condition weights: any condition leaves the prediction unchanged.
    cond = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        after = unet(torch.cat([sample, cond], 1), 10, text).sample
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    unet.save_pretrained(tmp_path / "unet8")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet8")
    assert reloaded.config.in_channels == 8
    assert torch.equal(reloaded.conv_in.weight, w) and torch.equal(reloaded.conv_in.bias, old_b)

    with pytest.raises(ValueError, match="already has 8 input channels"):
        widen_conv_in(unet, 8)


# ---------------------------------------------------------------------------------------------------
# load_iclight_unet: strict offset merge
# ---------------------------------------------------------------------------------------------------


def test_load_iclight_unet_merges_every_key_in_float32(base_dir, offsets_path):
    unet = load_iclight_unet(base_dir, offsets_path)
    expected = padded_state(UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet"))
    offsets = load_file(str(offsets_path))
    merged = unet.state_dict()
    assert unet.config.in_channels == 8 and set(merged) == set(expected) == set(offsets)
    for key, value in merged.items():
        assert torch.equal(value, expected[key] + offsets[key].float()), key

    half = load_iclight_unet(base_dir, offsets_path, torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half.conv_in.weight, merged["conv_in.weight"].half())


def test_load_iclight_unet_without_offsets_is_the_widened_base(base_dir):
    unet = load_iclight_unet(base_dir)
    expected = padded_state(UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet"))
    for key, value in unet.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("failure", ["missing", "extra", "shape"])
def test_offset_merge_is_strict(base_dir, offsets_path, tmp_path, failure):
    offsets = load_file(str(offsets_path))
    if failure == "missing":
        key = "down_blocks.1.attentions.0.proj_in.weight"
        del offsets[key]
    elif failure == "extra":
        key = "not_a_layer.weight"
        offsets[key] = torch.zeros(3, dtype=torch.float16)
    else:
        key = "conv_in.weight"
        offsets[key] = offsets[key][:, :4].contiguous()  # a 4-channel offset for the 8-channel layer
    path = tmp_path / f"{failure}.safetensors"
    save_file(offsets, str(path))
    with pytest.raises(ValueError) as err:
        load_iclight_unet(base_dir, path)
    assert key in str(err.value) and str(path) in str(err.value), str(err.value)
    if failure == "shape":
        assert "[32, 4, 3, 3]" in str(err.value) and "[32, 8, 3, 3]" in str(err.value), str(err.value)


@pytest.mark.parametrize("name", ["offsets.bin", "offsets.ckpt", "pickle_in_disguise.safetensors"])
def test_pickle_offsets_are_refused_without_unpickling(base_dir, offsets_path, tmp_path, name):
    path = tmp_path / name
    torch.save(load_file(str(offsets_path)), path)
    with pytest.raises(ValueError) as err:
        load_iclight_unet(base_dir, path)
    assert str(path) in str(err.value) and "safetensors" in str(err.value), str(err.value)


def test_missing_offset_file_is_named(base_dir, tmp_path):
    path = tmp_path / "nowhere" / "iclight_sd15_fc.safetensors"
    with pytest.raises(MissingWeightsError) as err:
        load_iclight_unet(base_dir, path)
    assert str(path) in str(err.value) and "download_models.py" in str(err.value), str(err.value)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_local_weights_fail_fast_and_name_the_files(tmp_path):
    base = tmp_path / "realistic-vision-v51"
    offsets = tmp_path / "iclight_sd15_fc.safetensors"
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        load_iclight_unet(base, offsets)
    message = str(err.value)
    for name in (
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "iclight_sd15_fc.safetensors",
    ):
        assert name in message, message
    assert "python download_models.py" in message, message

    with pytest.raises(MissingWeightsError) as err:
        load_base_components(base)
    for name in ("vae/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json"):
        assert name in str(err.value), str(err.value)

    with pytest.raises(MissingWeightsError, match="download_models.py"):  # a hub id, offline, not cached
        load_iclight_unet("eddpm-tests/no-such-repo")
    with pytest.raises(MissingWeightsError, match="download_models.py"):
        load_base_components("eddpm-tests/no-such-repo")
    with pytest.raises(MissingWeightsError, match="sd15.safetensors"):  # a missing single-file checkpoint
        load_iclight_unet(tmp_path / "sd15.safetensors")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"offline failures took {elapsed:.1f} s"


def test_single_file_pickle_base_is_refused(tmp_path):
    path = tmp_path / "sd15.ckpt"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="never loaded"):
        load_iclight_unet(path)


def test_load_base_components_from_a_local_folder(base_dir, tiny_components):
    vae, text_encoder, tokenizer = load_base_components(base_dir)
    assert tokenizer.model_max_length == 77 and len(tokenizer) == len(tiny_components.tokenizer)
    assert tokenizer("a cat").input_ids == tiny_components.tokenizer("a cat").input_ids
    for a, b in zip(vae.state_dict().values(), tiny_components.vae.state_dict().values()):
        assert torch.equal(a, b)
    want = tiny_components.text_encoder.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in text_encoder.state_dict().items())


# ---------------------------------------------------------------------------------------------------
# save_iclight_offsets
# ---------------------------------------------------------------------------------------------------


def test_save_offsets_then_load_reproduces_the_trained_unet(base_dir, tmp_path):
    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")  # 4 channels
    trained = load_iclight_unet(base_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": move every weight, condition channels included
        for p in trained.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))

    path = save_iclight_offsets(trained, base, tmp_path / "exported.safetensors")
    info = iclight.describe_offsets(path)
    assert info["metadata"]["format"] == iclight.OFFSET_FORMAT
    assert info["num_tensors"] == len(trained.state_dict())
    offsets = load_file(str(path))
    assert all(v.dtype == torch.float16 for v in offsets.values())
    assert list(offsets["conv_in.weight"].shape) == [32, 8, 3, 3]

    loaded = load_iclight_unet(base_dir, path).state_dict()
    base_state = padded_state(base)
    for key, want in trained.state_dict().items():
        delta = want - base_state[key]
        # fp16 keeps 11 significant bits of each offset: error <= |offset| * 2^-11 (+ float32 rounding).
        bound = delta.abs() * 2.0**-11 + 1e-6
        err = (loaded[key] - want).abs()
        assert bool((err <= bound).all()), f"{key}: max error {err.max().item():.3g}"
    assert base.config.in_channels == 4, "save_iclight_offsets must not widen the base it is given"


# ---------------------------------------------------------------------------------------------------
# Condition encoding, decoding
# ---------------------------------------------------------------------------------------------------


def reference_latents(vae, model_input_f64: np.ndarray) -> torch.Tensor:
    """mode(E(x)) * 0.18215 for x already in model range, [B, H, W, 3] float64."""
    x = torch.from_numpy(model_input_f64).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode() * 0.18215


def test_encode_condition_matches_a_float64_rederivation(tiny_components):
    vae = tiny_components.vae
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    alpha = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(64, 48))  # exact in float32 and float64
    composite = np.floor(np.clip(127.0 + (image.astype(np.float64) - 127.0) * alpha[..., None], 0, 255))
    expected = reference_latents(vae, (composite / 127.0 - 1.0)[None])
    got = encode_condition(vae, image, alpha.astype(np.float32))
    assert got.shape == (1, 4, 8, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # Batched torch float images with arbitrary alpha (no uint8 rounding on this path).
    images = torch.from_numpy(rng.uniform(0, 255, size=(2, 3, 32, 40)))
    alphas = torch.from_numpy(rng.uniform(0, 1, size=(2, 32, 40)))
    composite = 127.0 + (images.numpy() - 127.0) * alphas.numpy()[:, None]
    expected = reference_latents(vae, (composite / 127.0 - 1.0).transpose(0, 2, 3, 1))
    torch.testing.assert_close(
        encode_condition(vae, images.float(), alphas.float()), expected, rtol=0, atol=1e-5
    )


def test_gray_127_maps_to_zero_and_uses_the_mode(tiny_components):
    vae = tiny_components.vae
    gray = torch.full((1, 3, 16, 16), 127, dtype=torch.uint8)
    with torch.no_grad():
        zero = vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean * vae.config.scaling_factor
    assert torch.equal(encode_images(vae, gray), zero)
    assert torch.equal(encode_images(vae, gray), encode_images(vae, gray)), "must be deterministic (mode)"


def test_composite_on_gray_numpy_and_torch_agree():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    alpha = rng.choice([0.0, 0.5, 1.0], size=(5, 7)).astype(np.float32)
    out = composite_on_gray(image, alpha)
    assert out.dtype == np.uint8
    assert np.array_equal(out[alpha == 1.0], image[alpha == 1.0])
    assert np.all(out[alpha == 0.0] == 127)
    torch_out = composite_on_gray(
        torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(alpha)[None]
    )
    assert np.array_equal(torch_out[0].permute(1, 2, 0).numpy(), out)


def test_decode_latents_inverts_the_pixel_mapping(tiny_components):
    vae = tiny_components.vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = vae.decode(latents / 0.18215).sample.double().numpy()
    expected = np.clip(np.round((x + 1.0) * 127.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    got = decode_latents(vae, latents)
    assert got.shape == (2, 64, 64, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------------
# extract_foreground
# ---------------------------------------------------------------------------------------------------


class FakeRMBG(nn.Module):
    """BriaRMBG's contract: forward(x) -> (6 side outputs [B, 1, H, W], finest first; features)."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(3.0))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        # Deliberately outside [0, 1] so that clipping is visible; coarser outputs are all zero.
        finest = 1.5 * torch.sigmoid(self.gain * x.mean(1, keepdim=True)) - 0.25  # [B, 1, H, W]
        coarse = [torch.zeros_like(finest) for _ in range(5)]
        return [finest, *coarse], [x.mean(1, keepdim=True)] * 6


def test_extract_foreground_follows_iclight_rmbg_call():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(90, 200, 3), dtype=np.uint8)
    rmbg = FakeRMBG()
    fg, alpha = extract_foreground(rmbg, image, target_area=128 * 128)

    # 90 x 200 scaled to about 128^2 pixels: k = sqrt(16384 / 18000) = 0.954, sides 1.34 x 2.98 units of 64.
    (x,) = rmbg.seen
    assert tuple(x.shape) == (1, 3, 64, 192), tuple(x.shape)
    feed = np.asarray(Image.fromarray(image).resize((192, 64), Image.LANCZOS)).astype(np.float64)
    torch.testing.assert_close(
        x[0].permute(1, 2, 0).double(), torch.from_numpy(feed / 127.0 - 1.0), rtol=0, atol=1e-6
    )

    assert alpha.shape == (90, 200) and alpha.dtype == np.float32
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    with torch.no_grad():
        finest = rmbg(x)[0][0]
    expected_alpha = torch.nn.functional.interpolate(finest, size=(90, 200), mode="bilinear")[0, 0].numpy()
    np.testing.assert_allclose(alpha, np.clip(expected_alpha, 0, 1), atol=1e-6)
    assert alpha.max() > 0.5, "the finest (first) side output must be used, not the zero coarse ones"

    expected_fg = np.clip(
        127.0 + (image.astype(np.float64) - 127.0) * alpha[..., None].astype(np.float64), 0, 255
    )
    assert fg.shape == image.shape and fg.dtype == np.uint8
    assert np.abs(fg.astype(np.float64) - np.floor(expected_fg)).max() <= 1


@pytest.mark.parametrize(("height", "width"), [(640, 512), (1024, 1024), (333, 1500), (50, 40)])
def test_rmbg_input_size_is_multiple_of_64_near_the_target_area(height, width):
    h, w = iclight.rmbg_input_size(height, width)
    assert h % 64 == 0 and w % 64 == 0 and h >= 64 and w >= 64
    # Each side is off by at most half a unit of 64 from the exact aspect-preserving size.
    k = (1024 * 1024 / (height * width)) ** 0.5
    assert abs(h - height * k) <= 32 and abs(w - width * k) <= 32


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------


def test_prompt_chunks_follow_iclight_long_prompt_recipe(tiny_components):
    tok = tiny_components.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    a = tok("a", add_special_tokens=False).input_ids
    assert len(a) == 1, "the tiny tokenizer encodes 'a' as one token"
    chunks = prompt_token_chunks(tok, "a " * 100)  # 100 tokens -> 75 + 25
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0] == [bos] + a * 75 + [eos]
    assert chunks[1] == [bos] + a * 25 + [eos] * 51
    assert prompt_token_chunks(tok, "") == [[bos] + [eos] * 76], "an empty prompt is one empty chunk"
    # The short case equals the usual diffusers tokenisation (pad token = EOS for CLIP).
    usual = tok("a photo", padding="max_length", max_length=77, truncation=True).input_ids
    assert prompt_token_chunks(tok, "a photo") == [usual]
    assert prompt_token_chunks(tok, "a " * 100, max_chunks=1) == chunks[:1]


def test_encode_prompt_pair_chunks_and_repeats_negative(tiny_components):
    tok, te = tiny_components.tokenizer, tiny_components.text_encoder
    long_prompt = "a " * 100
    with torch.no_grad():
        cond, uncond = encode_prompt_pair(tok, te, long_prompt, "bad")
        single = encode_prompts(tok, te, [long_prompt, "bad"])  # [2, 77, 32], truncated
        pair_short = encode_prompt_pair(tok, te, "a photo", "bad")
        batch_short = encode_prompts(tok, te, ["a photo", "bad"])
        empty_cond, empty_uncond = encode_prompt_pair(tok, te, "", "")
        empty_ref = encode_prompts(tok, te, [""])
        _, long_uncond = encode_prompt_pair(tok, te, "", long_prompt)
        tail_ref = te(torch.tensor(prompt_token_chunks(tok, long_prompt)[1:])).last_hidden_state

    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond[0, :77], single[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[0, 77:], tail_ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond[0, :77], single[1], rtol=0, atol=1e-6)
    assert torch.equal(uncond[0, :77], uncond[0, 77:]), "the single negative chunk is repeated"

    # Single-chunk case: identical to the training-batch encoder.
    assert torch.equal(pair_short[0][0], batch_short[0]) and torch.equal(pair_short[1][0], batch_short[1])
    assert empty_cond.shape == (1, 77, 32)
    torch.testing.assert_close(empty_cond[0], empty_ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(empty_uncond, empty_cond, rtol=0, atol=0)
    assert long_uncond.shape == (1, 154, 32)


# ---------------------------------------------------------------------------------------------------
# ConditionedUNet inside diffusers pipelines
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Tiny components, schedules, download script
# ---------------------------------------------------------------------------------------------------


def test_build_tiny_components_is_deterministic_and_fast():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    start = time.perf_counter()
    a = build_tiny_components(seed=0)
    elapsed = time.perf_counter() - start
    assert torch.equal(torch.rand(1), before), "build_tiny_components must not move the global RNG"
    b = build_tiny_components(seed=0)
    c = build_tiny_components(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs for the same seed"
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), f"{name} ignores the seed"
    assert (
        a.unet.config.in_channels == 8
        and a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size
    )
    assert a.vae.config.scaling_factor == 0.18215 and a.tokenizer.model_max_length == 77
    with torch.no_grad():
        assert encode_images(a.vae, torch.zeros(1, 3, 64, 64)).shape == (1, 4, 8, 8), "VAE must downsample 8x"
    ids = a.tokenizer("Golden hour, café; RGB-lit! 42 ünïcödé 日本", add_special_tokens=False).input_ids
    assert a.tokenizer.unk_token_id not in ids, "every caption must tokenise without unknowns"
    assert elapsed < 3.0, f"build_tiny_components took {elapsed:.2f} s"


def test_schedule_constants_match_the_fact_sheet():
    sd15 = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert abs(sd15.alphas_cumprod[999].item() - 0.00466) < 5e-5
    demo = DPMSolverMultistepScheduler(**iclight.ICLIGHT_DEMO_SAMPLER_CONFIG)
    # Built without beta_schedule in the demo, hence linear betas.
    torch.testing.assert_close(demo.betas, torch.linspace(0.00085, 0.012, 1000), rtol=0, atol=1e-8)
    assert demo.config.use_karras_sigmas and demo.config.algorithm_type == "sde-dpmsolver++"


def run_download_models(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "download_models.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return proc, time.perf_counter() - start


def test_download_models_offline_fails_fast_and_clearly(tmp_path):
    proc, elapsed = run_download_models("--models_dir", str(tmp_path / "models"), "--only", "iclight")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    assert "HF_HUB_OFFLINE" in output and "internet" in output, output
    assert elapsed < 10.0, f"took {elapsed:.1f} s"
    assert not (tmp_path / "models" / "iclight_sd15_fc.safetensors").exists()

    proc, elapsed = run_download_models("--help")
    assert proc.returncode == 0 and "--models_dir" in proc.stdout and "--only" in proc.stdout
    assert elapsed < 10.0, f"--help took {elapsed:.1f} s"
