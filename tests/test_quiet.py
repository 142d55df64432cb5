"""eddpm/quiet.py: a tiny train.py run and a relight.py run print none of the known-harmless library messages,
and the filters drop exactly those messages (the same loggers' other messages still show)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
# What each message looked like before the filters, as the libraries print it.
NOISE = ("should be kept in float32", "requires torchvision", "gemm_4bit_forward")


def test_a_tiny_train_and_relight_print_no_known_noise(tmp_path):
    train = subprocess.run(
        [sys.executable, REPO / "train.py", "--preset", "tiny", "--output_dir", tmp_path / "out", "--cache_dir",
         tmp_path / "cache", "--max_train_steps", "1", "--num_validation_images", "1", "--checkpointing_steps", "0",
         "--report_to", "none"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    relight = subprocess.run(
        [sys.executable, REPO / "relight.py", "--checkpoint", tmp_path / "out", "--input",
         REPO / "data" / "synthetic" / "condition" / "00000.png", "--output", tmp_path / "o.png", "--width", "64",
         "--height", "64", "--steps", "2", "--highres_scale", "1"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert relight.returncode == 0, relight.stderr[-3000:]
    for name, proc in (("train.py", train), ("relight.py", relight)):
        noise = [line for line in (proc.stdout + proc.stderr).splitlines() if any(n in line for n in NOISE)]
        assert not noise, f"{name} printed: {noise}"
    # the run did pass through the code that logs them: the fp16 export casts the UNet
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("logger, message, dropped", [
    ("diffusers.models.modeling_utils", "There are modules in UNet2DConditionModel that should be kept in float32: "
     "[]. Casting directly with `to()` can lead to inconsistent results", True),
    ("diffusers.models.modeling_utils", "There are modules in UNet2DConditionModel that should be kept in float32: "
     "['norm']. Casting directly with `to()` can lead to inconsistent results", False),  # a real list still shows
    ("diffusers.models.modeling_utils", "Some weights of the model checkpoint were not used", False),
    ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed); falling back "
     "to `CLIPImageProcessorPil` for backward compatibility.", True),
    ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed).", False),
    ("transformers", "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
     "`CLIPImageProcessorPil` for backward compatibility.", False),  # only the logger that says it
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module "
     "named 'kernels'.", True),
    ("bitsandbytes.backends.cpu.ops", "Failed to load another kernel", False),
])
def test_filters_drop_exactly_the_known_messages(logger, message, dropped):
    import eddpm.quiet

    eddpm.quiet.install()
    eddpm.quiet.install()  # idempotent
    target = logging.getLogger(logger)
    assert sum(isinstance(f, eddpm.quiet._DropMessage) for f in target.filters) == (
        0 if logger == "transformers" else 1)
    record = target.makeRecord(logger, logging.WARNING, __file__, 0, message, None, None)
    assert target.filter(record) is (not dropped)
