"""The latent cache: every usable row encoded once into shards, reused across epochs, runs and processes.

`build_latent_cache` reads rows from a source (eddpm/sources.py: a metadata.jsonl folder, webdataset
tars or a `datasets` table) and stores, under `cache_dir` (data/README.md, "The latent cache"):
  shards/latents-<id>.safetensors  float16 [N, 4, h/8, w/8]: target and condition latents of one bucket
  shards/prompts-<id>.safetensors  float16 [N, 77, D]: prompt embeddings, one per distinct text
  manifests/<name>.json (+ index)  per (source, settings): the usable rows and where their entries are
                                   (eddpm/manifest.py); shards are eddpm/shards.py's files
Entries are keyed by what they depend on (the files' sha256, model identity, bucket, flip, matte source,
degradation, PREPROCESS_VERSION): a change re-encodes only what it touches, and entries are shared by rows
(one condition under five lights) and by the manifests of one cache_dir (other settings).

A launch: each process takes the rows whose number % world_size == rank. A row whose key (its line and
its files' size and mtime, or its tar/table file's) is in the manifest is reused without opening a file;
any other row is probed, hashed and looked up by its entry keys, and what is still missing is encoded into
the process's own new shards. Rank 0 then merges the processes' parts into the next manifest and every
process loads it. `verify=True` (--verify_cache) hashes every row's files again instead of trusting size
and mtime. LatentDataset holds numpy arrays (a few dozen bytes a row) and reads entries on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from eddpm import conditioning, prompts, sources
from eddpm.buckets import make_buckets
from eddpm.cache_build import PREPROCESS_VERSION, SHARD_ROWS, Build, CacheStats, entry_key
from eddpm.examples import DEGRADATIONS, Example, load_example
from eddpm.manifest import NO_KEY, Index, KeyTable, as_keys
from eddpm.metadata import DatasetError, Row, RowProblem, Skip, flip_row
from eddpm.shards import ShardReader

__all__ = ["PREPROCESS_VERSION", "CacheStats", "LatentDataset", "build_latent_cache", "model_fingerprint"]

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


# --- the dataset ---------------------------------------------------------------------------------------


class LatentDataset(torch.utils.data.Dataset):
    """The cached examples; `__getitem__` reads one example's three entries from the shards.

    `rows[i]` is the metadata Row of item i, read again from the source on demand (file names as the
    source names them), `buckets[i]` its (width, height) in pixels (the bucket id of BucketBatchSampler),
    `empty_prompt_embeds` the [77, D] embedding of "" for caption dropout, `stats` what the build did.
    Memory: 39 bytes a row (numpy arrays), whatever the dataset's size.
    """

    def __init__(self, cache_dir: str, index: Index, source, buckets: list, empty_prompt: bytes, stats: CacheStats):
        a = index.arrays
        self.source, self.stats = source, stats
        self._number, self._locator, self._bucket = a["number"], a["locator"], a["bucket"]
        self._flipped = a["flipped"].astype(bool)
        self._bucket_sizes = [tuple(b) for b in buckets]
        latent, prompt = (a["latent_shard"], a["latent_slot"]), (a["prompt_shard"], a["prompt_slot"])
        self._entries = np.stack([latent[0][a["target"]], latent[1][a["target"]], latent[0][a["condition"]],
                                  latent[1][a["condition"]], prompt[0][a["prompt"]], prompt[1][a["prompt"]]],
                                 axis=1).astype(np.int32)  # [R, 6]: (shard, slot) of target, condition, prompt
        self._reader = ShardReader(os.path.join(cache_dir, "shards"), index.meta["shards"])
        empty = int(KeyTable(a["prompt_key"]).find(as_keys(empty_prompt))[0])
        self.empty_prompt_embeds = self._reader.read(int(prompt[0][empty]), int(prompt[1][empty]))  # [77, D]
        self.rows = _Rows(self)
        self.buckets = _Buckets(self)

    def __len__(self) -> int:
        return len(self._number)

    def __getitem__(self, index: int) -> dict:
        t_shard, t_slot, c_shard, c_slot, p_shard, p_slot = self._entries[index].tolist()
        return {
            "latents": self._reader.read(t_shard, t_slot),  # [4, h, w]
            "cond_latents": self._reader.read(c_shard, c_slot),  # [4, h, w]
            "prompt_embeds": self._reader.read(p_shard, p_slot),  # [77, D]
            "index": index,
        }

    def row(self, index: int) -> Row:
        row = self.source.row(int(self._number[index]), int(self._locator[index]))
        return flip_row(row) if self._flipped[index] else row

    def load_example(self, index: int, *, matte_fn=None, degrade: str = "none") -> Example:
        """Item `index` decoded again at its bucket size (eddpm/examples.py), mirrored if it is a flipped copy."""
        scan = sources.ScanRow(int(self._number[index]), int(self._locator[index]), NO_KEY, 0, "")
        with self.source.open_rows([scan]) as opened:
            local = next(opened)
            if isinstance(local, RowProblem):
                raise local
            ex = load_example(local.row, local.folder, self.buckets[index], matte_fn=matte_fn, degrade=degrade,
                              allow_outside_paths=local.allow_outside_paths)
        if self._flipped[index]:
            ex = Example(*(np.ascontiguousarray(x[:, ::-1]) for x in (ex.target, ex.condition, ex.alpha)))
        return ex


class _Rows(Sequence):
    def __init__(self, dataset: LatentDataset):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._dataset.row(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._dataset.row(index % len(self))


class _Buckets(Sequence):
    def __init__(self, dataset: LatentDataset):
        self._sizes, self._ids = dataset._bucket_sizes, dataset._bucket

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._sizes[i] for i in self._ids[index].tolist()]
        return self._sizes[int(self._ids[index])]

    def __iter__(self):
        return map(self._sizes.__getitem__, self._ids.tolist())


# --- the build -----------------------------------------------------------------------------------------


def build_latent_cache(
    data_dir,
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
    allow_outside_paths: bool = False,
    buckets: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    encode_images: Callable | None = None,
    encode_prompts: Callable | None = None,
    progress: bool = True,
    verify: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    shard_rows: int = SHARD_ROWS,
) -> LatentDataset:
    """Check the rows of `data_dir`, encode what is not cached yet into `cache_dir`, return the dataset.

    data_dir: a folder or tar pattern (eddpm/sources.py, open_source), or a source object (which carries
        its own allow_empty_prompts and allow_outside_paths).
    model_id: identity of (vae, text_encoder, tokenizer) in the cache keys; None computes it with
        `model_fingerprint`. matte_id: identity of `matte_fn` (default: its qualified name).
    degrade: "none" or "shading" (unpaired rows only; paired conditions are never altered).
    flip: also include a mirrored copy of every row (pixels flipped, "left"/"right" swapped in the prompt);
        off by default because mirroring changes which side the light comes from.
    buckets: (width, height) list, default `make_buckets(resolution)`.
    encode_images(vae, pixels [B, 3, H, W] 0..255) -> [B, 4, h, w], for targets and for conditions (which
        `load_example` has already composited on gray); default: eddpm.conditioning's.
    encode_prompts(tokenizer, text_encoder, list[str]) -> [B, 77, D]; default: eddpm.prompts'.
    verify: hash every row's files again instead of trusting their size and modification time.
    rank, world_size, barrier: on several processes, call it on every one (barrier() returns when all
        have called it, e.g. accelerate's wait_for_everyone); each encodes its share of the missing rows.
    """
    if degrade not in DEGRADATIONS:
        raise ValueError(f"degrade must be one of {DEGRADATIONS}, got {degrade!r}")
    if world_size > 1 and barrier is None:
        raise ValueError("several processes need a barrier (e.g. accelerator.wait_for_everyone)")
    source = sources.open_source(os.fspath(data_dir), allow_empty_prompts=allow_empty_prompts,
                                 allow_outside_paths=allow_outside_paths) if isinstance(data_dir, (str, os.PathLike)) else data_dir
    buckets = [tuple(b) for b in (buckets or make_buckets(resolution))]
    if model_id is None:
        model_id = "-".join(model_fingerprint(m) for m in (vae, text_encoder, tokenizer))
    if matte_fn is not None and matte_id is None:
        matte_id = getattr(matte_fn, "__qualname__", type(matte_fn).__qualname__)
    settings = {"source": source.identity(), "model_id": model_id, "buckets": buckets, "degrade": degrade,
                "flip": flip, "matte_id": matte_id if matte_fn is not None else None,
                "preprocess_version": PREPROCESS_VERSION}
    name = sources.digest16(settings).hex()
    encoders = (vae, text_encoder, tokenizer, encode_images or conditioning.encode_images,
                encode_prompts or prompts.encode_prompts)
    build = Build(source, cache_dir, name, settings, encoders, matte_fn, strict, batch_size, device, shard_rows)
    stats = build.run(rank, world_size, verify, progress)
    index = build.finish(rank, world_size, barrier)

    stats.usable = len(index)
    stats.skipped = [Skip(n, file_name, kind, detail) for n, file_name, kind, detail, _ in index.meta["skips"]]
    if rank == 0:
        counts = index.meta["counts"]
        reasons = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
        print(f"{source.location}: {index.meta['rows']} rows usable, {sum(counts.values())} skipped"
              + (f" ({reasons})" if reasons else ""))
        print(f"latent cache {cache_dir}: {stats.reused_rows} rows reused unopened, {stats.opened_rows} opened "
              f"({1000 * stats.seconds_per_image:.0f} ms each), {stats.encoded_targets + stats.encoded_conditions} "
              f"latents and {stats.encoded_prompts} prompts encoded on this process of {world_size}; "
              f"{len(index)} examples ready")
    if len(index) == 0:
        raise DatasetError(f"no usable rows in {source.location} (see the warnings above)")
    return LatentDataset(cache_dir, index, source, buckets, entry_key("prompt", model_id, ""), stats)
