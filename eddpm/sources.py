"""Where training rows come from: a metadata.jsonl folder, webdataset tar shards, or a `datasets` table.

Each source gives eddpm/cache.py the same three things (data/README.md, "Inputs", has the formats):
- `scan(rank, world, known)`: this process's rows (row number % world == rank), each with a 16-byte `key`
  that changes whenever the row or a file it reads may have changed, found without decoding or hashing
  anything: for metadata.jsonl from the line and each file's size and modification time; for a tar or a
  table file from that file's size and modification time and the row's position in it. `known` holds the
  last build's containers (tar or table files: name -> size, mtime, rows), so an unchanged one is not even
  opened. Problems found while scanning (bad JSON lines) come as ScanProblem.
- `open_rows(rows)`: each row, one at a time, as a metadata Row whose files lie in a folder, ready for
  eddpm/examples.py's load_example (a tar's members or a table's cells are written to a temporary folder
  under their member names, and removed when the next row is reached), or the RowProblem that skips it.
- `row(number, locator)`: the Row to show (file names as the user knows them), read again on demand.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from eddpm import metadata
from eddpm.metadata import DatasetError, Row, RowProblem

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
MAX_MEMBER_BYTES = 1 << 28  # a tar member or table cell above 256 MiB is no training image
MAX_JSON_BYTES = 1 << 20  # a sample's .json, as a metadata.jsonl line (eddpm/metadata.py)
_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # rows are written to memory when possible


def digest16(*parts) -> bytes:
    """A 16-byte key of JSON-serialisable parts."""
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=16).digest()


def row_key(*fields) -> bytes:
    """A 16-byte key of strings, numbers, None and tuples of them (their repr: cheaper than JSON, per row)."""
    return hashlib.blake2b(repr(fields).encode(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class ScanRow:
    number: int  # 1-based row number: the line of metadata.jsonl, else the position over all containers
    locator: int  # where the source finds it again: byte offset of the line, or container << 32 | position
    key: bytes  # 16 bytes; equal keys mean the same inputs, unless the files changed within their mtime
    dup: int  # 64-bit identity for the duplicate check (metadata.jsonl: names and text), 0 for none
    name: str  # for messages


@dataclass(frozen=True, slots=True)
class ScanProblem:
    number: int
    name: str
    problem: RowProblem
    key: bytes | None  # a problem that lasts as long as the key (tar or table rows); None: found anew


@dataclass(frozen=True)
class LocalRow:
    """A row whose files are `folder/<row's file names>`, and the names to show in messages."""

    row: Row
    folder: str
    allow_outside_paths: bool = False
    display: str = ""


def check_prompt(text, allow_empty_prompts: bool, where: str) -> str:
    """metadata.jsonl's prompt rules for a prompt from elsewhere (`where` names it in messages)."""
    if text is None and not allow_empty_prompts:
        raise RowProblem("missing prompt", f"no prompt ({where})")
    if text is not None and not isinstance(text, str):
        raise RowProblem("bad field", f"the prompt ({where}) must be a string, got {type(text).__name__}")
    text = (text or "").strip()
    if not text and not allow_empty_prompts:
        raise RowProblem("empty prompt", f"the prompt ({where}) is empty (allow_empty_prompts keeps it)")
    return text


def open_source(data_dir: str, *, dataset_name: str | None = None, allow_empty_prompts: bool = False,
                allow_outside_paths: bool = False, **columns):
    """The source for train.py's flags: `dataset_name` (a datasets folder or parquet files) with its
    columns, else `data_dir` as webdataset tars (a .tar file, a brace pattern, or a folder of .tar files
    without metadata.jsonl), else as a metadata.jsonl folder."""
    if dataset_name:
        from eddpm.tables import TableSource  # pyarrow and datasets are imported only for a table

        return TableSource(dataset_name, allow_empty_prompts=allow_empty_prompts,
                           allow_outside_paths=allow_outside_paths, **columns)
    has_tars = os.path.isdir(data_dir) and not os.path.exists(os.path.join(data_dir, metadata.METADATA_FILE)) and any(
        glob.iglob(os.path.join(glob.escape(data_dir), "**", "*.tar"), recursive=True))
    if "{" in data_dir or data_dir.endswith(".tar") or has_tars:
        return TarSource(data_dir, allow_empty_prompts=allow_empty_prompts)
    return MetadataSource(data_dir, allow_empty_prompts=allow_empty_prompts, allow_outside_paths=allow_outside_paths)


# --- metadata.jsonl -----------------------------------------------------------------------------------


