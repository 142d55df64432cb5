"""Dataset validation, image decoding, buckets, flips, the latent cache and the bucket sampler.

The encoders are simple fakes (avg-pool by 8 of x/127 - 1, hash-seeded prompt embeddings) that count
what they encode, so these tests do not depend on eddpm.iclight or on any model.
"""

import hashlib
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from eddpm import data

EMBED_DIM = 16


# --- fakes and helpers --------------------------------------------------------------------------------


def _pool(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] 0..255 -> [B, 4, H/8, W/8]: avg-pooled x/127 - 1 plus their channel mean."""
    x = F.avg_pool2d(pixels / 127.0 - 1.0, 8)
    return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)


def _fake_prompt_embedding(text: str) -> torch.Tensor:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return torch.randn(77, EMBED_DIM, generator=torch.Generator().manual_seed(seed))


class FakeEncoders:
    """Counts the items each encoder sees; records the mattes given to encode_condition."""

    def __init__(self):
        self.counts = Counter()
        self.alphas: list[torch.Tensor] = []

    def encode_images(self, vae, pixels):
        self.counts["images"] += len(pixels)
        return _pool(pixels)

    def encode_condition(self, vae, pixels, alpha):
        self.counts["conditions"] += len(pixels)
        self.alphas.extend(alpha.clone())
        return _pool(127.0 + (pixels - 127.0) * alpha)

    def encode_prompts(self, tokenizer, text_encoder, prompts):
        self.counts["prompts"] += len(prompts)
        return torch.stack([_fake_prompt_embedding(p) for p in prompts])


def build(data_dir, cache_dir, encoders=None, **options):
    encoders = encoders or FakeEncoders()
    kwargs = {
        "vae": None,
        "text_encoder": None,
        "tokenizer": None,
        "resolution": 64,
        "model_id": "fake-model",
        "encode_images": encoders.encode_images,
        "encode_condition": encoders.encode_condition,
        "encode_prompts": encoders.encode_prompts,
        "progress": False,
    }
    return data.build_latent_cache(str(data_dir), str(cache_dir), **{**kwargs, **options})


def disc_rgba(size=(64, 64), color=(200, 40, 40), background=(10, 200, 10)) -> Image.Image:
    """A coloured disc on a coloured background, with the disc as alpha."""
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    inside = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (min(size) / 3) ** 2
    rgb = np.where(inside[..., None], np.array(color), np.array(background)).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, inside.astype(np.uint8) * 255]))


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
    (folder / data.METADATA_FILE).write_text(text + "\n")
    return folder


GOOD = {"file_name": "good.png", "text": "a red disc, light from the left"}
GOOD_FILES = {"good.png": disc_rgba(), "good_mask.png": disc_rgba().getchannel("A")}

# (case, metadata line, extra files, expected kind, file name named in the message)
BAD_CASES = [
    ("zero-byte", {"file_name": "zero.png", "text": "t"}, {"zero.png": b""}, "unreadable image", "zero.png"),
    (
        "truncated PNG",
        {"file_name": "cut.png", "text": "t"},
        {"cut.png": encoded(noise_rgb().convert("RGBA"), "PNG")[:3000]},
        "unreadable image",
        "cut.png",
    ),
    (
        "truncated JPEG",
        {"file_name": "cut.jpg", "text": "t", "mask_file_name": "good_mask.png"},
        {"cut.jpg": encoded(noise_rgb(), "JPEG")[:2000]},
        "unreadable image",
        "cut.jpg",
    ),
    (
        "text file named .png",
        {"file_name": "notes.png", "text": "t"},
        {"notes.png": b"this is not an image\n"},
        "unreadable image",
        "notes.png",
    ),
    ("missing file", {"file_name": "absent.png", "text": "t"}, {}, "missing file", "absent.png"),
    (
        "missing condition file",
        {"file_name": "good.png", "conditioning_file_name": "absent.png", "text": "t"},
        {},
        "missing file",
        "good.png",
    ),
    ("malformed JSON", '{"file_name": "good.png", "text": "oops"', {}, "malformed JSON", "good.png"),
    ("JSON that is not an object", '["good.png", "text"]', {}, "malformed JSON", "<unknown>"),
    ("no file_name", {"text": "t"}, {}, "missing file_name", "<unknown>"),
    ("missing text", {"file_name": "good.png"}, {}, "missing prompt", "good.png"),
    ("empty text", {"file_name": "good.png", "text": "   "}, {}, "empty prompt", "good.png"),
    (
        "too small",
        {"file_name": "tiny.png", "text": "t"},
        {"tiny.png": disc_rgba((32, 32))},
        "too small",
        "tiny.png",
    ),
    ("duplicate line", GOOD, {}, "duplicate", "good.png"),
    (
        "no matte",
        {"file_name": "plain.png", "text": "t"},
        {"plain.png": noise_rgb()},
        "no matte",
        "plain.png",
    ),
    (
        "empty matte",
        {"file_name": "clear.png", "text": "t"},
        {"clear.png": Image.fromarray(np.zeros((64, 64, 4), dtype=np.uint8))},  # alpha 0 everywhere
        "empty matte",
        "clear.png",
    ),
    (
        "condition of another aspect",
        {"file_name": "good.png", "conditioning_file_name": "tall.png", "text": "t"},
        {"tall.png": disc_rgba((64, 96))},
        "size mismatch",
        "good.png",
    ),
]


def test_each_bad_row_is_skipped_with_file_line_and_reason(tmp_path, caplog):
    files = dict(GOOD_FILES)
    lines = [GOOD]
    for _, line, extra, _, _ in BAD_CASES:
        files.update(extra)
        lines.append(line)
    folder = write_dataset(tmp_path / "set", lines, files)
    with caplog.at_level(logging.WARNING, logger="eddpm.data"):
        dataset = build(folder, tmp_path / "cache")
    assert [row.line for row in dataset.rows] == [1]
    skips = {skip.line: skip for skip in dataset.stats.skipped}
    for line_no, (case, _, _, kind, file_name) in enumerate(BAD_CASES, start=2):
        assert line_no in skips, f"{case} (line {line_no}) was not skipped"
        assert skips[line_no].kind == kind, f"{case}: {skips[line_no]}"
        expected = f"metadata.jsonl:{line_no}: {file_name}: {kind}"
        assert sum(expected in message for message in caplog.messages) == 1, (
            f"{case}: no log line {expected!r}"
        )
    assert len(skips) == len(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_strict_raises_at_the_bad_row(tmp_path, case):
    name, line, extra, kind, file_name = case
    folder = write_dataset(tmp_path / "set", [GOOD, line], {**GOOD_FILES, **extra})
    with pytest.raises(data.DatasetError, match=f"metadata.jsonl:2: {file_name}: {kind}"):
        build(folder, tmp_path / "cache", strict=True)


def test_no_usable_rows_is_a_clear_value_error(tmp_path):
    folder = write_dataset(tmp_path / "set", [{"file_name": "zero.png", "text": "t"}], {"zero.png": b""})
    with pytest.raises(ValueError, match="no usable rows"):
        build(folder, tmp_path / "cache")


def test_missing_metadata_file_says_what_is_needed(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        data.read_metadata(str(tmp_path))


def test_read_metadata_keeps_extra_fields_and_ignores_blank_lines(tmp_path):
    line = {**GOOD, "light_direction": "left", "shape": "disc"}
    folder = write_dataset(tmp_path, ["", json.dumps(line), "   "], GOOD_FILES)
    (folder / data.METADATA_FILE).write_bytes(
        b"\xef\xbb\xbf" + (folder / data.METADATA_FILE).read_bytes()
    )  # a BOM
    rows, skips = data.read_metadata(str(folder))
    assert skips == []
    assert [(r.line, r.file_name, r.text, r.extra) for r in rows] == [
        (2, "good.png", GOOD["text"], {"light_direction": "left", "shape": "disc"})
    ]


def test_allow_empty_prompts_reads_missing_and_empty_text_as_empty(tmp_path):
    lines = [{"file_name": "good.png"}, {"file_name": "good.png", "text": ""}]
    folder = write_dataset(tmp_path, lines, GOOD_FILES)
    rows, skips = data.read_metadata(str(folder), allow_empty_prompts=True)
    assert [r.text for r in rows] == [""]
    assert [s.kind for s in skips] == ["duplicate"]  # both lines read as the same (file, "") row


# --- decoding odd but valid images --------------------------------------------------------------------


def test_grayscale_loads_as_equal_rgb_channels(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    Image.fromarray(gray).save(tmp_path / "l.png")
    rgb, alpha = data.load_image(str(tmp_path / "l.png"))
    assert alpha is None
    assert np.array_equal(rgb, np.repeat(gray[..., None], 3, axis=2))


def test_palette_images_with_and_without_transparency(tmp_path):
    source = disc_rgba().convert("RGB")
    palette = source.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "p.png")
    rgb, alpha = data.load_image(str(tmp_path / "p.png"))
    assert alpha is None
    assert np.array_equal(rgb, np.asarray(source))

    background_index = palette.getpixel((0, 0))
    palette.save(tmp_path / "pt.png", transparency=background_index)
    rgb, alpha = data.load_image(str(tmp_path / "pt.png"))
    expected_alpha = (np.asarray(palette) != background_index).astype(np.float32)
    assert np.array_equal(alpha, expected_alpha)
    assert np.array_equal(rgb[expected_alpha == 1], np.asarray(source)[expected_alpha == 1])


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = np.zeros((32, 32, 4), dtype=np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:] = (255, 0, 255, 0)  # green
    Image.frombytes("CMYK", (32, 32), cmyk.tobytes()).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    rgb, alpha = data.load_image(str(tmp_path / "cmyk.jpg"))
    assert alpha is None and rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(rgb[8, 4], (255, 0, 0), atol=12)
    np.testing.assert_allclose(rgb[8, 28], (0, 255, 0), atol=12)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(values * 257).save(tmp_path / "deep.png")  # 0..65535
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    rgb, alpha = data.load_image(str(tmp_path / "deep.png"))
    assert alpha is None
    assert np.array_equal(rgb[..., 0], values.astype(np.uint8)) and np.array_equal(rgb[..., 2], rgb[..., 0])


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((32, 48, 3), dtype=np.uint8)  # H=32, W=48 as stored
    stored[:8, :8] = (255, 0, 0)  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored top-left ends at the displayed top-right
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgb, _ = data.load_image(str(tmp_path / "rotated.jpg"))
    assert rgb.shape == (48, 32, 3)
    assert rgb[:8, -8:, 0].mean() > 200 and rgb[:8, :8, 0].mean() < 50
    assert data._probe(str(tmp_path / "rotated.jpg"))[:2] == (32, 48)  # width, height after rotation


def test_rgba_and_la_give_their_alpha(tmp_path):
    image = disc_rgba()
    image.save(tmp_path / "rgba.png")
    rgb, alpha = data.load_image(str(tmp_path / "rgba.png"))
    assert np.array_equal(rgb, np.asarray(image)[..., :3])  # the stored RGB, not composited
    assert np.array_equal(alpha, np.asarray(image)[..., 3] / np.float32(255))
    image.convert("LA").save(tmp_path / "la.png")
    _, alpha = data.load_image(str(tmp_path / "la.png"))
    assert np.array_equal(alpha, np.asarray(image)[..., 3] / np.float32(255))


def test_rgba_alpha_is_the_matte_and_the_target_rgb_is_kept(tmp_path):
    image = disc_rgba()
    folder = write_dataset(tmp_path / "set", [GOOD], {"good.png": image})
    encoders = FakeEncoders()
    dataset = build(folder, tmp_path / "cache", encoders)
    pixels = torch.from_numpy(np.asarray(image)[..., :3].copy()).permute(2, 0, 1)[None].float()
    alpha = torch.from_numpy(np.asarray(image)[..., 3] / 255.0).float()
    torch.testing.assert_close(encoders.alphas[0][0], alpha)
    torch.testing.assert_close(dataset[0]["latents"], _pool(pixels)[0])  # uncomposited target
    torch.testing.assert_close(dataset[0]["cond_latents"], _pool(127 + (pixels - 127) * alpha)[0])


def test_mask_file_then_matte_fn_supply_the_matte(tmp_path):
    mask = disc_rgba().getchannel("A")
    lines = [
        {"file_name": "a.png", "text": "with a mask", "mask_file_name": "mask.png"},
        {"file_name": "b.png", "text": "needs rmbg"},
    ]
    folder = write_dataset(
        tmp_path / "set", lines, {"a.png": noise_rgb(seed=1), "b.png": noise_rgb(seed=2), "mask.png": mask}
    )
    square = np.zeros((64, 64), dtype=np.float32)
    square[8:40, 8:40] = 1.0
    calls = []

    def matte_fn(rgb):
        calls.append(rgb.shape)
        return square

    encoders = FakeEncoders()
    dataset = build(folder, tmp_path / "cache", encoders, matte_fn=matte_fn, matte_id="square")
    assert len(dataset) == 2 and calls == [(64, 64, 3)]
    assert np.array_equal(encoders.alphas[0][0].numpy(), np.asarray(mask) / np.float32(255))
    assert np.array_equal(encoders.alphas[1][0].numpy(), square)


# --- buckets and resizing -----------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [128, 256, 512, 576, 768, 1024])
def test_buckets_are_multiples_of_64_with_about_the_target_area(resolution):
    buckets = data.make_buckets(resolution)
    assert buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0, (width, height)
        assert abs(width * height / resolution**2 - 1) <= 0.1, (width, height)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])
    if resolution % 64 == 0:
        assert (resolution, resolution) in buckets


def test_iclight_default_512x640_is_a_bucket_at_576():
    assert (512, 640) in data.make_buckets(576)
    assert (512, 640) not in data.make_buckets(512)  # 25 % more area than 512**2
    assert data.assign_bucket(1024, 1280, data.make_buckets(576)) == (512, 640)
    assert (
        min(min(b) for b in data.make_buckets(512)) >= 256
        and max(max(b) for b in data.make_buckets(512)) <= 1024
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(16, 4000), st.integers(16, 4000), st.sampled_from([128, 512, 576, 768]))
def test_assign_bucket_picks_the_closest_aspect_ratio(width, height, resolution):
    buckets = data.make_buckets(resolution)
    chosen = data.assign_bucket(width, height, buckets)
    best = None
    for bucket in buckets:  # reference: a plain loop over the buckets
        distance = abs(math.log(bucket[0] / bucket[1]) - math.log(width / height))
        if best is None or distance < best[0] - 1e-12:
            best = (distance, bucket)
    assert chosen == best[1]


def test_resize_cover_fills_the_bucket_and_crops_the_centre():
    image = np.zeros((50, 100, 3), dtype=np.uint8)  # H=50, W=100: left half red, right half blue
    image[:, :50, 0] = 255
    image[:, 50:, 2] = 255
    out = data.resize_cover(image, (64, 64))
    assert out.shape == (64, 64, 3)
    # The centred 50x50 crop keeps 25 px of each half: still red left, blue right.
    assert out[:, :28, 0].min() > 240 and out[:, 36:, 2].min() > 240
    alpha = data.resize_cover(np.ones((50, 100), dtype=np.float32), (32, 64))
    assert alpha.shape == (64, 32) and np.allclose(alpha, 1.0)


# --- flips and degradation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("warm light from the left", "warm light from the right"),
        ("Left light, RIGHT shadow", "Right light, LEFT shadow"),
        ("left-right gradient", "right-left gradient"),
        ("leftover bright rightly", "leftover bright rightly"),
        ("", ""),
    ],
)
def test_swap_left_right(text, expected):
    assert data.swap_left_right(text) == expected


@given(st.lists(st.sampled_from(["left", "right", "Left", "RIGHT", "lefty", "bright", "top", ",", "light"])))
def test_swap_left_right_is_an_involution(words):
    text = " ".join(words)
    assert data.swap_left_right(data.swap_left_right(text)) == text


def test_flip_mirrors_pixels_and_swaps_the_prompt(tmp_path):
    image = disc_rgba(color=(250, 0, 0))
    pixels = np.asarray(image).copy()
    pixels[:, :20, :3] = (0, 0, 250)  # make it asymmetric
    line = {"file_name": "a.png", "text": "light from the Left", "light_direction": "left"}
    folder = write_dataset(tmp_path / "set", [line], {"a.png": Image.fromarray(pixels)})
    rows, _ = data.read_metadata(str(folder))
    plain = data.load_example(rows[0], str(folder), (64, 64))
    mirrored = data.load_example(data.flip_row(rows[0]), str(folder), (64, 64))
    for a, b in (
        (plain.target, mirrored.target),
        (plain.condition, mirrored.condition),
        (plain.alpha, mirrored.alpha),
    ):
        assert np.array_equal(a[:, ::-1], b)

    dataset = build(folder, tmp_path / "cache", flip=True)
    assert [(r.text, r.flipped, r.extra["light_direction"]) for r in dataset.rows] == [
        ("light from the Left", False, "left"),
        ("light from the Right", True, "right"),
    ]
    for key in ("latents", "cond_latents"):
        torch.testing.assert_close(dataset[1][key], dataset[0][key].flip(-1))
    assert not torch.equal(dataset[0]["prompt_embeds"], dataset[1]["prompt_embeds"])


def test_flip_is_off_by_default(tmp_path):
    folder = write_dataset(tmp_path / "set", [GOOD], GOOD_FILES)
    assert len(build(folder, tmp_path / "cache")) == 1


def test_degrade_shading_changes_only_the_matte_and_is_seeded():
    rgb = np.asarray(noise_rgb())
    alpha = np.asarray(disc_rgba().getchannel("A")) / np.float32(255)
    out = data.degrade_shading(rgb, alpha, seed=5)
    assert np.array_equal(out[alpha == 0], rgb[alpha == 0])
    assert np.abs(out[alpha == 1].astype(int) - rgb[alpha == 1]).mean() > 5
    assert np.array_equal(out, data.degrade_shading(rgb, alpha, seed=5))
    assert not np.array_equal(out, data.degrade_shading(rgb, alpha, seed=6))


# --- the latent cache ---------------------------------------------------------------------------------


@pytest.fixture
def mixed_set(tmp_path):
    """Two paired rows (RGBA conditions) and two unpaired rows (RGBA targets), one bucket at 64."""
    files = {
        "p1.png": noise_rgb(seed=1),
        "p1_cond.png": disc_rgba(color=(20, 20, 220)),
        "p2.png": noise_rgb(seed=2),
        "p2_cond.png": disc_rgba(color=(220, 220, 20)),
        "u1.png": disc_rgba(color=(200, 100, 0)),
        "u2.png": disc_rgba(color=(0, 100, 200)),
    }
    lines = [
        {"file_name": "p1.png", "conditioning_file_name": "p1_cond.png", "text": "one, light from the left"},
        {"file_name": "p2.png", "conditioning_file_name": "p2_cond.png", "text": "two, light from the top"},
        {"file_name": "u1.png", "text": "three, light from the right"},
        {"file_name": "u2.png", "text": "one, light from the left"},  # a repeated prompt: encoded once
    ]
    return write_dataset(tmp_path / "set", lines, files)


def test_cache_hit_runs_no_encoder_and_returns_the_same_tensors(mixed_set, tmp_path):
    first = FakeEncoders()
    dataset = build(mixed_set, tmp_path / "cache", first)
    assert first.counts == {"images": 4, "conditions": 4, "prompts": 4}  # 3 distinct prompts + ""
    assert dataset.stats.seconds_per_image > 0
    again = FakeEncoders()
    cached = build(mixed_set, tmp_path / "cache", again)
    assert again.counts == {}
    assert cached.stats.encoded_targets == cached.stats.encoded_conditions == 0
    for i in range(len(dataset)):
        for key in ("latents", "cond_latents", "prompt_embeds"):
            assert torch.equal(dataset[i][key], cached[i][key])
    item = cached[0]
    assert item["latents"].shape == item["cond_latents"].shape == (4, 8, 8)
    assert item["prompt_embeds"].shape == (77, EMBED_DIM) and item["index"] == 0
    torch.testing.assert_close(cached.empty_prompt_embeds, _fake_prompt_embedding(""))
    torch.testing.assert_close(item["prompt_embeds"], _fake_prompt_embedding("one, light from the left"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("paired target bytes", {"images": 1}),
        ("paired condition bytes", {"conditions": 1}),
        ("unpaired target bytes", {"images": 1, "conditions": 1}),
        ("model_id", {"images": 4, "conditions": 4, "prompts": 4}),
        ("resolution", {"images": 4, "conditions": 4}),
        ("degrade", {"conditions": 2}),  # unpaired rows only
        ("torn cache entry", {"images": 1}),
        ("new prompt", {"prompts": 1}),
    ],
)
def test_cache_recomputes_only_what_changed(mixed_set, tmp_path, change, expected):
    cache = tmp_path / "cache"
    build(mixed_set, cache)
    options = {}
    if change == "paired target bytes":
        noise_rgb(seed=9).save(mixed_set / "p1.png")
    elif change == "paired condition bytes":
        disc_rgba(color=(1, 2, 3)).save(mixed_set / "p1_cond.png")
    elif change == "unpaired target bytes":
        disc_rgba(color=(1, 2, 3)).save(mixed_set / "u1.png")
    elif change == "model_id":
        options["model_id"] = "another-model"
    elif change == "resolution":
        for name in ("p1.png", "p1_cond.png", "p2.png", "p2_cond.png", "u1.png", "u2.png"):
            Image.open(mixed_set / name).resize((128, 128)).save(mixed_set / name)
        build(mixed_set, cache)  # the new bytes at the old resolution
        options["resolution"] = 128
    elif change == "degrade":
        options["degrade"] = "shading"
    elif change == "torn cache entry":
        entry = sorted((cache / "targets").iterdir())[0]
        entry.write_bytes(entry.read_bytes()[:40])
    elif change == "new prompt":
        lines = (mixed_set / data.METADATA_FILE).read_text().replace("two, light", "TWO, light")
        (mixed_set / data.METADATA_FILE).write_text(lines)
    encoders = FakeEncoders()
    dataset = build(mixed_set, cache, encoders, **options)
    assert encoders.counts == expected
    assert len(dataset) == 4


def test_degraded_condition_differs_for_unpaired_rows_only(mixed_set, tmp_path):
    plain = build(mixed_set, tmp_path / "cache")
    degraded = build(mixed_set, tmp_path / "cache", degrade="shading")
    for i, row in enumerate(plain.rows):
        same = torch.equal(plain[i]["cond_latents"], degraded[i]["cond_latents"])
        assert same == row.paired, f"{row.file_name}: paired={row.paired} but same={same}"
        assert torch.equal(plain[i]["latents"], degraded[i]["latents"])


def test_model_fingerprint_tracks_weights_and_config():
    def make(seed, width=8):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))

    assert data.model_fingerprint(make(0)) == data.model_fingerprint(make(0))
    assert data.model_fingerprint(make(0)) != data.model_fingerprint(make(1))
    assert data.model_fingerprint(make(0)) != data.model_fingerprint(make(0, width=9))

    class Tokenizer:
        model_max_length = 77

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    assert data.model_fingerprint(Tokenizer({"a": 0})) != data.model_fingerprint(Tokenizer({"b": 0}))


def test_fingerprint_is_the_default_model_id(mixed_set, tmp_path):
    encoders = FakeEncoders()
    build(mixed_set, tmp_path / "cache", encoders, model_id=None, vae=torch.nn.Linear(2, 2))
    build(mixed_set, tmp_path / "cache", encoders, model_id=None, vae=torch.nn.Linear(2, 3))
    assert encoders.counts["images"] == 8  # another VAE: everything re-encoded


# --- batching -----------------------------------------------------------------------------------------


BUCKETS = [(64, 64)] * 7 + [(128, 64)] * 5 + [(64, 128)] * 3


def _batches(sampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


@pytest.mark.parametrize("drop_last", [False, True])
def test_bucket_batches_are_full_hold_one_bucket_and_cover_every_index(drop_last):
    sampler = data.BucketBatchSampler(BUCKETS, batch_size=2, seed=0, drop_last=drop_last)
    batches = _batches(sampler)
    assert len(batches) == len(sampler) == (6 if drop_last else 9)
    for batch in batches:
        assert len(batch) == 2 and len({BUCKETS[i] for i in batch}) == 1, batch
    seen = [i for batch in batches for i in batch]
    if drop_last:  # one item of each odd-sized bucket left out, none repeated
        assert len(seen) == len(set(seen)) == 12
    else:  # each odd-sized bucket tops up its last batch with one of its own items
        assert sorted(set(seen)) == list(range(len(BUCKETS))) and len(seen) == 18
        assert sorted(BUCKETS[i] for i, n in Counter(seen).items() if n == 2) == sorted({*BUCKETS})


def test_bucket_sampler_is_deterministic_per_seed_and_epoch():
    def at(seed, epoch):
        sampler = data.BucketBatchSampler(BUCKETS, batch_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return _batches(sampler)

    assert at(0, 0) == at(0, 0)
    assert at(0, 0) != at(0, 1)
    assert at(0, 0) != at(1, 0)
    sampler = data.BucketBatchSampler(BUCKETS, batch_size=2, seed=0)
    assert [_batches(sampler), _batches(sampler)] == [at(0, 0), at(0, 1)]  # each pass advances the epoch
    ordered = data.BucketBatchSampler(BUCKETS, batch_size=3, shuffle=False)
    assert _batches(ordered)[:3] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]


def test_bucket_sampler_shards_under_accelerate():
    shard = pytest.importorskip("accelerate.data_loader").BatchSamplerShard
    sampler = data.BucketBatchSampler(BUCKETS, batch_size=2, seed=3)
    full = _batches(sampler)
    shards = []
    for rank in range(2):
        sampler.set_epoch(0)  # every process sees the same batches, then takes its share
        shards.append(_batches(shard(sampler, num_processes=2, process_index=rank)))
    assert shards[0] == full[0::2]
    assert shards[1] == full[1::2] + full[:1]  # 9 batches: accelerate repeats the first for rank 1
    for batch in shards[0] + shards[1]:
        assert len({BUCKETS[i] for i in batch}) == 1, batch
    assert sampler.sampler is sampler  # where accelerate looks for set_epoch after sharding


def test_dataloader_with_the_bucket_sampler_stacks_batches(mixed_set, tmp_path):
    dataset = build(mixed_set, tmp_path / "cache")
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=data.BucketBatchSampler(dataset, batch_size=3)
    )
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [3, 3]  # 4 items, topped up to two full batches
    assert batches[0]["latents"].shape[1:] == (4, 8, 8) and batches[0]["prompt_embeds"].shape[1:] == (
        77,
        EMBED_DIM,
    )


def test_psnr_against_hand_values():
    black, white = np.zeros((4, 5, 3), np.uint8), np.full((4, 5, 3), 255, np.uint8)
    assert data.psnr(black, white) == pytest.approx(0.0)  # MSE = 255^2
    assert data.psnr(black, black + 1) == pytest.approx(20 * np.log10(255.0))  # MSE = 1: 48.13 dB
    half = black.copy()
    half[:2] = 255  # MSE = 255^2 / 2: +3.01 dB
    assert data.psnr(half, black) == pytest.approx(10 * np.log10(2.0))
