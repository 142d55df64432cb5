"""load_example: IC-Light's condition order (composite at the source size, then resize), mattes, flips.

The reference is written here: the composite 127 + (x - 127) * alpha in float32, truncated to uint8
(docs/iclight-facts.md, "Condition encoding"), then a port of IC-Light's resize_and_center_crop.
"""

import hashlib

import numpy as np
import pytest
from dataset_files import disc_rgba, noise_rgb, soft_disc_rgba, write_dataset
from PIL import Image

from eddpm.examples import degrade_shading, load_example
from eddpm.images import ImageError
from eddpm.metadata import RowProblem, flip_row, read_metadata


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.clip(127 + (rgb.astype(np.float32) - 127) * alpha[..., None], 0, 255).astype(np.uint8)


def cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """IC-Light's resize_and_center_crop (Lanczos; mode "F" mattes bilinear, then clipped)."""
    pil = Image.fromarray(image)
    scale = max(width / pil.width, height / pil.height)
    rw, rh = int(round(pil.width * scale)), int(round(pil.height * scale))
    resized = pil.resize((rw, rh), Image.BILINEAR if pil.mode == "F" else Image.LANCZOS)
    out = np.array(resized.crop(((rw - width) / 2, (rh - height) / 2, (rw + width) / 2, (rh + height) / 2)))
    return np.clip(out, 0, 1) if pil.mode == "F" else out


def rows_of(folder):
    rows, skips = read_metadata(str(folder))
    assert skips == []
    return rows


def test_paired_condition_is_composited_at_the_source_size_then_cropped(tmp_path):
    condition = soft_disc_rgba((96, 80), seed=1)  # scaled by 0.8 to 77 x 64, then 13 columns cropped
    target = noise_rgb((96, 80), seed=2)
    line = {"file_name": "t.png", "conditioning_file_name": "c.png", "text": "x"}
    folder = write_dataset(tmp_path, [line], {"t.png": target, "c.png": condition})
    example = load_example(rows_of(folder)[0], str(folder), (64, 64))

    pixels = np.asarray(condition)
    alpha = pixels[..., 3] / np.float32(255)
    expected = cover(composite(pixels[..., :3], alpha), 64, 64)
    assert np.array_equal(example.condition, expected)
    assert np.array_equal(example.target, cover(np.asarray(target), 64, 64))
    assert np.array_equal(example.alpha, cover(alpha, 64, 64))
    resized_first = composite(cover(pixels[..., :3], 64, 64), cover(alpha, 64, 64))
    assert not np.array_equal(example.condition, resized_first)  # the order is visible in the pixels


def test_unpaired_degradation_happens_at_the_source_size_before_the_composite(tmp_path):
    image = soft_disc_rgba((80, 64), seed=3)
    folder = write_dataset(tmp_path, [{"file_name": "u.png", "text": "x"}], {"u.png": image})
    row = rows_of(folder)[0]
    example = load_example(row, str(folder), (64, 64), degrade="shading")

    pixels = np.asarray(image)
    alpha = pixels[..., 3] / np.float32(255)
    seed = int(hashlib.sha256((folder / "u.png").read_bytes()).hexdigest()[:16], 16)
    degraded = degrade_shading(pixels[..., :3], alpha, seed=seed)
    assert np.array_equal(example.condition, cover(composite(degraded, alpha), 64, 64))
    assert np.array_equal(example.target, cover(pixels[..., :3], 64, 64))  # the target is never degraded
    plain = load_example(row, str(folder), (64, 64))
    assert np.array_equal(plain.condition, cover(composite(pixels[..., :3], alpha), 64, 64))


def test_paired_conditions_are_never_degraded(tmp_path):
    line = {"file_name": "t.png", "conditioning_file_name": "c.png", "text": "x"}
    folder = write_dataset(tmp_path, [line], {"t.png": noise_rgb(), "c.png": disc_rgba()})
    row = rows_of(folder)[0]
    plain = load_example(row, str(folder), (64, 64))
    degraded = load_example(row, str(folder), (64, 64), degrade="shading")
    assert np.array_equal(plain.condition, degraded.condition)
    with pytest.raises(ValueError, match="degrade must be one of"):
        load_example(row, str(folder), (64, 64), degrade="blur")


