"""Tests for eddpm/weights.py: widening conv_in, the strict offset merge, offset export, loading and the
offline failures (and download_models.py's). The expected weights are built by hand (zero padding, base
plus offset in float32) from tiny UNets made here; nothing is downloaded."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from eddpm.iclight import MissingWeightsError
from eddpm.tiny import TINY_UNET_CONFIG
from eddpm.weights import (
    describe_offsets,
    load_base_components,
    load_iclight_unet,
    merge_offsets_,
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


def test_nonfinite_offsets_are_refused_naming_the_tensors_before_any_weight_changes(offsets_path, tmp_path):
    offsets = load_file(str(offsets_path))
    nan_key, inf_key = "mid_block.resnets.0.conv1.weight", "conv_out.bias"
    offsets[nan_key] = offsets[nan_key].clone()
    offsets[nan_key].view(-1)[7] = float("nan")
    offsets[inf_key] = offsets[inf_key].clone()
    offsets[inf_key][0] = float("-inf")
    path = tmp_path / "damaged.safetensors"
    save_file(offsets, str(path))
    unet = widen_conv_in(make_base_unet(1))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError) as err:
        merge_offsets_(unet, path)
    message = str(err.value)
    assert "NaN or Inf" in message and "2 tensor(s)" in message and str(path) in message, message
    assert nan_key in message and inf_key in message, message
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # nothing was merged


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
    info = describe_offsets(path)
    assert info["metadata"]["format"] == "iclight-offset" and info["metadata"]["in_channels"] == "8"
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
# download_models.py
# ---------------------------------------------------------------------------------------------------


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
