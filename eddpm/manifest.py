"""The latent cache's manifest: the usable rows, where their entries lie, what was skipped; and its merge.

`manifests/<name>.json` (settings, shard records, containers, skips, counts) names its index
`manifests/<name>-<id>.safetensors`: numpy arrays, one element per row or entry, no Python object per row:
  rows     number int32 (line or row number), locator int64 (where the source finds the row again),
           row_key uint8 [R, 16] (eddpm/sources.py), flipped uint8, bucket int16 (into settings' buckets),
           target, condition int32 (into the latent entries), prompt int32 (into the prompt entries)
  entries  latent_key uint8 [E, 16], latent_shard int32 (into the JSON's shards), latent_slot int32, and the
           same three for prompt_ (one embedding per distinct text)
  skips    skip_key uint8 [S, 16], one per JSON skip (zeros for a skip that the scan finds anew each time)
Each process of a build writes a Part (its rows: those taken from the manifest as references to its
rows, the others with their entry keys; its new shards; its skips) and rank 0 merges the parts into the
next manifest (`merge`).
"""

from __future__ import annotations

import json
import os
import uuid
from array import array
from collections import Counter

import numpy as np

from eddpm.metadata import RowProblem

FORMAT = 1
ROW_ARRAYS = ("number", "locator", "row_key", "flipped", "bucket")
NO_KEY = bytes(16)


def as_keys(raw) -> np.ndarray:
    """16-byte keys (bytes joined, or uint8 [N, 16]) as a numpy "S16" vector, comparable and sortable."""
    if isinstance(raw, (bytes, bytearray)):
        return np.frombuffer(bytes(raw), dtype="S16")
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 16).view("S16").ravel()  # a view, no copy


def key_bytes(keys: np.ndarray) -> np.ndarray:
    """The inverse of as_keys: uint8 [N, 16]."""
    return np.ascontiguousarray(keys, dtype="S16").view(np.uint8).reshape(-1, 16)


class KeyTable:
    """Position of 16-byte keys in a table, by binary search over a sorted copy (the first of equal keys)."""

    def __init__(self, keys: np.ndarray):
        keys = as_keys(keys) if keys.dtype != np.dtype("S16") else keys
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]

    def find(self, queries: np.ndarray) -> np.ndarray:
        """int64 positions of `queries` ("S16"), -1 where absent."""
        if len(self.sorted) == 0 or len(queries) == 0:
            return np.full(len(queries), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.sorted, queries), len(self.sorted) - 1)
        return np.where(self.sorted[at] == queries, self.order[at], -1)