def test_mask_file_of_another_size_and_matte_fn_supply_the_matte(tmp_path):
    mask = disc_rgba((160, 128)).getchannel("A")  # twice the image's size, same aspect
    lines = [
        {"file_name": "a.png", "text": "with a mask", "mask_file_name": "mask.png"},
        {"file_name": "b.png", "text": "needs rmbg"},
    ]
    files = {"a.png": noise_rgb((80, 64), seed=1), "b.png": noise_rgb((80, 64), seed=2), "mask.png": mask}
    folder = write_dataset(tmp_path, lines, files)
    with_mask, needs_rmbg = rows_of(folder)

    example = load_example(with_mask, str(folder), (64, 64))
    matte = cover(np.asarray(mask) / np.float32(255), 80, 64)  # the mask brought to the image's size
    assert np.array_equal(example.alpha, cover(matte, 64, 64))
    assert np.array_equal(example.condition, cover(composite(np.asarray(files["a.png"]), matte), 64, 64))

    square = np.zeros((64, 80), dtype=np.float32)
    square[8:40, 8:40] = 1.5  # clipped to 1
    seen = []

    def matte_fn(rgb):
        seen.append(rgb.copy())
        return square

    example = load_example(needs_rmbg, str(folder), (64, 64), matte_fn=matte_fn)
    assert len(seen) == 1 and np.array_equal(seen[0], np.asarray(files["b.png"]))  # the full-size image
    assert np.array_equal(example.alpha, cover(np.clip(square, 0, 1), 64, 64))
    with pytest.raises(RowProblem, match="no matte: matte_fn returned shape"):
        load_example(needs_rmbg, str(folder), (64, 64), matte_fn=lambda rgb: square[:32])
    with pytest.raises(RowProblem, match="no matte"):
        load_example(needs_rmbg, str(folder), (64, 64))


def test_empty_matte_and_unreadable_files_raise_what_the_cache_skips(tmp_path):
    clear = Image.fromarray(np.zeros((64, 64, 4), dtype=np.uint8))
    lines = [{"file_name": "clear.png", "text": "x"}, {"file_name": "bad.png", "text": "y"}]
    folder = write_dataset(tmp_path, lines, {"clear.png": clear, "bad.png": b"not an image"})
    clear_row, bad_row = rows_of(folder)
    with pytest.raises(RowProblem) as problem:
        load_example(clear_row, str(folder), (64, 64))
    assert problem.value.kind == "empty matte"
    with pytest.raises(ImageError) as error:
        load_example(bad_row, str(folder), (64, 64))
    assert error.value.kind == "unreadable image"


def test_flip_mirrors_target_condition_and_matte(tmp_path):
    pixels = np.asarray(soft_disc_rgba((75, 64), seed=4)).copy()
    pixels[:, :20, :3] = (0, 0, 250)  # make it asymmetric
    line = {"file_name": "a.png", "text": "light from the Left", "light_direction": "left"}
    folder = write_dataset(tmp_path, [line], {"a.png": Image.fromarray(pixels)})
    row = rows_of(folder)[0]
    plain = load_example(row, str(folder), (64, 64))
    mirrored = load_example(flip_row(row), str(folder), (64, 64))
    for name in ("target", "condition", "alpha"):
        assert np.array_equal(getattr(plain, name)[:, ::-1], getattr(mirrored, name)), name
    assert not np.array_equal(plain.target, mirrored.target)


def test_degrade_shading_changes_only_the_matte_and_is_seeded():
    rgb = np.asarray(noise_rgb())
    alpha = np.asarray(disc_rgba().getchannel("A")) / np.float32(255)
    out = degrade_shading(rgb, alpha, seed=5)
    assert np.array_equal(out[alpha == 0], rgb[alpha == 0])
    assert np.abs(out[alpha == 1].astype(int) - rgb[alpha == 1]).mean() > 5
    assert np.array_equal(out, degrade_shading(rgb, alpha, seed=5))
    assert not np.array_equal(out, degrade_shading(rgb, alpha, seed=6))
