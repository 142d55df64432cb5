"""The one image loader and the resizers of training, the demo and the command line.

`load_image` reads any file Pillow opens into (rgb uint8 [H, W, 3], alpha float32 [H, W] or None), with
EXIF orientation applied and 16-bit samples mapped to 8 bits as round(v * 255 / 65535). Pillow itself
decodes 16-bit gray PNGs to "I;16" but 16-bit gray+alpha, RGB and RGBA PNGs to 8 bits by dropping the low
byte; `_png_sixteen_bit` decodes the low bytes too, so every 16-bit PNG gets the same mapping.

`resize_cover` is IC-Light's resize_and_center_crop (docs/iclight-facts.md, "Condition encoding"): the
condition of training, the demo and relight.py goes through it (eddpm/conditioning.py, `prepare_condition`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 64 * 2**20  # decoded-size cap: 8192 x 8192 (192 MiB as RGB) is the largest square accepted
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # samples read as 0..65535
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# rawmode -> mode of the 16-bit PNGs whose low bytes Pillow drops (another layout is left to Pillow).
_WIDE_PNG_RAWMODES = {"LA;16B": "RGBA", "RGB;16B": "RGB", "RGBA;16B": "RGBA"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class ImageError(ValueError):
    """A file that cannot be used as an image: a short `kind` (summarised in reports) and a `detail`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def probe_image(path: str | os.PathLike) -> tuple[int, int, bool]:
    """(width, height, has_alpha) from the header only, the size after EXIF rotation."""
    name = _check_exists(path)
    try:
        with _open(path) as img:
            width, height = img.size
            # Pillow finds a PNG's eXIf chunk after the pixel data only by decoding: used when it came first.
            header_exif = img.format != "PNG" or "exif" in img.info
            transposed = header_exif and _orientation(img) in _TRANSPOSING_ORIENTATIONS
            has_alpha = _has_alpha(img)
    except Image.DecompressionBombError as e:
        raise ImageError("too large", f"{name}: {e}") from None
    except _DECODE_ERRORS as e:
        raise ImageError("unreadable image", f"{name}: {e}") from None
    return (height, width, has_alpha) if transposed else (width, height, has_alpha)


