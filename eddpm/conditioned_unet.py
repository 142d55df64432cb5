"""ConditionedUNet: the 8-channel fc UNet seen by diffusers pipelines as a 4-channel one.

docs/iclight-facts.md, "The 8-channel UNet": pipelines must make 4-channel noise, the condition latent is
appended inside the UNet call as [noisy latent (4), condition (4)], and classifier-free guidance gives
both branches the same condition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from eddpm.iclight import LATENT_CHANNELS

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


class ConditionedUNet(nn.Module):
    """An 8-channel fc UNet that diffusers pipelines see as a 4-channel one.

    The pipeline makes 4-channel noise (`config.in_channels` reads 4 here); forward appends the
    condition latent along channels, `[noisy latent (4), condition (4)]`, before calling the wrapped
    UNet. The condition is tiled to the sample's batch, so with classifier-free guidance both halves
    get the same condition (guidance acts on text only)::

        cond_unet = ConditionedUNet(unet)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=cond_unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        with cond_unet.condition(encode_condition(vae, prepare_condition(fg, None, 512, 640))):
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=2.0)

    For a condition with one latent per prompt and `num_images_per_prompt > 1`, pass the same
    `num_images_per_prompt` to `condition(...)`: latents are then ordered like the pipeline's
    prompts (p0, p0, p1, p1, ...).
    """

    def __init__(self, unet: UNet2DConditionModel, latent_channels: int = LATENT_CHANNELS):
        super().__init__()
        self.unet = unet
        self.latent_channels = latent_channels
        self.condition_channels = unet.config.in_channels - latent_channels
        if self.condition_channels <= 0:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} channels; a ConditionedUNet needs more than "
                f"{latent_channels} (use eddpm.weights.widen_conv_in or load_iclight_unet)"
            )
        self._condition: torch.Tensor | None = None

    @property
    def config(self):
        """The wrapped UNet's config with in_channels = latent channels (what pipelines read)."""
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict({**self.unet.config, "in_channels": self.latent_channels})

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def set_condition(self, latents: torch.Tensor | None, num_images_per_prompt: int = 1) -> None:
        """Hold `latents` [Bc, 4, h, w] for the following calls (None clears it)."""
        if latents is not None:
            if latents.ndim != 4 or latents.shape[1] != self.condition_channels:
                raise ValueError(
                    f"condition must be [B, {self.condition_channels}, h, w], got {list(latents.shape)}"
                )
            latents = latents.repeat_interleave(num_images_per_prompt, dim=0)
        self._condition = latents

    @contextlib.contextmanager
    def condition(self, latents: torch.Tensor, num_images_per_prompt: int = 1) -> Iterator[ConditionedUNet]:
        """`with cond_unet.condition(latents): pipe(...)`; the previous condition comes back afterwards."""
        previous = self._condition
        self.set_condition(latents, num_images_per_prompt)
        try:
            yield self
        finally:
            self._condition = previous

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        """UNet(cat([sample, condition tiled to the batch], dim=1), ...); other arguments pass through."""
        if self._condition is None:
            raise RuntimeError(
                "no condition set: call the pipeline inside `with cond_unet.condition(latents):`"
            )
        cond = self._condition.to(device=sample.device, dtype=sample.dtype)
        batch, cond_batch = sample.shape[0], cond.shape[0]
        if batch % cond_batch or cond.shape[2:] != sample.shape[2:]:
            raise ValueError(
                f"condition {list(cond.shape)} does not fit the sample {list(sample.shape)}: "
                "the batch must be a multiple of the condition's and the latent sizes must match"
            )
        cond = cond.repeat(batch // cond_batch, 1, 1, 1)  # [B, 4, h, w]; CFG halves get the same one
        return self.unet(torch.cat([sample, cond], dim=1), timestep, encoder_hidden_states, *args, **kwargs)
