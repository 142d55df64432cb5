"""Dataset format, validation, aspect-ratio buckets and the on-disk latent cache.

Format (data/README.md has the long version): `data_dir/metadata.jsonl`, one JSON object per line with
- `file_name`: the target image (what the model learns to produce), relative to `data_dir`;
- `text`: the prompt. A missing key or an empty string skips the row unless `allow_empty_prompts=True`,
  which reads both as "" (the model then learns from the condition alone, like caption dropout);
- `conditioning_file_name` (optional): the same subject under other light, pixel-aligned with the target.
  Rows without it are "unpaired": the condition is the target's own foreground, optionally with its
  appearance degraded (`degrade="shading"`) so that the model must relight rather than copy;
- `mask_file_name` (optional): a grayscale matte (white = foreground) of the condition image
  (of the target for unpaired rows);
- any other keys (e.g. `light_direction`, `shape`) are kept in `Row.extra` for evaluation.

The condition's matte comes from, in order: the condition image's own alpha (RGBA, LA, or a palette with
transparency; an opaque alpha means a full-frame matte), else `mask_file_name`, else `matte_fn` (a
BriaRMBG wrapper `matte_fn(rgb uint8 [H, W, 3]) -> alpha float [H, W]`); with none of these the row is
skipped. A target with alpha is used as stored (its RGB as is); its alpha serves only as the matte of
unpaired rows.

Bad rows (malformed JSON, missing fields or files, undecodable, truncated or too small images, ...) are
skipped with one warning line `metadata.jsonl:LINE: FILE: KIND: DETAIL`, and a summary is printed;
`strict=True` raises `DatasetError` with that same line at the first problem instead.

Latent cache: `build_latent_cache` encodes every usable example once and stores, as safetensors under
`cache_dir`, the target latents `[4, h, w]`, the condition latents `[4, h, w]` and the prompt embedding
`[77, D]`, each keyed by what it depends on (file bytes, model identity, bucket size, flip, matte source,
degradation, `PREPROCESS_VERSION`), so later epochs and runs reuse them and any change recomputes only
the entries it touches. `LatentDataset` reads the cached tensors lazily, one example per `__getitem__`
(cheap, and memory stays flat for large sets); `BucketBatchSampler` batches within one bucket at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# Bump when anything that changes cached tensors for the same inputs changes (resizing, matting,
# degradation, the encoders' recipe): every cache entry is then recomputed.
PREPROCESS_VERSION = 1
METADATA_FILE = "metadata.jsonl"
DEGRADATIONS = ("none", "shading")
ASPECT_TOLERANCE = 0.01  # a condition or mask may differ from its image's aspect ratio by 1 % at most
EMPTY_MATTE = 1e-3  # mattes covering less than 0.1 % of the image are treated as empty
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class DatasetError(ValueError):
    """A problem with the dataset: raised at the first bad row with `strict=True`, or when none is usable."""


class _Problem(Exception):
    """One reason to skip a row: a short `kind` (summarised) and a `detail` (logged)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Row:
    """One usable line of metadata.jsonl (file names relative to the data folder)."""

    line: int  # 1-based line number in metadata.jsonl
    file_name: str
    text: str
    conditioning_file_name: str | None = None
    mask_file_name: str | None = None
    flipped: bool = False  # a mirrored copy made by flip=True (text has left/right swapped)
    extra: dict = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.conditioning_file_name is not None


@dataclass(frozen=True)
class Skip:
    """A skipped line and why."""

    line: int
    file_name: str
    kind: str
    detail: str


class _Report:
    """Collects skips: one warning each, or a DatasetError at the first one when strict."""

    def __init__(self, metadata_path: str, strict: bool):
        self.metadata_path, self.strict = metadata_path, strict
        self.skips: list[Skip] = []
        self._lines: set[int] = set()

    def skip(self, line: int, file_name: str, problem: _Problem) -> None:
        if line in self._lines:  # a row is reported once even if several of its copies fail
            return
        message = f"{self.metadata_path}:{line}: {file_name}: {problem.kind}: {problem.detail}"
        if self.strict:
            raise DatasetError(message)
        logger.warning(message)
        self._lines.add(line)
        self.skips.append(Skip(line, file_name, problem.kind, problem.detail))

    def summary(self, usable: int) -> str:
        kinds = Counter(s.kind for s in self.skips)
        reasons = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
        return f"{self.metadata_path}: {usable} rows usable, {len(self.skips)} skipped" + (
            f" ({reasons})" if reasons else ""
        )


