"""The training job end to end on tiny models: outputs, resume, several ranks, failures, config.

Every run is a real `train.main` (or torchrun) on a 12-row copy of data/synthetic at 64 px with the tiny
models. 12 rows in batches of 4 make 3 batches an epoch, so the checkpoints at steps 2 and 4 fall in the
middle of an epoch and resuming from them must skip batches. One 6-step run (`reference`) is shared by the
tests that only read its outputs; the resume tests compare against it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "data" / "synthetic"
NUM_ROWS, BATCH, STEPS = 12, 4, 6
STATS_KEYS = {"step", "epoch", "loss", "lr", "keep_rate", "budget", "sum_scores", "kept_per_mask", "alpha_bar_T",
              "grad_norm", "score_grad_norm", "nonfinite_total", "scores_rank_spread", "steps_per_sec"}


class Killed(BaseException):
    """Stands for SIGKILL: nothing in train.py may catch it."""


# --- helpers -----------------------------------------------------------------------------------------


def train_args(data_dir, cache_dir, output_dir, *extra) -> list[str]:
    """A 6-step tiny run: checkpoints at 2, 4, 6 (the last two kept), a stats line every step."""
    return ["--preset", "tiny", "--data_dir", str(data_dir), "--cache_dir", str(cache_dir),
            "--output_dir", str(output_dir), "--report_to", "none", "--resolution", "64",
            "--train_batch_size", str(BATCH), "--max_train_steps", str(STEPS), "--lr_warmup_steps", "1",
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--logging_steps", "1",
            "--num_validation_images", "1", *map(str, extra)]


def run_train(argv: list[str]) -> dict:
    """train.main in this process; accelerate's state is a singleton, so reset it around each run."""
    from accelerate.state import AcceleratorState, GradientState

    import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return train.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def read_stats(output_dir) -> list[dict]:
    with open(Path(output_dir) / "stats.jsonl") as fh:
        return [json.loads(line) for line in fh]


def checkpoint_state(checkpoint) -> dict:
    """The whole training state of a checkpoint folder, verified first (eddpm.checkpoint)."""
    from eddpm.checkpoint import load_state, verify_checkpoint

    verify_checkpoint(str(checkpoint))
    return load_state(str(checkpoint))


def load_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max(max|a|, 1e-12); the key sets must match."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1e-12))
               for k in a)


def ema_shadow(checkpoint) -> list[torch.Tensor]:
    return checkpoint_state(checkpoint)["ema"]["shadow_params"]


def unet_weights(checkpoint) -> dict[str, torch.Tensor]:
    return checkpoint_state(checkpoint)["unet"]


def no_pickles(folder) -> list[str]:
    return [str(p) for p in Path(folder).rglob("*") if p.suffix in (".pkl", ".bin", ".pt", ".pth", ".ckpt")]


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads make a tiny step 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The first 12 rows of data/synthetic (all 128 px squares: one bucket)."""
    root = tmp_path_factory.mktemp("data")
    lines = (SYNTHETIC / "metadata.jsonl").read_text().splitlines()[:NUM_ROWS]
    for line in lines:
        row = json.loads(line)
        for key in ("file_name", "conditioning_file_name"):
            (root / row[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SYNTHETIC / row[key], root / row[key])
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """This module's latent cache (content-keyed, so sharing it between runs is what train.py does too)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(one_thread, small_data, cache_dir, tmp_path_factory):
    """One uninterrupted 6-step run; returns (output_dir, argv, result)."""
    out = tmp_path_factory.mktemp("reference")
    argv = train_args(small_data, cache_dir, out)
    result = run_train(argv)
    return out, argv, result


# --- 1. every output ---------------------------------------------------------------------------------


