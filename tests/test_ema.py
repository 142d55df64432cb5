"""eddpm/ema.py: LowMemoryEMA against diffusers' EMAModel (the reference it replaces), and its in-place resume."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from eddpm.ema import LowMemoryEMA


def params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((4, 3), (5,), (2, 2, 3))]


@pytest.mark.parametrize("offload", [False, True])
def test_steps_match_emamodel_and_a_resume_loads_in_place(offload):
    model = params(0)
    reference = EMAModel(model, decay=0.99, use_ema_warmup=True, power=3 / 4)
    ema = LowMemoryEMA(model, offload=offload, decay=0.99, use_ema_warmup=True, power=3 / 4)
    for step in range(3):
        with torch.no_grad():
            for p, new in zip(model, params(step + 1)):
                p.copy_(new)
        reference.step(model)
        ema.step(model)
    for s, r in zip(ema.shadow_params, reference.shadow_params):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-7)

    resumed = LowMemoryEMA(params(9), offload=offload, decay=0.99, use_ema_warmup=True, power=3 / 4)
    before = [s.data_ptr() for s in resumed.shadow_params]
    resumed.load_state_dict(reference.state_dict())  # a checkpoint's EMA
    assert [s.data_ptr() for s in resumed.shadow_params] == before  # copied into place, no second EMA
    assert resumed.optimization_step == reference.optimization_step == 3
    for s, r in zip(resumed.shadow_params, reference.shadow_params):
        assert torch.equal(s, r)
    with pytest.raises(ValueError, match="do not match"):
        resumed.load_state_dict({**reference.state_dict(), "shadow_params": reference.shadow_params[:2]})
