"""The latent cache: image-level skips with line numbers, strict mode, keys, reuse, flips, batching.

The encoders are simple fakes (avg-pool by 8 of x/127 - 1, hash-seeded prompt embeddings) that count
what they encode, so these tests do not depend on a model.
"""

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dataset_files import (
    GOOD,
    GOOD_FILES,
    METADATA_FILE,
    disc_rgba,
    encoded,
    noise_rgb,
    write_dataset,
)
from PIL import Image

from eddpm.buckets import BucketBatchSampler
from eddpm.cache import build_latent_cache, model_fingerprint
from eddpm.examples import load_example
from eddpm.metadata import DatasetError, flip_row, read_metadata

REPO = Path(__file__).resolve().parents[1]

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
    """Counts the images (targets and conditions alike) and prompts each encoder sees."""

    def __init__(self):
        self.counts = Counter()

    def encode_images(self, vae, pixels):
        self.counts["images"] += len(pixels)
        return _pool(pixels)

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
        "encode_prompts": encoders.encode_prompts,
        "progress": False,
    }
    return build_latent_cache(str(data_dir), str(cache_dir), **{**kwargs, **options})


def header_only_png(width: int, height: int, color_type: int = 6) -> bytes:
    """A PNG signature, IHDR and IEND: a valid header that claims a size, and no pixel data."""

    def chunk(kind, payload):
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def half(x: torch.Tensor) -> torch.Tensor:
    """What the cache stores: float16, rounded to nearest, read back as float32."""
    return x.to(torch.float16).to(torch.float32)


def composited(image: Image.Image) -> torch.Tensor:
    """An RGBA image's RGB over gray 127 by its alpha, float32 then truncated to uint8, as [1, 3, H, W]."""
    pixels = np.asarray(image).astype(np.float32)
    out = np.clip(127 + (pixels[..., :3] - 127) * pixels[..., 3:] / 255, 0, 255).astype(np.uint8)
    return torch.from_numpy(out).permute(2, 0, 1)[None].float()


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
    (
        "too many pixels",
        {"file_name": "huge.png", "text": "t"},
        {"huge.png": header_only_png(9000, 8000)},  # 72 M pixels, above images.MAX_PIXELS
        "too large",
        "huge.png",
    ),
    ("missing file", {"file_name": "absent.png", "text": "t"}, {}, "missing file", "absent.png"),
    ("malformed JSON", '{"file_name": "good.png", "text": "oops"', {}, "malformed JSON", "good.png"),
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
    with caplog.at_level(logging.WARNING, logger="eddpm.metadata"):
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
    with pytest.raises(DatasetError, match=f"metadata.jsonl:2: {file_name}: {kind}"):
        build(folder, tmp_path / "cache", strict=True)


def test_no_usable_rows_is_a_clear_value_error(tmp_path):
    folder = write_dataset(tmp_path / "set", [{"file_name": "zero.png", "text": "t"}], {"zero.png": b""})
    with pytest.raises(ValueError, match="no usable rows"):
        build(folder, tmp_path / "cache")


def test_condition_latent_is_the_composite_and_the_target_rgb_is_kept(tmp_path):
    image = disc_rgba()
    folder = write_dataset(tmp_path / "set", [GOOD], {"good.png": image})
    dataset = build(folder, tmp_path / "cache")
    pixels = torch.from_numpy(np.asarray(image)[..., :3].copy()).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(dataset[0]["latents"], half(_pool(pixels)[0]), rtol=0, atol=0)  # uncomposited target
    torch.testing.assert_close(dataset[0]["cond_latents"], half(_pool(composited(image))[0]), rtol=0, atol=0)


def test_mask_file_then_matte_fn_supply_the_matte(tmp_path):
    mask = disc_rgba().getchannel("A")
    lines = [
        {"file_name": "a.png", "text": "with a mask", "mask_file_name": "mask.png"},
        {"file_name": "b.png", "text": "needs rmbg"},
    ]
    folder = write_dataset(
        tmp_path / "set", lines, {"a.png": noise_rgb(seed=1), "b.png": noise_rgb(seed=2), "mask.png": mask}
    )
    square = np.zeros((64, 64), dtype=np.uint8)
    square[8:40, 8:40] = 255
    calls = []

    def matte_fn(rgb):
        calls.append(rgb.shape)
        return square / np.float32(255)

    dataset = build(folder, tmp_path / "cache", matte_fn=matte_fn, matte_id="square")
    assert len(dataset) == 2 and calls == [(64, 64, 3)]
    with_mask = Image.fromarray(np.dstack([np.asarray(noise_rgb(seed=1)), np.asarray(mask)]))
    with_square = Image.fromarray(np.dstack([np.asarray(noise_rgb(seed=2)), square]))
    torch.testing.assert_close(dataset[0]["cond_latents"], half(_pool(composited(with_mask))[0]), rtol=0, atol=0)
    torch.testing.assert_close(dataset[1]["cond_latents"], half(_pool(composited(with_square))[0]), rtol=0, atol=0)