def test_outputs(reference):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from eddpm.checkpoint import list_checkpoints
    from eddpm.config import resolve_config
    from eddpm.models import load_base_unet
    from eddpm.scheduler import EDDPMScheduler

    out, argv, result = reference
    assert result["global_step"] == STEPS and result["nonfinite_total"] == 0, result

    cfg = resolve_config(argv)
    assert json.loads((out / "config.json").read_text()) == json.loads(cfg.to_json())

    # checkpoints: 2, 4, 6 written, pruned to the last two, nothing temporary left
    assert [Path(p).name for p in list_checkpoints(str(out))] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-6"]
    assert no_pickles(out) == []  # checkpoints are safetensors and JSON only
    final_state = checkpoint_state(out / "checkpoint-6")
    scores = final_state["policy"]["scores"]  # [T] float64, s after the last update
    assert final_state["counters"]["global_step"] == STEPS and scores.dtype == torch.float64
    assert float(scores.sum()) <= cfg.final_keep_rate * 1000 + 1e-9, float(scores.sum())

    # unet/: the EMA weights in float16, 8 input channels
    assert load_tensors(out / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype == torch.float16
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.in_channels == 8 and unet.conv_in.weight.shape[1] == 8
    shadow = final_state["ema"]["shadow_params"]
    for p, e in zip(unet.parameters(), shadow, strict=True):
        torch.testing.assert_close(p.detach().float(), e.half().float(), rtol=0, atol=0)

    # scheduler/: the learned s, K = round(final_keep_rate * T) steps, t = T-1 among them
    scheduler = EDDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert torch.equal(torch.tensor(scheduler.config.scores, dtype=torch.float64), scores)
    assert scheduler.config.num_kept_steps == round(cfg.final_keep_rate * 1000) == 20
    assert scheduler.config.mask_mode == cfg.mask_mode
    kept = [int(t) for t in scheduler.kept_timesteps]
    assert len(kept) == 20 and 999 in kept and kept == result["kept_timesteps"]

    # iclight_offsets: the tiny base built from the seed plus the fp16 offsets gives back unet/
    offsets = load_tensors(out / "iclight_offsets.safetensors")
    base = load_base_unet("tiny", cfg.seed).state_dict()
    trained = unet.state_dict()
    assert set(offsets) == set(trained) and all(v.dtype == torch.float16 for v in offsets.values())
    for key, weight in trained.items():
        off, weight = offsets[key].float(), weight.float()
        err = (base[key] + off - weight).abs()
        bound = weight.abs() * 2**-11 + off.abs() * 2**-10 + 1e-7  # fp16 rounding of unet/ and of the offset
        assert bool((err <= bound).all()), f"{key}: max error {float(err.max()):.3g}"
    assert any(float(v.float().abs().max()) > 0 for v in offsets.values()), "training changed nothing"
    # the LDM-keyed twin for ComfyUI's UNet loader: the same tensors under LDM names
    from eddpm.ldm import to_ldm_state_dict

    ldm = load_tensors(out / "iclight_offsets_ldm.safetensors")
    expected_ldm = to_ldm_state_dict(offsets)
    assert set(ldm) == set(expected_ldm) and all(torch.equal(ldm[k], expected_ldm[k]) for k in ldm)

    # stats.jsonl: one line per step, every documented key, a loss for at least one bucket of t
    stats = read_stats(out)
    assert [r["step"] for r in stats] == list(range(1, STEPS + 1))
    for r in stats:
        assert STATS_KEYS <= set(r), sorted(STATS_KEYS - set(r))
        assert any(k.startswith("loss_t") for k in r), r
        assert r["nonfinite_total"] == 0 and r["scores_rank_spread"] == 0.0
        assert 0 < r["loss"] < 10 and r["grad_norm"] > 0, r
    assert stats[-1]["sum_scores"] == pytest.approx(float(scores.sum()), abs=1e-9)
    assert [r["epoch"] for r in stats] == [0, 0, 0, 1, 1, 1]  # 3 batches an epoch

    # plots and samples
    with Image.open(out / "scores.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    samples = sorted((out / "samples").glob("step-*.png"))
    assert [p.name for p in samples] == [f"step-{STEPS:06d}.png"] and Path(result["samples"]) == samples[0]
    with Image.open(samples[0]) as im:
        assert im.format == "PNG" and im.size == (128, 64)  # condition | relit, one 64 px row


# --- 7. keep-rate schedule position --------------------------------------------------------------------


def test_keep_rate_follows_the_schedule(reference):
    from eddpm.masks import keep_rate

    out, argv, _ = reference
    cfg = json.loads((out / "config.json").read_text())
    stats = read_stats(out)
    for r in stats:
        expected = keep_rate(r["step"] / STEPS, cfg["final_keep_rate"], cfg["warmup"], cfg["ramp_end"])
        assert r["keep_rate"] == expected, (r["step"], r["keep_rate"], expected)
        assert r["budget"] == pytest.approx(expected * 1000, rel=1e-12)
        assert r["sum_scores"] <= r["budget"] + 1e-9, r
    rates = [r["keep_rate"] for r in stats]
    assert rates[0] < 1 and rates[-1] == cfg["final_keep_rate"] and rates == sorted(rates, reverse=True), rates


# --- 2. resume determinism ----------------------------------------------------------------------------


def assert_same_run(out, ref, first_new_step: int):
    """`out` (resumed) ends exactly where the uninterrupted `ref` does: s, UNet, EMA, the stats lines."""
    a, b = checkpoint_state(out / f"checkpoint-{STEPS}"), checkpoint_state(ref / f"checkpoint-{STEPS}")
    diff_s = float((a["policy"]["scores"] - b["policy"]["scores"]).abs().max())
    assert diff_s <= 1e-12, f"scores differ by {diff_s:.3g}"
    assert a["counters"]["global_step"] == b["counters"]["global_step"] == STEPS
    weights = max_rel_diff(b["unet"], a["unet"])
    ema = max_rel_diff({str(i): t for i, t in enumerate(b["ema"]["shadow_params"])},
                       {str(i): t for i, t in enumerate(a["ema"]["shadow_params"])})
    exported = max_rel_diff(load_tensors(ref / "unet" / "diffusion_pytorch_model.safetensors"),
                            load_tensors(out / "unet" / "diffusion_pytorch_model.safetensors"))
    print(f"resume from step {first_new_step - 1}: max |ds| = {diff_s:.3g}, max relative difference of the "
          f"UNet {weights:.3g}, EMA {ema:.3g}, exported unet/ {exported:.3g}")
    assert max(weights, ema, exported) <= 1e-5, (weights, ema, exported)
    # same batches, masks, noise and updates after the resume point: the logged numbers agree
    skip = {"steps_per_sec"}
    ref_stats, new_stats = read_stats(ref), read_stats(out)
    assert [r["step"] for r in new_stats] == list(range(1, STEPS + 1))
    for r, n in zip(ref_stats[first_new_step - 1:], new_stats[first_new_step - 1:], strict=True):
        assert {k: v for k, v in r.items() if k not in skip} == pytest.approx(
            {k: v for k, v in n.items() if k not in skip}, rel=1e-5, abs=1e-9), r["step"]


def test_resume_is_exact(reference, small_data, cache_dir, tmp_path):
    """Resume mid-epoch (step 4: epoch 1, one batch to skip) and end where the straight run ends."""
    from eddpm.checkpoint import resolve_resume

    ref, _, _ = reference
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-4", out / "checkpoint-4")
    lines = (ref / "stats.jsonl").read_text().splitlines(keepends=True)
    (out / "stats.jsonl").write_text("".join(lines))  # lines past step 4 must be dropped on resume
    assert resolve_resume(str(out), "latest") == str(out / "checkpoint-4")
    result = run_train(train_args(small_data, cache_dir, out, "--resume_from_checkpoint", "latest"))
    assert result["global_step"] == STEPS
    assert_same_run(out, ref, first_new_step=5)


# --- 5. a kill during a save, damaged and foreign checkpoints --------------------------------------------


def test_resume_skips_partial_damaged_and_pickled_checkpoints(reference, small_data, cache_dir, tmp_path):
    """What a kill during a save leaves (a .tmp-checkpoint folder, a checkpoint without manifest), a truncated
    newest checkpoint and one holding a pickle are all passed over by `latest`, each named in a message; the run
    resumes from the newest intact checkpoint (step 2: epoch 0, two batches to skip), ends exactly where the
    straight run ends, and the next save removes the leftovers."""
    from eddpm.checkpoint import resolve_resume

    ref, _, _ = reference
    out = tmp_path / "damaged"
    out.mkdir()
    source = tmp_path / "source"  # the reference run again, keeping all three checkpoints
    run_train(train_args(small_data, cache_dir, source, "--checkpoints_total_limit", 3))
    for step in (2, 4, 6):
        shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-6" / "ema.safetensors").write_bytes(b"")  # zero bytes
    (out / "checkpoint-4" / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04not really")  # a foreign pickle
    (out / ".tmp-checkpoint-5").mkdir()  # a save that was killed
    (out / "checkpoint-5").mkdir()  # no manifest: never completed
    shutil.copy(ref / "stats.jsonl", out / "stats.jsonl")
    with open(out / "stats.jsonl", "a") as fh:
        fh.write('{"step": 7, "lo')  # a torn last line
    messages = []
    assert resolve_resume(str(out), "latest", say=messages.append) == str(out / "checkpoint-2")
    assert "checkpoint-6: ema.safetensors has 0 bytes" in messages[0], messages
    assert "custom_checkpoint_0.pkl" in messages[1] and "never loads pickles" in messages[1], messages

    result = run_train(train_args(small_data, cache_dir, out, "--resume_from_checkpoint", "latest"))
    assert result["global_step"] == STEPS
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")], "leftovers not cleaned"
    assert_same_run(out, ref, first_new_step=3)


# --- 4. non-finite losses -------------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_then_stop(small_data, cache_dir, tmp_path):
    """A learning rate of 1e30 blows the weights up at step 1; from step 2 on every loss is non-finite and the
    step is skipped (weights, EMA and s unchanged); the third in a row stops the run with one line naming the
    checkpoint it wrote."""
    out = tmp_path / "nan"
    argv = train_args(small_data, cache_dir, out, "--learning_rate", "1e30", "--lr_warmup_steps", 0,
                      "--max_train_steps", 8, "--checkpointing_steps", 1, "--checkpoints_total_limit", 10,
                      "--max_nonfinite_steps", 3)
    with pytest.raises(SystemExit, match=r"3 non-finite losses in a row; stopped.*checkpoint-4"):
        run_train(argv)
    stats = read_stats(out)
    assert [r["step"] for r in stats] == [1, 2, 3]  # the stop comes before step 4's line
    assert [r["nonfinite_total"] for r in stats] == [0, 1, 2]
    assert stats[0]["loss"] > 0 and stats[1]["loss"] is None

    def state(step):
        return checkpoint_state(out / f"checkpoint-{step}")

    first, last = state(1), state(4)
    assert max_rel_diff(first["unet"], last["unet"]) == 0
    assert all(torch.equal(x, y) for x, y in zip(first["ema"]["shadow_params"], last["ema"]["shadow_params"],
                                                strict=True))
    assert torch.equal(first["policy"]["scores"], last["policy"]["scores"])
    assert last["counters"] == {"global_step": 4, "nonfinite_total": 3}
    # the checkpoint loads (and the output folder's lock was released): resuming at the end only exports
    run_train(train_args(small_data, cache_dir, out, "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
                         "--export_fp32"))


def test_ordinary_training_then_an_eddpm_fine_tune_from_its_offsets(small_data, cache_dir, tmp_path):
    """--final_keep_rate 1 --scores_lr 0 is ordinary DDPM training: s stays exactly 1, so every mask keeps all
    1000 steps. Its iclight_offsets.safetensors, given as --offset_path to a tiny run, is where the fine-tune
    starts: with a learning rate of 1e-30 the fine-tune's weights are the base run's exported (EMA) UNet up to
    the offsets' fp16."""
    base, tuned = tmp_path / "uniform", tmp_path / "tuned"
    run_train(train_args(small_data, cache_dir, base, "--max_train_steps", 2, "--final_keep_rate", 1,
                         "--scores_lr", 0, "--export_fp32"))
    state = checkpoint_state(base / "checkpoint-2")
    assert torch.equal(state["policy"]["scores"], torch.ones(1000, dtype=torch.float64))
    assert [r["kept_per_mask"] for r in read_stats(base)] == [1000.0, 1000.0]
    run_train(train_args(small_data, cache_dir, tuned, "--max_train_steps", 1, "--learning_rate", 1e-30,
                         "--offset_path", base / "iclight_offsets.safetensors", "--checkpointing_steps", 1))
    trained = load_tensors(base / "unet" / "diffusion_pytorch_model.safetensors")
    start = unet_weights(tuned / "checkpoint-1")
    from eddpm.models import load_base_unet

    fresh = load_base_unet("tiny", 0).state_dict()
    assert max_rel_diff(trained, fresh) > 1e-2  # two steps at the preset's learning rate moved the weights
    assert max_rel_diff(trained, start) < 2e-3  # fp16 offsets: about 2**-11 of each tensor's largest value


def test_synthetic_scenes_render_a_missing_data_dir_once(cache_dir, tmp_path):
    """--synthetic_scenes N renders N scenes x 5 lights into a data_dir without metadata.jsonl, then trains
    on it; a second run finds the set and leaves it alone."""
    data_dir = tmp_path / "rendered"
    argv = train_args(data_dir, cache_dir, tmp_path / "out", "--synthetic_scenes", 2, "--max_train_steps", 1,
                      "--checkpointing_steps", 0)
    assert run_train(argv)["global_step"] == 1
    rows = [json.loads(line) for line in (data_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["light_direction"] for r in rows[:5]} == {"left", "right", "top", "bottom", "front"}
    assert json.loads((data_dir / "generation.json").read_text())["all_directions"] is True
    stamp = (data_dir / "metadata.jsonl").stat().st_mtime_ns
    run_train(argv[:argv.index("--output_dir") + 1] + [str(tmp_path / "again")] + argv[argv.index("--output_dir") + 2:])
    assert (data_dir / "metadata.jsonl").stat().st_mtime_ns == stamp


# --- 3. two ranks -----------------------------------------------------------------------------------------


def torchrun(argv: list[str], nproc: int = 2) -> float:
    """`torchrun --standalone` of train.py on the CPU (gloo), one thread a process; returns its seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
                           str(nproc), "train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"({nproc} process(es), cpu" in proc.stdout, proc.stdout[:500]
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def two_ranks(small_data, cache_dir, tmp_path_factory):
    """A 6-step run on 2 ranks, checkpoints at 3 and 6: 3 batches an epoch shared by 2 ranks make 2 steps
    an epoch (the second rank's second batch wraps around), so step 3 is in the middle of epoch 1."""
    out = tmp_path_factory.mktemp("two_ranks")
    argv = train_args(small_data, cache_dir, out, "--checkpointing_steps", 3)
    print(f"torchrun, 2 ranks, {STEPS} steps: {torchrun(argv):.1f} s")
    return out, argv


def test_two_ranks_hold_the_same_scores(two_ranks):
    """Each rank updates its own s from the gathered global batch; the stats' scores_rank_spread
    (max |s_rank - s_rank0|, from a gather of every rank's s) is 0 after every step while s moves."""
    out, _ = two_ranks
    stats = read_stats(out)
    assert [r["step"] for r in stats] == list(range(1, STEPS + 1))
    assert [r["scores_rank_spread"] for r in stats] == [0.0] * STEPS
    assert [r["epoch"] for r in stats] == [0, 0, 1, 1, 2, 2]
    assert stats[-1]["sum_scores"] < 1000 * stats[0]["keep_rate"] and stats[-1]["score_grad_norm"] > 0
    checkpoint = out / f"checkpoint-{STEPS}"
    assert no_pickles(out) == []
    scores = checkpoint_state(checkpoint)["policy"]["scores"]
    assert float(scores.min()) < 1 and stats[-1]["sum_scores"] == pytest.approx(float(scores.sum()), abs=1e-9)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-6"]


def test_two_ranks_resume_is_exact(two_ranks, tmp_path):
    """Resume the 2-rank run from step 3 (mid-epoch on both shards): it ends where the straight one does."""
    ref, argv = two_ranks
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-3", out / "checkpoint-3")
    shutil.copy(ref / "stats.jsonl", out / "stats.jsonl")
    argv = [*argv, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    print(f"torchrun resume, 2 ranks: {torchrun(argv):.1f} s")
    assert_same_run(out, ref, first_new_step=4)


# --- 6. config ------------------------------------------------------------------------------------------


def test_presets_resolve_and_flags_override():
    from eddpm.config import PATH_FIELDS, PRESETS, REPO_ROOT, TrainConfig, absolute_path, resolve_config

    for name, preset in PRESETS.items():
        cfg = resolve_config(["--preset", name])
        expected = {k: absolute_path(v, REPO_ROOT) if k in PATH_FIELDS else v for k, v in preset.items()}
        assert {k: getattr(cfg, k) for k in preset} == expected and cfg.preset == name
        assert cfg.seed == TrainConfig.seed  # untouched fields keep the defaults
    cfg = resolve_config(["--preset", "small", "--train_batch_size", "3", "--learning_rate", "1e-3",
                          "--no-use_ema", "--mask_mode", "paper", "--offset_path", "x.safetensors"])
    assert (cfg.train_batch_size, cfg.learning_rate, cfg.use_ema, cfg.mask_mode, cfg.offset_path) == (
        3, 1e-3, False, "paper", os.path.abspath("x.safetensors"))
    assert cfg.max_train_steps == PRESETS["small"]["max_train_steps"]
    # an explicit epoch count replaces the preset's step count; both given, the steps win
    assert resolve_config(["--num_train_epochs", "3"]).max_train_steps is None
    assert resolve_config(["--num_train_epochs", "3", "--max_train_steps", "7"]).max_train_steps == 7
    assert json.loads(cfg.to_json())["train_batch_size"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--final_keep_rate", "0"], "--final_keep_rate must be in (0, 1]"),
    (["--warmup", "0.7", "--ramp_end", "0.6"], "need 0 <= --warmup < --ramp_end <= 1"),
    (["--resolution", "100"], "--resolution must be a positive multiple of 64"),
    (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps must be >= 1"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
    (["--checkpointing_steps", "-1"], "--checkpointing_steps must be >= 0"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
    (["--scores_lr", "-0.1"], "--scores_lr must be >= 0"),
    (["--pg_reward", "step", "--mask_mode", "paper"], "--pg_reward step needs --mask_mode respaced"),
    (["--train_batch_size", "1"], "--pg_baseline loo needs at least 2 rows"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-9"], "is neither 'latest' nor a checkpoint folder"),
])
def test_bad_values_exit_with_a_clear_message(argv, message):
    from eddpm.config import resolve_config

    with pytest.raises(SystemExit) as info:
        resolve_config(argv)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("argv", [["--preset", "huge"], ["--mixed_precision", "fp8"], ["--lr_scheduler", "exp"],
                                  ["--train_batch_size", "two"], ["--no_such_flag", "1"]])
def test_unparsable_flags_exit(argv, capsys):
    from eddpm.config import resolve_config

    with pytest.raises(SystemExit) as info:
        resolve_config(argv)
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err


def test_help_is_fast_and_imports_nothing_heavy():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and "--max_train_steps" in proc.stdout and "--resume_from_checkpoint" in proc.stdout
    assert seconds < 3.0, f"train.py --help took {seconds:.2f} s"
    probe = "import sys, train; print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# --- paths, precision, one run per folder -------------------------------------------------------------------


def test_runs_from_another_folder_and_records_absolute_paths(small_data, cache_dir, tmp_path, monkeypatch):
    """From a working directory outside the repository: the preset's paths resolve against the repository, the
    flags' against the working directory, config.json records them absolute, and relight.py's loader reads the
    output folder from yet another directory."""
    from eddpm.relighting import load_relighter

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_train(["--preset", "tiny", "--data_dir", str(small_data), "--cache_dir", str(cache_dir), "--output_dir",
               "out", "--report_to", "none", "--train_batch_size", str(BATCH), "--max_train_steps", "1",
               "--checkpointing_steps", "0", "--num_validation_images", "1"])
    config = json.loads((elsewhere / "out" / "config.json").read_text())
    assert config["output_dir"] == str(elsewhere / "out") and config["base_model"] == "tiny"
    cfg_default = json.loads((elsewhere / "out" / "config.json").read_text())
    assert Path(cfg_default["data_dir"]).is_absolute() and Path(cfg_default["cache_dir"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    relighter = load_relighter(str(elsewhere / "out"))
    assert relighter.learned_steps == 20


def test_preset_paths_are_relative_to_the_repository(tmp_path, monkeypatch):
    from eddpm.config import resolve_config

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(["--preset", "iclight"])
    assert cfg.base_model == str(REPO / "models" / "realistic-vision-v51")
    assert cfg.offset_path == str(REPO / "models" / "iclight_sd15_fc.safetensors")
    assert cfg.data_dir == str(REPO / "data" / "train")
    cfg = resolve_config(["--preset", "iclight", "--base_model", "stablediffusionapi/realistic-vision-v51",
                          "--data_dir", "mine"])
    assert cfg.base_model == "stablediffusionapi/realistic-vision-v51"  # a hub id stays one
    assert cfg.data_dir == str(tmp_path / "mine")


def test_fp16_on_a_cpu_is_a_clear_error(small_data, cache_dir, tmp_path):
    with pytest.raises(SystemExit, match="fp16 needs a CUDA GPU"):
        run_train(train_args(small_data, cache_dir, tmp_path / "fp16", "--mixed_precision", "fp16"))


def test_a_second_run_on_the_same_output_dir_stops(small_data, cache_dir, tmp_path):
    from eddpm.checkpoint import OutputLock

    out = tmp_path / "busy"
    out.mkdir()
    lock = OutputLock(str(out)).acquire()  # what a first run holds while it trains
    try:
        with pytest.raises(SystemExit, match="another run is using"):
            run_train(train_args(small_data, cache_dir, out))
    finally:
        lock.release()
