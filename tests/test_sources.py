"""The inputs of the latent cache: webdataset tars and `datasets` tables give the folder's examples.

Each input is built from the same images as a metadata.jsonl folder, whose cached tensors tests/test_cache.py
checks against hand-computed references; the tar and table builds must give the same tensors, and, since
entries are keyed by content, encode nothing on a cache that already holds the folder's.
"""

import io
import json
import os
import tarfile

import pytest
import torch
from dataset_files import disc_rgba, noise_rgb, write_dataset
from test_cache import FakeEncoders

from eddpm.cache import build_latent_cache
from eddpm.metadata import DatasetError, read_metadata
from eddpm.sources import MetadataSource, TarSource, expand_braces, open_source

LINES = [
    {"file_name": "p.png", "conditioning_file_name": "p_cond.png", "text": "paired, light from the left",
     "light_direction": "left"},
    {"file_name": "u.png", "text": "unpaired, light from the right"},
    {"file_name": "m.png", "mask_file_name": "m_mask.png", "text": "masked"},
]
FILES = {"p.png": noise_rgb(seed=1), "p_cond.png": disc_rgba(color=(20, 20, 220)),
         "u.png": disc_rgba(color=(200, 100, 0)), "m.png": noise_rgb(seed=3),
         "m_mask.png": disc_rgba().getchannel("A")}