def test_flip_mirrors_latents_and_swaps_the_prompt(tmp_path):
    pixels = np.asarray(disc_rgba(color=(250, 0, 0))).copy()
    pixels[:, :20, :3] = (0, 0, 250)  # make it asymmetric
    line = {"file_name": "a.png", "text": "light from the Left", "light_direction": "left"}
    folder = write_dataset(tmp_path / "set", [line], {"a.png": Image.fromarray(pixels)})
    dataset = build(folder, tmp_path / "cache", flip=True)
    assert [(r.text, r.flipped, r.extra["light_direction"]) for r in dataset.rows] == [
        ("light from the Left", False, "left"),
        ("light from the Right", True, "right"),
    ]
    for key in ("latents", "cond_latents"):
        torch.testing.assert_close(dataset[1][key], dataset[0][key].flip(-1))
        assert not torch.equal(dataset[1][key], dataset[0][key])
    assert not torch.equal(dataset[0]["prompt_embeds"], dataset[1]["prompt_embeds"])


def test_flip_is_off_by_default(tmp_path):
    folder = write_dataset(tmp_path / "set", [GOOD], GOOD_FILES)
    assert len(build(folder, tmp_path / "cache")) == 1


# --- reuse and keys -----------------------------------------------------------------------------------


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
    assert first.counts == {"images": 8, "prompts": 4}  # 4 targets, 4 conditions; 3 distinct prompts + ""
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
    torch.testing.assert_close(cached.empty_prompt_embeds, half(_fake_prompt_embedding("")), rtol=0, atol=0)
    torch.testing.assert_close(item["prompt_embeds"], half(_fake_prompt_embedding("one, light from the left")),
                               rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "targets", "conditions", "prompts"),
    [
        ("paired target bytes", 1, 0, 0),
        ("paired condition bytes", 0, 1, 0),
        ("unpaired target bytes", 1, 1, 0),
        ("model_id", 4, 4, 4),
        ("resolution", 4, 4, 0),
        ("degrade", 0, 2, 0),  # unpaired rows only
        ("torn shard", 1, 1, 0),  # shards of 2 entries: each holds one row's target and condition
        ("shard of another shape", 1, 1, 0),
        ("torn manifest index", 4, 4, 4),  # no manifest: everything again
        ("new prompt", 0, 0, 1),
    ],
)
def test_cache_recomputes_only_what_changed(mixed_set, tmp_path, change, targets, conditions, prompts):
    cache = tmp_path / "cache"
    options = {"batch_size": 2, "shard_rows": 2} if "shard" in change else {}
    build(mixed_set, cache, **options)
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
    elif change == "torn shard":
        shard = sorted((cache / "shards").glob("latents-*"))[0]
        shard.write_bytes(shard.read_bytes()[:-40])
    elif change == "torn manifest index":
        index = next(p for p in (cache / "manifests").iterdir() if p.suffix == ".safetensors")
        index.write_bytes(index.read_bytes()[:100])
    elif change == "shard of another shape":  # a complete safetensors file, but [2, 4, 8, 4] for a 64x64 bucket
        from safetensors.torch import save_file

        shard = sorted((cache / "shards").glob("latents-*"))[0]
        save_file({"latents": torch.zeros(2, 4, 8, 4, dtype=torch.float16)}, str(shard))
    elif change == "new prompt":
        lines = (mixed_set / METADATA_FILE).read_text().replace("two, light", "TWO, light")
        (mixed_set / METADATA_FILE).write_text(lines)
    encoders = FakeEncoders()
    dataset = build(mixed_set, cache, encoders, **options)
    assert (dataset.stats.encoded_targets, dataset.stats.encoded_conditions) == (targets, conditions)
    assert (encoders.counts["images"], encoders.counts["prompts"]) == (targets + conditions, prompts)
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

    assert model_fingerprint(make(0)) == model_fingerprint(make(0))
    assert model_fingerprint(make(0)) != model_fingerprint(make(1))
    assert model_fingerprint(make(0)) != model_fingerprint(make(0, width=9))

    class Tokenizer:
        model_max_length = 77

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    assert model_fingerprint(Tokenizer({"a": 0})) != model_fingerprint(Tokenizer({"b": 0}))


