"""bench/relight_accuracy.py on a 3-step tiny train.py output: the output files and their format, and the
two reference rows, which do not depend on the model: the light-direction estimator must read the true
targets right (it is the yardstick of the 80 % goal) and a flat-lit condition must read as no side light.
The accuracy of a trained model is measured by the bench itself (README), not here: a 3-step model is noise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "relight_accuracy.py"
NUM = 2


@pytest.fixture(scope="module")
def bench_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("relight_accuracy")
    train = [sys.executable, "train.py", "--preset", "tiny", "--output_dir", str(root / "model"), "--cache_dir",
             str(root / "cache"), "--max_train_steps", "3", "--lr_warmup_steps", "1", "--checkpointing_steps", "0",
             "--num_validation_images", "1", "--report_to", "none"]
    done = subprocess.run(train, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = root / "bench"
    command = [sys.executable, str(BENCH), "--checkpoint", str(root / "model"), "--num", str(NUM), "--dpm_steps", "3",
               "--grid_conditions", "1", "--output_dir", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out, json.loads((out / "results.json").read_text())


def test_files_and_rows(bench_output):
    out, result = bench_output
    rows = result["rows"]
    assert set(rows) == {"EDDPM (learned steps)", "DPM++ 2M SDE Karras, 3 steps", "ground truth", "condition copied"}
    for name, row in rows.items():
        assert sum(sum(c.values()) for c in row["confusion"].values()) == 5 * NUM, name
        assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["psnr"]), name
    learned = result["learned_steps"]
    assert rows["EDDPM (learned steps)"]["unet_calls_per_image"] == learned
    assert rows["DPM++ 2M SDE Karras, 3 steps"]["unet_calls_per_image"] == 3
    report = (out / "results.md").read_text()
    assert result["command"].startswith("python bench/relight_accuracy.py --checkpoint")
    assert result["command"] in report and "![relights](grid.png)" in report
    from PIL import Image

    grid = Image.open(out / "grid.png")
    # 1 condition: label column + 4 columns (condition, target, EDDPM, DPM++) of 128 px tiles, 5 rows
    assert grid.size == (56 + 4 * 128 + 4, 16 + 5 * 128)


def test_reference_rows_do_not_depend_on_the_model(bench_output):
    _, result = bench_output
    truth, copied = result["rows"]["ground truth"], result["rows"]["condition copied"]
    assert truth["accuracy"] == 1.0, f"the estimator misreads true targets: {truth['confusion']}"
    # the condition is the same flat-lit image for all five requests: it reads as "front" every time
    assert copied["confusion"] == {r: {e: NUM * (e == "front") for e in copied["confusion"][r]} for r in copied["confusion"]}
    assert copied["accuracy"] == pytest.approx(0.2)
    # a VAE round trip of the true target is far closer to it than the unlit condition is
    assert truth["psnr"] > copied["psnr"] + 5


def test_step_schedules_at_equal_steps(bench_output):
    """--steps: every sampler at each K on the same model, the fixed lists it ran, and paired differences that
    agree with the records."""
    out, _ = bench_output
    model = out.parent / "model"
    steps_out = out.parent / "steps"
    samplers = "eddpm,eddpm_dpmpp_2m,uniform_dpmpp_2m,ays_interp_dpmpp_2m,searched_dpmpp_2m"
    command = [sys.executable, str(BENCH), "--checkpoint", str(model), "--num", "1", "--steps", "3,10",
               "--samplers", samplers, "--search_trajectories", "5", "--search_teacher_steps", "20",
               "--search_grid_stride", "2", "--reference_steps", "4", "--reference_num", "1", "--output_dir",
               str(steps_out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads((steps_out / "results.json").read_text())
    runs = {(r["sampler"], r["steps"]): r for r in result["runs"]}
    assert runs[("uniform_dpmpp_2m", 10)]["timesteps"] == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert runs[("ays_interp_dpmpp_2m", 10)]["timesteps"] == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    assert len(runs[("searched_dpmpp_2m", 3)]["timesteps"]) == 3 and ("ddim", 4) in runs
    assert result["search"]["num_trajectories"] == 5 and result["search"]["grid_points"] == 11
    for (sampler, k), run in runs.items():
        assert result["rows"][run["name"]]["unet_calls_per_image"] == k, (sampler, k)
    for d in result["paired"]:
        mine = {(x["index"], x["direction"]): x["psnr"] for x in result["records"][d["eddpm"]]}
        theirs = {(x["index"], x["direction"]): x["psnr"] for x in result["records"][d["other"]]}
        diffs = [mine[key] - theirs[key] for key in mine]
        assert d["n"] == 5 and d["mean"] == pytest.approx(float(np.mean(diffs)))
        assert d["se"] == pytest.approx(float(np.std(diffs, ddof=1) / np.sqrt(5)))
    assert {(d["eddpm"].split(" @ ")[1], d["other"].split(" @ ")[-1]) for d in result["paired"]} >= {("3", "3")}
    assert "PSNR differences" in (steps_out / "results.md").read_text()


def test_schedule_comparison_combines_seeds(tmp_path):
    """bench/schedule_comparison.py: per-seed paired means, their mean and standard error over seeds (by hand)."""
    keys = [(i, d) for i in range(2) for d in ("left", "right")]

    def run(eddpm_psnr, ays_psnr):
        rows = {"e": [{"index": i, "direction": d, "psnr": p, "estimated": d} for (i, d), p in zip(keys, eddpm_psnr)],
                "a": [{"index": i, "direction": d, "psnr": p, "estimated": d} for (i, d), p in zip(keys, ays_psnr)]}
        summary = {name: {"psnr": float(np.mean([x["psnr"] for x in r])), "accuracy": 1.0} for name, r in rows.items()}
        return {"runs": [{"name": "e", "sampler": "eddpm_dpmpp_2m", "steps": 10},
                         {"name": "a", "sampler": "ays_interp_dpmpp_2m", "steps": 10}],
                "records": rows, "rows": summary, "search": None}

    paths = []
    for seed, (e, a) in enumerate([([20, 21, 22, 23], [19, 21, 21, 22]), ([20, 20, 20, 20], [20, 21, 20, 19])]):
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(run(e, a)))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "schedule_comparison.py"), "--runs",
                           *map(str, paths), "--output_dir", str(tmp_path / "out")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    (d,) = result["summary"]["paired"]
    assert d["per_seed"] == pytest.approx([0.75, 0.0])  # (1 + 0 + 1 + 1) / 4 and (0 - 1 + 0 + 1) / 4
    assert d["mean"] == pytest.approx(0.375) and d["se_seeds"] == pytest.approx(0.375)  # std([.75, 0]) / sqrt(2)
    (goal,) = result["summary"]["goal"]
    assert goal["best_baseline"] == "ays_interp_dpmpp_2m" and goal["met"] is False  # 0.375 < 2 x 0.375
    assert (tmp_path / "out" / "psnr_vs_K.png").is_file()
