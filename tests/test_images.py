"""The one image loader and resizer: odd but valid files, 16-bit PNGs, limits, IC-Light's crop, PSNR.

References are independent of eddpm/images.py: PNG files written byte by byte (all five row filters),
8-bit values computed with integer arithmetic, Pillow's ImageOps.exif_transpose for orientations, and a
port of IC-Light's resize_and_center_crop written here.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from eddpm.images import ImageError, load_image, probe_image, psnr, resize_cover, resize_exact

# --- helpers ------------------------------------------------------------------------------------------


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _filtered(samples: np.ndarray) -> bytes:
    """The filtered scanlines of uint16 [H, W, C]: row y uses filter y % 5 (None, Sub, Up, Average, Paeth)."""
    height, width, channels = samples.shape
    bpp = 2 * channels  # bytes per pixel
    previous = bytes(width * bpp)
    stream = bytearray()
    for y in range(height):
        line = samples[y].astype(">u2").tobytes()
        kind = y % 5
        stream.append(kind)
        for i, x in enumerate(line):
            a = line[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            predictor = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
            stream.append((x - predictor) % 256)
        previous = line
    return bytes(stream)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def write_png16(path, samples: np.ndarray, extra_chunks: tuple[bytes, ...] = (), interlaced=False) -> None:
    """A 16-bit PNG of samples uint16 [H, W, C] (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA), by hand.

    Every row filter is used, so every unfiltering path is read; `interlaced` stores the 7 Adam7 passes.
    """
    height, width, channels = samples.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    if interlaced:
        passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
        stream = b"".join(_filtered(p) for p in passes if p.size)
    else:
        stream = _filtered(samples)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, int(interlaced))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header))
        for extra in extra_chunks:
            f.write(extra)
        f.write(_chunk(b"IDAT", zlib.compress(stream)) + _chunk(b"IEND", b""))


def to_eight_bit(samples: np.ndarray) -> np.ndarray:
    """floor(v * 255 / 65535 + 1/2) in integers (no ties exist: v * 510 is never an odd multiple of 65535)."""
    return ((samples.astype(np.int64) * 510 + 65535) // 131070).astype(np.uint8)


def iclight_resize_and_center_crop(image: np.ndarray, target_width: int, target_height: int) -> np.ndarray:
    """IC-Light's resize_and_center_crop, ported line by line (mattes as mode "F", bilinear)."""
    pil_image = Image.fromarray(image)
    original_width, original_height = pil_image.size
    scale_factor = max(target_width / original_width, target_height / original_height)
    resized_width = int(round(original_width * scale_factor))
    resized_height = int(round(original_height * scale_factor))
    resample = Image.BILINEAR if pil_image.mode == "F" else Image.LANCZOS
    resized_image = pil_image.resize((resized_width, resized_height), resample)
    left = (resized_width - target_width) / 2
    top = (resized_height - target_height) / 2
    right = (resized_width + target_width) / 2
    bottom = (resized_height + target_height) / 2
    return np.array(resized_image.crop((left, top, right, bottom)))


# --- 8-bit files --------------------------------------------------------------------------------------


def disc_rgba(size=(64, 64)) -> Image.Image:
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    inside = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (min(size) / 3) ** 2
    rgb = np.where(inside[..., None], np.array((200, 40, 40)), np.array((10, 200, 10))).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, inside.astype(np.uint8) * 255]))


def test_grayscale_loads_as_equal_rgb_channels(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    Image.fromarray(gray).save(tmp_path / "l.png")
    rgb, alpha = load_image(tmp_path / "l.png")
    assert alpha is None
    assert np.array_equal(rgb, np.repeat(gray[..., None], 3, axis=2))


def test_palette_images_with_and_without_transparency(tmp_path):
    source = disc_rgba().convert("RGB")
    palette = source.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "p.png")
    rgb, alpha = load_image(tmp_path / "p.png")
    assert alpha is None
    assert np.array_equal(rgb, np.asarray(source))

    background_index = palette.getpixel((0, 0))
    palette.save(tmp_path / "pt.png", transparency=background_index)
    rgb, alpha = load_image(tmp_path / "pt.png")
    expected_alpha = (np.asarray(palette) != background_index).astype(np.float32)
    assert np.array_equal(alpha, expected_alpha)
    assert np.array_equal(rgb[expected_alpha == 1], np.asarray(source)[expected_alpha == 1])


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = np.zeros((32, 32, 4), dtype=np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:] = (255, 0, 255, 0)  # green
    Image.frombytes("CMYK", (32, 32), cmyk.tobytes()).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    rgb, alpha = load_image(tmp_path / "cmyk.jpg")
    assert alpha is None and rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(rgb[8, 4], (255, 0, 0), atol=12)
    np.testing.assert_allclose(rgb[8, 28], (0, 255, 0), atol=12)


