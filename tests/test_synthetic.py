"""The synthetic relighting generator: determinism, coverage, visibly directional light, file formats."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eddpm import synthetic

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "synthetic"


def _luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    synthetic.generate(str(tmp_path / "a"), num_examples=6, resolution=32, seed=3)
    synthetic.generate(str(tmp_path / "b"), num_examples=6, resolution=32, seed=3)
    synthetic.generate(str(tmp_path / "c"), num_examples=6, resolution=32, seed=4)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 6 * 2 + 2  # targets, conditions, metadata.jsonl, generation.json
    assert a == b
    differing = [name for name in a if name.endswith(".png") and a[name] != c[name]]
    assert len(differing) == 12, f"only {differing} differ between seeds 3 and 4"


def test_every_shape_and_direction_pair_appears_in_thirty_examples():
    pairs = set()
    for index in range(30):
        example = synthetic.render_example(seed=0, index=index, resolution=16)
        pairs.add((example.meta["shape"], example.meta["light_direction"]))
    expected = {(s, d) for s in synthetic.SHAPES for d in synthetic.DIRECTIONS}
    assert pairs == expected, f"missing {expected - pairs}"


@pytest.fixture(scope="module")
def rendered():
    """60 examples at 64 px from another seed than the bundled set: every (shape, direction) twice."""
    return [synthetic.render_example(seed=7, index=i, resolution=64) for i in range(60)]


def test_lit_half_of_the_matte_is_brighter(rendered):
    # Independent of light_gradient: the mean brightness of the matte's half facing the light against
    # the opposite half, split at the matte centroid.
    failures = []
    for example in rendered:
        direction = example.meta["light_direction"]
        if direction == "front":
            continue
        alpha = example.condition[..., 3] / 255.0
        luma = _luma(example.target)
        rows, cols = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
        coord = cols if direction in ("left", "right") else rows
        centre = (alpha * coord).sum() / alpha.sum()
        low, high = alpha * (coord < centre), alpha * (coord >= centre)
        mean_low = (luma * low).sum() / low.sum()
        mean_high = (luma * high).sum() / high.sum()
        lit, unlit = (mean_low, mean_high) if direction in ("left", "top") else (mean_high, mean_low)
        if not lit > unlit * 1.1:
            failures.append((example.meta["index"], example.meta["shape"], direction, lit, unlit))
    assert not failures, f"lit side not 10 % brighter: {failures}"


def test_brightness_gradient_classifies_the_direction(rendered):
    truth = [e.meta["light_direction"] for e in rendered]
    guess = [synthetic.estimate_light_direction(e.target, e.condition[..., 3] / 255.0) for e in rendered]
    wrong = [(i, t, g) for i, (t, g) in enumerate(zip(truth, guess)) if t != g]
    assert len(wrong) <= 0.1 * len(rendered), f"misclassified (index, truth, guess): {wrong}"


def test_light_gradient_signs_on_a_hand_made_image():
    # A disc whose brightness grows to the right and upwards: dx > 0 and dy > 0 (y points up).
    size = 41
    rows, cols = np.mgrid[0:size, 0:size]
    alpha = ((rows - 20) ** 2 + (cols - 20) ** 2 <= 15**2).astype(np.float64)
    rgb = np.repeat((20 + 5 * cols + 2 * (size - 1 - rows))[..., None], 3, axis=2)
    dx, dy = synthetic.light_gradient(rgb, alpha)
    assert dx > 0.1 and dy > 0.05, (dx, dy)
    assert synthetic.estimate_light_direction(rgb, alpha) == "right"
    assert synthetic.estimate_light_direction(np.full_like(rgb, 100), alpha) == "front"


def test_condition_is_rgba_on_gray_127_and_matches_the_target_silhouette():
    example = synthetic.render_example(seed=0, index=3, resolution=48)
    assert example.target.shape == (48, 48, 3) and example.target.dtype == np.uint8
    assert example.condition.shape == (48, 48, 4) and example.condition.dtype == np.uint8
    alpha = example.condition[..., 3]
    outside = alpha == 0
    assert outside.any() and (alpha == 255).any()
    assert ((alpha > 0) & (alpha < 255)).any(), "expected anti-aliased edges"
    assert np.all(example.condition[outside, :3] == synthetic.CONDITION_GRAY)
    # The flat condition light is close to uniform: its brightness spread inside the matte is small.
    inside = alpha == 255
    assert _luma(example.condition[..., :3])[inside].std() < 25


def test_metadata_rows_have_the_documented_format(tmp_path):
    rows = synthetic.generate(str(tmp_path), num_examples=5, resolution=24, seed=1)
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    for row in rows:
        assert set(row) >= {"file_name", "conditioning_file_name", "text", "light_direction", "shape"}
        target = Image.open(tmp_path / row["file_name"])
        condition = Image.open(tmp_path / row["conditioning_file_name"])
        assert (target.mode, condition.mode) == ("RGB", "RGBA")
        assert target.size == condition.size == (24, 24)
        pattern = (
            rf"^{row['color']} {row['shape']}, (warm|neutral|cool) light from the {row['light_direction']}$"
        )
        assert re.match(pattern, row["text"]), row["text"]
    arguments = json.loads((tmp_path / "generation.json").read_text())
    assert arguments == {
        "generator": "eddpm.synthetic",
        "generator_version": synthetic.GENERATOR_VERSION,
        "num_examples": 5,
        "resolution": 24,
        "seed": 1,
    }


def test_cli_writes_a_set(tmp_path, capsys):
    synthetic.main(
        ["--output_dir", str(tmp_path), "--num_examples", "2", "--resolution", "16", "--seed", "0"]
    )
    assert "wrote 2 examples" in capsys.readouterr().out
    assert len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 2


def test_bundled_set_is_what_the_generator_makes():
    arguments = json.loads((BUNDLED / "generation.json").read_text())
    assert arguments["generator_version"] == synthetic.GENERATOR_VERSION, "regenerate data/synthetic"
    rows = [json.loads(line) for line in (BUNDLED / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == arguments["num_examples"]
    counts = {d: sum(r["light_direction"] == d for r in rows) for d in synthetic.DIRECTIONS}
    assert len(set(counts.values())) == 1, f"directions not balanced: {counts}"
    size = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert size < 3 * 2**20, f"data/synthetic is {size / 2**20:.1f} MiB"
    for row in rows:
        example = synthetic.render_example(arguments["seed"], row["index"], arguments["resolution"])
        assert row == {
            "file_name": row["file_name"],
            "conditioning_file_name": row["conditioning_file_name"],
            "text": example.text,
            **example.meta,
        }
        # Pixels, not PNG bytes: zlib builds differ between machines. Allow the last-bit differences
        # another CPU's libm could cause on a few edge pixels.
        for name, expected in (
            (row["file_name"], example.target),
            (row["conditioning_file_name"], example.condition),
        ):
            stored = np.asarray(Image.open(BUNDLED / name))
            assert stored.shape == expected.shape
            differ = np.abs(stored.astype(int) - expected.astype(int)) > 1
            assert differ.mean() < 1e-3, f"{name}: {differ.sum()} values differ from a fresh render"


def test_a_scene_relit_from_each_side_keeps_everything_but_the_light():
    default = synthetic.render_example(5, 7, 48)  # index 7: its own light is DIRECTIONS[2] = top
    for direction in synthetic.DIRECTIONS:
        ex = synthetic.render_example(5, 7, 48, direction=direction)
        assert np.array_equal(ex.condition, default.condition), direction
        assert ex.meta["light_direction"] == direction and ex.text.endswith(f"light from the {direction}")
        same = {k: v for k, v in ex.meta.items() if k not in ("light_direction", "light_vector")}
        assert same == {k: v for k, v in default.meta.items() if k not in ("light_direction", "light_vector")}
        alpha = ex.condition[..., 3].astype(np.float64) / 255
        assert synthetic.estimate_light_direction(ex.target, alpha) == direction
    assert np.array_equal(synthetic.render_example(5, 7, 48, direction="top").target, default.target)
    with pytest.raises(ValueError, match="direction must be one of"):
        synthetic.render_example(5, 7, 48, direction="above")


def test_all_directions_writes_five_rows_per_scene_sharing_one_condition(tmp_path):
    rows = synthetic.generate(str(tmp_path), num_examples=2, resolution=24, seed=1, all_directions=True)
    assert [(r["index"], r["light_direction"]) for r in rows] == [
        (i, d) for i in range(2) for d in synthetic.DIRECTIONS]
    assert {r["conditioning_file_name"] for r in rows} == {"condition/00000.png", "condition/00001.png"}
    assert len({r["file_name"] for r in rows}) == 10
    assert sorted(p.name for p in (tmp_path / "condition").iterdir()) == ["00000.png", "00001.png"]
    assert json.loads((tmp_path / "generation.json").read_text())["all_directions"] is True
    for row in rows:
        expected = synthetic.render_example(1, row["index"], 24, direction=row["light_direction"])
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["file_name"])), expected.target)
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["conditioning_file_name"])), expected.condition)