# --- metadata.jsonl -----------------------------------------------------------------------------------


def read_metadata(
    data_dir: str, *, allow_empty_prompts: bool = False, strict: bool = False
) -> tuple[list[Row], list[Skip]]:
    """Parse and check `data_dir/metadata.jsonl` (fields, referenced files, duplicates); decode no image.

    Blank lines are ignored. A duplicate is a line with the same file_name, conditioning_file_name,
    mask_file_name and text as an earlier one. Image-level checks happen in `build_latent_cache`.
    """
    report = _Report(os.path.join(data_dir, METADATA_FILE), strict)
    return _read_metadata(data_dir, allow_empty_prompts, report), report.skips


def _read_metadata(data_dir: str, allow_empty_prompts: bool, report: _Report) -> list[Row]:
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: a dataset folder needs a {METADATA_FILE} (see data/README.md)"
        )
    rows: list[Row] = []
    seen: dict[tuple, int] = {}
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    for line_no, raw in enumerate(raw_lines, start=1):
        try:
            row = _parse_line(raw, line_no, data_dir, allow_empty_prompts)
        except _Problem as problem:
            report.skip(line_no, _guess_file_name(raw), problem)
            continue
        if row is None:
            continue
        identity = (row.file_name, row.conditioning_file_name, row.mask_file_name, row.text)
        if identity in seen:
            report.skip(line_no, row.file_name, _Problem("duplicate", f"same as line {seen[identity]}"))
            continue
        seen[identity] = line_no
        rows.append(row)
    return rows


def _parse_line(raw: bytes, line_no: int, data_dir: str, allow_empty_prompts: bool) -> Row | None:
    try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").strip()
    except UnicodeDecodeError as e:
        raise _Problem("malformed JSON", f"not UTF-8 ({e})") from None
    if not line:
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Problem("malformed JSON", str(e)) from None
    if not isinstance(obj, dict):
        raise _Problem("malformed JSON", f"expected an object, got {type(obj).__name__}")
    names = {}
    for key in ("file_name", "conditioning_file_name", "mask_file_name"):
        value = obj.get(key)
        if value is None and key != "file_name":
            continue
        if not isinstance(value, str) or not value.strip():
            raise _Problem(
                "missing file_name" if key == "file_name" else "bad field",
                f"{key!r} must be a non-empty string",
            )
        names[key] = value
    text = obj.get("text")
    if text is None and not allow_empty_prompts:
        raise _Problem("missing prompt", "no 'text' (pass allow_empty_prompts=True to train on it with '')")
    if text is not None and not isinstance(text, str):
        raise _Problem("bad field", f"'text' must be a string, got {type(text).__name__}")
    text = (text or "").strip()
    if not text and not allow_empty_prompts:
        raise _Problem("empty prompt", "'text' is empty (pass allow_empty_prompts=True to keep it)")
    for key, name in names.items():
        if not os.path.isfile(os.path.join(data_dir, name)):
            raise _Problem("missing file", f"{key} {name!r} not found")
    extra = {
        k: v
        for k, v in obj.items()
        if k not in ("file_name", "conditioning_file_name", "mask_file_name", "text")
    }
    return Row(
        line=line_no,
        file_name=names["file_name"],
        text=text,
        conditioning_file_name=names.get("conditioning_file_name"),
        mask_file_name=names.get("mask_file_name"),
        extra=extra,
    )


def _guess_file_name(raw: bytes) -> str:
    match = re.search(rb'"file_name"\s*:\s*"([^"]*)"', raw)
    return match.group(1).decode("utf-8", "replace") if match else "<unknown>"


# --- images -------------------------------------------------------------------------------------------


def load_image(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode an image into (rgb uint8 [H, W, 3], alpha float32 [H, W] in [0, 1], or None).

    EXIF orientation is applied. Grayscale, palette, CMYK and 16-bit images become RGB; 16-bit and
    32-bit integer or float ("I", "F") samples are read as 0..65535 and scaled to 0..255. Alpha comes
    from RGBA/LA/PA modes or a palette/tRNS transparency. Raises `_Problem` when the file cannot be decoded
    (zero bytes, not an image, truncated, corrupt).
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode everything now, so truncated files fail here
            img = ImageOps.exif_transpose(img)
        if img.mode in _SIXTEEN_BIT_MODES:
            gray = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
            gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2), None
        has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise _Problem("unreadable image", f"{os.path.basename(path)}: {e}") from None
    array = np.asarray(img)
    if has_alpha:
        return np.ascontiguousarray(array[:, :, :3]), array[:, :, 3].astype(np.float32) / 255.0
    return array, None


