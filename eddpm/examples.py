"""One training example from a metadata row: target, condition and matte at a bucket size.

The condition's matte comes from, in order: the condition image's own alpha (RGBA, LA, or a palette with
transparency; an opaque alpha means a full-frame matte), else `mask_file_name`, else `matte_fn` (a
BriaRMBG wrapper `matte_fn(rgb uint8 [H, W, 3]) -> alpha float [H, W]`); with none of these the row is
skipped. A target with alpha is used as stored (its RGB as is); its alpha serves only as the matte of
unpaired rows.

The condition is IC-Light's (docs/iclight-facts.md, "Condition encoding"): the foreground composited on
gray 127 at the source resolution, then resized and centre-cropped (eddpm/conditioning.py,
`prepare_condition`), the same recipe as the demo's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from eddpm.conditioning import prepare_condition
from eddpm.images import load_image, resize_cover
from eddpm.metadata import Row, RowProblem, dataset_path, file_digest

DEGRADATIONS = ("none", "shading")
EMPTY_MATTE = 1e-3  # mattes covering less than 0.1 % of the image are treated as empty


@dataclass
class Example:
    """A preprocessed example at its bucket size (width, height)."""

    target: np.ndarray  # [H, W, 3] uint8, the target's RGB as stored (never composited)
    condition: np.ndarray  # [H, W, 3] uint8, the foreground already composited on gray 127
    alpha: np.ndarray  # [H, W] float32 in [0, 1], the condition's matte with the condition's geometry


def load_example(
    row: Row,
    data_dir: str,
    bucket: tuple[int, int],
    *,
    matte_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    degrade: str = "none",
    allow_outside_paths: bool = False,
) -> Example:
    """Decode, matte, degrade (unpaired rows, at the source size), composite, resize to `bucket`, mirror.

    bucket: (width, height). Raises images.ImageError for a file that cannot be decoded and RowProblem
    for a missing, misshapen or empty matte, or for a file that resolves outside `data_dir` (checked again
    here, as a link may have changed since read_metadata; `allow_outside_paths` as there); eddpm/cache.py
    turns them into a skipped line.
    """
    if degrade not in DEGRADATIONS:
        raise ValueError(f"degrade must be one of {DEGRADATIONS}, got {degrade!r}")

    def path(key: str) -> str:
        return dataset_path(data_dir, getattr(row, key), key, allow_outside_paths=allow_outside_paths)

    target_rgb, target_alpha = load_image(path("file_name"))
    if row.paired:
        cond_rgb, cond_alpha = load_image(path("conditioning_file_name"))
    else:
        cond_rgb, cond_alpha = target_rgb, target_alpha
    mask_path = path("mask_file_name") if row.mask_file_name is not None else None
    matte = _find_matte(mask_path, cond_rgb, cond_alpha, matte_fn)  # float32 [H, W] of the condition
    if float(matte.mean()) < EMPTY_MATTE:
        raise RowProblem("empty matte", "the foreground matte is (almost) empty")
    if degrade == "shading" and not row.paired:
        seed = int(file_digest(path("file_name"))[:16], 16)
        cond_rgb = degrade_shading(cond_rgb, matte, seed=seed)
    target = resize_cover(target_rgb, *bucket)  # [h, w, 3]
    condition = prepare_condition(cond_rgb, matte, *bucket)  # [h, w, 3], composited then resized
    alpha = resize_cover(matte, *bucket).astype(np.float32)  # [h, w], the condition's geometry
    if row.flipped:
        target, condition, alpha = target[:, ::-1], condition[:, ::-1], alpha[:, ::-1]
    return Example(np.ascontiguousarray(target), np.ascontiguousarray(condition), np.ascontiguousarray(alpha))


def _find_matte(
    mask_path: str | None,
    cond_rgb: np.ndarray,
    cond_alpha: np.ndarray | None,
    matte_fn: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """The condition's matte, float32 [H, W] in [0, 1]: its alpha, else the mask file, else matte_fn."""
    if cond_alpha is not None:
        return cond_alpha
    height, width = cond_rgb.shape[:2]
    if mask_path is not None:
        mask_rgb, _ = load_image(mask_path)
        matte = _luma(mask_rgb)
        return matte if matte.shape == (height, width) else resize_cover(matte, width, height)
    if matte_fn is not None:
        matte = np.asarray(matte_fn(cond_rgb), dtype=np.float32)
        if matte.shape != (height, width):
            raise RowProblem(
                "no matte", f"matte_fn returned shape {matte.shape} for an image of {(height, width)}"
            )
        return np.clip(matte, 0.0, 1.0)
    raise RowProblem("no matte", "no alpha, no mask_file_name and no matte_fn (BriaRMBG)")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's "L" conversion of uint8 [H, W, 3], as float32 [H, W] in [0, 1]."""
    return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255.0


def degrade_shading(rgb: np.ndarray, alpha: np.ndarray, seed: int) -> np.ndarray:
    """Random appearance change inside the matte: brightness, contrast, colour tint, a soft gradient.

    rgb [H, W, 3] uint8, alpha [H, W] in [0, 1]. Outside the matte the pixels are kept (they are
    composited over gray anyway). Used for unpaired rows so the condition's light differs from the target's.
    """
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0.6, 1.3)
    contrast = rng.uniform(0.7, 1.3)
    tint = rng.uniform(0.85, 1.15, size=3)
    angle, strength = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 0.5)
    height, width = alpha.shape
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = np.cos(angle) * (2 * xs / max(width - 1, 1) - 1) + np.sin(angle) * (
        2 * ys / max(height - 1, 1) - 1
    )
    shade = 1.0 + strength * ramp / np.sqrt(2.0)  # [H, W], between 1 - strength and 1 + strength
    x = rgb.astype(np.float64) / 255.0
    a = alpha.astype(np.float64)[:, :, None]
    mean = (x * a).sum(axis=(0, 1)) / max(a.sum(), 1e-6)  # per-channel mean inside the matte
    y = ((x - mean) * contrast + mean) * brightness * tint * shade[:, :, None]
    out = x * (1 - a) + np.clip(y, 0.0, 1.0) * a
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
