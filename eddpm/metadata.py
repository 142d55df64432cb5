"""The dataset's `metadata.jsonl`: rows, their checks, skipped lines, and mirrored copies.

Format (data/README.md has the long version): `data_dir/metadata.jsonl`, one JSON object per line with
- `file_name`: the target image (what the model learns to produce), relative to `data_dir`;
- `text`: the prompt. A missing key or an empty string skips the row unless `allow_empty_prompts=True`,
  which reads both as "" (the model then learns from the condition alone, like caption dropout);
- `conditioning_file_name` (optional): the same subject under other light, pixel-aligned with the target.
  Rows without it are "unpaired": the condition is the target's own foreground, optionally with its
  appearance degraded (eddpm/examples.py, `degrade_shading`) so that the model must relight rather than copy;
- `mask_file_name` (optional): a grayscale matte (white = foreground) of the condition image
  (of the target for unpaired rows);
- any other keys (e.g. `light_direction`, `shape`) are kept in `Row.extra` for evaluation.

Bad rows (malformed JSON, missing fields or files, and, found later by eddpm/cache.py, undecodable,
truncated or too small images, ...) are skipped with one warning line `metadata.jsonl:LINE: FILE: KIND:
DETAIL`, and a summary is printed; `strict=True` raises `DatasetError` with that same line at the first
problem instead.

The file may come from someone else, so reading it is bounded: it is streamed line by line (JSON Lines:
lines end with "\n"), a line longer than MAX_LINE_BYTES or nested deeper than MAX_JSON_DEPTH is a skipped
row (checked before `json.loads`), only the first MAX_WARNINGS skips are printed (the summary counts all),
and every file field must resolve inside the dataset folder, symlinks followed (`dataset_path`), unless
`allow_outside_paths=True`. The message for a path outside is the same whether that file exists or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
FILE_FIELDS = ("file_name", "conditioning_file_name", "mask_file_name")
MAX_LINE_BYTES = 1 << 20  # a metadata line holds a few file names and a prompt: 1 MiB is far beyond any real one
MAX_JSON_DEPTH = 64  # nesting of [ and { in one line; json.loads recurses once per level
MAX_WARNINGS = 20  # skips printed one per line; the rest are only counted in the summary
MAX_KEPT_SKIPS = 1000  # read_metadata keeps this many Skip records; further bad lines are only counted
MAX_NAME_CHARS = 200  # file names in messages are cut to this length


class DatasetError(ValueError):
    """A problem with the dataset: raised at the first bad row with `strict=True`, or when none is usable."""


class MissingMetadataError(DatasetError, FileNotFoundError):
    """The dataset folder has no readable metadata.jsonl (a DatasetError and a FileNotFoundError)."""


class RowProblem(Exception):
    """One reason to skip a row: a short `kind` (summarised) and a `detail` (logged)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Row:
    """One usable line of metadata.jsonl (file names relative to the data folder)."""

    line: int  # 1-based line number in metadata.jsonl
    file_name: str
    text: str
    conditioning_file_name: str | None = None
    mask_file_name: str | None = None
    flipped: bool = False  # a mirrored copy made by flip_row (text has left/right swapped)
    extra: dict = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.conditioning_file_name is not None


@dataclass(frozen=True)
class Skip:
    """A skipped line and why."""

    line: int
    file_name: str
    kind: str
    detail: str