def test_fingerprint_is_the_default_model_id(mixed_set, tmp_path):
    encoders = FakeEncoders()
    build(mixed_set, tmp_path / "cache", encoders, model_id=None, vae=torch.nn.Linear(2, 2))
    build(mixed_set, tmp_path / "cache", encoders, model_id=None, vae=torch.nn.Linear(2, 3))
    assert encoders.counts["images"] == 16  # another VAE: all 4 targets and 4 conditions re-encoded


def test_dataloader_with_the_bucket_sampler_stacks_batches(mixed_set, tmp_path):
    dataset = build(mixed_set, tmp_path / "cache")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, batch_size=3))
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [3, 3]  # 4 items, topped up to two full batches
    assert batches[0]["latents"].shape[1:] == (4, 8, 8)
    assert batches[0]["prompt_embeds"].shape[1:] == (77, EMBED_DIM)


def test_rows_and_examples_are_read_again_from_the_source(mixed_set, tmp_path):
    dataset = build(mixed_set, tmp_path / "cache", flip=True)
    rows, _ = read_metadata(str(mixed_set))
    assert list(dataset.rows) == [copy for row in rows for copy in (row, flip_row(row))]
    assert list(dataset.buckets) == [(64, 64)] * 8 and dataset.rows[-1] == flip_row(rows[-1])
    mirrored = dataset.load_example(1)  # the flipped copy of line 1, decoded again
    plain = load_example(rows[0], str(mixed_set), (64, 64))
    assert np.array_equal(mirrored.target, plain.target[:, ::-1])
    assert np.array_equal(mirrored.condition, plain.condition[:, ::-1])


# --- the shards: format, start-up, what a change costs ----------------------------------------------------


