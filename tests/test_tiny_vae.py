"""The VAE shipped in models/tiny/vae (scripts/train_tiny_vae.py): SD's latent layout, roughly unit-variance
scaled latents, and reconstructions of the bundled synthetic images that no untrained VAE comes close to."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from eddpm.conditioning import decode_latents, encode_images
from eddpm.examples import load_example
from eddpm.metadata import read_metadata
from eddpm.tiny import TINY_VAE_CONFIG

VAE_DIR = REPO_ROOT / "models" / "tiny" / "vae"
# models/tiny/README.md: on all 100 images at 64 px the shipped VAE measures 28.9 dB, an untrained VAE of
# the same config 13.0 dB and a flat gray 127 image 16.9 dB.
PSNR_FLOOR = 24.0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def trained_vae():
    from diffusers import AutoencoderKL

    assert (VAE_DIR / "config.json").is_file(), f"{VAE_DIR} is missing: run python scripts/train_tiny_vae.py"
    return AutoencoderKL.from_pretrained(VAE_DIR, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bundled_images() -> np.ndarray:
    """Six targets and six gray-composited conditions of data/synthetic at 64 px: uint8 [12, 64, 64, 3]."""
    data_dir = str(REPO_ROOT / "data" / "synthetic")
    rows, _ = read_metadata(data_dir)
    examples = [load_example(r, data_dir, (64, 64)) for r in rows[:6]]
    return np.stack([e.target for e in examples] + [e.condition for e in examples])


def _round_trip_psnr(vae, images: np.ndarray) -> float:
    recon = decode_latents(vae, encode_images(vae, images))
    assert recon.shape == images.shape and recon.dtype == np.uint8
    return float(np.mean([_psnr(a, b) for a, b in zip(images, recon)]))


def test_sd_latent_layout(trained_vae):
    cfg = trained_vae.config
    assert cfg.latent_channels == 4 and cfg.scaling_factor == pytest.approx(0.18215, abs=0)
    for side in (64, 128):
        latents = encode_images(trained_vae, torch.full((2, 3, side, side), 127.0))
        assert list(latents.shape) == [2, 4, side // 8, side // 8], f"{side} px -> {list(latents.shape)}"
    weights = VAE_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 5 * 2**20, f"{weights} is {weights.stat().st_size} bytes"


def test_reconstruction_beats_untrained_and_flat_gray(trained_vae, bundled_images):
    from diffusers import AutoencoderKL

    trained = _round_trip_psnr(trained_vae, bundled_images)
    torch.manual_seed(0)
    untrained = _round_trip_psnr(AutoencoderKL(**trained_vae.config).eval(), bundled_images)
    gray = float(np.mean([_psnr(img, np.full_like(img, 127)) for img in bundled_images]))
    assert trained > PSNR_FLOOR, f"trained VAE {trained:.2f} dB <= floor {PSNR_FLOOR}"
    assert max(untrained, gray) < PSNR_FLOOR - 5, f"the floor does not discriminate: untrained {untrained:.2f} dB, gray {gray:.2f} dB"


def test_scaled_latents_have_about_unit_variance(trained_vae, bundled_images):
    latents = encode_images(trained_vae, bundled_images).double()  # [12, 4, 8, 8], times 0.18215
    std, mean = latents.std(dim=(0, 2, 3)), latents.mean(dim=(0, 2, 3))
    assert ((std > 0.5) & (std < 2.0)).all(), f"per-channel std {std.tolist()}"
    assert (mean.abs() < 0.6).all(), f"per-channel mean {mean.tolist()}"


def test_tiny_components_load_the_shipped_vae(trained_vae):
    from eddpm.models import load_components

    loaded = load_components("tiny").vae.state_dict()
    for key, value in trained_vae.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_fold_latent_stats_is_an_exact_reparameterisation():
    from diffusers import AutoencoderKL

    spec = importlib.util.spec_from_file_location("train_tiny_vae", REPO_ROOT / "scripts" / "train_tiny_vae.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval().double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        images = vae.decode(before.mode()).sample
        mean, std = torch.tensor([0.3, -1.0, 0.0, 2.0]).double(), torch.tensor([0.5, 2.0, 1.0, 4.0]).double()
        script.fold_latent_stats_(vae, mean, std)
        after = vae.encode(x).latent_dist
        expected = (before.mode() - mean[:, None, None]) / (std[:, None, None] * vae.config.scaling_factor)
        torch.testing.assert_close(after.mode(), expected)
        torch.testing.assert_close(after.std, before.std / (std[:, None, None] * vae.config.scaling_factor))
        torch.testing.assert_close(vae.decode(after.mode()).sample, images)
