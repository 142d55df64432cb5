"""metadata.jsonl: parsing, line-numbered skips, strict mode, left/right swaps of mirrored rows, and the bounds
on a downloaded dataset (paths stay in its folder, bounded lines, memory and output)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dataset_files import GOOD, GOOD_FILES, METADATA_FILE, disc_rgba, write_dataset
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from eddpm.metadata import (
    MAX_KEPT_SKIPS,
    MAX_LINE_BYTES,
    MAX_WARNINGS,
    DatasetError,
    MissingMetadataError,
    Row,
    RowProblem,
    SkipReport,
    flip_row,
    json_nesting_depth,
    read_metadata,
    swap_left_right,
)

REPO = Path(__file__).resolve().parents[1]

# (case, metadata line, expected kind, file name named in the message): problems found without decoding.
LINE_CASES = [
    ("missing file", {"file_name": "absent.png", "text": "t"}, "missing file", "absent.png"),
    (
        "missing condition file",
        {"file_name": "good.png", "conditioning_file_name": "absent.png", "text": "t"},
        "missing file",
        "good.png",
    ),
    ("mask a number", {"file_name": "good.png", "mask_file_name": 3, "text": "t"}, "bad field", "good.png"),
    ("malformed JSON", '{"file_name": "good.png", "text": "oops"', "malformed JSON", "good.png"),
    ("JSON that is not an object", '["good.png", "text"]', "malformed JSON", "<unknown>"),
    ("not UTF-8", b'{"file_name": "good.png", "text": "\xff"}', "malformed JSON", "good.png"),
    ("no file_name", {"text": "t"}, "missing file_name", "<unknown>"),
    ("missing text", {"file_name": "good.png"}, "missing prompt", "good.png"),
    ("text not a string", {"file_name": "good.png", "text": 5}, "bad field", "good.png"),
    ("empty text", {"file_name": "good.png", "text": "   "}, "empty prompt", "good.png"),
    ("duplicate line", GOOD, "duplicate", "good.png"),
]


def _write_lines(folder, lines) -> None:
    """metadata.jsonl from dicts (JSON), str or raw bytes lines."""
    raw = [line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
           for line in lines]
    (folder / METADATA_FILE).write_bytes(b"\n".join(raw) + b"\n")


def test_each_bad_line_is_skipped_with_its_line_number_and_reason(tmp_path, caplog):
    folder = write_dataset(tmp_path / "set", [], GOOD_FILES)
    _write_lines(folder, [GOOD] + [line for _, line, _, _ in LINE_CASES])
    with caplog.at_level(logging.WARNING, logger="eddpm.metadata"):
        rows, skips = read_metadata(str(folder))
    assert [row.line for row in rows] == [1]
    assert [(s.line, s.kind, s.file_name) for s in skips] == [
        (line_no, kind, name) for line_no, (_, _, kind, name) in enumerate(LINE_CASES, start=2)
    ]
    for line_no, (case, _, kind, name) in enumerate(LINE_CASES, start=2):
        expected = f"metadata.jsonl:{line_no}: {name}: {kind}: "
        found = sum(expected in message for message in caplog.messages)
        assert found == 1, f"{case}: {found} log lines {expected!r}"


@pytest.mark.parametrize("case", LINE_CASES, ids=[c[0] for c in LINE_CASES])
def test_strict_raises_at_the_bad_line(tmp_path, case):
    _, line, kind, name = case
    folder = write_dataset(tmp_path / "set", [], GOOD_FILES)
    _write_lines(folder, [GOOD, line])
    with pytest.raises(DatasetError, match=f"metadata.jsonl:2: {name}: {kind}"):
        read_metadata(str(folder), strict=True)


def test_missing_metadata_file_says_what_is_needed(tmp_path):
    with pytest.raises(MissingMetadataError, match="metadata.jsonl not found: a dataset folder needs") as err:
        read_metadata(str(tmp_path))
    assert isinstance(err.value, DatasetError) and isinstance(err.value, FileNotFoundError)


def test_read_metadata_keeps_extra_fields_and_ignores_blank_lines(tmp_path):
    line = {**GOOD, "light_direction": "left", "shape": "disc"}
    folder = write_dataset(tmp_path, ["", json.dumps(line), "   "], GOOD_FILES)
    (folder / METADATA_FILE).write_bytes(b"\xef\xbb\xbf" + (folder / METADATA_FILE).read_bytes())  # a BOM
    rows, skips = read_metadata(str(folder))
    assert skips == []
    assert [(r.line, r.file_name, r.text, r.extra, r.paired) for r in rows] == [
        (2, "good.png", GOOD["text"], {"light_direction": "left", "shape": "disc"}, False)
    ]


def test_allow_empty_prompts_reads_missing_and_empty_text_as_empty(tmp_path):
    lines = [{"file_name": "good.png"}, {"file_name": "good.png", "text": ""}]
    folder = write_dataset(tmp_path, lines, GOOD_FILES)
    rows, skips = read_metadata(str(folder), allow_empty_prompts=True)
    assert [r.text for r in rows] == [""]
    assert [(s.line, s.kind) for s in skips] == [(2, "duplicate")]  # both read as the same (file, "") row


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("warm light from the left", "warm light from the right"),
        ("Left light, RIGHT shadow", "Right light, LEFT shadow"),
        ("left-right gradient", "right-left gradient"),
        ("leftover bright rightly", "leftover bright rightly"),
        ("", ""),
    ],
)
def test_swap_left_right(text, expected):
    assert swap_left_right(text) == expected


@given(st.lists(st.sampled_from(["left", "right", "Left", "RIGHT", "lefty", "bright", "top", ",", "light"])))
def test_swap_left_right_is_an_involution(words):
    text = " ".join(words)
    assert swap_left_right(swap_left_right(text)) == text


def test_flip_row_swaps_prompt_and_light_direction_and_marks_the_copy():
    extra = {"light_direction": "left", "n": 1}
    row = Row(line=3, file_name="a.png", text="light from the Left", extra=extra)
    flipped = flip_row(row)
    assert (flipped.text, flipped.flipped) == ("light from the Right", True)
    assert flipped.extra == {"light_direction": "right", "n": 1}
    assert (flipped.line, flipped.file_name) == (3, "a.png") and row.extra["light_direction"] == "left"
    assert flip_row(flipped) == row


# --- what a downloaded dataset may not do: leave its folder, cost unbounded memory or output -------------

OUTSIDE = "outside the dataset folder"


def _outside_setup(tmp_path):
    """A dataset folder `set/` next to `outside/secret.png`; links inside `set/` pointing out and in."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"not even an image")
    folder = write_dataset(tmp_path / "set", [], GOOD_FILES)
    (folder / "link_out.png").symlink_to(outside / "secret.png")
    (folder / "dangling_out.png").symlink_to(outside / "absent.png")
    (folder / "dir_out").symlink_to(outside, target_is_directory=True)
    (folder / "link_in.png").symlink_to(folder / "good.png")
    return folder, outside