def test_entries_are_float16_in_one_shard_per_bucket(mixed_set, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    dataset = build(mixed_set, cache, flip=True)
    shards = sorted((cache / "shards").iterdir())
    assert [p.name.split("-")[0] for p in shards] == ["latents", "prompts"]
    latents, embeds = load_file(str(shards[0]))["latents"], load_file(str(shards[1]))["embeds"]
    # 4 rows x 2 copies x (target, condition); 5 distinct texts ("two, light from the top" has no side) + ""
    assert latents.dtype == embeds.dtype == torch.float16
    assert latents.shape == (16, 4, 8, 8) and embeds.shape == (6, 77, EMBED_DIM)
    stored = {tuple(x.flatten().tolist()) for x in latents.float()}
    for i in range(len(dataset)):
        assert tuple(dataset[i]["latents"].flatten().tolist()) in stored
        assert tuple(dataset[i]["cond_latents"].flatten().tolist()) in stored
    assert len(list(cache.rglob("*"))) == 2 + 2 + 2  # 2 shards, a manifest and its index, their 2 folders


@pytest.fixture
def file_reads(monkeypatch):
    """Counts the header probes, file hashes and image decodes a build makes."""
    import eddpm.cache_build
    import eddpm.examples

    counts = Counter()

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(eddpm.cache_build, "probe_image")
    counting(eddpm.cache_build, "file_digest")
    counting(eddpm.examples, "load_image")
    return counts


def test_a_launch_on_a_built_cache_opens_no_file(mixed_set, tmp_path, file_reads):
    build(mixed_set, tmp_path / "cache")
    assert file_reads["probe_image"] == 6 and file_reads["file_digest"] == 6  # 4 targets, 2 conditions
    file_reads.clear()
    dataset = build(mixed_set, tmp_path / "cache")
    assert file_reads == {} and (dataset.stats.reused_rows, dataset.stats.opened_rows) == (4, 0)


def test_a_touched_file_is_hashed_again_not_encoded_again(mixed_set, tmp_path, file_reads):
    build(mixed_set, tmp_path / "cache")
    st = (mixed_set / "u1.png").stat()
    os.utime(mixed_set / "u1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    file_reads.clear()
    encoders = FakeEncoders()
    dataset = build(mixed_set, tmp_path / "cache", encoders)
    assert (dataset.stats.reused_rows, dataset.stats.opened_rows) == (3, 1) and file_reads["file_digest"] == 1
    assert encoders.counts == {}  # same bytes, same entry keys


def test_new_bytes_behind_the_same_size_and_mtime_need_verify(tmp_path):
    lines = [{"file_name": "a.bmp", "mask_file_name": "m.png", "text": "t"}]
    files = {"a.bmp": noise_rgb(seed=1), "m.png": disc_rgba().getchannel("A")}
    folder = write_dataset(tmp_path / "set", lines, files)
    first = build(folder, tmp_path / "cache")[0]["latents"]
    st = (folder / "a.bmp").stat()
    noise_rgb(seed=2).save(folder / "a.bmp")  # an uncompressed BMP: same size
    os.utime(folder / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    encoders = FakeEncoders()
    assert torch.equal(build(folder, tmp_path / "cache", encoders)[0]["latents"], first) and encoders.counts == {}
    verified = build(folder, tmp_path / "cache", encoders, verify=True)
    assert encoders.counts == {"images": 2}  # the target and its own condition
    pixels = torch.from_numpy(np.asarray(noise_rgb(seed=2)).copy()).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(verified[0]["latents"], half(_pool(pixels)[0]), rtol=0, atol=0)


def test_a_new_row_encodes_only_itself(mixed_set, tmp_path):
    build(mixed_set, tmp_path / "cache")
    disc_rgba(color=(9, 9, 9)).save(mixed_set / "new.png")
    with open(mixed_set / METADATA_FILE, "a") as f:
        f.write(json.dumps({"file_name": "new.png", "text": "new, light from the left"}) + "\n")
    encoders = FakeEncoders()
    dataset = build(mixed_set, tmp_path / "cache", encoders)
    assert encoders.counts == {"images": 2, "prompts": 1}
    assert (dataset.stats.reused_rows, dataset.stats.opened_rows, len(dataset)) == (4, 1, 5)


# --- several processes ------------------------------------------------------------------------------------


def torchrun_build(data_dir, cache_dir, out) -> list[dict]:
    """tests/cache_worker.py on 2 processes (gloo, one thread each); each process's report."""
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "cache_worker.py"), str(data_dir), str(cache_dir), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def test_two_processes_split_the_rows_and_train_from_one_manifest(tmp_path):
    colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250), (250, 0, 250)]
    files = {f"{i}.png": disc_rgba(color=c) for i, c in enumerate(colors)} | {"zero.png": b""}
    lines = [{"file_name": f"{i}.png", "text": f"disc {i}"} for i in range(4)]
    lines += [{"file_name": "zero.png", "text": "t"}, lines[0]]  # line 5 unreadable, line 6 = line 1
    lines += [{"file_name": f"{i}.png", "text": f"disc {i}"} for i in (4, 5)]
    folder = write_dataset(tmp_path / "set", lines, files)
    reference = build(folder, tmp_path / "reference")  # one process
    ranks = torchrun_build(folder, tmp_path / "cache", tmp_path / "out")
    cold, warm = [r["cold"] for r in ranks], [r["warm"] for r in ranks]
    # rows of line % 2 == 1 on rank 0: 1, 3, 5, 7; the duplicate (line 6, rank 1) is encoded, then dropped
    assert [r["opened"] for r in cold] == [4, 4] and [r["reused"] for r in cold] == [0, 0]
    assert sum(r["images"] for r in cold) == 2 * 6 + 2
    expected_sums = [[float(reference[i][k].double().sum()) for k in ("latents", "cond_latents", "prompt_embeds")]
                     for i in range(len(reference))]
    for r in cold + warm:
        assert r["lines"] == [1, 2, 3, 4, 7, 8] and r["sums"] == expected_sums
        assert r["skips"] == [[5, "unreadable image"], [6, "duplicate"]]
    assert list((tmp_path / "cache" / "parts").iterdir()) == []
    assert len(list((tmp_path / "cache" / "shards").glob("latents-*"))) == 2  # one per process
    # the second launch opens nothing: line 5's skip and line 6 (same key as line 1) come from the manifest
    assert [(r["opened"], r["images"], r["prompts"]) for r in warm] == [(0, 0, 0), (0, 0, 0)]
    assert [r["reused"] for r in warm] == [3, 4]