class MetadataSource:
    """A folder with metadata.jsonl (eddpm/metadata.py): a row's key covers its line and its files' stat."""

    def __init__(self, data_dir: str, *, allow_empty_prompts: bool = False, allow_outside_paths: bool = False):
        self.data_dir, self.allow_empty_prompts = data_dir, allow_empty_prompts
        self.allow_outside_paths = allow_outside_paths
        self.location = os.path.join(data_dir, metadata.METADATA_FILE)
        self.containers: list = []

    def identity(self) -> dict:
        return {"kind": "metadata", "path": os.path.realpath(self.data_dir),
                "allow_empty_prompts": self.allow_empty_prompts, "allow_outside_paths": self.allow_outside_paths}

    def scan(self, rank: int, world: int, known: dict) -> Iterator[ScanRow | ScanProblem]:
        for line, offset, result, name in metadata.scan_metadata(
                self.data_dir, allow_empty_prompts=self.allow_empty_prompts,
                allow_outside_paths=self.allow_outside_paths, select=lambda n: (n - 1) % world == rank):
            if isinstance(result, RowProblem):
                yield ScanProblem(line, name, result, None)
                continue
            names = (result.file_name, result.conditioning_file_name, result.mask_file_name)
            try:
                stats = [file_stat(os.path.join(self.data_dir, n)) if n else None for n in names]
            except OSError as err:  # removed since the line was checked
                yield ScanProblem(line, result.file_name, RowProblem("missing file", str(err)), None)
                continue
            identity = repr((*names, result.text)).encode()  # what makes two lines duplicates
            dup = int.from_bytes(hashlib.blake2b(identity, digest_size=8).digest(), "little") or 1
            key = hashlib.blake2b(identity + repr(stats).encode(), digest_size=16).digest()
            yield ScanRow(line, offset, key, dup, result.file_name)

    @contextlib.contextmanager
    def open_rows(self, rows: list[ScanRow]) -> Iterator[Iterator[LocalRow | RowProblem]]:
        def each():
            for r in rows:
                try:
                    yield LocalRow(self.row(r.number, r.locator), self.data_dir, self.allow_outside_paths)
                except RowProblem as problem:
                    yield problem

        yield each()

    def row(self, number: int, locator: int) -> Row:
        return metadata.read_row_at(self.data_dir, locator, number, allow_empty_prompts=self.allow_empty_prompts,
                                    allow_outside_paths=self.allow_outside_paths)


def file_stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# --- containers: tar files and table files --------------------------------------------------------------


class ContainerSource:
    """Rows that live inside container files (tars, parquet or arrow files), numbered over all of them."""

    location: str
    root: str

    def container_paths(self) -> list[str]:
        raise NotImplementedError

    def count(self, index: int) -> int:  # rows in container `index` (it may be opened)
        raise NotImplementedError

    def stat(self, path: str) -> tuple[int, int]:
        return file_stat(path)

    def scan(self, rank: int, world: int, known: dict) -> Iterator[ScanRow | ScanProblem]:
        self._paths = self.container_paths()
        self.containers = []
        number = 0
        for index, path in enumerate(self._paths):
            name = os.path.relpath(path, self.root)
            size, mtime = self.stat(path)
            old = known.get(name)
            count = old[2] if old and (old[0], old[1]) == (size, mtime) else self.count(index)
            self.containers.append([name, size, mtime, count])
            for position in range(count):
                number += 1
                if (number - 1) % world == rank:
                    yield ScanRow(number, index << 32 | position, row_key(name, size, mtime, position), 0,
                                  f"{name}#{position}")

    def _path(self, locator: int) -> tuple[str, int]:
        if not getattr(self, "_paths", None):
            self._paths = self.container_paths()
        return self._paths[locator >> 32], locator & 0xFFFFFFFF

    @contextlib.contextmanager
    def open_rows(self, rows: list[ScanRow]) -> Iterator[Iterator[LocalRow | RowProblem]]:
        """The rows one at a time, each row's files written when it is reached and removed at the next."""
        with tempfile.TemporaryDirectory(prefix="eddpm-rows-", dir=_TMP) as tmp:

            def each():
                for r in rows:
                    folder = os.path.join(tmp, str(r.number))
                    try:
                        row, files, shown = self._read(r.number, r.locator)
                        os.makedirs(folder)
                        for name, data in files.items():
                            with open(os.path.join(folder, name), "wb") as f:
                                f.write(data)
                    except RowProblem as problem:
                        yield problem
                        continue
                    yield LocalRow(row, folder, display=shown["file_name"])
                    shutil.rmtree(folder, ignore_errors=True)

            yield each()

    def row(self, number: int, locator: int) -> Row:
        """The row with its files named as in the source (`shard-000.tar/0001.jpg`, `train.parquet[5]:image`)."""
        row, _, shown = self._read(number, locator, with_bytes=False)
        return Row(line=number, file_name=shown["file_name"], text=row.text,
                   conditioning_file_name=shown.get("conditioning_file_name"),
                   mask_file_name=shown.get("mask_file_name"), extra=row.extra)

    def _read(self, number: int, locator: int, with_bytes: bool = True) -> tuple[Row, dict, dict]:
        """(row with the file names of `files`, {file name: bytes} (empty unless with_bytes), {field: name
        to show})."""
        raise NotImplementedError


# --- webdataset tars ----------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard patterns: `a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero-padded
    when the first bound has a leading zero); `{x,y}` lists; several braces multiply."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        first, last = bounds.groups()
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