def load_image(
    path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode an image into (rgb uint8 [H, W, 3], alpha float32 [H, W] in [0, 1], or None).

    EXIF orientation is applied. Gray, palette and CMYK images become RGB. 16-bit and 32-bit samples
    ("I;16*", "I", "F" modes and 16-bit gray+alpha/RGB/RGBA PNGs) are read as 0..65535 and mapped to
    round(v * 255 / 65535). Alpha comes from RGBA/LA/PA modes or a tRNS transparency. Raises ImageError:
    "missing file", "too large" (more than `max_pixels` pixels, checked from the header before decoding)
    or "unreadable image" (zero bytes, not an image, truncated, corrupt).
    """
    name = _check_exists(path)
    try:
        with _open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    "too large", f"{name}: {width}x{height} has more than max_pixels={max_pixels} pixels"
                )
            wide_rawmode = _wide_png_rawmode(img)  # read before load() clears the tiles
            img.load()  # decode everything now, so truncated files fail here
            orientation = _orientation(img)
            if wide_rawmode is None:
                rgb, alpha = _to_rgb_alpha(img)
            else:
                wide = _png_sixteen_bit(path, img, wide_rawmode)  # uint16 [H, W, C]
                rgb, alpha = _wide_to_rgb_alpha(wide, img.info.get("transparency"))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too large", f"{name}: {e}") from None
    except _DECODE_ERRORS as e:
        raise ImageError("unreadable image", f"{name}: {e}") from None
    rgb = np.ascontiguousarray(_orient(rgb, orientation))
    return rgb, None if alpha is None else np.ascontiguousarray(_orient(alpha, orientation))


def _open(path: str | os.PathLike) -> Image.Image:
    """Image.open without Pillow's DecompressionBombWarning (two lines on stderr): the callers check the size
    themselves (load_image against max_pixels, before decoding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _check_exists(path: str | os.PathLike) -> str:
    name = os.path.basename(os.fspath(path))
    if not os.path.isfile(path):
        raise ImageError("missing file", f"{name} not found")
    return name


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag: 1 (as stored) to 8; a missing, broken or invalid tag reads as 1."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: read as "no rotation", as ImageOps.exif_transpose does
        return 1
    return orientation if orientation in range(1, 9) else 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Display orientation of a stored [H, W, ...] array (what ImageOps.exif_transpose does to an image)."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, 1)
    return array


def _to_eight_bit(samples: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) of 0..65535 samples, clipped to 0..255, as uint8."""
    return np.clip(np.rint(samples.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)


def _to_rgb_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoded Pillow image -> (rgb uint8 [H, W, 3], alpha float32 [H, W] or None), as stored."""
    if img.mode in _WIDE_MODES:
        return _wide_to_rgb_alpha(np.asarray(img)[:, :, None], img.info.get("transparency"))
    if _has_alpha(img):
        array = np.asarray(img.convert("RGBA"))
        return array[:, :, :3], array[:, :, 3].astype(np.float32) / 255.0
    return np.asarray(img.convert("RGB")), None


def _wide_to_rgb_alpha(samples: np.ndarray, transparency) -> tuple[np.ndarray, np.ndarray | None]:
    """0..65535 samples [H, W, C] (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) -> (rgb uint8, alpha float32).

    `transparency` is the tRNS colour key of gray (an int) or RGB (a tuple) images, in the same units.
    """
    channels = samples.shape[2]
    colour = samples[:, :, :3] if channels >= 3 else np.repeat(samples[:, :, :1], 3, axis=2)
    alpha = None
    if channels in (2, 4):
        alpha = (samples[:, :, -1].astype(np.float64) / 65535.0).astype(np.float32)
    elif transparency is not None:
        key = np.atleast_1d(np.asarray(transparency))
        alpha = np.any(samples[:, :, :channels] != key, axis=2).astype(np.float32)
    return _to_eight_bit(colour), alpha


def _wide_png_rawmode(img: Image.Image) -> str | None:
    """The rawmode of a not yet loaded 16-bit gray+alpha, RGB or RGBA PNG; None for any other file."""
    if img.format != "PNG" or len(img.tile) != 1:
        return None
    rawmode = img.tile[0][3]
    return rawmode if _WIDE_PNG_RAWMODES.get(rawmode) == img.mode else None


def _png_sixteen_bit(path: str | os.PathLike, img: Image.Image, rawmode: str) -> np.ndarray:
    """The 0..65535 samples [H, W, C] of a 16-bit gray+alpha, RGB or RGBA PNG, `img` loaded by Pillow.

    Pillow unpacks these with rawmodes "LA;16B", "RGB;16B", "RGBA;16B", which keep only the high byte of
    each big-endian sample. Decoding the same data again with a rawmode of the same pixel size reads the
    low bytes: "RGB;16L"/"RGBA;16L" take the second byte of each sample, plain "RGBA" (4 bytes, as
    gray+alpha) takes all four. The PNG filters see the same bytes per pixel, so rows unfilter identically.
    """
    if rawmode == "LA;16B":
        raw = _decode_as(path, "RGBA").astype(np.uint16)  # [H, W, 4]: L high, L low, A high, A low
        return raw[:, :, 0::2] << 8 | raw[:, :, 1::2]  # [H, W, 2]
    high = np.asarray(img).astype(np.uint16)  # [H, W, C]
    return high << 8 | _decode_as(path, rawmode[:-1] + "L")


def _decode_as(path: str | os.PathLike, rawmode: str) -> np.ndarray:
    """Decode a single-tile file with another rawmode of the same pixel size into its own mode."""
    with Image.open(path) as img:
        tile = img.tile[0]
        img.tile = [tile._replace(args=rawmode) if hasattr(tile, "_replace") else (*tile[:3], rawmode)]
        img.load()
        return np.asarray(img)


def resize_exact(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize of uint8 [H, W, 3] to [height, width, 3]; a float matte [H, W] is resized bilinearly."""
    if image.ndim == 2:
        matte = Image.fromarray(np.asarray(image, dtype=np.float32))  # mode "F"
        return np.clip(np.asarray(matte.resize((width, height), Image.Resampling.BILINEAR)), 0.0, 1.0)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """IC-Light's resize_and_center_crop: scale to cover width x height, then crop the centre.

    s = max(width / w, height / h); the whole image is resized to (round(w s), round(h s)) (Lanczos for
    uint8 [H, W, 3], bilinear and clipped to [0, 1] for a float matte [H, W]) and cropped at the box
    ((rw - width) / 2, (rh - height) / 2, ...) that PIL's `crop` rounds half to even
    (docs/iclight-facts.md, "Condition encoding"). The crop's start is rounded here and its end is start +
    size: the same box as IC-Light's for even sizes, and the requested size for odd ones.
    Returns [height, width, 3] uint8 or [height, width] float32.
    """
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    resized_w, resized_h = int(round(w * scale)), int(round(h * scale))
    left, top = round((resized_w - width) / 2), round((resized_h - height) / 2)
    resized = resize_exact(image, resized_w, resized_h)
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(255^2 / MSE) over all values of two uint8 images of one shape (MSE in float64, >= 1e-10)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))