class SkipReport:
    """Collects skips: a warning each (the first `max_warnings`), or a DatasetError at the first when strict.

    `skips` holds every skip reported through `skip` (rows that eddpm/cache.py rejects; their number is
    bounded by the usable rows) and the first MAX_KEPT_SKIPS lines that read_metadata rejects; `counts` and
    `total` count all of them, so a file of garbage costs a bounded amount of memory and output.
    """

    def __init__(self, metadata_path: str, strict: bool, max_warnings: int = MAX_WARNINGS):
        self.metadata_path, self.strict, self.max_warnings = metadata_path, strict, max_warnings
        self.skips: list[Skip] = []
        self.counts: Counter = Counter()  # kind -> skipped lines
        self.total = 0
        self._lines: set[int] = set()  # lines of rows reported through `skip`

    def skip(self, line: int, file_name: str, problem: Exception) -> None:
        """Record `problem` (a RowProblem or an images.ImageError: anything with `kind` and `detail`)."""
        if line in self._lines:  # a row is reported once even if several of its copies fail
            return
        self._record(line, file_name, problem, keep=True)
        self._lines.add(line)

    def skip_line(self, line: int, file_name: str, problem: Exception) -> None:
        """Record a line that never became a row (each line is reported once): kept while few."""
        self._record(line, file_name, problem, keep=len(self.skips) < MAX_KEPT_SKIPS)

    def _record(self, line: int, file_name: str, problem: Exception, keep: bool) -> None:
        message = f"{self.metadata_path}:{line}: {printable(file_name)}: {problem.kind}: {problem.detail}"
        if self.strict:
            raise DatasetError(message)
        if self.total < self.max_warnings:
            logger.warning(message)
        elif self.total == self.max_warnings:
            logger.warning(f"{self.metadata_path}: more lines skipped; the summary counts them")
        self.total += 1
        self.counts[problem.kind] += 1
        if keep:
            self.skips.append(Skip(line, file_name, problem.kind, problem.detail))

    def summary(self, usable: int) -> str:
        reasons = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        hidden = max(0, self.total - self.max_warnings)
        return (f"{self.metadata_path}: {usable} rows usable, {self.total} skipped"
                + (f" ({reasons})" if reasons else "")
                + (f"; {hidden} of the skips were not printed" if hidden else ""))


def read_metadata(
    data_dir: str,
    *,
    allow_empty_prompts: bool = False,
    allow_outside_paths: bool = False,
    strict: bool = False,
    report: SkipReport | None = None,
) -> tuple[list[Row], list[Skip]]:
    """Parse and check `data_dir/metadata.jsonl` (fields, referenced files, duplicates); decode no image.

    Blank lines are ignored. A duplicate is a line with the same file_name, conditioning_file_name,
    mask_file_name and text as an earlier one. Image-level checks happen in eddpm/cache.py. Skips go to
    `report` when given (then `strict` is the report's), else to a new one. A missing or unreadable
    metadata.jsonl raises MissingMetadataError; memory stays bounded by the usable rows (see the module
    docstring).
    """
    report = report or SkipReport(os.path.join(data_dir, METADATA_FILE), strict)
    rows: list[Row] = []
    seen: dict[tuple, int] = {}
    for line_no, _, result, name in scan_metadata(
        data_dir, allow_empty_prompts=allow_empty_prompts, allow_outside_paths=allow_outside_paths
    ):
        if isinstance(result, RowProblem):
            report.skip_line(line_no, name, result)
            continue
        identity = (result.file_name, result.conditioning_file_name, result.mask_file_name, result.text)
        if identity in seen:
            report.skip_line(line_no, name, RowProblem("duplicate", f"same as line {seen[identity]}"))
            continue
        seen[identity] = line_no
        rows.append(result)
    return rows, report.skips


def scan_metadata(data_dir: str, *, allow_empty_prompts: bool = False, allow_outside_paths: bool = False,
                  select=None):
    """Stream metadata.jsonl for eddpm/sources.py: (line, byte offset, Row or RowProblem, file name) per
    non-blank line that `select(line)` keeps (all by default), with read_metadata's checks except the
    duplicate one (the caller finds duplicates over all its processes). No row is kept in memory."""
    real_dirs: dict[str, str] = {}  # folder -> its realpath, for this scan's containment checks
    with _open_metadata(data_dir, allow_outside_paths) as f:
        end = 0
        for line_no, raw, complete in _read_lines(f, MAX_LINE_BYTES):
            start, end = end, f.tell()
            if select is not None and not select(line_no):
                continue
            try:
                if not complete:
                    raise RowProblem("line too long", f"longer than {MAX_LINE_BYTES} bytes")
                row = _parse_line(raw, line_no, data_dir, allow_empty_prompts, allow_outside_paths, real_dirs)
            except RowProblem as problem:
                yield line_no, start, problem, _guess_file_name(raw)
                continue
            if row is not None:
                yield line_no, start, row, row.file_name


