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


def eddpm_state(checkpoint) -> dict:
    from eddpm.checkpoint import load_extra_state

    return load_extra_state(str(checkpoint))


def load_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max(max|a|, 1e-12); the key sets must match."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1e-12))
               for k in a)


def ema_shadow(checkpoint) -> list[torch.Tensor]:
    """The EMA weights accelerate saved for the registered EMAModel."""
    state = torch.load(Path(checkpoint) / "custom_checkpoint_0.pkl", weights_only=False)
    return state["shadow_params"]


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
    from eddpm_scheduler import EDDPMScheduler

    out, argv, result = reference
    assert result["global_step"] == STEPS and result["nonfinite_total"] == 0, result

    cfg = resolve_config(argv)
    assert json.loads((out / "config.json").read_text()) == json.loads(cfg.to_json())

    # checkpoints: 2, 4, 6 written, pruned to the last two, nothing temporary left
    assert [Path(p).name for p in list_checkpoints(str(out))] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-6"]
    final_state = eddpm_state(out / "checkpoint-6")
    scores = final_state["policy"]["scores"]  # [T] float64, s after the last update
    assert final_state["global_step"] == STEPS and scores.dtype == torch.float64
    assert float(scores.sum()) <= cfg.final_keep_rate * 1000 + 1e-9, float(scores.sum())

    # unet/: the EMA weights, 8 input channels
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.in_channels == 8 and unet.conv_in.weight.shape[1] == 8
    shadow = ema_shadow(out / "checkpoint-6")
    for p, e in zip(unet.parameters(), shadow, strict=True):
        torch.testing.assert_close(p.detach(), e.float(), rtol=0, atol=0)

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
        off = offsets[key].float()
        err = (base[key] + off - weight).abs()
        bound = weight.abs() * 2**-24 + off.abs() * 2**-10 + 1e-7  # fp16 rounding of the offset
        assert bool((err <= bound).all()), f"{key}: max error {float(err.max()):.3g}"
    assert any(float(v.float().abs().max()) > 0 for v in offsets.values()), "training changed nothing"

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
    a, b = eddpm_state(out / f"checkpoint-{STEPS}"), eddpm_state(ref / f"checkpoint-{STEPS}")
    diff_s = float((a["policy"]["scores"] - b["policy"]["scores"]).abs().max())
    assert diff_s <= 1e-12, f"scores differ by {diff_s:.3g}"
    assert a["global_step"] == b["global_step"] == STEPS
    weights = max_rel_diff(load_tensors(ref / f"checkpoint-{STEPS}" / "model.safetensors"),
                           load_tensors(out / f"checkpoint-{STEPS}" / "model.safetensors"))
    ema = max_rel_diff({str(i): t for i, t in enumerate(ema_shadow(ref / f"checkpoint-{STEPS}"))},
                       {str(i): t for i, t in enumerate(ema_shadow(out / f"checkpoint-{STEPS}"))})
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


# --- 5. a kill during a checkpoint save ----------------------------------------------------------------


def test_kill_during_save_then_resume(reference, small_data, cache_dir, tmp_path, monkeypatch):
    """The second save (step 4) dies after accelerate wrote its files: checkpoint-2 stays the latest and
    complete, the half-written folder is ignored and cleaned, and resuming from step 2 (epoch 0, two
    batches to skip) ends exactly where the straight run ends."""
    from accelerate import Accelerator

    from eddpm.checkpoint import list_checkpoints, load_extra_state, resolve_resume

    ref, _, _ = reference
    out = tmp_path / "killed"
    argv = train_args(small_data, cache_dir, out)
    original, saves = Accelerator.save_state, []

    def save_state_then_die(self, output_dir=None, **kw):
        saves.append(output_dir)
        location = original(self, output_dir, **kw)
        if len(saves) == 2:
            raise Killed(output_dir)
        return location

    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, "save_state", save_state_then_die)
        with pytest.raises(Killed):
            run_train(argv)
    assert [Path(p).name for p in saves] == [".tmp-checkpoint-2", ".tmp-checkpoint-4"]
    assert (out / ".tmp-checkpoint-4" / "model.safetensors").is_file()  # the half-written save is there...
    assert not (out / "checkpoint-4").exists()
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-2")]  # ...and ignored
    assert resolve_resume(str(out), "latest") == str(out / "checkpoint-2")
    assert load_extra_state(str(out / "checkpoint-2"))["global_step"] == 2
    # an older leftover, and a checkpoint folder that lacks the EDDPM state (not complete), are ignored too
    (out / ".tmp-checkpoint-1").mkdir()
    (out / "checkpoint-3").mkdir()
    assert resolve_resume(str(out), "latest") == str(out / "checkpoint-2")
    shutil.rmtree(out / "checkpoint-3")

    result = run_train(argv + ["--resume_from_checkpoint", "latest"])
    assert result["global_step"] == STEPS
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")], "leftovers not cleaned"
    assert [Path(p).name for p in list_checkpoints(str(out))] == ["checkpoint-4", "checkpoint-6"]
    assert_same_run(out, ref, first_new_step=3)


