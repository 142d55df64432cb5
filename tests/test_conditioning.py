"""Tests for eddpm/conditioning.py: the condition recipe, pixels <-> latents, IC-Light's RMBG call.

Each recipe is re-derived here from docs/iclight-facts.md (numpy float64, IC-Light's resize-and-crop
written out with PIL, hand-computed pixel values) and compared with the library function.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from eddpm.conditioning import (
    composite_on_gray,
    decode_latents,
    encode_condition,
    encode_images,
    extract_foreground,
    prepare_condition,
    rmbg_input_size,
)


def reference_latents(vae, model_input_f64: np.ndarray) -> torch.Tensor:
    """mode(E(x)) * 0.18215 for x already in model range, [B, H, W, 3] float64."""
    x = torch.from_numpy(model_input_f64).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode() * 0.18215


def reference_composite(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """floor(clip(127 + (img - 127) * alpha, 0, 255)) in float64; image [..., 3], alpha [...]."""
    out = 127.0 + (image.astype(np.float64) - 127.0) * alpha.astype(np.float64)[..., None]
    return np.floor(np.clip(out, 0, 255)).astype(np.uint8)


def reference_resize_and_center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """IC-Light's resize_and_center_crop, step by step: cover scale, Lanczos, PIL crop of the float box."""
    pil = Image.fromarray(image)
    w, h = pil.size
    scale = max(width / w, height / h)
    rw, rh = int(round(w * scale)), int(round(h * scale))
    resized = pil.resize((rw, rh), Image.LANCZOS)
    box = ((rw - width) / 2, (rh - height) / 2, (rw + width) / 2, (rh + height) / 2)
    return np.array(resized.crop(box))


# ---------------------------------------------------------------------------------------------------
# composite_on_gray, prepare_condition
# ---------------------------------------------------------------------------------------------------


