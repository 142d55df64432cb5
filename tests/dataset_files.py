"""Small dataset folders for the data tests (test_metadata, test_examples, test_cache): images and lines."""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

METADATA_FILE = "metadata.jsonl"


def disc_rgba(size=(64, 64), color=(200, 40, 40), background=(10, 200, 10)) -> Image.Image:
    """A coloured disc on a coloured background, with the disc as alpha (0 or 255)."""
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    inside = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (min(size) / 3) ** 2
    rgb = np.where(inside[..., None], np.array(color), np.array(background)).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, inside.astype(np.uint8) * 255]))


def soft_disc_rgba(size=(80, 64), seed=0) -> Image.Image:
    """Noise RGB with a soft-edged disc alpha (values strictly between 0 and 255 on the rim)."""
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    radius = np.hypot(rows - height / 2, cols - width / 2)
    alpha = np.clip((min(size) / 3 - radius) / 6 + 0.5, 0, 1)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, np.rint(alpha * 255).astype(np.uint8)]))


def noise_rgb(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def write_dataset(folder: Path, lines: list, files: dict) -> Path:
    """files: name -> PIL image (saved by extension) or bytes; lines: dicts (JSON) or raw strings."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / METADATA_FILE).write_text(text + "\n")
    return folder


GOOD = {"file_name": "good.png", "text": "a red disc, light from the left"}
GOOD_FILES = {"good.png": disc_rgba(), "good_mask.png": disc_rgba().getchannel("A")}