# --- 4. non-finite losses -------------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_then_stop(small_data, cache_dir, tmp_path, monkeypatch):
    """Under --gradient_accumulation_steps 2 (micro-batches 2k-1 and 2k make step k), a NaN in either
    micro-batch skips the whole step: NaN in step 2's first micro-batch is skipped and training goes on;
    NaN in steps 4 (second), 5 (first) and 6 (both), 3 in a row, stops the run with a message and a
    checkpoint whose weights, EMA and s are those of step 3 (skipped steps change nothing)."""
    import eddpm.training

    out = tmp_path / "nan"
    original, calls = eddpm.training.diffusion_loss, []

    def loss_with_nans(*args, **kw):
        losses = original(*args, **kw)
        calls.append(1)
        return losses * float("nan") if len(calls) in (3, 8, 9, 11, 12) else losses

    argv = train_args(small_data, cache_dir, out, "--train_batch_size", 2, "--gradient_accumulation_steps", 2,
                      "--max_train_steps", 8, "--checkpointing_steps", 1, "--checkpoints_total_limit", 10,
                      "--max_nonfinite_steps", 3)
    with monkeypatch.context() as patch:
        patch.setattr(eddpm.training, "diffusion_loss", loss_with_nans)
        with pytest.raises(SystemExit, match=r"3 non-finite losses in a row; stopped.*checkpoint-6"):
            run_train(argv)
    assert len(calls) == 12
    stats = read_stats(out)
    assert [r["step"] for r in stats] == [1, 2, 3, 4, 5]  # the stop comes before step 6's line
    assert [r["nonfinite_total"] for r in stats] == [0, 1, 1, 2, 3]
    assert stats[1]["loss"] is None and stats[2]["loss"] > 0  # skipped, then training went on

    def unchanged(first: int, last: int) -> bool:
        a, b = out / f"checkpoint-{first}", out / f"checkpoint-{last}"
        return (max_rel_diff(load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")) == 0
                and all(torch.equal(x, y) for x, y in zip(ema_shadow(a), ema_shadow(b), strict=True))
                and torch.equal(eddpm_state(a)["policy"]["scores"], eddpm_state(b)["policy"]["scores"]))

    assert unchanged(1, 2) and unchanged(3, 6)
    assert not unchanged(2, 3)  # a finite step does change them
    state6 = eddpm_state(out / "checkpoint-6")
    assert state6["global_step"] == 6 and state6["nonfinite_total"] == 4

    # the checkpoint loads: resume it with the run's end at step 6, which only exports
    result = run_train(argv + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert result["global_step"] == 6 and result["nonfinite_total"] == 4
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [r["step"] for r in read_stats(out)] == [1, 2, 3, 4, 5]


# --- the policy sees the whole optimizer step ----------------------------------------------------------


def test_policy_gets_every_micro_batch(small_data, cache_dir, tmp_path, monkeypatch):
    """Under --gradient_accumulation_steps 2 the mask policy's update receives the losses and masks of
    every micro-batch of the step, in order; each sample's t is kept by its mask and its alpha-bar is
    the masked one of that mask."""
    import eddpm.training
    from eddpm.masks import masked_alphas_cumprod

    drawn, computed, updates = [], [], []
    draw, loss, update = (eddpm.training.MaskPolicy.draw, eddpm.training.diffusion_loss,
                          eddpm.training.MaskPolicy.update)

    def record_draw(self, batch_size, generator):
        result = draw(self, batch_size, generator)
        drawn.append({k: v.clone() for k, v in result.items()})
        return result

    def record_loss(unet, latents, cond, prompt_embeds, noise, timesteps, alpha_bar_t, weights=None, **kw):
        losses = loss(unet, latents, cond, prompt_embeds, noise, timesteps, alpha_bar_t, weights, **kw)
        computed.append({"losses": losses.detach().clone(), "timesteps": timesteps.clone(),
                         "alpha_bar_t": alpha_bar_t.clone()})
        return losses

    def record_update(self, losses, masks, keep_fraction, timesteps=None):
        updates.append({"losses": losses.clone(), "masks": masks.clone(), "keep_fraction": keep_fraction,
                        "mask_mode": self.mask_mode, "betas": self.betas, "timesteps": timesteps.clone()})
        return update(self, losses, masks, keep_fraction, timesteps=timesteps)

    monkeypatch.setattr(eddpm.training.MaskPolicy, "draw", record_draw)
    monkeypatch.setattr(eddpm.training.MaskPolicy, "update", record_update)
    monkeypatch.setattr(eddpm.training, "diffusion_loss", record_loss)
    out = tmp_path / "accumulate"
    result = run_train(train_args(small_data, cache_dir, out, "--gradient_accumulation_steps", 2,
                                  "--max_train_steps", 3, "--checkpointing_steps", 0))
    assert result["global_step"] == 3 and len(updates) == 3
    # 3 batches an epoch: step 1 = batches 1+2, step 2 = batch 3 (the epoch's end syncs), step 3 = 4+5
    assert [len(u["losses"]) for u in updates] == [2 * BATCH, BATCH, 2 * BATCH]
    assert len(drawn) == len(computed) == 5
    torch.testing.assert_close(torch.cat([u["losses"] for u in updates]),
                               torch.cat([c["losses"] for c in computed]), rtol=0, atol=0)
    masks = torch.cat([d["masks"] for d in drawn])  # [20, T]
    torch.testing.assert_close(torch.cat([u["masks"] for u in updates]), masks.float(), rtol=0, atol=0)
    timesteps = torch.cat([c["timesteps"] for c in computed])  # [20]
    assert bool((masks.gather(1, timesteps[:, None]) == 1).all()), "a sample's t is masked out"
    # the gap reward needs each row's t: the update gets the same timesteps, in the same order
    assert torch.equal(torch.cat([u["timesteps"] for u in updates]), timesteps)
    alpha_bar = masked_alphas_cumprod(updates[0]["betas"], masks, updates[0]["mask_mode"])  # [20, T]
    torch.testing.assert_close(torch.cat([c["alpha_bar_t"] for c in computed]),
                               alpha_bar.gather(1, timesteps[:, None]).squeeze(1), rtol=0, atol=0)
    stats = read_stats(out)
    assert [r["keep_rate"] for r in stats] == [u["keep_fraction"] for u in updates]



@pytest.mark.parametrize("reward", ["loss", "gap"])
def test_v_prediction_and_weights_reach_loss_policy_and_scheduler(small_data, cache_dir, tmp_path, monkeypatch, reward):
    """--prediction_type v_prediction --loss_weighting truncated_snr: the UNet learns v, the policy gets the
    weighted loss L_b (paper's reward) or the plain eps error (gap reward), and scheduler/ says v_prediction."""
    import eddpm.training
    from eddpm_scheduler import EDDPMScheduler

    computed, updates = [], []
    loss, update = eddpm.training.diffusion_loss, eddpm.training.MaskPolicy.update

    def record_loss(*args, **kw):
        losses = loss(*args, **kw)
        computed.append({"losses": losses.detach().clone(), "alpha_bar_t": args[6].clone(),
                         "prediction_type": kw["prediction_type"]})
        return losses

    def record_update(self, losses, masks, keep_fraction, timesteps=None):
        updates.append(losses.clone())
        return update(self, losses, masks, keep_fraction, timesteps=timesteps)

    monkeypatch.setattr(eddpm.training.MaskPolicy, "update", record_update)
    monkeypatch.setattr(eddpm.training, "diffusion_loss", record_loss)
    out = tmp_path / reward
    run_train(train_args(small_data, cache_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 0,
                         "--prediction_type", "v_prediction", "--loss_weighting", "truncated_snr",
                         "--pg_reward", reward))
    assert len(updates) == len(computed) == 2 and {c["prediction_type"] for c in computed} == {"v_prediction"}
    for got, c in zip(updates, computed):
        a = c["alpha_bar_t"].double()
        weights = torch.clamp((1 - a) / a, min=1.0)  # max(1, 1/SNR), written out
        expected = c["losses"].double() * (a if reward == "gap" else weights)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    assert EDDPMScheduler.from_pretrained(out, subfolder="scheduler").config.prediction_type == "v_prediction"



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
    (max |s_rank - s_rank0|, from a gather of every rank's s) is 0 after every step while s moves, and
    both ranks' RNG states land in the checkpoint."""
    out, _ = two_ranks
    stats = read_stats(out)
    assert [r["step"] for r in stats] == list(range(1, STEPS + 1))
    assert [r["scores_rank_spread"] for r in stats] == [0.0] * STEPS
    assert [r["epoch"] for r in stats] == [0, 0, 1, 1, 2, 2]
    assert stats[-1]["sum_scores"] < 1000 * stats[0]["keep_rate"] and stats[-1]["score_grad_norm"] > 0
    checkpoint = out / f"checkpoint-{STEPS}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    scores = eddpm_state(checkpoint)["policy"]["scores"]
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
    from eddpm.config import PRESETS, TrainConfig, resolve_config

    for name, preset in PRESETS.items():
        cfg = resolve_config(["--preset", name])
        assert {k: getattr(cfg, k) for k in preset} == preset and cfg.preset == name
        assert cfg.seed == TrainConfig.seed  # untouched fields keep the defaults
    cfg = resolve_config(["--preset", "small", "--train_batch_size", "3", "--learning_rate", "1e-3",
                          "--no-use_ema", "--mask_mode", "paper", "--offset_path", "x.safetensors"])
    assert (cfg.train_batch_size, cfg.learning_rate, cfg.use_ema, cfg.mask_mode, cfg.offset_path) == (
        3, 1e-3, False, "paper", "x.safetensors")
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


# --- checkpoint state round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_policy_state_round_trips_through_a_checkpoint(tmp_path, optimizer):
    """The EDDPM state (s, its optimiser with int keys and tensors, counters) survives save/load exactly,
    and a policy restored from it takes the same next step as the original."""
    from eddpm.checkpoint import load_extra_state, save_extra_state
    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.training import MaskPolicy
    from eddpm_scheduler import EDDPMScheduler

    betas = EDDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).betas
    gen = torch.Generator().manual_seed(0)
    policy = MaskPolicy(betas, optimizer=optimizer, lr=0.1)
    for keep in (0.5, 0.3):
        draw = policy.draw(6, gen)
        policy.update(torch.rand(6, generator=gen, dtype=torch.float64), draw["masks"], keep)
    save_extra_state(str(tmp_path), {"policy": policy.state_dict(), "global_step": 2, "nonfinite_total": 1})
    loaded = load_extra_state(str(tmp_path))
    assert loaded["global_step"] == 2 and loaded["nonfinite_total"] == 1
    restored = MaskPolicy(betas, optimizer=optimizer, lr=0.1)
    restored.load_state_dict(loaded["policy"])
    assert torch.equal(restored.scores, policy.scores)
    draw = policy.draw(6, gen)
    losses = torch.rand(6, generator=gen, dtype=torch.float64)
    policy.update(losses, draw["masks"], 0.2)
    restored.update(losses, draw["masks"], 0.2)
    assert torch.equal(restored.scores, policy.scores)
