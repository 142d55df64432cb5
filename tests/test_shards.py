"""Cache shards and the manifest's key tables: the files are plain safetensors, reads and checks are exact."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eddpm.manifest import KeyTable, as_keys
from eddpm.shards import ShardReader, ShardWriter, check_shard


def write(path, batches, shape=(4, 2, 3)):
    writer = ShardWriter(str(path), "latents", shape, {"kind": "latents", "bucket": "24x16"})
    slots = [writer.append(b) for b in batches]
    return writer.close(), slots


def test_a_shard_is_a_safetensors_file_of_float16_entries(tmp_path):
    batches = [torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(i)) * 4 for i in range(3)]
    record, slots = write(tmp_path / "s.safetensors", batches)
    assert slots == [0, 3, 6] and record["shape"] == [9, 4, 2, 3]
    stored = load_file(str(tmp_path / "s.safetensors"))["latents"]
    expected = torch.cat(batches).to(torch.float16)  # round to nearest, as torch casts
    assert stored.dtype == torch.float16 and torch.equal(stored, expected)
    reader = ShardReader(str(tmp_path), [record], max_open=1)
    for slot in (0, 4, 8):
        assert torch.equal(reader.read(0, slot), expected[slot].float())
    assert not list(tmp_path.glob("*.tmp"))


def test_check_shard_refuses_torn_foreign_and_misshapen_files(tmp_path):
    path = tmp_path / "s.safetensors"
    record, _ = write(path, [torch.zeros(2, 4, 2, 3)])
    assert check_shard(str(path), record)
    assert check_shard(str(path), {**record, "shape": [2, 4, 2, None]})  # any last size
    assert not check_shard(str(path), {**record, "shape": [2, 4, 3, 2]})
    assert not check_shard(str(path), {**record, "shape": [3, 4, 2, 3]})
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    assert not check_shard(str(path), record)
    path.write_bytes(data + b"\0")
    assert not check_shard(str(path), record)
    path.write_bytes(b"\xff" * 64)
    assert not check_shard(str(path), record)
    assert not check_shard(str(tmp_path / "absent"), record)


def test_values_outside_float16_are_refused(tmp_path):
    writer = ShardWriter(str(tmp_path / "s.safetensors"), "latents", (2,), {})
    with pytest.raises(ValueError, match="not finite in float16"):
        writer.append(torch.tensor([[1.0, 70000.0]]))
    writer.abort()
    assert not os.listdir(tmp_path)


def test_key_table_finds_what_a_dict_finds():
    rng = np.random.default_rng(0)
    keys = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(500)]
    keys += [b"ab" + bytes(14), b"ab" + bytes(13) + b"\x01", bytes(16)]  # trailing zero bytes count
    keys += keys[:10]  # repeated keys: the first position is found
    reference = {}
    for i, k in enumerate(keys):
        reference.setdefault(k, i)
    table = KeyTable(as_keys(b"".join(keys)))
    absent = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(50)] + [b"ab" + bytes(12) + b"\x01\x00"]
    queries = keys + absent
    found = table.find(as_keys(b"".join(queries)))
    assert found.tolist() == [reference.get(q, -1) for q in queries]
    assert KeyTable(np.zeros((0, 16), np.uint8)).find(as_keys(keys[0])).tolist() == [-1]