def _name_free(detail: str, name: str) -> str:
    return detail.replace(name, "NAME")


def test_paths_leading_out_of_the_folder_are_skipped_the_same_whether_or_not_the_file_exists(tmp_path, caplog):
    folder, outside = _outside_setup(tmp_path)
    pairs = [  # (existing outside file, absent outside file), reached the same way
        ("../outside/secret.png", "../outside/absent.png"),
        (str(outside / "secret.png"), str(outside / "absent.png")),
        ("link_out.png", "dangling_out.png"),
        ("dir_out/secret.png", "dir_out/absent.png"),
        ("sub/../../outside/secret.png", "sub/../../outside/absent.png"),
    ]
    lines = [{"file_name": name, "text": "t"} for pair in pairs for name in pair]
    lines += [{"file_name": "good.png", "conditioning_file_name": "../outside/secret.png", "text": "paired"},
              {"file_name": "good.png", "mask_file_name": "link_out.png", "text": "masked"},
              {"file_name": "link_in.png", "text": "a link inside the folder is fine"}]
    _write_lines(folder, lines)
    with caplog.at_level(logging.WARNING, logger="eddpm.metadata"):
        rows, skips = read_metadata(str(folder))
    assert [(r.line, r.file_name) for r in rows] == [(len(lines), "link_in.png")]
    assert [s.kind for s in skips] == [OUTSIDE] * (len(lines) - 1)
    by_line = {s.line: s for s in skips}
    for i, (present, absent) in enumerate(pairs):
        seen_present, seen_absent = by_line[2 * i + 1].detail, by_line[2 * i + 2].detail
        assert present in seen_present and absent in seen_absent
        assert _name_free(seen_present, present) == _name_free(seen_absent, absent), (seen_present, seen_absent)
    assert "conditioning_file_name '../outside/secret.png'" in by_line[len(pairs) * 2 + 1].detail
    assert "mask_file_name 'link_out.png'" in by_line[len(pairs) * 2 + 2].detail
    assert all("--allow_outside_paths" in s.detail and "not found" not in s.detail for s in skips)
    assert f"metadata.jsonl:1: ../outside/secret.png: {OUTSIDE}: " in caplog.messages[0]