def _open_metadata(data_dir: str, allow_outside_paths: bool):
    """data_dir/metadata.jsonl opened in binary; MissingMetadataError when absent or unreadable, DatasetError
    when it is a link leading out of the folder (unless `allow_outside_paths`)."""
    path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise MissingMetadataError(f"{path} not found: a dataset folder needs a {METADATA_FILE} (see data/README.md)")
    if not allow_outside_paths and not _inside(data_dir, path):
        raise DatasetError(f"{path} is a link to a file outside the dataset folder; copy the file into "
                           "the folder (or pass allow_outside_paths / --allow_outside_paths)")
    try:
        return open(path, "rb")
    except OSError as err:
        raise MissingMetadataError(f"{path} cannot be read ({err.strerror}); check its permissions") from None


def read_row_at(data_dir: str, offset: int, line_no: int, *, allow_empty_prompts: bool = False,
                allow_outside_paths: bool = False) -> Row:
    """The Row of the line at byte `offset` of metadata.jsonl (from scan_metadata); RowProblem if it is
    no longer a usable line."""
    with open(os.path.join(data_dir, METADATA_FILE), "rb") as f:
        f.seek(offset)
        raw = f.readline(MAX_LINE_BYTES + 1)
    row = _parse_line(raw, line_no, data_dir, allow_empty_prompts, allow_outside_paths) if raw.endswith(b"\n") or (
        len(raw) <= MAX_LINE_BYTES) else None
    if row is None:
        raise RowProblem("changed", f"line {line_no} of {METADATA_FILE} is no longer a row (the file changed)")
    return row


def _read_lines(f, max_bytes: int):
    """Yield (line number from 1, bytes, complete) per line of a binary file, holding at most
    `max_bytes` + 1 bytes of a line: a longer line yields its first bytes with complete=False, the rest is
    read and dropped."""
    line_no = 0
    while raw := f.readline(max_bytes + 1):
        line_no += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield line_no, raw, False
        else:
            yield line_no, raw, True


def json_nesting_depth(line: bytes) -> int:
    """The deepest nesting of [ and { outside JSON strings (escaped quotes respected), O(len) in numpy.

    A quote opens or closes a string unless an odd run of backslashes precedes it; brackets inside
    strings do not count. For malformed JSON the value is an estimate (only used to refuse early).
    """
    b = np.frombuffer(line, dtype=np.uint8)
    backslash = b == ord("\\")
    total = np.cumsum(backslash)
    run = total - np.maximum.accumulate(np.where(backslash, 0, total))  # backslashes ending at each byte
    escaped = np.zeros(len(b), dtype=bool)
    escaped[1:] = run[:-1] % 2 == 1
    in_string = np.cumsum((b == ord('"')) & ~escaped) % 2 == 1
    opens = np.isin(b, (ord("["), ord("{"))) & ~in_string
    closes = np.isin(b, (ord("]"), ord("}"))) & ~in_string
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def _parse_line(
    raw: bytes, line_no: int, data_dir: str, allow_empty_prompts: bool, allow_outside_paths: bool,
    real_dirs: dict | None = None,
) -> Row | None:
    """The Row of one line (None for a blank one); RowProblem for anything that makes it unusable."""
    obj = _decode_object(raw, line_no)
    if obj is None:
        return None
    names = {}
    for key in FILE_FIELDS:
        value = obj.get(key)
        if value is None and key != "file_name":
            continue
        if not isinstance(value, str) or not value.strip():
            raise RowProblem(
                "missing file_name" if key == "file_name" else "bad field",
                f"{key!r} must be a non-empty string",
            )
        names[key] = value
    text = obj.get("text")
    if text is None and not allow_empty_prompts:
        raise RowProblem("missing prompt", "no 'text' (pass allow_empty_prompts=True to train on it with '')")
    if text is not None and not isinstance(text, str):
        raise RowProblem("bad field", f"'text' must be a string, got {type(text).__name__}")
    text = (text or "").strip()
    if not text and not allow_empty_prompts:
        raise RowProblem("empty prompt", "'text' is empty (pass allow_empty_prompts=True to keep it)")
    for key, name in names.items():  # containment first: nothing outside is even looked at
        path = dataset_path(data_dir, name, key, allow_outside_paths=allow_outside_paths, real_dirs=real_dirs)
        if not os.path.isfile(path):
            raise RowProblem("missing file", f"{key} {quoted(name)} not found")
    extra = {k: v for k, v in obj.items() if k not in (*FILE_FIELDS, "text")}
    return Row(
        line=line_no,
        file_name=names["file_name"],
        text=text,
        conditioning_file_name=names.get("conditioning_file_name"),
        mask_file_name=names.get("mask_file_name"),
        extra=extra,
    )


