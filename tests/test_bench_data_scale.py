"""bench/data_scale.py end to end at 300 rows: the real cache files it reports on, and its tables.

A format and consistency check of the bench (its timings are not asserted): the cache it counts is the one
on disk, both inputs give the same number of rows, and the two-process build covers every row once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_small_run_reports_the_files_it_wrote(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "bench" / "data_scale.py"), "--sizes", "300", "--two_process_size",
                    "300", "--repeats", "1", "--data_root", str(data), "--output_dir", str(out)],
                   check=True, timeout=600, capture_output=True, text=True)
    results = json.loads((out / "data_scale.json").read_text())
    size = results["sizes"][0]
    assert size["rows"] == 300
    for fmt in ("metadata.jsonl", "webdataset"):
        cold, warm = size[fmt]["cold"], size[fmt]["warm"]
        assert (cold["rows"], cold["reused"], cold["opened"]) == (300, 0, 300)
        assert (warm["rows"], warm["reused"], warm["opened"]) == (300, 300, 0)  # a launch on a built cache
    run = results["pairs"][0]["runs"][0]
    assert sorted(run["two_opened"]) == [150, 150]  # each process opened its half of the rows
    assert run["speedup"] == run["one_seconds"] / run["two_seconds"]
    for fmt in ("metadata.jsonl", "webdataset"):
        files = [p for p in (data / f"cache-{fmt}-300").rglob("*") if p.is_file()]
        assert {p.suffix for p in files} <= {".safetensors", ".json"}
        disk = size[fmt]["disk"]
        assert disk["files"] == len(files)
        assert sum(disk["bytes"].values()) == sum(p.stat().st_size for p in files)
    table = (out / "data_scale.md").read_text()
    assert "| 300 | metadata.jsonl |" in table and "| 300 | webdataset |" in table and "1 process" in table