def test_rgba_and_la_give_their_alpha(tmp_path):
    image = disc_rgba()
    image.save(tmp_path / "rgba.png")
    rgb, alpha = load_image(tmp_path / "rgba.png")
    assert np.array_equal(rgb, np.asarray(image)[..., :3])  # the stored RGB, not composited
    assert np.array_equal(alpha, np.asarray(image)[..., 3] / np.float32(255))
    image.convert("LA").save(tmp_path / "la.png")
    _, alpha = load_image(tmp_path / "la.png")
    assert np.array_equal(alpha, np.asarray(image)[..., 3] / np.float32(255))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillows_exif_transpose(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 4), dtype=np.uint8)  # H=5, W=7
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    rgb, alpha = load_image(tmp_path / "o.png")
    assert np.array_equal(rgb, expected[..., :3]), orientation
    assert np.array_equal(alpha, expected[..., 3] / np.float32(255)), orientation
    assert probe_image(tmp_path / "o.png") == (expected.shape[1], expected.shape[0], True)


def test_exif_rotation_of_a_jpeg_and_its_probed_size(tmp_path):
    stored = np.zeros((32, 48, 3), dtype=np.uint8)  # H=32, W=48 as stored
    stored[:8, :8] = (255, 0, 0)  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored top-left ends at the displayed top-right
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgb, _ = load_image(tmp_path / "rotated.jpg")
    assert rgb.shape == (48, 32, 3)
    assert rgb[:8, -8:, 0].mean() > 200 and rgb[:8, :8, 0].mean() < 50
    assert probe_image(tmp_path / "rotated.jpg") == (32, 48, False)  # width, height after rotation


# --- 16-bit files -------------------------------------------------------------------------------------


def _samples(channels: int, seed: int = 0) -> np.ndarray:
    """uint16 [5, 7, C] with extremes, values next to each rounding boundary and random values."""
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, 65536, (5, 7, channels)).astype(np.uint16)
    edges = np.array([0, 1, 128, 129, 256, 32767, 32768, 32896, 65279, 65407, 65408, 65534, 65535])
    samples[0, :, 0] = edges[:7]
    samples[1, :6, 0] = edges[7:]
    return samples


@pytest.mark.parametrize("interlaced", [False, True], ids=["sequential", "interlaced"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["gray", "gray+alpha", "RGB", "RGBA"])
def test_sixteen_bit_pngs_map_every_sample_to_round_v_255_over_65535(tmp_path, channels, interlaced):
    samples = _samples(channels)
    write_png16(tmp_path / "deep.png", samples, interlaced=interlaced)
    rgb, alpha = load_image(tmp_path / "deep.png")
    colour = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, axis=2)
    expected = to_eight_bit(colour)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, expected), np.argwhere(rgb != expected)[:5]
    if channels in (2, 4):
        np.testing.assert_allclose(alpha, samples[..., -1] / 65535.0, rtol=0, atol=1e-7)
    else:
        assert alpha is None
    assert probe_image(tmp_path / "deep.png") == (7, 5, channels in (2, 4))


def test_sixteen_bit_gray_ramp_has_mean_127_5_and_is_not_clipped_to_white(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0, 257, ..., 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")  # Pillow writes "I;16" as a 16-bit gray PNG
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I;16")
    rgb, alpha = load_image(tmp_path / "ramp.png")
    assert alpha is None
    assert np.array_equal(rgb[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))  # v / 257 exactly
    assert rgb.mean() == 127.5 and (rgb == 255).mean() == 1 / 256


@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "RGB"])
def test_sixteen_bit_transparent_colour_key_gives_an_alpha(tmp_path, channels):
    samples = _samples(channels, seed=1)
    key = samples[2, 3]  # one pixel's colour is the transparent one
    write_png16(tmp_path / "keyed.png", samples, (_chunk(b"tRNS", key.astype(">u2").tobytes()),))
    rgb, alpha = load_image(tmp_path / "keyed.png")
    expected_alpha = np.ones((5, 7), np.float32)
    expected_alpha[(samples == key).all(axis=2)] = 0.0
    assert expected_alpha[2, 3] == 0 and expected_alpha.sum() >= 34
    assert np.array_equal(alpha, expected_alpha)
    colour = samples if channels == 3 else np.repeat(samples, 3, axis=2)
    assert np.array_equal(rgb, to_eight_bit(colour))