class Index:
    """A loaded manifest: `meta` (the JSON) and `arrays` (the index, as described above)."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]):
        self.meta, self.arrays = meta, arrays

    @classmethod
    def load(cls, folder: str, name: str) -> Index | None:
        """The manifest `name`, or None when it is missing, of another format, or unreadable."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            with open(os.path.join(folder, f"{name}.json")) as f:
                meta = json.load(f)
            if meta.get("format") != FORMAT:
                return None
            return cls(meta, load_file(os.path.join(folder, meta["index"])))
        except (OSError, ValueError, KeyError, SafetensorError):  # torn or foreign: built again
            return None

    def save(self, folder: str, name: str) -> None:
        """Write the index under a new name, then switch the JSON to it atomically; the old index goes."""
        from safetensors.numpy import save_file

        os.makedirs(folder, exist_ok=True)
        old = self.meta.get("index")
        self.meta["index"] = f"{name}-{uuid.uuid4().hex[:12]}.safetensors"
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        save_file(arrays, os.path.join(folder, self.meta["index"]))
        tmp = os.path.join(folder, f"{name}.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.meta, f)
        os.replace(tmp, os.path.join(folder, f"{name}.json"))
        if old and old != self.meta["index"] and os.path.exists(os.path.join(folder, old)):
            os.remove(os.path.join(folder, old))

    def __len__(self) -> int:
        return len(self.arrays["number"])


class Part:
    """One process's share of a build: rows with their entry keys, new or adopted entries, skips."""

    def __init__(self):
        self.rows = {"number": array("i"), "locator": array("q"), "flipped": array("B"), "bucket": array("h")}
        self.row_keys = {k: bytearray() for k in ("row_key", "target", "condition", "prompt")}
        self.dups = {"dup_number": [], "dup": []}  # numpy blocks: rows and their duplicate identities
        self.reused = {"number": [], "locator": [], "row_key": [], "old": []}  # numpy blocks: manifest rows
        self.entries = {kind: {"key": bytearray(), "shard": [], "slot": array("i")} for kind in ("latent", "prompt")}
        self.shards: dict[str, dict] = {}  # name -> record, of the entries above
        self.skips: list[list] = []  # [number, name, kind, detail, key hex or None]
        self.counts: Counter = Counter()  # kind -> skipped rows, kept or not

    def add_row(self, number: int, locator: int, row_key: bytes, flipped: bool, bucket: int,
                target: bytes, condition: bytes, prompt: bytes) -> None:
        for name, value in (("number", number), ("locator", locator), ("flipped", flipped), ("bucket", bucket)):
            self.rows[name].append(value)
        for name, key in (("row_key", row_key), ("target", target), ("condition", condition), ("prompt", prompt)):
            self.row_keys[name] += key

    def add_dups(self, numbers: np.ndarray, dups: np.ndarray) -> None:
        self.dups["dup_number"].append(numbers.astype(np.int32))
        self.dups["dup"].append(dups.astype(np.uint64))

    def add_reused(self, numbers: np.ndarray, locators: np.ndarray, row_keys: np.ndarray, old: np.ndarray) -> None:
        """Rows that are the manifest's rows `old` (each the first of its copies), with a new number and locator."""
        for name, values in (("number", numbers.astype(np.int32)), ("locator", locators.astype(np.int64)),
                             ("row_key", row_keys), ("old", old.astype(np.int64))):
            self.reused[name].append(values)

    def add_entry(self, kind: str, key: bytes, record: dict, slot: int) -> None:
        self.shards.setdefault(record["name"], record)
        entries = self.entries[kind]
        entries["key"] += key
        entries["shard"].append(record["name"])
        entries["slot"].append(slot)

    def add_skip(self, number: int, name: str, problem, key: bytes | None, keep: bool = True) -> None:
        self.counts[problem.kind] += 1
        if keep or key is not None:
            self.skips.append([number, name, problem.kind, problem.detail, key.hex() if key else None])

    def blocks(self, which: str) -> dict[str, np.ndarray]:
        """self.dups or self.reused, each column's blocks joined."""
        columns = getattr(self, which)
        dtypes = {"dup_number": np.int32, "dup": np.uint64, "number": np.int32, "locator": np.int64,
                  "row_key": "S16", "old": np.int64}
        return {k: np.concatenate(v) if v else np.zeros(0, dtypes[k]) for k, v in columns.items()}

    def save(self, path: str) -> None:
        arrays = {k: np.frombuffer(v, dtype=v.typecode) for k, v in self.rows.items()}
        arrays |= {k: np.frombuffer(bytes(v), dtype=np.uint8) for k, v in self.row_keys.items()}
        arrays |= {f"dups_{k}": v for k, v in self.blocks("dups").items()}
        arrays |= {f"reused_{k}": key_bytes(v) if k == "row_key" else v for k, v in self.blocks("reused").items()}
        for kind, e in self.entries.items():
            arrays[f"{kind}_key"] = np.frombuffer(bytes(e["key"]), dtype=np.uint8)
            arrays[f"{kind}_slot"] = np.frombuffer(e["slot"], dtype=np.int32)
        meta = {"shards": self.shards, "skips": self.skips, "counts": self.counts,
                "entry_shards": {kind: e["shard"] for kind, e in self.entries.items()}}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Part:
        part = cls()
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            for k in part.rows:
                part.rows[k] = array(part.rows[k].typecode, data[k].tobytes())
            part.dups = {k: [data[f"dups_{k}"]] for k in part.dups}
            part.reused = {k: [as_keys(data[f"reused_{k}"]) if k == "row_key" else data[f"reused_{k}"]]
                           for k in part.reused}
            for k in part.row_keys:
                part.row_keys[k] = bytearray(data[k].tobytes())
            for kind, e in part.entries.items():
                e["key"] = bytearray(data[f"{kind}_key"].tobytes())
                e["slot"] = array("i", data[f"{kind}_slot"].tobytes())
                e["shard"] = meta["entry_shards"][kind]
        part.shards, part.skips, part.counts = meta["shards"], meta["skips"], Counter(meta["counts"])
        return part


def _entry_table(kind: str, old: Index | None, valid: dict | None, parts: list[Part], records: dict):
    """All entries of `kind` (old valid ones first, then the parts'), one per key: (keys S16, shard, slot)."""
    keys, shards, slots = [], [], []
    if old is not None:
        mask = valid[f"{kind}_valid"]
        names = [old.meta["shards"][i]["name"] for i in range(len(old.meta["shards"]))]
        keys.append(as_keys(old.arrays[f"{kind}_key"])[mask])
        shards += [names[i] for i in old.arrays[f"{kind}_shard"][mask]]
        slots.append(old.arrays[f"{kind}_slot"][mask])
        for record in old.meta["shards"]:
            records.setdefault(record["name"], record)
    for part in parts:
        e = part.entries[kind]
        keys.append(as_keys(e["key"]))
        shards += e["shard"]
        slots.append(np.frombuffer(e["slot"], dtype=np.int32))
        records.update({n: r for n, r in part.shards.items() if n not in records})
    keys = np.concatenate(keys) if keys else np.zeros(0, "S16")
    _, first = np.unique(keys, return_index=True)
    first.sort()
    slots = np.concatenate(slots).astype(np.int32) if slots else np.zeros(0, np.int32)
    return keys[first], [shards[i] for i in first], slots[first]


def _reused_rows(part: Part, old: Index | None, copies: int) -> dict[str, np.ndarray]:
    """A part's rows taken from the manifest, with all their copies, as merge's columns."""
    r = part.blocks("reused")
    if old is None:
        return None
    a = old.arrays
    q = (r["old"][:, None] + np.arange(copies)).ravel()  # [N * copies]: the old rows of every copy
    latent, prompt = as_keys(a["latent_key"]), as_keys(a["prompt_key"])
    return {"number": np.repeat(r["number"], copies), "locator": np.repeat(r["locator"], copies),
            "flipped": a["flipped"][q], "bucket": a["bucket"][q], "row_key": np.repeat(r["row_key"], copies),
            "target": latent[a["target"][q]], "condition": latent[a["condition"][q]], "prompt": prompt[a["prompt"][q]]}


def merge(parts: list[Part], old: Index | None, valid: dict | None, meta: dict, report, name_of,
          copies: int) -> Index:
    """The next manifest from every process's part and the old manifest's still valid entries.

    `copies`: index rows per source row (2 with flips). Rows are ordered by (number, flipped). A row whose `dup` identity equals an earlier row's is dropped as
    a "duplicate" (reported through `report`, a metadata.SkipReport, naming the row by
    `name_of(number, locator)`), as read_metadata does in one process.
    """
    blocks = []
    for p in parts:
        blocks.append({k: np.frombuffer(v, dtype=v.typecode) for k, v in p.rows.items()}
                      | {k: as_keys(v) for k, v in p.row_keys.items()})
        blocks.append(_reused_rows(p, old, copies))
    rows = {k: np.concatenate([b[k] for b in blocks if b is not None]) for k in blocks[0]}
    skips = [s for p in parts for s in p.skips]
    counts = sum((p.counts for p in parts), Counter())
    dup_numbers = np.concatenate([p.blocks("dups")["dup_number"] for p in parts])
    dups = np.concatenate([p.blocks("dups")["dup"] for p in parts])
    order = np.lexsort((dup_numbers, dups))
    dup_numbers, dups = dup_numbers[order], dups[order]
    later = np.flatnonzero(dups[1:] == dups[:-1]) + 1
    dropped = set()
    if len(later):
        firsts = dup_numbers[np.searchsorted(dups, dups[later])]
        names = {int(n): name for n, name, *_ in skips}
        locators = dict(zip(rows["number"].tolist(), rows["locator"].tolist()))
        dup_skips = []
        for number, first in sorted(zip(dup_numbers[later].tolist(), firsts.tolist())):
            dropped.add(number)
            name = names[number] if number in names else name_of(number, locators[number])
            problem = RowProblem("duplicate", f"same as line {first}")
            report.skip_line(number, name, problem)
            counts[problem.kind] += 1
            dup_skips.append([number, name, problem.kind, problem.detail, None])
        for s in skips:
            if s[0] in dropped:
                counts[s[2]] -= 1
        skips = [s for s in skips if s[0] not in dropped] + dup_skips
    kept = np.flatnonzero(~np.isin(rows["number"], np.fromiter(dropped, np.int32, len(dropped))))
    kept = kept[np.lexsort((rows["flipped"][kept], rows["number"][kept]))]
    rows = {k: v[kept] for k, v in rows.items()}
    del blocks, kept

    records: dict[str, dict] = {}
    arrays = {k: rows[k] for k in ("number", "locator", "flipped", "bucket")}
    arrays["row_key"] = key_bytes(rows["row_key"])
    for kind, columns in (("latent", ("target", "condition")), ("prompt", ("prompt",))):
        keys, shards, slots = _entry_table(kind, old, valid, parts, records)
        table = KeyTable(keys)
        for column in columns:
            arrays[column] = table.find(rows[column]).astype(np.int32)
            if (arrays[column] < 0).any():
                raise RuntimeError(f"merge: a row's {column} entry is in no shard (a bug of eddpm/cache.py)")
        arrays[f"{kind}_key"], arrays[f"{kind}_slot"] = key_bytes(keys), slots
        arrays[f"{kind}_shard_name"] = shards
    used = sorted({n for kind in ("latent", "prompt") for n in arrays[f"{kind}_shard_name"]})
    number_of = {n: i for i, n in enumerate(used)}
    for kind in ("latent", "prompt"):
        arrays[f"{kind}_shard"] = np.array([number_of[n] for n in arrays.pop(f"{kind}_shard_name")], np.int32)
    skips.sort(key=lambda s: s[0])
    arrays["skip_key"] = np.frombuffer(b"".join(bytes.fromhex(s[4]) if s[4] else NO_KEY for s in skips),
                                       dtype=np.uint8).reshape(-1, 16)
    meta = {**meta, "format": FORMAT, "shards": [records[n] for n in used], "skips": skips,
            "counts": {k: n for k, n in sorted(counts.items()) if n > 0},
            "rows": int(len(np.unique(arrays["number"])))}
    return Index(json.loads(json.dumps(meta)), arrays)  # JSON types, as a loaded one has


def unchanged(parts: list[Part], old: Index | None, copies: int, containers: list) -> bool:
    """True when the parts only found the manifest's rows again, with the same numbers, locators, skips
    and containers: the manifest stands as it is (no merge, no rewrite)."""
    if old is None or containers != old.meta.get("containers", []) or any(
            p.row_keys["row_key"] or p.entries["latent"]["key"] or p.entries["prompt"]["key"] for p in parts):
        return False
    reused = [p.blocks("reused") for p in parts]
    numbers = np.concatenate([r["number"] for r in reused])
    order = np.argsort(numbers, kind="stable")
    first = np.arange(0, len(old), copies)  # the first copy of every manifest row
    a = old.arrays
    skips = sorted(([n, name, kind, detail, key] for p in parts for n, name, kind, detail, key in p.skips),
                   key=lambda s: s[0])
    return (len(numbers) == len(first) and np.array_equal(np.concatenate([r["old"] for r in reused])[order], first)
            and np.array_equal(numbers[order], a["number"][first])
            and np.array_equal(np.concatenate([r["locator"] for r in reused])[order], a["locator"][first])
            and skips == old.meta["skips"])


def same(a: Index | None, b: Index) -> bool:
    """True when `b` says what `a` says (so that rewriting it can be skipped)."""
    if a is None or {k: v for k, v in a.meta.items() if k != "index"} != {
            k: v for k, v in b.meta.items() if k != "index"}:
        return False
    return set(a.arrays) == set(b.arrays) and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in b.arrays)