def test_strict_stops_at_a_path_outside_and_allow_outside_paths_reads_it(tmp_path):
    folder, outside = _outside_setup(tmp_path)
    _write_lines(folder, [GOOD, {"file_name": "../outside/secret.png", "text": "t"},
                          {"file_name": "link_out.png", "text": "u"}, {"file_name": "dangling_out.png", "text": "v"}])
    with pytest.raises(DatasetError, match=f"metadata.jsonl:2: ../outside/secret.png: {OUTSIDE}"):
        read_metadata(str(folder), strict=True)
    rows, skips = read_metadata(str(folder), allow_outside_paths=True)
    assert [r.file_name for r in rows] == ["good.png", "../outside/secret.png", "link_out.png"]
    assert [(s.line, s.kind) for s in skips] == [(4, "missing file")]  # now it may say so


def test_a_linked_dataset_folder_is_inside_itself_and_a_linked_metadata_file_must_be_too(tmp_path):
    folder, outside = _outside_setup(tmp_path)
    _write_lines(folder, [GOOD, {"file_name": "link_in.png", "text": "t"}])
    alias = tmp_path / "alias"
    alias.symlink_to(folder, target_is_directory=True)
    rows, skips = read_metadata(str(alias))
    assert len(rows) == 2 and skips == []

    elsewhere = write_dataset(tmp_path / "elsewhere", [GOOD], GOOD_FILES)
    linked = write_dataset(tmp_path / "linked", [], GOOD_FILES)
    (linked / METADATA_FILE).unlink()
    (linked / METADATA_FILE).symlink_to(elsewhere / METADATA_FILE)
    with pytest.raises(DatasetError, match="metadata.jsonl is a link to a file outside the dataset folder"):
        read_metadata(str(linked))
    assert len(read_metadata(str(linked), allow_outside_paths=True)[0]) == 1


def test_load_example_checks_again_for_a_link_changed_after_reading(tmp_path):
    """A file swapped for a link leading out between read_metadata and decoding is still refused."""
    from eddpm.examples import load_example

    folder, outside = _outside_setup(tmp_path)
    Image.fromarray(np.full((64, 64, 4), 200, dtype=np.uint8)).save(outside / "secret.png")
    _write_lines(folder, [{"file_name": "swapped.png", "text": "t"}])
    disc_rgba().save(folder / "swapped.png")
    (row,), _ = read_metadata(str(folder))
    (folder / "swapped.png").unlink()
    (folder / "swapped.png").symlink_to(outside / "secret.png")
    with pytest.raises(RowProblem) as problem:
        load_example(row, str(folder), (64, 64))
    assert problem.value.kind == OUTSIDE
    example = load_example(row, str(folder), (64, 64), allow_outside_paths=True)
    assert (example.target == 200).all()


def test_nul_in_a_file_name_is_a_bad_field(tmp_path):
    folder = write_dataset(tmp_path, [], GOOD_FILES)
    _write_lines(folder, [{"file_name": "good.png\u0000x", "text": "t"}])
    _, skips = read_metadata(str(folder))
    assert [(s.kind, s.detail) for s in skips] == [("bad field", "file_name contains a NUL character")]


def _depth_of(value) -> int:
    """Reference: the nesting depth of a parsed JSON value, by recursion over the Python objects."""
    if isinstance(value, list):
        return 1 + max((_depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth_of(v) for v in value.values()), default=0)
    return 0


_TRICKY_TEXT = st.text(alphabet='[]{}"\\ab\n\u00e9', max_size=8)
_JSON = st.recursive(
    st.none() | st.integers() | _TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY_TEXT, inner, max_size=3),
    max_leaves=30,
)


@given(_JSON, st.booleans())
def test_json_nesting_depth_matches_the_parsed_value(value, ascii_only):
    line = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_nesting_depth(line) == _depth_of(value), line


