"""The EMA of the UNet's weights without a temporary copy of the model, optionally kept in CPU memory.

diffusers' `EMAModel` (its warm-up decay, state_dict, copy_to, store/restore) with two changes that matter at
SD1.5 size (860M parameters, 3.44 GB in float32): its foreach step computes `shadow - param` for every tensor
at once, a second full copy of the model for a moment; here the update is an in-place
`shadow.lerp_(param, 1 - decay)`, which allocates nothing. With `offload=True` the shadow weights live in CPU
memory (diffusers' examples call this `--offload_ema`), are updated tensor by tensor, and are copied back the
same way, so the GPU never holds more than one tensor of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


class LowMemoryEMA(EMAModel):
    """EMAModel whose step is shadow <- shadow + (1 - decay) (param - shadow), in place; `offload` keeps it on the CPU.

    Build it while the model is still on the CPU, so that the shadow copy is made there; then `.to(device)`
    unless offloaded. Only parameters with requires_grad are tracked (an average of a frozen weight is the
    weight): every method takes the model's full parameter list and skips the frozen ones, so a LoRA run
    (eddpm/lora.py) averages only its adapters and conv_in."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], offload: bool = False, **kwargs):
        super().__init__(_trained(parameters), foreach=True, **kwargs)
        self.offload = offload
        if offload:
            self.to("cpu")

    def to(self, device=None, dtype=None, non_blocking=False) -> None:
        super().to("cpu" if self.offload else device, dtype, non_blocking)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p.detach()) for s, p in zip(self.shadow_params, _trained(parameters), strict=True)]
        if self.offload:
            for s, p in trained:
                s.lerp_(p.to(s.device, non_blocking=True), 1.0 - decay)
        elif trained:
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow_params, _trained(parameters), strict=True):
            p.data.copy_(s.to(p.device, non_blocking=True))

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """EMAModel's, except that the shadow weights are copied into the existing tensors one by one: its
        deepcopy of the whole state would hold a second EMA (3.44 GB at SD1.5 size) while resuming."""
        state_dict = dict(state_dict)
        shadow = state_dict.pop("shadow_params", None)
        super().load_state_dict(state_dict)  # the counters and decay settings
        if shadow is None:
            return
        if len(shadow) != len(self.shadow_params) or any(
                s.shape != v.shape for s, v in zip(self.shadow_params, shadow)):
            raise ValueError("shadow_params do not match the EMA's parameters (number or shapes)")
        for s, v in zip(self.shadow_params, shadow):
            s.copy_(v)

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().store(_trained(parameters))

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().restore(_trained(parameters))


def _trained(parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in parameters if p.requires_grad]
