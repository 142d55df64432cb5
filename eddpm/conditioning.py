"""Pixels <-> latents and the fc condition, the one recipe of training, the demo, relight.py and validation.

docs/iclight-facts.md, "Condition encoding": composite the matted foreground on gray 127 at the source
resolution, resize and centre-crop it (`prepare_condition`), map pixels with x / 127 - 1, take the VAE's
mode times 0.18215 (`encode_images`). Decoding uses the demo's other mapping, x * 127.5 + 127.5
("Decoding"). `extract_foreground` is IC-Light's RMBG call ("RMBG call used by IC-Light").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from eddpm.iclight import GRAY
from eddpm.images import resize_cover

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def composite_on_gray(images: np.ndarray | torch.Tensor, alpha: np.ndarray | torch.Tensor):
    """out = 127 + (img - 127) * alpha: the foreground matted over gray 127.

    numpy: images [H, W, 3] or [B, H, W, 3], alpha [H, W] or [B, H, W] (or with a trailing 1).
    torch: images [B, 3, H, W] or [3, H, W], alpha [B, 1, H, W], [B, H, W] or [H, W].
    uint8 images give uint8 (clipped, truncated as IC-Light does); float images give float.
    """
    if isinstance(images, np.ndarray):
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.ndim == images.ndim - 1:
            alpha = alpha[..., None]  # [..., H, W, 1]
        out = GRAY + (images.astype(np.float32) - GRAY) * alpha
        return out.clip(0, 255).astype(np.uint8) if images.dtype == np.uint8 else out.astype(images.dtype)
    alpha = torch.as_tensor(alpha, device=images.device)
    if alpha.ndim == images.ndim - 1:
        alpha = alpha.unsqueeze(-3)  # [B, 1, H, W] (or [1, H, W])
    out = GRAY + (images.float() - GRAY) * alpha.float()
    if images.dtype == torch.uint8:
        return out.clamp(0, 255).to(torch.uint8)
    return out.to(images.dtype)


def prepare_condition(rgb: np.ndarray, alpha: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """condition = resize_cover(composite_on_gray(rgb, alpha), width, height): uint8 [height, width, 3].

    IC-Light's order (docs/iclight-facts.md, "Condition encoding"): composite at the source resolution,
    THEN resize and centre-crop. rgb uint8 [H, W, 3]; alpha float [H, W] in [0, 1], or None for an opaque
    foreground (no compositing). Training's cache, the demo, relight.py and validation all call this.
    """
    composite = rgb if alpha is None else composite_on_gray(rgb, alpha)  # uint8 [H, W, 3]
    return resize_cover(composite, width, height)


def pixels_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8/float pixels in 0..255 as a float32 tensor [B, 3, H, W].

    numpy [H, W, 3] or [B, H, W, 3] (channels last, as images are stored) or torch [B, 3, H, W].
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images, dtype=np.float32))  # a writable copy
        if images.ndim == 3:
            images = images[None]
        images = images.permute(0, 3, 1, 2)  # [B, 3, H, W]
    elif images.ndim == 3:
        images = images[None]
    return images.float()


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """latents = mode(E(x / 127 - 1)) * scaling_factor, IC-Light's exact mapping (gray 127 -> 0).

    pixels: [B, 3, H, W] in 0..255 (float or uint8; numpy channels-last also accepted).
    Returns [B, 4, H/8, W/8] on the VAE's device and dtype. The distribution's mode, not a sample
    (docs/iclight-facts.md, "Condition encoding", step 3).
    """
    x = pixels_to_tensor(pixels).to(vae.device) / GRAY - 1.0  # float32, [B, 3, H, W]
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    return dist.mode() * vae.config.scaling_factor  # [B, 4, H/8, W/8]


def encode_condition(
    vae: AutoencoderKL,
    pixels: np.ndarray | torch.Tensor,
    alpha: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """The fc condition latent of already prepared pixels (see `prepare_condition`): encode_images(pixels).

    pixels: [B, 3, H, W] in 0..255 (numpy channels-last also accepted), already composited on gray.
    A caller that still holds a separate matte may pass `alpha`; the pixels are then composited on gray
    first, at their current size. Returns [B, 4, H/8, W/8].
    """
    if alpha is not None:
        pixels = composite_on_gray(pixels, alpha)
    return encode_images(vae, pixels)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """pixels = uint8(clip(x * 127.5 + 127.5, 0, 255)), x = D(z / scaling_factor): IC-Light's decoding.

    The demo's mapping (docs/iclight-facts.md, "Decoding"): not the exact inverse of the encoder's
    x / 127 - 1, and truncated, not rounded. latents [B, 4, h, w] -> uint8 numpy [B, 8h, 8w, 3].
    """
    x = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    pixels = (x.float() * 127.5 + 127.5).clamp(0, 255)  # [B, 3, H, W]
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # the cast truncates


def rmbg_input_size(height: int, width: int, target_area: int = 1024 * 1024) -> tuple[int, int]:
    """(h, w) keeping the aspect ratio, area about `target_area`, each side a multiple of 64 (at least 64)."""
    k = math.sqrt(target_area / (height * width)) / 64.0
    return max(64, 64 * round(height * k)), max(64, 64 * round(width * k))


@torch.no_grad()
def extract_foreground(
    rmbg: nn.Module, image: np.ndarray, *, target_area: int = 1024 * 1024
) -> tuple[np.ndarray, np.ndarray]:
    """IC-Light's RMBG call: alpha = clip(resize(rmbg(x / 127 - 1)[0][0]), 0, 1); fg on gray 127.

    image: uint8 [H, W, 3]. The net sees the image resized (Lanczos, aspect kept) to about
    `target_area` pixels with sides multiples of 64; its finest side output [1, 1, h, w] is resized
    bilinearly back to [H, W] (docs/iclight-facts.md, "RMBG call used by IC-Light").
    Returns (fg uint8 [H, W, 3] composited on gray, alpha float32 [H, W]).
    """
    from PIL import Image

    height, width = image.shape[:2]
    feed_h, feed_w = rmbg_input_size(height, width, target_area)
    feed = np.asarray(Image.fromarray(image).resize((feed_w, feed_h), Image.LANCZOS))
    param = next(rmbg.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = pixels_to_tensor(feed).to(device) / GRAY - 1.0  # [1, 3, feed_h, feed_w]
    side_outputs, _features = rmbg(x.to(dtype))
    alpha = side_outputs[0].float()  # [1, 1, feed_h, feed_w], finest first
    alpha = torch.nn.functional.interpolate(alpha, size=(height, width), mode="bilinear")
    alpha = alpha[0, 0].cpu().numpy().clip(0, 1).astype(np.float32)  # [H, W]
    return composite_on_gray(image, alpha), alpha