def test_deep_nesting_and_long_lines_are_skipped_rows_naming_their_line(tmp_path, caplog):
    folder = write_dataset(tmp_path, [], GOOD_FILES)
    deep_string = {**GOOD, "text": "[" * 100_000}  # brackets inside a string do not nest
    _write_lines(folder, [
        GOOD,
        b"[" * 100_000,
        b'{"file_name": "good.png", "text": "t", "x": ' + b"[" * 64 + b"]" * 64 + b"}",  # 65 with the object
        b'{"file_name": "good.png", "text": "u", "x": ' + b"[" * 63 + b"]" * 63 + b"}",  # at the limit
        b'{"file_name": "good.png", "text": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}',
        deep_string,
    ])
    with caplog.at_level(logging.WARNING, logger="eddpm.metadata"):
        rows, skips = read_metadata(str(folder))
    assert [r.line for r in rows] == [1, 4, 6]
    assert [(s.line, s.kind, s.file_name) for s in skips] == [
        (2, "malformed JSON", "<unknown>"), (3, "malformed JSON", "good.png"), (5, "line too long", "good.png")]
    assert "nested 100000 levels deep" in skips[0].detail and "nested 65 levels deep" in skips[1].detail
    assert all(len(message) < 500 for message in caplog.messages)


def test_warnings_are_capped_and_the_summary_counts_every_skip(tmp_path, caplog):
    folder = write_dataset(tmp_path, [], GOOD_FILES)
    _write_lines(folder, [GOOD] + ["garbage"] * 3000 + [{"file_name": "absent.png", "text": "t"}] * 2)
    report = SkipReport(str(folder / METADATA_FILE), strict=False)
    with caplog.at_level(logging.WARNING, logger="eddpm.metadata"):
        rows, skips = read_metadata(str(folder), report=report)
    assert len(rows) == 1 and len(skips) == MAX_KEPT_SKIPS
    assert len(caplog.messages) == MAX_WARNINGS + 1 and "summary counts them" in caplog.messages[-1]
    assert report.summary(1) == (f"{folder / METADATA_FILE}: 1 rows usable, 3002 skipped (malformed JSON: 3000, "
                                 f"missing file: 2); {3002 - MAX_WARNINGS} of the skips were not printed")


def _garbage(path, megabytes: float) -> int:
    """Random bytes, bad JSON, deep brackets, over-long lines and rows naming absent files; returns lines."""
    rng = np.random.default_rng(0)
    lines, size = 0, 0
    with open(path, "wb") as fh:
        while size < megabytes * 2**20:
            kind = lines % 6
            if kind == 0:
                line = rng.integers(0, 256, int(rng.integers(10, 200)), dtype=np.uint8).tobytes().replace(b"\n", b"")
            elif kind == 1:
                line = json.dumps({"file_name": f"absent_{lines}.png", "text": "x"}).encode()
            elif kind == 2:
                line = b'{"file_name": "a.png", "text": ' + b"[" * 5000
            elif kind == 3:
                line = b"[" * 100_000 if lines % 600 == 3 else b"not json " * 5
            elif kind == 4:
                line = b'{"x": "' + b"y" * (2 * MAX_LINE_BYTES) + b'"}' if lines % 3000 == 4 else b"[1, 2]"
            else:
                line = b'{"file_name": "../../etc/passwd", "text": "t"}'
            fh.write(line + b"\n")
            size, lines = size + len(line) + 1, lines + 1
    return lines


def test_a_file_of_garbage_costs_bounded_memory_and_output(tmp_path):
    """Probe of issue 13: a garbage metadata.jsonl of 200 MB took 1.2 GB and printed 1.6 million lines. This one
    (8 MB) must add under 40 MB to the process and print MAX_WARNINGS + 1 warning lines, in a fresh process."""
    folder = tmp_path / "garbage"
    folder.mkdir()
    lines = _garbage(folder / METADATA_FILE, 8)
    script = (
        "import logging, resource, sys\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='%(message)s')\n"
        "from eddpm.metadata import SkipReport, read_metadata\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"report = SkipReport({str(folder / METADATA_FILE)!r}, False)\n"
        f"rows, _ = read_metadata({str(folder)!r}, report=report)\n"
        "print(report.summary(len(rows)))\n"
        "print('GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    growth_mb = int(out[-1].split()[1]) / 1024
    assert growth_mb < 40, f"reading {lines} lines of garbage grew the process by {growth_mb:.0f} MB"
    assert len(out) == MAX_WARNINGS + 3, out[:3]  # the warnings, "more lines skipped", the summary, the growth
    assert f"0 rows usable, {lines} skipped" in out[-2], out[-2]
