"""Cache shards: safetensors files of many same-shape float16 entries, written by appending, read by slot.

A shard is an ordinary safetensors file holding one float16 tensor `[N, *entry_shape]`: the latents of one
bucket (`"latents"`, [N, 4, h/8, w/8]) or prompt embeddings (`"embeds"`, [N, 77, D]); `safetensors.torch.
load_file` reads it like any other. The writer reserves a fixed-size header, appends each entry's bytes as
soon as it is encoded, and at the end writes the header with the final N, padded with spaces (which the
safetensors format allows), so a shard of thousands of entries is written in one pass without holding
them in memory. It is written under a temporary name and renamed when complete: an interrupted build
leaves no half shard behind, only a `.tmp` file that the next build's writer of the same name replaces.

float16, not bfloat16: SD latents times the scaling factor 0.18215 and CLIP hidden states stay far
inside float16's range (65504), where float16's 10-bit mantissa rounds 8 times finer than bfloat16's 7
bits; a value outside that range is refused when written, never stored as inf.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict

import numpy as np
import torch

HEADER_BYTES = 1024  # 8-byte length + the JSON header, padded with spaces
MAX_HEADER_BYTES = 1 << 20  # a header longer than this is not one of ours: the shard is invalid
FORMAT = "eddpm-cache-shard-1"
FLOAT16_MAX = 65504.0  # the largest finite float16


class ShardWriter:
    """Append entries of `entry_shape` to the safetensors file `path` (complete only after `close`)."""

    def __init__(self, path: str, tensor_name: str, entry_shape: tuple[int, ...], metadata: dict[str, str]):
        self.path, self.tensor_name, self.entry_shape = path, tensor_name, tuple(entry_shape)
        self.metadata = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}}
        self.entry_bytes = 2 * int(np.prod(self.entry_shape))
        self.count = 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._tmp = f"{path}.tmp"
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * HEADER_BYTES)

    def append(self, values: torch.Tensor) -> int:
        """Write a batch [B, *entry_shape] (any float dtype, any device); returns the slot of its first entry."""
        array = values.detach().to("cpu", torch.float32).numpy()
        if array.shape[1:] != self.entry_shape:
            raise ValueError(f"{self.tensor_name}: got entries of shape {array.shape[1:]}, expected {self.entry_shape}")
        largest = float(np.abs(array).max()) if array.size else 0.0
        if not largest <= FLOAT16_MAX:  # also NaN
            raise ValueError(f"{self.tensor_name}: a value is not finite in float16 (largest |x| = {largest}); "
                             "the encoder's output is out of range")
        half = array.astype(np.float16)
        self._file.write(np.ascontiguousarray(half).tobytes())
        first, self.count = self.count, self.count + len(half)
        return first

    def close(self) -> dict | None:
        """Finish the file; returns its manifest record (name, shape, data start), or None when empty."""
        if self.count == 0:
            self.abort()
            return None
        shape = [self.count, *self.entry_shape]
        header = {"__metadata__": self.metadata,
                  self.tensor_name: {"dtype": "F16", "shape": shape, "data_offsets": [0, self.count * self.entry_bytes]}}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > HEADER_BYTES - 8:
            raise ValueError(f"shard header of {len(text)} bytes does not fit in {HEADER_BYTES - 8}")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", HEADER_BYTES - 8) + text.ljust(HEADER_BYTES - 8, b" "))
        self._file.close()
        os.replace(self._tmp, self.path)
        return {"name": os.path.basename(self.path), "tensor": self.tensor_name, "shape": shape,
                "start": HEADER_BYTES}

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def check_shard(path: str, record: dict) -> bool:
    """True when `path` is the complete shard `record` describes: its header names one float16 tensor of
    record["shape"] (a `None` in the shape accepts any size) whose bytes fill the file exactly."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                return False
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
        info = header[record["tensor"]]
        shape = info["shape"]
        expected = record["shape"]
        shape_ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
        data = 2 * int(np.prod(shape))
        return (info["dtype"] == "F16" and shape_ok and info["data_offsets"] == [0, data]
                and 8 + length == record["start"] and size == record["start"] + data)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


class ShardReader:
    """Entries by (shard number, slot), one `os.pread` each; at most `max_open` files open at a time.

    records: the manifest's shard records (name, shape [N, *entry_shape], start). Picklable: the open
    files are not carried over (a DataLoader worker opens its own).
    """

    def __init__(self, folder: str, records: list[dict], max_open: int = 64):
        self.folder, self.records, self.max_open = folder, records, max_open
        self._files: OrderedDict[int, int] = OrderedDict()

    def read(self, shard: int, slot: int) -> torch.Tensor:
        """One entry as float32 [*entry_shape]."""
        record = self.records[shard]
        entry_shape = record["shape"][1:]
        size = 2 * int(np.prod(entry_shape))
        data = os.pread(self._fd(shard), size, record["start"] + slot * size)
        if len(data) != size:
            raise OSError(f"{record['name']}: entry {slot} is cut short (the cache changed during training?)")
        return torch.from_numpy(np.frombuffer(data, dtype=np.float16).astype(np.float32).reshape(entry_shape))

    def _fd(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            fd = os.open(os.path.join(self.folder, self.records[shard]["name"]), os.O_RDONLY)
            if len(self._files) >= self.max_open:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