def _probe(path: str) -> tuple[int, int, bool]:
    """(width, height after EXIF rotation, has alpha) from the header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # a broken EXIF block: exif_transpose will not rotate either
                orientation = 1
            has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise _Problem("unreadable image", f"{os.path.basename(path)}: {e}") from None
    if orientation in (5, 6, 7, 8):  # the transposing orientations
        width, height = height, width
    return width, height, has_alpha


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(255^2 / MSE) over all values of two uint8 images of one shape (float64; MSE floored at 1e-10)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def resize_cover(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale `image` ([H, W, 3] uint8 or [H, W] float) to cover size=(width, height), then centre-crop.

    Lanczos for colour, bilinear for mattes (no ringing outside [0, 1]).
    """
    height, width = image.shape[:2]
    out_w, out_h = size
    if (width, height) == (out_w, out_h):
        return image.copy() if image.ndim == 3 else np.clip(image.astype(np.float32), 0.0, 1.0)
    scale = max(out_w / width, out_h / height)
    crop_w, crop_h = out_w / scale, out_h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    if image.ndim == 2:
        resized = Image.fromarray(image.astype(np.float32)).resize(size, Image.Resampling.BILINEAR, box=box)
        return np.clip(np.asarray(resized), 0.0, 1.0)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, box=box))


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


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap the words "left" and "right" (whole words, keeping UPPER/Capitalised/lower case)."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, text)


def flip_row(row: Row) -> Row:
    """The mirrored copy of a row: left/right swapped in its prompt and its `light_direction`."""
    extra = dict(row.extra)
    if isinstance(extra.get("light_direction"), str):
        extra["light_direction"] = swap_left_right(extra["light_direction"])
    return replace(row, text=swap_left_right(row.text), flipped=not row.flipped, extra=extra)


@dataclass
class Example:
    """A preprocessed example at its bucket size (width, height)."""

    target: np.ndarray  # [H, W, 3] uint8
    condition: np.ndarray  # [H, W, 3] uint8, not yet composited (the encoder composites with alpha)
    alpha: np.ndarray  # [H, W] float32 in [0, 1], the condition's matte


def load_example(
    row: Row,
    data_dir: str,
    bucket: tuple[int, int],
    *,
    matte_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    degrade: str = "none",
) -> Example:
    """Decode, matte, resize (cover + centre crop) to `bucket`, degrade (unpaired only) and mirror a row."""
    target_rgb, target_alpha = load_image(os.path.join(data_dir, row.file_name))
    if row.paired:
        cond_rgb, cond_alpha = load_image(os.path.join(data_dir, row.conditioning_file_name))
    else:
        cond_rgb, cond_alpha = target_rgb, target_alpha
    if cond_alpha is not None:
        matte = cond_alpha
    elif row.mask_file_name is not None:
        mask_rgb, _ = load_image(os.path.join(data_dir, row.mask_file_name))
        matte = np.asarray(Image.fromarray(mask_rgb).convert("L"), dtype=np.float32) / 255.0
        if matte.shape != cond_rgb.shape[:2]:
            matte = resize_cover(matte, (cond_rgb.shape[1], cond_rgb.shape[0]))
    elif matte_fn is not None:
        matte = np.asarray(matte_fn(cond_rgb), dtype=np.float32)
        if matte.shape != cond_rgb.shape[:2]:
            raise _Problem(
                "no matte", f"matte_fn returned shape {matte.shape} for an image of {cond_rgb.shape[:2]}"
            )
        matte = np.clip(matte, 0.0, 1.0)
    else:
        raise _Problem("no matte", "no alpha, no mask_file_name and no matte_fn (BriaRMBG)")
    if float(matte.mean()) < EMPTY_MATTE:
        raise _Problem("empty matte", "the foreground matte is (almost) empty")
    target = resize_cover(target_rgb, bucket)
    condition = resize_cover(cond_rgb, bucket)
    alpha = resize_cover(matte, bucket).astype(np.float32)
    if degrade == "shading" and not row.paired:
        condition = degrade_shading(condition, alpha, seed=_file_seed(os.path.join(data_dir, row.file_name)))
    elif degrade not in DEGRADATIONS:
        raise ValueError(f"degrade must be one of {DEGRADATIONS}, got {degrade!r}")
    if row.flipped:
        target, condition, alpha = target[:, ::-1], condition[:, ::-1], alpha[:, ::-1]
    return Example(np.ascontiguousarray(target), np.ascontiguousarray(condition), np.ascontiguousarray(alpha))


