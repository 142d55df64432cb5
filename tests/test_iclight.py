"""Tests for eddpm/iclight.py: the IC-Light constants against diffusers' own schedulers and the numbers in
docs/iclight-facts.md, and the module's promise to import nothing heavy."""

import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from eddpm import iclight

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_schedule_constants_match_the_documented_numbers():
    sd15 = DDPMScheduler.from_config(iclight.SD15_SCHEDULER_CONFIG)
    assert abs(sd15.alphas_cumprod[999].item() - 0.00466) < 5e-5
    # scaled_linear: betas are the squares of a linspace of square roots.
    want = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sd15.betas.double(), want, rtol=0, atol=1e-8)
    demo = DPMSolverMultistepScheduler(**iclight.ICLIGHT_DEMO_SAMPLER_CONFIG)
    # Built without beta_schedule in the demo, hence linear betas.
    torch.testing.assert_close(demo.betas, torch.linspace(0.00085, 0.012, 1000), rtol=0, atol=1e-8)
    assert demo.config.use_karras_sigmas and demo.config.algorithm_type == "sde-dpmsolver++"


def test_iclight_imports_no_heavy_library():
    heavy = "{'torch', 'numpy', 'diffusers', 'PIL'}"
    code = f"import sys, eddpm.iclight; print(sorted({heavy} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
