"""One process's share of a latent cache build (eddpm/cache.py): scan, look up, open, encode, write.

The scan gives this process's rows (eddpm/sources.py). A row whose key the manifest has, with intact
entries, is reused as it is; a row the manifest skipped is reported again; any other row is opened:
probed (bucket, matte source), its files hashed into entry keys, and only the entries that neither this
manifest, another manifest of the cache_dir, nor this build has yet are encoded, in batches of one bucket,
and appended to this process's own shards (eddpm/shards.py). What the process found goes into a Part
(eddpm/manifest.py) that rank 0 merges.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from eddpm import sources
from eddpm.buckets import assign_bucket
from eddpm.examples import load_example
from eddpm.iclight import LATENT_CHANNELS
from eddpm.images import ImageError, probe_image
from eddpm.manifest import Index, KeyTable, Part, as_keys, merge, same, unchanged
from eddpm.metadata import (
    MAX_KEPT_SKIPS,
    Row,
    RowProblem,
    Skip,
    SkipReport,
    dataset_path,
    file_digest,
    swap_left_right,
)
from eddpm.shards import ShardWriter, check_shard

# Bump when anything that changes cached tensors for the same inputs changes (resizing, matting,
# degradation, the encoders' recipe): every cache entry is then recomputed.
# 2: IC-Light's condition order (composite at the source size, then resize), its crop box, 16-bit PNGs.
# 3: entries stored in float16 shards.
PREPROCESS_VERSION = 3
ASPECT_TOLERANCE = 0.01  # a condition or mask may differ from its image's aspect ratio by 1 % at most
SHARD_ROWS = 4096  # entries per shard: 160 MB of latents at 512x640, 0.0005 files a row
CHUNK_ROWS = 256  # rows opened together (a tar's members are written to a temporary folder per chunk)
SCAN_BATCH = 4096  # rows looked up in the manifest at once


def entry_key(*parts) -> bytes:
    """A 16-byte entry key of everything the entry depends on."""
    return hashlib.sha256(json.dumps([PREPROCESS_VERSION, *parts], default=str).encode()).digest()[:16]


@dataclass
class CacheStats:
    """What a build did on this process. `seconds_per_image`: wall time per opened row (probe, hash,
    decode, encode); `reused_rows`: rows taken from the manifest without opening a file."""

    usable: int = 0
    skipped: list[Skip] = field(default_factory=list)
    encoded_targets: int = 0
    encoded_conditions: int = 0
    encoded_prompts: int = 0
    seconds_per_image: float = 0.0
    reused_rows: int = 0
    opened_rows: int = 0


class Build:
    """One process's share of a build: the scan, the opened rows, the encoders' queues and shard writers."""

    def __init__(self, source, cache_dir, name, settings, encoders, matte_fn, strict, batch_size, device,
                 shard_rows):
        self.source, self.cache_dir, self.name, self.settings = source, cache_dir, name, settings
        self.vae, self.text_encoder, self.tokenizer, self.encode_images, self.encode_prompts = encoders
        self.model_id, self.buckets = settings["model_id"], settings["buckets"]
        self.bucket_id = {b: i for i, b in enumerate(self.buckets)}
        self.min_side = min(min(b) for b in self.buckets)
        self.matte_fn, self.matte_id, self.degrade = matte_fn, settings["matte_id"], settings["degrade"]
        self.copies = (False, True) if settings["flip"] else (False,)
        self.batch_size, self.device, self.shard_rows = batch_size, device, shard_rows
        length = getattr(self.tokenizer, "model_max_length", 77)
        self.prompt_shape = (length if isinstance(length, int) and length < 4096 else 77,
                             getattr(getattr(self.text_encoder, "config", None), "hidden_size", None))
        self.report = SkipReport(source.location, strict)
        self.part, self.stats, self.seconds = Part(), CacheStats(), 0.0
        self.folder, self.shard_dir = os.path.join(cache_dir, "manifests"), os.path.join(cache_dir, "shards")
        self._shard_ok: dict[str, bool] = {}
        self.old = Index.load(self.folder, name)
        self.valid = self._validate(self.old) if self.old else None
        self._old_tables: dict[str, KeyTable] = {}  # made when a row is opened (a warm launch needs none)
        self.known: set[bytes] = set()  # entry keys written, queued or adopted by this process
        self.queues: dict[tuple, list] = {}  # bucket -> [(key, pixels [H, W, 3], "target" | "condition")]
        self.writers: dict[tuple, tuple] = {}  # ("latents", bucket) or ("prompts", shape) -> (writer, entries)
        self.pending_prompts: dict[bytes, str] = {}
        self._library = None

    # -- checking what is there --

    def _expected(self, record: dict) -> list:
        if record.get("kind") == "latents":
            width, height = record["bucket"]
            return [record["shape"][0], LATENT_CHANNELS, height // 8, width // 8]
        return [record["shape"][0], *self.prompt_shape]

    def _validate(self, index: Index) -> dict:
        """Which entries of `index` lie in a complete shard of the expected shape (4 x h/8 x w/8 for its
        bucket, 77 x D for prompts): masks `latent_valid`, `prompt_valid`, and `row_ok` per row."""
        records = index.meta["shards"]
        for record in records:
            if record["name"] not in self._shard_ok:
                path = os.path.join(self.shard_dir, record["name"])
                self._shard_ok[record["name"]] = check_shard(path, {**record, "shape": self._expected(record)})
        ok = np.array([self._shard_ok[r["name"]] for r in records], dtype=bool)
        sizes = np.array([r["shape"][0] for r in records], dtype=np.int64)
        a, out = index.arrays, {}
        for kind in ("latent", "prompt"):
            shard, slot = a[f"{kind}_shard"], a[f"{kind}_slot"]
            out[f"{kind}_valid"] = ok[shard] & (slot < sizes[shard]) if len(records) else np.zeros(len(shard), bool)
        row_ok = (out["latent_valid"][a["target"]] & out["latent_valid"][a["condition"]]
                  & out["prompt_valid"][a["prompt"]])
        out["first_ok"] = row_ok.copy()  # at the first copy of a row: all its copies are intact
        for shift in range(1, len(self.copies)):
            out["first_ok"][:-shift] &= row_ok[shift:]
        return out

    def _have(self, kind: str, key: bytes) -> bool:
        """Whether entry `key` exists: written or queued here, valid in the manifest, or in another
        manifest of this cache_dir (then it is adopted into this one)."""
        if key in self.known:
            return True
        if self.old is not None:
            if kind not in self._old_tables:
                self._old_tables[kind] = KeyTable(self.old.arrays[f"{kind}_key"])
            i = self._old_tables[kind].find(as_keys(key))[0]
            if i >= 0 and self.valid[f"{kind}_valid"][i]:
                return True
        table, records, slots = self._other_manifests()[kind]
        i = table.find(as_keys(key))[0]
        if i < 0:
            return False
        self.part.add_entry(kind, key, records[i], int(slots[i]))
        self.known.add(key)
        return True

    def _other_manifests(self) -> dict:
        """The valid entries of every other manifest in cache_dir (loaded once, when first needed)."""
        if self._library is None:
            found = {kind: ([], [], []) for kind in ("latent", "prompt")}
            for path in sorted(glob.glob(os.path.join(self.folder, "*.json"))):
                other = os.path.basename(path)[: -len(".json")]
                index = Index.load(self.folder, other) if other != self.name else None
                if index is None:
                    continue
                valid = self._validate(index)
                for kind, (keys, records, slots) in found.items():
                    mask = valid[f"{kind}_valid"]
                    keys.append(as_keys(index.arrays[f"{kind}_key"])[mask])
                    records += [index.meta["shards"][i] for i in index.arrays[f"{kind}_shard"][mask]]
                    slots.append(index.arrays[f"{kind}_slot"][mask])
            self._library = {kind: (KeyTable(np.concatenate(k) if k else np.zeros(0, "S16")), r,
                                    np.concatenate(s) if s else np.zeros(0, np.int32))
                             for kind, (k, r, s) in found.items()}
        return self._library

    # -- the scan --

    def run(self, rank: int, world: int, verify: bool, progress: bool) -> CacheStats:
        known = {c[0]: c[1:] for c in self.old.meta.get("containers", [])} if self.old else {}
        trusted = self.old is not None and not verify
        rows = KeyTable(self.old.arrays["row_key"]) if trusted else None
        skips = KeyTable(self.old.arrays["skip_key"]) if trusted else None
        self.bar = tqdm(desc="caching latents", unit="row", disable=not progress)
        batch, chunk = [], []
        for item in self.source.scan(rank, world, known):
            if isinstance(item, sources.ScanProblem):
                self.report.skip_line(item.number, item.name, item.problem)
                self.part.add_skip(item.number, item.name, item.problem, item.key,
                                   keep=len(self.part.skips) < MAX_KEPT_SKIPS)
                continue
            batch.append(item)
            if len(batch) >= SCAN_BATCH:
                self._look_up(batch, rows, skips, chunk)
                batch = []
        self._look_up(batch, rows, skips, chunk)
        self._open(chunk)
        start = time.perf_counter()
        for bucket in list(self.queues):
            self._encode(bucket)
        empty = entry_key("prompt", self.model_id, "")
        if rank == 0 and not self._have("prompt", empty):
            self.pending_prompts[empty] = ""
        self._encode_prompts()
        for slot in list(self.writers):
            self._close(slot)
        self.bar.close()
        self.seconds += time.perf_counter() - start
        self.stats.seconds_per_image = self.seconds / max(self.stats.opened_rows, 1)
        return self.stats

    def _look_up(self, batch: list, rows: KeyTable | None, skips: KeyTable | None, chunk: list) -> None:
        """Reuse the rows whose key the manifest has (and whose entries are intact), re-report the rows
        it skipped, and open the others in chunks."""
        if not batch:
            return
        numbers = np.fromiter((r.number for r in batch), np.int32, len(batch))
        dups = np.fromiter((r.dup for r in batch), np.uint64, len(batch))
        self.part.add_dups(numbers[dups != 0], dups[dups != 0])
        keys = as_keys(b"".join(r.key for r in batch))
        hits = rows.find(keys) if rows else np.full(len(batch), -1)
        reuse = hits >= 0
        if reuse.any():
            reuse[reuse] = self.valid["first_ok"][hits[reuse]]
        locators = np.fromiter((r.locator for r in batch), np.int64, len(batch))
        self.part.add_reused(numbers[reuse], locators[reuse], keys[reuse], hits[reuse])
        self.stats.reused_rows += int(reuse.sum())
        skipped = skips.find(keys[~reuse]) if skips else np.full(int((~reuse).sum()), -1)
        for i, skip in zip(np.flatnonzero(~reuse).tolist(), skipped.tolist()):
            r = batch[i]
            if skip >= 0:
                _, name, kind, detail, _ = self.old.meta["skips"][skip]
                self._skip(r.number, name, RowProblem(kind, detail), r.key)
            else:
                chunk.append(r)
                if len(chunk) >= CHUNK_ROWS:
                    self._open(chunk)
                    chunk.clear()

    def _skip(self, number: int, name: str, problem, key: bytes | None) -> None:
        self.report.skip(number, name, problem)  # raises when strict
        self.part.add_skip(number, name, problem, key)

    # -- opening rows --

    def _open(self, chunk: list) -> None:
        if not chunk:
            return
        start = time.perf_counter()
        with self.source.open_rows(chunk) as opened:
            for r, local in zip(chunk, opened):
                self.bar.update(1)
                self.stats.opened_rows += 1
                if isinstance(local, RowProblem):
                    self._skip(r.number, r.name, local, r.key)
                    continue
                try:
                    self._add(r, local)
                except (RowProblem, ImageError) as problem:
                    if local.display:  # files written to a temporary folder: name them without it
                        problem = RowProblem(problem.kind, problem.detail.replace(local.folder + os.sep, ""))
                    self._skip(r.number, local.display or local.row.file_name, problem, r.key)
        self.seconds += time.perf_counter() - start

    def _add(self, r: sources.ScanRow, local: sources.LocalRow) -> None:
        """Probe and hash one row, queue the entries nobody has, and add its copies to the part."""
        row, folder, outside = local.row, local.folder, local.allow_outside_paths

        def path(key: str) -> str:
            return dataset_path(folder, getattr(row, key), key, allow_outside_paths=outside)

        bucket, matte_source = self._check_row(row, path)
        digest = {k: file_digest(path(k)) for k in ("file_name", "conditioning_file_name", "mask_file_name")
                  if getattr(row, k)}
        condition_parts = [digest.get("conditioning_file_name", digest["file_name"]), matte_source,
                           digest.get("mask_file_name") if matte_source == "mask" else None,
                           self.matte_id if matte_source == "matte_fn" else None,
                           "none" if row.paired else self.degrade]
        copies = []
        for flipped in self.copies:
            text = swap_left_right(row.text) if flipped else row.text
            copies.append((flipped, entry_key("target", self.model_id, bucket, flipped, digest["file_name"]),
                           entry_key("condition", self.model_id, bucket, flipped, *condition_parts),
                           entry_key("prompt", self.model_id, text), text))
        missing = [(flipped, kind, key) for flipped, target, condition, _, _ in copies
                   for kind, key in (("target", target), ("condition", condition)) if not self._have("latent", key)]
        if missing:
            ex = load_example(row, folder, bucket, matte_fn=self.matte_fn, degrade=self.degrade,
                              allow_outside_paths=outside)
            for flipped, kind, key in dict.fromkeys(missing):
                pixels = ex.target if kind == "target" else ex.condition  # [H, W, 3]
                self._queue(bucket, key, pixels[:, ::-1] if flipped else pixels, kind)
        for flipped, target, condition, prompt, text in copies:
            if not self._have("prompt", prompt):
                self.known.add(prompt)
                self.pending_prompts[prompt] = text
            self.part.add_row(r.number, r.locator, r.key, flipped, self.bucket_id[bucket], target, condition, prompt)
        if len(self.pending_prompts) >= 16 * self.batch_size:
            self._encode_prompts()

    def _check_row(self, row: Row, path: Callable[[str], str]) -> tuple[tuple[int, int], str]:
        """Header-level checks of one row; returns (bucket, matte source: "alpha", "mask" or "matte_fn")."""
        width, height, target_alpha = probe_image(path("file_name"))
        if min(width, height) < self.min_side:
            raise RowProblem("too small", f"{width}x{height} is below the smallest bucket side ({self.min_side} px)")
        matte_owner = (width, height, target_alpha)
        if row.paired:
            matte_owner = probe_image(path("conditioning_file_name"))
            _check_aspect("condition", matte_owner[:2], (width, height))
            if min(matte_owner[:2]) < self.min_side:
                raise RowProblem("too small",
                                 f"condition {matte_owner[0]}x{matte_owner[1]} is below {self.min_side} px")
        bucket = assign_bucket(width, height, self.buckets)
        if matte_owner[2]:
            return bucket, "alpha"
        if row.mask_file_name is not None:
            _check_aspect("mask", probe_image(path("mask_file_name"))[:2], matte_owner[:2])
            return bucket, "mask"
        if self.matte_fn is not None:
            return bucket, "matte_fn"
        raise RowProblem("no matte", "no alpha, no mask_file_name and no matte_fn (BriaRMBG is not available)")

    # -- encoding and writing --

    def _queue(self, bucket: tuple[int, int], key: bytes, pixels: np.ndarray, kind: str) -> None:
        self.known.add(key)
        queue = self.queues.setdefault(bucket, [])
        queue.append((key, pixels, kind))
        if len(queue) >= self.batch_size:
            self._encode(bucket)

    def _encode(self, bucket: tuple[int, int]) -> None:
        queue = self.queues.pop(bucket)
        pixels = torch.from_numpy(np.stack([p for _, p, _ in queue])).permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        with torch.no_grad():
            latents = self.encode_images(self.vae, pixels.to(self.device))  # [B, 4, h, w]
        width, height = bucket
        if tuple(latents.shape) != (len(queue), LATENT_CHANNELS, height // 8, width // 8):
            raise ValueError(f"encode_images gave {tuple(latents.shape)} for {len(queue)} images of {width}x{height}")
        self._write(("latents", bucket), latents, [key for key, _, _ in queue])
        kinds = [kind for _, _, kind in queue]
        self.stats.encoded_targets += kinds.count("target")
        self.stats.encoded_conditions += kinds.count("condition")

    def _encode_prompts(self) -> None:
        items, self.pending_prompts = list(self.pending_prompts.items()), {}
        for first in range(0, len(items), self.batch_size):
            chunk = items[first : first + self.batch_size]
            with torch.no_grad():
                embeds = self.encode_prompts(self.tokenizer, self.text_encoder, [t for _, t in chunk])  # [B, 77, D]
            length, dim = self.prompt_shape
            if embeds.ndim != 3 or tuple(embeds.shape[:2]) != (len(chunk), length) or dim not in (None, embeds.shape[2]):
                raise ValueError(f"encode_prompts gave {tuple(embeds.shape)} for {len(chunk)} prompts, "
                                 f"expected [{len(chunk)}, {length}, {dim or 'D'}]")
            self._write(("prompts", tuple(embeds.shape[1:])), embeds, [key for key, _ in chunk])
            self.stats.encoded_prompts += len(chunk)

    def _write(self, slot: tuple, values: torch.Tensor, keys: list[bytes]) -> None:
        if slot not in self.writers:
            kind, what = slot
            path = os.path.join(self.shard_dir, f"{kind}-{uuid.uuid4().hex[:16]}.safetensors")
            info = {"kind": kind, "model_id": self.model_id}
            if kind == "latents":
                info["bucket"] = f"{what[0]}x{what[1]}"
            tensor = "latents" if kind == "latents" else "embeds"
            self.writers[slot] = (ShardWriter(path, tensor, tuple(values.shape[1:]), info), [])
        writer, entries = self.writers[slot]
        first = writer.append(values)
        entries += [(key, first + i) for i, key in enumerate(keys)]
        if writer.count >= self.shard_rows:
            self._close(slot)

    def _close(self, slot: tuple) -> None:
        writer, entries = self.writers.pop(slot)
        record = writer.close()
        if record is None:
            return
        kind, what = slot
        record["kind"] = kind
        if kind == "latents":
            record["bucket"] = list(what)
        for key, index in entries:
            self.part.add_entry("latent" if kind == "latents" else "prompt", key, record, index)

    # -- the merge --

    def finish(self, rank: int, world: int, barrier) -> Index:
        """Merge every process's part into the manifest (rank 0) and return it, on every process."""
        meta = {"settings": self.settings, "containers": getattr(self.source, "containers", [])}
        if world == 1:
            if unchanged([self.part], self.old, len(self.copies), json.loads(json.dumps(meta["containers"]))):
                return self.old
            index = merge([self.part], self.old, self.valid, meta, self.report, self._name_of, len(self.copies))
            if not same(self.old, index):
                index.save(self.folder, self.name)
            return index
        parts = os.path.join(self.cache_dir, "parts")
        os.makedirs(parts, exist_ok=True)
        paths = [os.path.join(parts, f"{self.name}-{r}-of-{world}.npz") for r in range(world)]
        self.part.save(paths[rank])
        barrier()
        if rank == 0:
            parts = [Part.load(p) for p in paths]
            if not unchanged(parts, self.old, len(self.copies), json.loads(json.dumps(meta["containers"]))):
                index = merge(parts, self.old, self.valid, meta, self.report, self._name_of, len(self.copies))
                if not same(self.old, index):
                    index.save(self.folder, self.name)
            del parts
            for p in paths:
                os.remove(p)
        barrier()
        index = Index.load(self.folder, self.name)
        if index is None:
            raise RuntimeError(f"the cache manifest {self.name} in {self.folder} was not written by rank 0")
        return index

    def _name_of(self, number: int, locator: int) -> str:
        try:
            return self.source.row(number, locator).file_name
        except (RowProblem, OSError, IndexError):
            return f"row {number}"


def _check_aspect(what: str, size: tuple[int, int], reference: tuple[int, int]) -> None:
    if abs(math.log((size[0] / size[1]) / (reference[0] / reference[1]))) > ASPECT_TOLERANCE:
        raise RowProblem(
            "size mismatch", f"{what} is {size[0]}x{size[1]}, its image {reference[0]}x{reference[1]}"
        )
