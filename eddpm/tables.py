"""A Hugging Face `datasets` dataset on disk as a source of rows for the latent cache (eddpm/sources.py).

`--dataset_name` names a `save_to_disk` folder (read with datasets.load_from_disk; a DatasetDict gives
its "train" split) or parquet files (one file, a folder of them, or a glob), read in place with pyarrow,
one row group at a time. The columns are named as in diffusers' training examples (data/README.md,
"Inputs").
"""

from __future__ import annotations

import glob
import os
import re

from eddpm import metadata
from eddpm.metadata import DatasetError, Row, RowProblem, dataset_path
from eddpm.sources import MAX_MEMBER_BYTES, ContainerSource, check_prompt, file_stat


class TableSource(ContainerSource):
    """A Hugging Face `datasets` dataset on disk: a `save_to_disk` folder (datasets.load_from_disk, the
    "train" split of a DatasetDict) or parquet files (one, a folder of them, or a glob), read in place
    with pyarrow. Columns as in diffusers' training examples: `image_column` the target,
    `conditioning_image_column` the condition (optional), `caption_column` the prompt, `mask_column` a mask
    (optional). An image cell is a datasets Image ({"bytes", "path"}), raw bytes, or a path relative to the
    dataset folder; other scalar columns become Row.extra."""

    def __init__(self, path: str, *, image_column: str = "image", conditioning_image_column: str | None = None,
                 caption_column: str = "text", mask_column: str | None = None, allow_empty_prompts: bool = False,
                 allow_outside_paths: bool = False):
        self.path, self.caption_column = path, caption_column
        self.image_columns = {"file_name": image_column, "conditioning_file_name": conditioning_image_column,
                              "mask_file_name": mask_column}
        self.allow_empty_prompts, self.allow_outside_paths = allow_empty_prompts, allow_outside_paths
        self.saved = os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))
        self.root = path if os.path.isdir(path) else os.path.dirname(path.split("*")[0]) or "."
        self.location = path
        self.containers: list = []
        self._tables: dict[int, object] = {}
        self._group: tuple = (None, -1, None)  # (container, first row, pyarrow table) of the last row group read

    def identity(self) -> dict:
        return {"kind": "datasets", "path": os.path.abspath(self.path), "columns": self.image_columns,
                "caption_column": self.caption_column, "allow_empty_prompts": self.allow_empty_prompts,
                "allow_outside_paths": self.allow_outside_paths}

    def container_paths(self) -> list[str]:
        if self.saved:
            return [self.path]
        if os.path.isdir(self.path):
            paths = sorted(glob.glob(os.path.join(glob.escape(self.path), "**", "*.parquet"), recursive=True))
        else:
            paths = sorted(glob.glob(self.path))
        if not paths:
            raise DatasetError(f"{self.path}: neither a datasets save_to_disk folder nor parquet files")
        return paths

    def stat(self, path: str) -> tuple[int, int]:
        if not os.path.isdir(path):
            return file_stat(path)
        stats = [file_stat(os.path.join(folder, f)) for folder, _, files in os.walk(path) for f in files]
        return sum(s[0] for s in stats), max((s[1] for s in stats), default=0)

    def count(self, index: int) -> int:
        return len(self._table(index)) if self.saved else self._table(index).metadata.num_rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": {}, "_group": (None, -1, None)}

    def _table(self, index: int):
        if index not in self._tables:
            path = self._paths[index]
            used = [c for c in (*self.image_columns.values(), self.caption_column) if c]
            if self.saved:
                import datasets

                table = datasets.load_from_disk(path)
                if isinstance(table, datasets.DatasetDict):
                    if "train" not in table:
                        raise DatasetError(f"{path}: a DatasetDict without a 'train' split ({list(table)})")
                    table = table["train"]
                names = table.column_names
            else:
                import pyarrow.parquet as pq

                table = pq.ParquetFile(path)
                names = table.schema_arrow.names
            missing = [c for c in used if c not in names]
            if missing:
                raise DatasetError(f"{path}: no column {missing[0]!r} (columns: {names}); set --image_column, "
                                   "--conditioning_image_column, --caption_column or --mask_column")
            if self.saved:  # every image column as bytes, not decoded (the others are only kept as extras)
                for column, feature in table.features.items():
                    if isinstance(feature, datasets.Image):
                        table = table.cast_column(column, datasets.Image(decode=False))
            self._tables[index] = table
        return self._tables[index]

    def _cells(self, index: int, position: int) -> dict:
        table = self._table(index)
        if self.saved:
            return table[position]
        container, first, group = self._group
        if container != index or not 0 <= position - first < len(group):
            first = 0
            for g in range(table.metadata.num_row_groups):
                rows = table.metadata.row_group(g).num_rows
                if position < first + rows:
                    group = table.read_row_group(g)
                    break
                first += rows
            self._group = (index, first, group)
        return group.slice(position - first, 1).to_pylist()[0]

    def _read(self, number: int, locator: int, with_bytes: bool = True) -> tuple[Row, dict, dict]:
        path, position = self._path(locator)
        cells = self._cells(locator >> 32, position)
        where = f"{os.path.basename(path)}[{position}]"
        text = check_prompt(cells.get(self.caption_column), self.allow_empty_prompts,
                            f"column {self.caption_column!r}")
        names, files = {}, {}
        for field, column in self.image_columns.items():
            data = self._image(cells.get(column), column, with_bytes) if column else None
            if data is None:
                if field == "file_name":
                    raise RowProblem("missing file", f"no image in column {column!r}")
                continue
            names[field] = re.sub(r"[^\w.-]", "_", column)
            files[names[field]] = data
        used = {*self.image_columns.values(), self.caption_column}
        extra = {k: v for k, v in cells.items() if k not in used and isinstance(v, (str, int, float, bool))}
        row = Row(line=number, file_name=names["file_name"], text=text,
                  conditioning_file_name=names.get("conditioning_file_name"),
                  mask_file_name=names.get("mask_file_name"), extra=extra)
        shown = {field: f"{where}:{self.image_columns[field]}" for field in names}
        return row, files if with_bytes else {}, shown

    def _image(self, value, column: str, with_bytes: bool) -> bytes | None:
        """The encoded image of a cell (b"" when not with_bytes), None for an empty cell."""
        if value is None:
            return None
        data, path = None, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            path = value
        else:
            raise RowProblem("bad field", f"column {column!r} holds {type(value).__name__}, not an image")
        if data is not None:
            if len(data) > MAX_MEMBER_BYTES:
                raise RowProblem("too large", f"column {column!r} holds {len(data)} bytes")
            return data
        if not path:
            return None
        full = dataset_path(self.root, path, column, allow_outside_paths=self.allow_outside_paths)
        if not os.path.isfile(full):
            raise RowProblem("missing file", f"{column} {metadata.quoted(path)} not found")
        if not with_bytes:
            return b""
        if os.path.getsize(full) > MAX_MEMBER_BYTES:
            raise RowProblem("too large", f"{metadata.quoted(path)} is above {MAX_MEMBER_BYTES} bytes")
        with open(full, "rb") as f:
            return f.read()