def _decode_object(raw: bytes, line_no: int) -> dict | None:
    """The JSON object of a line, None for a blank line; RowProblem("malformed JSON") otherwise, including a
    nesting deeper than MAX_JSON_DEPTH (found before json.loads, which recurses once per level)."""
    try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").strip()
    except UnicodeDecodeError as e:
        raise RowProblem("malformed JSON", f"not UTF-8 ({e})") from None
    if not line:
        return None
    # brackets bound the depth from above, so the exact scan runs only on lines with many of them
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and (depth := json_nesting_depth(raw)) > MAX_JSON_DEPTH:
        raise RowProblem("malformed JSON", f"nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowProblem("malformed JSON", str(e)) from None
    except RecursionError:  # cannot happen after the depth check; a bad row all the same
        raise RowProblem("malformed JSON", "nested too deeply") from None
    if not isinstance(obj, dict):
        raise RowProblem("malformed JSON", f"expected an object, got {type(obj).__name__}")
    return obj


def _guess_file_name(raw: bytes) -> str:
    match = re.search(rb'"file_name"\s*:\s*"([^"]{0,%d})' % MAX_NAME_CHARS, raw)
    return match.group(1).decode("utf-8", "replace") if match else "<unknown>"


def printable(name: str) -> str:
    """A file name for a one-line message: as is when short and printable, else its repr, cut short."""
    if len(name) <= MAX_NAME_CHARS and name.isprintable():
        return name
    return quoted(name)


def quoted(name: str) -> str:
    """repr(name) for a message, cut to MAX_NAME_CHARS characters."""
    return repr(name[:MAX_NAME_CHARS]) + ("..." if len(name) > MAX_NAME_CHARS else "")


def _inside(data_dir: str, path: str, real_dirs: dict | None = None) -> bool:
    if real_dirs is None:
        root = os.path.realpath(data_dir)
        return os.path.commonpath([root, os.path.realpath(path)]) == root
    # the same answer with each folder's realpath computed once per scan (scan_metadata): realpath(folder/name)
    # is realpath(folder)/name unless name itself is a link
    root = real_dirs.get(data_dir) or real_dirs.setdefault(data_dir, os.path.realpath(data_dir).rstrip(os.sep))
    folder, _, name = path.rpartition(os.sep)
    if not folder or name in ("", ".", "..") or os.path.islink(path):
        real = os.path.realpath(path)
    else:
        real = (real_dirs.get(folder) or real_dirs.setdefault(folder, os.path.realpath(folder).rstrip(os.sep))
                ) + os.sep + name
    return real == root or real.startswith(root + os.sep)


def dataset_path(data_dir: str, name: str, key: str = "file_name", *, allow_outside_paths: bool = False,
                 real_dirs: dict | None = None) -> str:
    """`data_dir/name`, after checking that it resolves inside `data_dir` (symlinks followed).

    Raises RowProblem("outside the dataset folder") for `../x`, an absolute path elsewhere, or a
    symlink leading out, unless `allow_outside_paths`; the message depends only on the name, never on
    whether the file outside exists. `key` names the field in the message. `real_dirs` (a dict kept for
    one scan) remembers each folder's realpath, so that only the file itself is looked up again.
    """
    if "\0" in name:
        raise RowProblem("bad field", f"{key} contains a NUL character")
    path = os.path.join(data_dir, name)
    if not allow_outside_paths and not _inside(data_dir, path, real_dirs):
        raise RowProblem(
            "outside the dataset folder",
            f"{key} {quoted(name)} leads out of it (file names are relative to the dataset folder; "
            "--allow_outside_paths reads such files)",
        )
    return path


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hex): the identity of a dataset file in cache keys and degradation seeds."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap the words "left" and "right" (whole words, keeping UPPER/Capitalised/lower case)."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, text)


def flip_row(row: Row) -> Row:
    """The mirrored copy of a row: left/right swapped in its prompt and its `light_direction`."""
    extra = dict(row.extra)
    if isinstance(extra.get("light_direction"), str):
        extra["light_direction"] = swap_left_right(extra["light_direction"])
    return replace(row, text=swap_left_right(row.text), flipped=not row.flipped, extra=extra)