def build(source, cache_dir, encoders=None, **options):
    encoders = encoders or FakeEncoders()
    return build_latent_cache(source, str(cache_dir), vae=None, text_encoder=None, tokenizer=None, resolution=64,
                              model_id="fake-model", encode_images=encoders.encode_images,
                              encode_prompts=encoders.encode_prompts, progress=False, **options)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path, members: dict) -> None:
    """members: name -> bytes, written in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def folder_as_tar_members(folder) -> dict:
    """LINES as webdataset samples: key.png target, key.cond.png, key.mask.png, key.txt, key.json."""
    members = {}
    for i, line in enumerate(LINES):
        key = f"sample{i:03d}"
        members[f"{key}.png"] = (folder / line["file_name"]).read_bytes()
        if "conditioning_file_name" in line:
            members[f"{key}.cond.png"] = (folder / line["conditioning_file_name"]).read_bytes()
        if "mask_file_name" in line:
            members[f"{key}.mask.png"] = (folder / line["mask_file_name"]).read_bytes()
        members[f"{key}.txt"] = line["text"].encode()
        if "light_direction" in line:
            members[f"{key}.json"] = json.dumps({"light_direction": line["light_direction"]}).encode()
    return members


def write_tables(folder, out, kind: str) -> None:
    """LINES as a datasets dataset (save_to_disk folder) or parquet file, images embedded as bytes."""
    import datasets

    def image(name):
        return {"bytes": (folder / name).read_bytes(), "path": None} if name else None

    table = datasets.Dataset.from_dict(
        {"image": [image(line["file_name"]) for line in LINES],
         "conditioning_image": [image(line.get("conditioning_file_name")) for line in LINES],
         "mask": [image(line.get("mask_file_name")) for line in LINES],
         "text": [line["text"] for line in LINES],
         "light_direction": [line.get("light_direction", "") for line in LINES]},
        features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                    "mask": datasets.Image(), "text": datasets.Value("string"),
                                    "light_direction": datasets.Value("string")}))
    if kind == "save_to_disk":
        table.save_to_disk(str(out))
    else:
        out.mkdir(parents=True)
        table.to_parquet(str(out / "train-00000.parquet"))


@pytest.fixture
def folder(tmp_path):
    return write_dataset(tmp_path / "set", LINES, FILES)


def source_of(kind: str, folder, root):
    if kind in ("tar folder", "tar pattern"):
        members = list(folder_as_tar_members(folder).items())
        write_tar(root / "wds" / "shard-000.tar", dict(members[:6]))  # samples 0 and 1
        write_tar(root / "wds" / "shard-001.tar", dict(members[6:]))  # sample 2
        return str(root / "wds") if kind == "tar folder" else str(root / "wds" / "shard-{000..001}.tar")
    write_tables(folder, root / "table", kind)
    return open_source("", dataset_name=str(root / "table"), conditioning_image_column="conditioning_image",
                       mask_column="mask")


@pytest.mark.parametrize("kind", ["tar folder", "tar pattern", "save_to_disk", "parquet"])
def test_each_input_gives_the_folder_examples_and_shares_its_entries(folder, tmp_path, kind):
    reference = build(str(folder), tmp_path / "cache", flip=True)
    source = source_of(kind, folder, tmp_path)
    encoders = FakeEncoders()
    shared = build(source, tmp_path / "cache", encoders, flip=True)
    assert encoders.counts == {}  # the same bytes: the folder's entries
    alone = build(source, tmp_path / "alone", flip=True)
    assert len(shared) == len(alone) == len(reference) == 6
    for i in range(len(reference)):
        for key in ("latents", "cond_latents", "prompt_embeds"):
            assert torch.equal(alone[i][key], reference[i][key]), (kind, i, key)
    assert [(r.text, r.flipped, r.paired, r.mask_file_name is not None) for r in alone.rows] == [
        (r.text, r.flipped, r.paired, r.mask_file_name is not None) for r in reference.rows]
    assert alone.rows[1].extra["light_direction"] == "right"  # the mirrored copy of sample 0
    names = [r.file_name for r in alone.rows[::2]]
    if kind.startswith("tar"):
        assert names == ["shard-000.tar/sample000.png", "shard-000.tar/sample001.png", "shard-001.tar/sample002.png"]
    else:
        prefix = "table" if kind == "save_to_disk" else "train-00000.parquet"
        assert names == [f"{prefix}[{i}]:image" for i in range(3)]


def test_unchanged_tars_are_not_opened_and_a_rewritten_one_encodes_only_its_new_sample(folder, tmp_path,
                                                                                         monkeypatch):
    source = source_of("tar folder", folder, tmp_path)
    build(source, tmp_path / "cache")
    with monkeypatch.context() as patch:
        patch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("an unchanged tar was opened"))
        assert build(source, tmp_path / "cache").stats.reused_rows == 3
    members = folder_as_tar_members(folder)
    members["sample002.png"] = _png(noise_rgb(seed=7))
    write_tar(tmp_path / "wds" / "shard-001.tar", dict(list(members.items())[6:]))  # rewritten: new mtime
    encoders = FakeEncoders()
    dataset = build(source, tmp_path / "cache", encoders)
    assert (dataset.stats.reused_rows, dataset.stats.opened_rows) == (2, 1)
    assert encoders.counts == {"images": 2}  # sample002's new target and its masked condition



BAD_SAMPLES = [  # (members, expected kind, name in the message)
    ({"a.png": b"not an image", "a.txt": b"t"}, "unreadable image", "shard.tar/a.png"),
    ({"b.png": _png(disc_rgba())}, "missing prompt", "shard.tar#2"),  # #position in the tar
    ({"c.png": _png(disc_rgba()), "c.txt": b"  "}, "empty prompt", "shard.tar#3"),
    ({"d.txt": b"no image"}, "missing file", "shard.tar#4"),
    ({"e.png": _png(disc_rgba()), "e.jpg": _png(disc_rgba()), "e.txt": b"t"}, "bad field", "shard.tar#5"),
    ({"f.png": _png(disc_rgba()), "f.txt": b"\xff\xfe"}, "bad field", "shard.tar#6"),
    ({"g.png": _png(disc_rgba()), "g.json": b"{oops"}, "malformed JSON", "shard.tar#7"),
    ({"h.png": _png(noise_rgb()), "h.txt": b"no matte"}, "no matte", "shard.tar/h.png"),
]


def test_bad_samples_are_skipped_with_their_names(tmp_path):
    members = {"good.png": _png(disc_rgba()), "good.txt": b"fine"}
    for sample, _, _ in BAD_SAMPLES:
        members |= sample
    write_tar(tmp_path / "wds" / "shard.tar", members)
    dataset = build(str(tmp_path / "wds" / "shard.tar"), tmp_path / "cache")
    assert [r.file_name for r in dataset.rows] == ["shard.tar/good.png"]
    assert [(s.line, s.kind, s.file_name) for s in dataset.stats.skipped] == [
        (n, kind, name) for n, (_, kind, name) in enumerate(BAD_SAMPLES, start=2)]
    again = build(str(tmp_path / "wds" / "shard.tar"), tmp_path / "cache")  # skips come from the manifest
    assert again.stats.opened_rows == 0 and again.stats.skipped == dataset.stats.skipped
    with pytest.raises(DatasetError, match="shard.tar:2: shard.tar/a.png: unreadable image"):
        build(str(tmp_path / "wds" / "shard.tar"), tmp_path / "strict", strict=True)


def test_a_table_without_the_columns_says_which_it_has(folder, tmp_path):
    write_tables(folder, tmp_path / "table", "parquet")
    source = open_source("", dataset_name=str(tmp_path / "table"), image_column="target")
    with pytest.raises(DatasetError, match=r"no column 'target' \(columns: \['image', 'conditioning_image'"):
        build(source, tmp_path / "cache")


def test_open_source_picks_the_input_from_the_path(folder, tmp_path):
    write_tar(tmp_path / "wds" / "a.tar", {"x.png": _png(disc_rgba()), "x.txt": b"t"})
    assert isinstance(open_source(str(folder)), MetadataSource)
    assert isinstance(open_source(str(tmp_path / "wds")), TarSource)
    assert isinstance(open_source(str(tmp_path / "wds" / "a.tar")), TarSource)
    assert isinstance(open_source(str(tmp_path / "wds" / "{a,b}.tar")), TarSource)
    with pytest.raises(DatasetError, match="1 of the 2 tar files"):
        build(str(tmp_path / "wds" / "{a,b}.tar"), tmp_path / "cache")


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("s{8..10}") == ["s8", "s9", "s10"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_metadata_rows_match_read_metadata(folder):
    source = MetadataSource(str(folder))
    scanned = list(source.scan(0, 1, {}))
    rows, _ = read_metadata(str(folder))
    assert [source.row(s.number, s.locator) for s in scanned] == rows
    halves = [list(source.scan(r, 2, {})) for r in (0, 1)]
    assert sorted(s.number for h in halves for s in h) == [1, 2, 3] and [s.number for s in halves[1]] == [2]
    os.utime(folder / "u.png", ns=(0, 10**9))
    assert [s.key for s in source.scan(0, 1, {})] != [s.key for s in scanned]  # only line 2's key moved
    assert [s.key for s in source.scan(0, 1, {})][::2] == [s.key for s in scanned][::2]


def test_the_scan_refuses_the_paths_read_metadata_refuses(tmp_path):
    """scan_metadata's per-scan folder cache gives read_metadata's (uncached) containment answers."""
    outside = tmp_path / "outside"
    outside.mkdir()
    disc_rgba().save(outside / "x.png")
    files = {"in/a.png": disc_rgba(), "b.png": disc_rgba()}
    lines = [{"file_name": name, "text": f"t{i}"} for i, name in enumerate(
        ["in/a.png", "b.png", "../outside/x.png", "out/x.png", "link.png", "in_link/a.png", "in/../b.png",
         str(outside / "x.png"), "in/./a.png"])]
    folder = write_dataset(tmp_path / "set", lines, files)
    os.symlink(outside, folder / "out")
    os.symlink(outside / "x.png", folder / "link.png")
    os.symlink(folder / "in", folder / "in_link")
    rows, skips = read_metadata(str(folder))
    scanned = list(MetadataSource(str(folder)).scan(0, 1, {}))
    assert [s.number for s in scanned if not hasattr(s, "problem")] == [r.line for r in rows] == [1, 2, 6, 7, 9]
    assert [(s.number, s.problem.kind) for s in scanned if hasattr(s, "problem")] == [
        (s.line, s.kind) for s in skips] == [(n, "outside the dataset folder") for n in (3, 4, 5, 8)]