def test_composite_on_gray_matches_float64_formula_for_numpy_and_torch():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    alpha = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(2, 5, 7))  # exact in float32
    expected = reference_composite(image, alpha)  # [2, 5, 7, 3]
    assert expected[alpha == 0.0].tolist() == [[127, 127, 127]] * int((alpha == 0.0).sum())

    single = composite_on_gray(image[0], alpha[0].astype(np.float32))
    assert single.dtype == np.uint8 and np.array_equal(single, expected[0])
    batched = composite_on_gray(image, alpha.astype(np.float32)[..., None])  # trailing 1 on alpha
    assert np.array_equal(batched, expected)

    images_t = torch.from_numpy(image).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
    for alpha_t in (torch.from_numpy(alpha).float(), torch.from_numpy(alpha).float()[:, None]):
        out = composite_on_gray(images_t, alpha_t)
        assert out.dtype == torch.uint8
        assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), expected)
    floats = composite_on_gray(images_t.double(), torch.from_numpy(alpha))  # float stays float, no truncation
    want = 127.0 + (image.astype(np.float64) - 127.0) * alpha[..., None]
    np.testing.assert_allclose(floats.permute(0, 2, 3, 1).numpy(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("src", "size"), [((90, 120), (64, 64)), ((64, 48), (40, 56)), ((50, 51), (64, 72))])
def test_prepare_condition_composites_then_resizes_like_iclight(src, size):
    rng = np.random.default_rng(2)
    height, width = src
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    alpha = np.zeros((height, width))
    alpha[height // 4 : 3 * height // 4, width // 3 :] = 1.0  # a hard matte edge, as RMBG's mattes have
    alpha[: height // 4] = 0.5
    out = prepare_condition(rgb, alpha.astype(np.float32), *size)
    expected = reference_resize_and_center_crop(reference_composite(rgb, alpha), *size)
    assert out.dtype == np.uint8 and out.shape == (size[1], size[0], 3)
    assert np.array_equal(out, expected), f"max difference {np.abs(out.astype(int) - expected).max()}"

    # The order matters: resizing first and compositing the resized matte gives a different condition,
    # so the assertion above would catch the wrong order.
    matte_rgb = np.repeat((alpha * 255).astype(np.uint8)[..., None], 3, axis=-1)  # [H, W, 3]
    matte = reference_resize_and_center_crop(matte_rgb, *size)
    wrong = reference_composite(reference_resize_and_center_crop(rgb, *size), matte[..., 0] / 255.0)
    assert not np.array_equal(out, wrong)


def test_prepare_condition_without_alpha_is_the_resized_image():
    rgb = np.random.default_rng(3).integers(0, 256, size=(70, 100, 3), dtype=np.uint8)
    out = prepare_condition(rgb, None, 64, 48)
    assert np.array_equal(out, reference_resize_and_center_crop(rgb, 64, 48))


# ---------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------


def test_encode_condition_of_prepared_pixels_matches_a_float64_rederivation(tiny_components):
    vae = tiny_components.vae
    rng = np.random.default_rng(0)
    prepared = rng.integers(0, 256, size=(2, 64, 48, 3), dtype=np.uint8)  # channels last, as stored
    expected = reference_latents(vae, prepared.astype(np.float64) / 127.0 - 1.0)
    got = encode_condition(vae, prepared)
    assert got.shape == (2, 4, 8, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    as_tensor = torch.from_numpy(prepared).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
    torch.testing.assert_close(encode_condition(vae, as_tensor), expected, rtol=0, atol=1e-5)


def test_encode_condition_with_a_separate_alpha_composites_first(tiny_components):
    vae = tiny_components.vae
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    alpha = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(64, 48))  # exact in float32 and float64
    expected = reference_latents(vae, (reference_composite(image, alpha) / 127.0 - 1.0)[None])
    got = encode_condition(vae, image, alpha.astype(np.float32))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # Batched torch float images with arbitrary alpha (no uint8 truncation on this path).
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


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


class FixedDecoder:
    """A VAE stand-in whose decoder returns the image `x` [B, 3, H, W] and records the latents it got."""

    def __init__(self, x: torch.Tensor):
        self.x, self.seen = x, []
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.config = SimpleNamespace(scaling_factor=0.18215)

    def decode(self, z):
        self.seen.append(z)
        return SimpleNamespace(sample=self.x)


def test_decode_latents_uses_iclight_mapping_on_hand_computed_values():
    # x * 127.5 + 127.5, clipped to [0, 255], truncated: worked out by hand.
    x_values = [1.0, -1.0, 0.0, 0.5, -0.5, 0.999, -0.004, 1.3, -1.7]
    want = [255, 0, 127, 191, 63, 254, 126, 255, 0]
    x = torch.tensor(x_values).reshape(1, 1, 1, -1).expand(1, 3, 1, len(x_values))  # [1, 3, 1, 9]
    vae = FixedDecoder(x)
    latents = torch.full((1, 4, 1, 1), 0.18215)
    got = decode_latents(vae, latents)
    assert got.shape == (1, 1, len(x_values), 3) and got.dtype == np.uint8
    for channel in range(3):
        assert got[0, 0, :, channel].tolist() == want, got[0, 0, :, channel].tolist()
    torch.testing.assert_close(vae.seen[0], torch.ones(1, 4, 1, 1), msg="the decoder must see z / 0.18215")


def test_decode_latents_with_the_tiny_vae_matches_float64(tiny_components):
    vae = tiny_components.vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = vae.decode(latents / 0.18215).sample.double().numpy()
    expected = np.clip(x * 127.5 + 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    got = decode_latents(vae, latents)
    assert got.shape == (2, 64, 64, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - expected.astype(int))
    # float32 vs float64 may land on either side of an integer, never further.
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


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
    h, w = rmbg_input_size(height, width)
    assert h % 64 == 0 and w % 64 == 0 and h >= 64 and w >= 64
    # Each side is off by at most half a unit of 64 from the exact aspect-preserving size.
    k = (1024 * 1024 / (height * width)) ** 0.5
    assert abs(h - height * k) <= 32 and abs(w - width * k) <= 32