class TarSource(ContainerSource):
    """webdataset shards: samples are the members sharing a key (the path up to the first dot of the
    file name): `KEY.jpg` (or .png, ...) the target, `KEY.cond.png` the condition, `KEY.mask.png` the
    mask, `KEY.txt` the prompt (UTF-8; else "text" of `KEY.json`), `KEY.json` extra fields. Uncompressed
    .tar files only: members are read in place (tarfile, with a seek per member)."""

    def __init__(self, pattern: str, *, allow_empty_prompts: bool = False):
        self.pattern, self.allow_empty_prompts = pattern, allow_empty_prompts
        self.root = pattern if os.path.isdir(pattern) else os.path.dirname(pattern.split("{")[0]) or "."
        self.location = pattern
        self.containers: list = []
        self._index_cache: tuple[int, list] = (-1, [])

    def identity(self) -> dict:
        return {"kind": "webdataset", "pattern": os.path.abspath(self.pattern),
                "allow_empty_prompts": self.allow_empty_prompts}

    def container_paths(self) -> list[str]:
        if os.path.isdir(self.pattern):
            paths = sorted(glob.glob(os.path.join(glob.escape(self.pattern), "**", "*.tar"), recursive=True))
        else:
            paths = expand_braces(self.pattern)
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise DatasetError(f"{len(missing)} of the {len(paths)} tar files of {self.pattern} are missing, "
                                   f"e.g. {missing[0]}")
        if not paths:
            raise DatasetError(f"no .tar files in {self.pattern}")
        return paths

    def count(self, index: int) -> int:
        return len(self._samples(index))

    def _samples(self, index: int) -> list[tuple[str, dict]]:
        """[(key, {extension: (data offset, size, member name)})] in order of first appearance."""
        if self._index_cache[0] == index:
            return self._index_cache[1]
        path = self._paths[index]
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    folder, base = posixpath.split(member.name)
                    if member.isfile() and "." in base.strip("."):
                        stem, extension = base.split(".", 1)
                        samples.setdefault(posixpath.join(folder, stem), {})[extension.lower()] = (
                            member.offset_data, member.size, member.name)
        except (tarfile.TarError, OSError) as err:
            logger.warning(f"{path}: unreadable tar after {len(samples)} samples ({err}); the rest is skipped")
        result = list(samples.items())
        self._index_cache = (index, result)
        return result

    def _read(self, number: int, locator: int, with_bytes: bool = True) -> tuple[Row, dict, dict]:
        path, position = self._path(locator)
        key, members = self._samples(locator >> 32)[position]
        tar_name = os.path.relpath(path, self.root)

        def one(prefix: str, what: str) -> str | None:
            found = [e for e in members if e.startswith(prefix) and e[len(prefix):] in IMAGE_EXTENSIONS]
            if len(found) > 1:
                raise RowProblem("bad field", f"{len(found)} {what} images for key {key!r}: {sorted(found)}")
            return found[0] if found else None

        target, condition, mask = one("", "target"), one("cond.", "condition"), one("mask.", "mask")
        if target is None:
            raise RowProblem("missing file", f"no target image ({key}.jpg, .png, ...) in {tar_name}")
        extra: dict = {}
        with open(path, "rb") as f:
            if "json" in members:
                extra = _json_object(_member(f, members["json"], MAX_JSON_BYTES), f"{key}.json")
            if "txt" in members:
                try:
                    text = _member(f, members["txt"], MAX_JSON_BYTES).decode("utf-8")
                except UnicodeDecodeError as err:
                    raise RowProblem("bad field", f"{key}.txt is not UTF-8 ({err})") from None
            else:
                text = extra.pop("text", None)
            text = check_prompt(text, self.allow_empty_prompts, f"{key}.txt")
            chosen = {"file_name": target, "conditioning_file_name": condition, "mask_file_name": mask}
            names = {field: posixpath.basename(members[e][2]) for field, e in chosen.items() if e}
            if len(set(names.values())) < len(names):
                raise RowProblem("bad field", f"two members of key {key!r} share a file name")
            files = {names[field]: _member(f, members[e], MAX_MEMBER_BYTES)
                     for field, e in chosen.items() if e and with_bytes}
        row = Row(line=number, file_name=names["file_name"], text=text,
                  conditioning_file_name=names.get("conditioning_file_name"),
                  mask_file_name=names.get("mask_file_name"), extra=extra)
        return row, files, {field: f"{tar_name}/{members[e][2]}" for field, e in chosen.items() if e}


def _member(f, entry: tuple[int, int, str], limit: int) -> bytes:
    offset, size, name = entry
    if size > limit:
        raise RowProblem("too large", f"{name} has {size} bytes (at most {limit})")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise RowProblem("unreadable image", f"{name} is cut short in its tar")
    return data


def _json_object(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise RowProblem("malformed JSON", f"{where}: {err}") from None
    if not isinstance(value, dict):
        raise RowProblem("malformed JSON", f"{where}: expected an object, got {type(value).__name__}")
    return value

