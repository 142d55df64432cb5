"""bench/memory.py: its exact byte counts against the live optimizer and EMA of a tiny UNet after a real step,
and its GPU estimate against hand-computed numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import memory  # noqa: E402

from eddpm.config import resolve_config  # noqa: E402


@pytest.mark.parametrize("flags", [[], ["--no-use_8bit_adam"], ["--no-use_ema"]])
def test_exact_bytes_match_the_live_optimizer_and_ema(flags):
    """The tiny UNet has tensors below and above AdamW8bit's 4096-element threshold, so both layouts count."""
    import train
    from eddpm.ema import LowMemoryEMA
    from eddpm.tiny import build_tiny_components

    if "--no-use_8bit_adam" not in flags:
        pytest.importorskip("bitsandbytes")
    cfg = resolve_config(["--preset", "iclight", *flags])
    unet = build_tiny_components(seed=0).unet
    sizes = [p.numel() for p in unet.parameters()]
    assert min(sizes) < memory.ADAM8_MIN_SIZE < max(sizes)
    optimizer = train.make_optimizer(cfg, unet)
    ema = LowMemoryEMA(unet.parameters(), offload=cfg.offload_ema) if cfg.use_ema else None
    for p in unet.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    live_state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    expected = memory.static_bytes(cfg, unet)
    assert expected["optimizer"] == memory.live_bytes(live_state)
    assert expected["weights"] == expected["gradients"] == 4 * sum(sizes)
    assert expected["ema"] == (memory.live_bytes(ema.shadow_params) if ema else 0)


def test_sd15_bytes_are_the_documented_ones():
    """docs/real-size.md: 3.44 GB of float32 weights, 1.75 GB of 8-bit AdamW state, 6.88 GB of AdamW state."""
    static = memory.static_bytes(resolve_config(["--preset", "iclight"]))
    assert static["weights"] == static["gradients"] == static["ema"] == 4 * 859_532_484
    assert round(static["optimizer"] / 1e9, 2) == 1.75
    fp32 = memory.static_bytes(resolve_config(["--preset", "iclight", "--no-use_8bit_adam"]))
    assert fp32["optimizer"] == 8 * 859_532_484 + 4 * 686  # two moments, and a float32 step per tensor


def test_estimate_extrapolates_the_transient_in_pixels():
    cfg = resolve_config(["--preset", "iclight"])  # EMA offloaded: not on the GPU
    static = {"weights": 4e9, "gradients": 4e9, "optimizer": 2e9, "ema": 4e9}
    # transient 1 GB at 256^2 px and 2 GB at 512^2 px: a line through both, read at 512 x 640 px
    out = memory.estimate(cfg, static, {256: 1e9, 512: 2e9})
    assert out["transient"] == pytest.approx(2e9 + 1e9 * (512 * 640 - 512**2) / (512**2 - 256**2))
    assert out["on_device"] == 10e9
    assert out["total"] == pytest.approx(10e9 + out["transient"] + memory.CUDA_CONTEXT_GB * 1e9)
    on_gpu = memory.estimate(resolve_config(["--preset", "iclight", "--no-offload_ema"]), static, None)
    assert on_gpu["on_device"] == 14e9 and on_gpu["transient"] == 0


def test_configurations_resolve_and_their_twins_exist():
    confs = memory.configurations()
    names = {c.name for c in confs}
    assert confs[0].name == "preset defaults" and not confs[0].flags
    for conf in confs:
        conf.config()  # the flags are train.py's
        assert conf.measured_as is None or conf.measured_as in names