# --- errors and limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (None, "missing file"),
        (b"", "unreadable image"),
        (b"this is not an image\n", "unreadable image"),
        ("truncated", "unreadable image"),
    ],
    ids=["missing", "zero bytes", "text", "truncated PNG"],
)
def test_bad_files_raise_image_error_with_a_kind(tmp_path, content, kind):
    path = tmp_path / "bad.png"
    if content == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[:3000])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert error.value.kind == kind and str(error.value).startswith(f"{kind}: bad.png")
    assert isinstance(error.value, ValueError)


def test_max_pixels_is_checked_from_the_header_before_decoding(tmp_path):
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png", max_pixels=8000)[0].shape == (80, 100, 3)
    with pytest.raises(ImageError, match="too large: small.png: 100x80") as error:
        load_image(tmp_path / "small.png", max_pixels=7999)
    assert error.value.kind == "too large"
    # A header that claims 9000 x 8000 (72 M pixels, above the default cap) and holds no pixel data:
    # decoding would fail as "unreadable image", so "too large" shows the check came first.
    header = struct.pack(">IIBBBBB", 9000, 8000, 8, 2, 0, 0, 0)
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="too large: huge.png: 9000x8000"):
        load_image(tmp_path / "huge.png")
    assert probe_image(tmp_path / "huge.png") == (9000, 8000, False)


# --- resizing -----------------------------------------------------------------------------------------

SIZES = [
    # (source width, height), (target width, height)
    ((75, 64), (64, 64)),  # excess 11 = 3 mod 4: the crop starts at round(5.5) = 6, not 5
    ((64, 75), (64, 64)),
    ((67, 64), (64, 64)),  # excess 3
    ((71, 64), (64, 64)),  # excess 7
    ((81, 64), (64, 64)),  # excess 17: round(8.5) = 8
    ((100, 50), (64, 64)),
    ((50, 100), (96, 64)),
    ((333, 517), (512, 640)),
    ((640, 480), (512, 640)),
    ((1001, 1000), (64, 128)),
    ((64, 64), (64, 64)),
    ((37, 29), (128, 192)),  # upscaling
]


@pytest.mark.parametrize(("source", "target"), SIZES, ids=[f"{s[0]}x{s[1]}->{t[0]}x{t[1]}" for s, t in SIZES])
def test_resize_cover_is_iclights_resize_and_center_crop(source, target):
    rng = np.random.default_rng(sum(source))
    image = rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
    expected = iclight_resize_and_center_crop(image, *target)
    got = resize_cover(image, *target)
    assert got.shape == expected.shape == (target[1], target[0], 3)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)

    matte = rng.uniform(-0.2, 1.2, (source[1], source[0])).astype(np.float32)
    expected_matte = np.clip(iclight_resize_and_center_crop(matte, *target), 0.0, 1.0)
    got_matte = resize_cover(matte, *target)
    assert got_matte.dtype == np.float32 and np.array_equal(got_matte, expected_matte)


def test_resize_cover_crop_offset_of_75_to_64_by_hand():
    image = np.repeat(np.arange(75, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    out = resize_cover(image, 64, 64)  # scale 1: no resampling, only the crop [6, 70)
    assert np.array_equal(out[0, :, 0], np.arange(6, 70, dtype=np.uint8))


def test_resize_cover_gives_the_requested_size_for_odd_sizes():
    image = np.zeros((40, 64, 3), dtype=np.uint8)  # excess 7 rows for 33: PIL's float box would give 32
    assert resize_cover(image, 64, 33).shape == (33, 64, 3)
    assert resize_cover(np.ones((40, 64), np.float32), 33, 21).shape == (21, 33)


def test_resize_exact_keeps_a_constant_image_constant():
    image = np.full((30, 50, 3), 77, np.uint8)
    out = resize_exact(image, 23, 41)
    assert out.shape == (41, 23, 3) and np.all(out == 77)


def test_psnr_against_hand_values():
    black, white = np.zeros((4, 5, 3), np.uint8), np.full((4, 5, 3), 255, np.uint8)
    assert psnr(black, white) == pytest.approx(0.0)  # MSE = 255^2
    assert psnr(black, black + 1) == pytest.approx(20 * np.log10(255.0))  # MSE = 1: 48.13 dB
    half = black.copy()
    half[:2] = 255  # MSE = 255^2 / 2: +3.01 dB
    assert psnr(half, black) == pytest.approx(10 * np.log10(2.0))