# --- buckets ------------------------------------------------------------------------------------------


def make_buckets(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int = 64
) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `step` in [min_side, max_side], area within 10 % of resolution**2.

    For each width the height is the multiple of `step` closest to resolution**2 / width. Defaults:
    min_side = resolution / 2 and max_side = 2 * resolution (rounded to `step`), so resolution 512 spans
    IC-Light's 256..1024 range. IC-Light's default 512x640 is a bucket from resolution 576 (area within
    1.2 %); at 512 it is 25 % too large. Sorted by aspect ratio, square included.
    """
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or max(min_side, -(-2 * resolution // step) * step)
    target_area = resolution * resolution
    buckets = set()
    for width in range(-(-min_side // step) * step, max_side + 1, step):
        height = max(step, round(target_area / width / step) * step)
        if min_side <= height <= max_side and abs(width * height / target_area - 1) <= 0.1:
            buckets.add((width, height))
    if not buckets:
        raise ValueError(f"no bucket with sides in [{min_side}, {max_side}] fits resolution {resolution}")
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log ratio; ties: the first listed)."""
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_aspect))


# --- fingerprints and keys ----------------------------------------------------------------------------


def model_fingerprint(model, num_tensors: int = 4, max_elements: int = 1 << 16) -> str:
    """A short hash of a model's identity: class, config, all parameter names/shapes, a few tensors' bytes.

    Cheap even for SD1.5 (a handful of tensors, at most `max_elements` values each). Tokenizers are
    hashed by class, vocabulary and model_max_length. Private config keys ("_name_or_path", versions) are
    left out so that moving a checkpoint does not invalidate a cache.
    """
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    config = getattr(model, "config", None)
    if config is not None:
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    if isinstance(model, torch.nn.Module):
        state = model.state_dict()
        for name, tensor in state.items():
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        names = list(state)
        picks = sorted(set(names[:: max(1, len(names) // num_tensors)] + names[-1:]))
        for name in picks:
            flat = state[name].detach().reshape(-1)[:max_elements].cpu().contiguous()
            h.update(flat.view(torch.uint8).numpy().tobytes())
    elif hasattr(model, "get_vocab"):
        h.update(json.dumps(sorted(model.get_vocab().items())).encode())
        h.update(str(getattr(model, "model_max_length", None)).encode())
    return h.hexdigest()[:16]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_seed(path: str) -> int:
    return int(_file_digest(path)[:16], 16)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([PREPROCESS_VERSION, *parts], default=str).encode()).hexdigest()[:32]


# --- the cache ----------------------------------------------------------------------------------------


@dataclass
class _Item:
    row: Row
    bucket: tuple[int, int]
    target_key: str
    condition_key: str
    prompt_key: str


@dataclass
class CacheStats:
    """What a build did. `seconds_per_image`: wall time per newly encoded example (preprocess + encode)."""

    usable: int = 0
    skipped: list[Skip] = field(default_factory=list)
    encoded_targets: int = 0
    encoded_conditions: int = 0
    encoded_prompts: int = 0
    seconds_per_image: float = 0.0


class LatentDataset(torch.utils.data.Dataset):
    """Cached examples; `__getitem__` reads one example's tensors from disk (lazily, no RAM growth).

    `rows[i]` is the metadata Row of item i (file names relative to `data_dir`), `buckets[i]` its
    (width, height) in pixels (the bucket id used by BucketBatchSampler), `empty_prompt_embeds` the
    [77, D] embedding of "" for caption dropout, `stats` what the build did.
    """

    def __init__(
        self, data_dir: str, cache_dir: str, items: list[_Item], empty_prompt_key: str, stats: CacheStats
    ):
        self.data_dir, self.cache_dir = data_dir, cache_dir
        self.rows = [item.row for item in items]
        self.buckets = [item.bucket for item in items]
        self._items = items
        self.empty_prompt_embeds = _load(_path(cache_dir, "prompts", empty_prompt_key))
        self.stats = stats

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        item = self._items[index]
        return {
            "latents": _load(_path(self.cache_dir, "targets", item.target_key)),  # [4, h, w]
            "cond_latents": _load(_path(self.cache_dir, "conditions", item.condition_key)),  # [4, h, w]
            "prompt_embeds": _load(_path(self.cache_dir, "prompts", item.prompt_key)),  # [77, D]
            "index": index,
        }


def _path(cache_dir: str, kind: str, key: str) -> str:
    return os.path.join(cache_dir, kind, f"{key}.safetensors")


def _load(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["value"].float()


def _is_cached(path: str) -> bool:
    """True when a readable cache entry exists (a torn or foreign file counts as missing)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return "value" in f.keys()
    except Exception:
        return False


def _save(path: str, value: torch.Tensor, **info: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(
        {"value": value.detach().float().cpu().contiguous()},
        tmp,
        metadata={k: str(v) for k, v in info.items()},
    )
    os.replace(tmp, path)  # atomic: an interrupted build never leaves a half-written entry


def build_latent_cache(
    data_dir: str,
    cache_dir: str,
    *,
    vae,
    text_encoder,
    tokenizer,
    resolution: int,
    model_id: str | None = None,
    matte_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    matte_id: str | None = None,
    degrade: str = "none",
    flip: bool = False,
    strict: bool = False,
    allow_empty_prompts: bool = False,
    buckets: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    encode_images: Callable | None = None,
    encode_condition: Callable | None = None,
    encode_prompts: Callable | None = None,
    progress: bool = True,
) -> LatentDataset:
    """Validate `data_dir`, encode what is not cached yet into `cache_dir`, and return the dataset.

    model_id: identity of (vae, text_encoder, tokenizer) in the cache keys; None computes it with
        `model_fingerprint`. matte_id: identity of `matte_fn` (default: its qualified name).
    degrade: "none" or "shading" (unpaired rows only; paired conditions are never altered).
    flip: also include a mirrored copy of every row (pixels flipped, "left"/"right" swapped in the prompt);
        off by default because mirroring changes which side the light comes from.
    buckets: (width, height) list, default `make_buckets(resolution)`.
    encode_images(vae, pixels [B, 3, H, W] 0..255) -> [B, 4, h, w];
    encode_condition(vae, pixels [B, 3, H, W] 0..255, alpha [B, 1, H, W]) -> [B, 4, h, w];
    encode_prompts(tokenizer, text_encoder, list[str]) -> [B, 77, D]; default: eddpm.iclight's.
    Run it on one process first when training on several (entries are written atomically).
    """
    if degrade not in DEGRADATIONS:
        raise ValueError(f"degrade must be one of {DEGRADATIONS}, got {degrade!r}")
    if None in (encode_images, encode_condition, encode_prompts):
        from eddpm import iclight  # lazily: heavy, and only needed when something must be encoded

        encode_images = encode_images or iclight.encode_images
        encode_condition = encode_condition or iclight.encode_condition
        encode_prompts = encode_prompts or iclight.encode_prompts
    buckets = list(buckets or make_buckets(resolution))
    min_side = min(min(b) for b in buckets)
    if model_id is None:
        model_id = "-".join(model_fingerprint(m) for m in (vae, text_encoder, tokenizer))
    if matte_fn is not None and matte_id is None:
        matte_id = getattr(matte_fn, "__qualname__", type(matte_fn).__qualname__)

    report = _Report(os.path.join(data_dir, METADATA_FILE), strict)
    rows = _read_metadata(data_dir, allow_empty_prompts, report)
    digests: dict[str, str] = {}  # path -> sha256 of its bytes, each file read once per build

    def digest(name: str | None) -> str | None:
        if name is None:
            return None
        path = os.path.join(data_dir, name)
        if path not in digests:
            digests[path] = _file_digest(path)
        return digests[path]

    items: list[_Item] = []
    for row in rows:
        try:
            bucket, matte_source = _check_row(row, data_dir, buckets, min_side, matte_fn is not None)
        except _Problem as problem:
            report.skip(row.line, row.file_name, problem)
            continue
        for copy in (row, flip_row(row)) if flip else (row,):
            condition_parts = [
                digest(row.conditioning_file_name or row.file_name),
                matte_source,
                digest(row.mask_file_name) if matte_source == "mask" else None,
                matte_id if matte_source == "matte_fn" else None,
                "none" if row.paired else degrade,
            ]
            items.append(
                _Item(
                    row=copy,
                    bucket=bucket,
                    target_key=_key("target", model_id, bucket, copy.flipped, digest(row.file_name)),
                    condition_key=_key("condition", model_id, bucket, copy.flipped, *condition_parts),
                    prompt_key=_key("prompt", model_id, copy.text),
                )
            )

    # Images: every target or condition entry not on disk yet, batched by bucket. An entry shared by
    # several items (one image, several captions) is scheduled once; if the item that carried it fails to
    # load, the next round retries it through another item, which then reports its own problem.
    stats = CacheStats()
    failed_lines: set[int] = set()
    seconds, loaded = 0.0, 0
    while True:
        scheduled, work = set(), []
        for item in items:
            if item.row.line in failed_lines:
                continue
            need_target = item.target_key not in scheduled and not _is_cached(
                _path(cache_dir, "targets", item.target_key)
            )
            need_condition = item.condition_key not in scheduled and not _is_cached(
                _path(cache_dir, "conditions", item.condition_key)
            )
            scheduled |= {item.target_key} if need_target else set()
            scheduled |= {item.condition_key} if need_condition else set()
            if need_target or need_condition:
                work.append((item, need_target, need_condition))
        if not work:
            break
        start = time.perf_counter()
        with _progress(len(work), "caching latents", progress) as bar:
            for bucket in dict.fromkeys(item.bucket for item, _, _ in work):
                in_bucket = [w for w in work if w[0].bucket == bucket]
                for first in range(0, len(in_bucket), batch_size):
                    batch = in_bucket[first : first + batch_size]
                    loaded += _encode_batch(
                        batch,
                        data_dir,
                        cache_dir,
                        matte_fn,
                        degrade,
                        device,
                        failed_lines,
                        report,
                        (encode_images, encode_condition, vae),
                        stats,
                    )
                    bar.update(len(batch))
        seconds += time.perf_counter() - start
    stats.seconds_per_image = seconds / max(loaded, 1)

    skipped_lines = {s.line for s in report.skips}
    usable = [item for item in items if item.row.line not in skipped_lines]
    stats.usable, stats.skipped = len(usable), report.skips
    print(report.summary(len({item.row.line for item in usable})))
    if not usable:
        raise DatasetError(f"no usable rows in {report.metadata_path} (see the warnings above)")

    # Prompts, the empty one included (caption dropout), each distinct text encoded once.
    empty_key = _key("prompt", model_id, "")
    texts = {item.prompt_key: item.row.text for item in usable} | {empty_key: ""}
    todo = [(k, t) for k, t in texts.items() if not _is_cached(_path(cache_dir, "prompts", k))]
    for first in range(0, len(todo), batch_size):
        chunk = todo[first : first + batch_size]
        with torch.no_grad():
            embeds = encode_prompts(tokenizer, text_encoder, [t for _, t in chunk])  # [B, 77, D]
        for (key, text), embed in zip(chunk, embeds):
            _save(_path(cache_dir, "prompts", key), embed, text=text, model_id=model_id)
        stats.encoded_prompts += len(chunk)
    print(
        f"latent cache {cache_dir}: encoded {loaded} examples in {seconds:.1f} s "
        f"({1000 * stats.seconds_per_image:.0f} ms per image) and {stats.encoded_prompts} prompts; "
        f"{len(usable)} examples ready"
    )
    return LatentDataset(data_dir, cache_dir, usable, empty_key, stats)


def _check_row(
    row: Row, data_dir: str, buckets: list[tuple[int, int]], min_side: int, have_matte_fn: bool
) -> tuple[tuple[int, int], str]:
    """Header-level checks of one row; returns (bucket, matte source: "alpha", "mask" or "matte_fn")."""
    width, height, target_alpha = _probe(os.path.join(data_dir, row.file_name))
    if min(width, height) < min_side:
        raise _Problem("too small", f"{width}x{height} is below the smallest bucket side ({min_side} px)")
    matte_owner = (width, height, target_alpha)
    if row.paired:
        matte_owner = _probe(os.path.join(data_dir, row.conditioning_file_name))
        _check_aspect("condition", matte_owner[:2], (width, height))
        if min(matte_owner[:2]) < min_side:
            raise _Problem("too small", f"condition {matte_owner[0]}x{matte_owner[1]} is below {min_side} px")
    if matte_owner[2]:
        return assign_bucket(width, height, buckets), "alpha"
    if row.mask_file_name is not None:
        _check_aspect("mask", _probe(os.path.join(data_dir, row.mask_file_name))[:2], matte_owner[:2])
        return assign_bucket(width, height, buckets), "mask"
    if have_matte_fn:
        return assign_bucket(width, height, buckets), "matte_fn"
    raise _Problem("no matte", "no alpha, no mask_file_name and no matte_fn (BriaRMBG is not available)")


def _check_aspect(what: str, size: tuple[int, int], reference: tuple[int, int]) -> None:
    if abs(math.log((size[0] / size[1]) / (reference[0] / reference[1]))) > ASPECT_TOLERANCE:
        raise _Problem(
            "size mismatch", f"{what} is {size[0]}x{size[1]}, its image {reference[0]}x{reference[1]}"
        )


def _encode_batch(
    batch, data_dir, cache_dir, matte_fn, degrade, device, failed_lines, report, encoders, stats
) -> int:
    """Load a batch of items of one bucket and write their missing entries; returns how many loaded."""
    encode_images, encode_condition, vae = encoders
    loaded = []
    for item, need_target, need_condition in batch:
        try:
            example = load_example(item.row, data_dir, item.bucket, matte_fn=matte_fn, degrade=degrade)
        except _Problem as problem:
            report.skip(item.row.line, item.row.file_name, problem)  # raises when strict
            failed_lines.add(item.row.line)
            continue
        loaded.append((item, need_target, need_condition, example))

    def to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().to(device)  # [B, 3, H, W]

    targets = [(item, ex) for item, need, _, ex in loaded if need]
    if targets:
        with torch.no_grad():
            latents = encode_images(vae, to_tensor([ex.target for _, ex in targets]))  # [B, 4, h, w]
        for (item, _), latent in zip(targets, latents):
            _save(
                _path(cache_dir, "targets", item.target_key),
                latent,
                file_name=item.row.file_name,
                bucket=item.bucket,
                flipped=item.row.flipped,
            )
        stats.encoded_targets += len(targets)
    conditions = [(item, ex) for item, _, need, ex in loaded if need]
    if conditions:
        alpha = (
            torch.from_numpy(np.stack([ex.alpha for _, ex in conditions]))[:, None].float().to(device)
        )  # [B, 1, H, W]
        with torch.no_grad():
            latents = encode_condition(vae, to_tensor([ex.condition for _, ex in conditions]), alpha)
        for (item, _), latent in zip(conditions, latents):
            _save(
                _path(cache_dir, "conditions", item.condition_key),
                latent,
                file_name=item.row.file_name,
                bucket=item.bucket,
                flipped=item.row.flipped,
            )
        stats.encoded_conditions += len(conditions)
    return len(loaded)


class _progress:
    """tqdm when available and wanted, else a no-op with the same `update`."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


# --- batching -----------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of `batch_size` indices that all share one bucket, for DataLoader(batch_sampler=...).

    Each pass shuffles the items inside each bucket, cuts them into batches and shuffles the order of all
    batches, from numpy's default_rng([seed, epoch]): the same (seed, epoch) gives the same batches on
    every process, as accelerate's sharding of batch samplers needs. Every batch is full: a bucket's
    remainder is dropped (drop_last=True) or topped up with items of the same bucket drawn again (the
    default), because accelerate assumes only the last batch can be short and would otherwise fill it
    across buckets. Every pass advances the epoch by one; `set_epoch(e)` pins it (accelerate calls it
    at each pass; call it yourself when resuming).
    """

    def __init__(
        self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0
        groups: dict = {}
        for index, bucket in enumerate(getattr(dataset, "buckets", dataset)):
            groups.setdefault(bucket, []).append(index)
        self._groups = list(groups.values())

    @property
    def sampler(self):
        # accelerate looks for set_epoch on `batch_sampler.sampler` once it wraps this in a BatchSamplerShard.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        batches = []
        for indices in self._groups:
            order = [indices[i] for i in rng.permutation(len(indices))] if self.shuffle else list(indices)
            short = -len(order) % self.batch_size
            if short and not self.drop_last:
                order += [order[i % len(order)] for i in range(short)]  # top up from the same bucket
            for first in range(0, len(order) - self.batch_size + 1, self.batch_size):
                batches.append(order[first : first + self.batch_size])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self._groups)
        return sum(-(-len(g) // self.batch_size) for g in self._groups)
