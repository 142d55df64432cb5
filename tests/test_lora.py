"""LoRA fine-tuning (eddpm/lora.py) on the tiny models: what trains, the files diffusers loads, resume, two ranks.

The reference run is train.py's 6-step tiny job (tests/test_train.py's `train_args`) with rank-4 adapters, alpha 8
(so alpha / r = 2 must reach every loader), the ResNet convolutions included, a learning rate high enough that
the adapters change the UNet's output clearly within 6 steps, and a float32 export so that the comparisons
between the LoRA file and the merged unet/ can be tight. The references are independent of eddpm/lora.py:
diffusers' own LoRA loader, a UNet built afresh with the names enumerated here, and W + (alpha / r) B A by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import test_train
import torch
from test_train import (
    STEPS,
    assert_same_run,
    checkpoint_state,
    load_tensors,
    no_pickles,
    read_stats,
    run_train,
    train_args,
)

# tests/test_train.py's fixtures: the 12-row data set, its latent cache, one torch thread
one_thread, small_data, cache_dir = test_train.one_thread, test_train.small_data, test_train.cache_dir

REPO = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0
LORA_ARGS = ["--lora_rank", RANK, "--lora_alpha", ALPHA, "--lora_include_convs", "--learning_rate", "1e-2"]
ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
CONVS = ("conv1", "conv2", "conv_shortcut")


def tiny_unet(seed: int = 0):
    from eddpm.tiny import build_tiny_components

    return build_tiny_components(seed).unet


def adapted_layers(unet, names) -> dict[str, torch.nn.Module]:
    """Layers of a plain UNet whose dotted path ends with one of `names` (peft's rule, written out here)."""
    return {path: m for path, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(path.endswith("." + n) for n in names)}


def unet_inputs(seed: int = 0):
    """[2, 8, 8, 8] sample, two timesteps, [2, 77, 32] text states: one call of the tiny 8-channel UNet."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 8, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, 32, generator=g))


@torch.no_grad()
def unet_out(unet) -> torch.Tensor:
    return unet(*unet_inputs()).sample.double()


def tiny_pipeline(unet):
    """diffusers' StableDiffusionPipeline around the raw 8-channel UNet, as an IC-Light user loads LoRAs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from eddpm.iclight import SD15_SCHEDULER_CONFIG
    from eddpm.tiny import build_tiny_components

    parts = build_tiny_components(0)
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_conv_in_(unet, folder) -> None:
    """conv_in.safetensors into a UNet: a partial state dict under the UNet's own names."""
    state = load_tensors(Path(folder) / "conv_in.safetensors")
    assert set(state) == {"conv_in.weight", "conv_in.bias"}, sorted(state)
    unet.load_state_dict(state, strict=False)


# --- adapters on a bare UNet ----------------------------------------------------------------------------


@pytest.mark.parametrize("include_convs", [False, True])
def test_add_lora_freezes_all_but_adapters_and_conv_in(include_convs):
    from eddpm.lora import LoraSettings, add_lora

    plain = tiny_unet()
    names = ATTENTION + (CONVS if include_convs else ())
    expected = adapted_layers(plain, names)
    # 4 projections x 2 attentions (self, cross) x 6 transformer blocks (2 down, 1 mid, 3 up)
    assert len(adapted_layers(plain, ATTENTION)) == 4 * 2 * 6
    unet = tiny_unet()
    trained = add_lora(unet, LoraSettings(RANK, ALPHA, include_convs=include_convs))
    names_trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    want = {f"{path}.lora_{ab}.default.weight" for path in expected for ab in "AB"} | {"conv_in.weight",
                                                                                        "conv_in.bias"}
    assert names_trained == want, sorted(names_trained ^ want)[:6]
    assert len(trained) == len(want)
    for path in expected:  # rank r: A maps the layer's input to r, B maps r to its output
        a = unet.get_parameter(f"{path}.lora_A.default.weight")
        b = unet.get_parameter(f"{path}.lora_B.default.weight")
        assert a.shape[0] == RANK and b.shape[1] == RANK and float(b.detach().abs().max()) == 0.0, path
    torch.testing.assert_close(unet_out(unet), unet_out(plain), rtol=0, atol=0)  # B = 0: nothing changed yet


def test_unknown_target_module_is_refused():
    from eddpm.lora import LoraSettings, add_lora

    with pytest.raises(ValueError, match="to_qq"):
        add_lora(tiny_unet(), LoraSettings(RANK, ALPHA, target_modules=("to_q", "to_qq")))


@pytest.mark.parametrize("include_convs", [False, True])
def test_lora_file_loads_in_diffusers_with_alpha(include_convs, tmp_path):
    """Random adapters (B != 0) saved by save_lora and loaded with diffusers' `pipe.load_lora_weights` into a
    fresh UNet give our UNet's output; each merged weight is W + (alpha / r) B A computed here in float64."""
    from eddpm.lora import LoraSettings, add_lora, merge_lora_, save_lora

    g = torch.Generator().manual_seed(1)
    unet = tiny_unet()
    add_lora(unet, LoraSettings(RANK, ALPHA, include_convs=include_convs))
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours = unet_out(unet)
    save_lora(unet, tmp_path, torch.float32)
    pipe = tiny_pipeline(tiny_unet())
    pipe.load_lora_weights(tmp_path)
    load_conv_in_(pipe.unet, tmp_path)
    theirs = unet_out(pipe.unet)
    base = unet_out(tiny_unet())
    tol = 1e-5 * float(ours.abs().max())
    err, effect = float((theirs - ours).abs().max()), float((ours - base).abs().max())
    print(f"convs={include_convs}: diffusers-loaded vs trained {err:.3g}, LoRA effect {effect:.3g}")
    assert err <= tol and effect > 1000 * tol, (err, effect, tol)

    # the merge, against W + (alpha / r) B A in float64 for every adapted layer
    adapters = {n: p.detach().double() for n, p in unet.named_parameters() if ".lora_" in n}
    base_weights = {k: v.double() for k, v in tiny_unet().state_dict().items()}
    merge_lora_(unet)
    merged = unet.state_dict()
    assert set(merged) == set(base_weights)  # a plain UNet again
    for path in adapted_layers(tiny_unet(), ATTENTION + (CONVS if include_convs else ())):
        a, b = adapters[f"{path}.lora_A.default.weight"], adapters[f"{path}.lora_B.default.weight"]
        delta = (ALPHA / RANK) * (b.flatten(1) @ a.flatten(1))  # [out, r] @ [r, in*k*k]; B is 1x1 for convs
        want = base_weights[f"{path}.weight"] + delta.reshape(base_weights[f"{path}.weight"].shape)
        torch.testing.assert_close(merged[f"{path}.weight"].double(), want, rtol=0, atol=1e-6)


def test_diffusers_example_format_applies(tmp_path):
    """A file as diffusers' SD LoRA example writes it (keys converted to "lora.down / lora.up") applies through
    apply_lora_ too; a file whose layers fit nothing is refused instead of being dropped silently."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from eddpm.lora import LoraSettings, add_lora, apply_lora_

    g = torch.Generator().manual_seed(2)
    unet = tiny_unet()
    add_lora(unet, LoraSettings(RANK, RANK))  # alpha = r: the example's convention
    unet.conv_in.requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert any(".lora.down." in k for k in state)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, safe_serialization=True)
    target = tiny_unet()
    note = apply_lora_(target, tmp_path)
    assert "48 layers" in note and "conv_in" not in note, note
    torch.testing.assert_close(unet_out(target), unet_out(unet), rtol=0, atol=1e-5)

    from safetensors.torch import save_file

    save_file({"unet.nowhere.to_q.lora_A.weight": torch.zeros(RANK, 8),
               "unet.nowhere.to_q.lora_B.weight": torch.zeros(8, RANK)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="do not fit|no UNet|not found"):
        apply_lora_(tiny_unet(), tmp_path / "bad.safetensors")


# --- the training run --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(one_thread, small_data, cache_dir, tmp_path_factory):
    """A 6-step LoRA run (checkpoints 2, 4, 6; the last two kept); returns (output_dir, argv, result)."""
    out = tmp_path_factory.mktemp("lora")
    argv = train_args(small_data, cache_dir, out, *LORA_ARGS, "--export_fp32")
    return out, argv, run_train(argv)


def test_only_adapters_and_conv_in_train(lora_run):
    """The checkpoint holds only the adapters and conv_in (weights, AdamW states, EMA), and the exported offsets
    (merged unet/ minus the base the run started from) are exactly zero for every other weight."""
    out, _, result = lora_run
    assert result["global_step"] == STEPS and result["nonfinite_total"] == 0, result
    plain = tiny_unet()
    layers = adapted_layers(plain, ATTENTION + CONVS)
    want = {f"{path}.lora_{ab}.default.weight" for path in layers for ab in "AB"} | {"conv_in.weight",
                                                                                     "conv_in.bias"}
    state = checkpoint_state(out / f"checkpoint-{STEPS}")
    assert set(state["unet"]) == want, sorted(set(state["unet"]) ^ want)[:6]
    assert len(state["ema"]["shadow_params"]) == len(want)
    assert len(state["optimizer"]["state"]) == len(want)  # AdamW moments for the trained tensors only
    assert no_pickles(out) == []
    offsets = load_tensors(out / "iclight_offsets.safetensors")
    changed = {f"{path}.weight" for path in layers} | {"conv_in.weight", "conv_in.bias"}
    assert set(offsets) == set(plain.state_dict())
    frozen_moved = [k for k, v in offsets.items() if k not in changed and bool(v.any())]
    assert frozen_moved == [], frozen_moved[:5]
    assert all(bool(offsets[k].any()) for k in changed), [k for k in changed if not offsets[k].any()][:5]
    stats = read_stats(out)
    assert [r["scores_rank_spread"] for r in stats] == [0.0] * STEPS and stats[-1]["score_grad_norm"] > 0


def test_lora_file_and_merged_unet_agree(lora_run):
    """pipe.load_lora_weights(OUTPUT_DIR) plus conv_in.safetensors on the base UNet = the exported unet/."""
    from diffusers import UNet2DConditionModel

    out, _, _ = lora_run
    names = {"pytorch_lora_weights.safetensors", "conv_in.safetensors", "iclight_offsets.safetensors", "unet"}
    assert names <= {p.name for p in out.iterdir()}
    lora_file = load_tensors(out / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") and v.dtype == torch.float32 for k, v in lora_file.items())
    merged = unet_out(UNet2DConditionModel.from_pretrained(out / "unet"))
    pipe = tiny_pipeline(tiny_unet())
    pipe.load_lora_weights(out)
    load_conv_in_(pipe.unet, out)
    loaded, base = unet_out(pipe.unet), unet_out(tiny_unet())
    tol = 1e-5 * float(merged.abs().max())
    err, effect = float((loaded - merged).abs().max()), float((merged - base).abs().max())
    print(f"LoRA file via diffusers vs merged unet/: {err:.3g}; trained vs base: {effect:.3g}")
    assert err <= tol and effect > 1000 * tol, (err, effect, tol)


def test_relight_checkpoint_and_lora_flag(lora_run, tmp_path):
    """relight.py --checkpoint on the LoRA output, and --preset tiny --lora OUT (the same UNet built from the
    LoRA file), make the same image; --lora_scale 0 gives the base model's image exactly."""
    from PIL import Image

    import relight

    out, _, _ = lora_run
    common = ["--input", str(REPO / "data" / "synthetic" / "condition" / "00000.png"), "--width", "64",
              "--height", "64", "--sampler", "ddim", "--steps", "4", "--highres_scale", "1", "--prompt", "light"]
    runs = {"checkpoint": ["--checkpoint", str(out)], "lora": ["--preset", "tiny", "--lora", str(out)],
            "scale0": ["--preset", "tiny", "--lora", str(out / "pytorch_lora_weights.safetensors"),
                       "--lora_scale", "0"],
            "base": ["--preset", "tiny"]}
    images = {}
    for name, args in runs.items():
        path = tmp_path / f"{name}.png"
        assert relight.main([*args, *common, "--output", str(path)]) == 0, name
        images[name] = np.asarray(Image.open(path)).astype(int)
    ckpt_vs_lora = int(np.abs(images["checkpoint"] - images["lora"]).max())
    lora_vs_base = float(np.abs(images["lora"] - images["base"]).mean())
    print(f"relight: --checkpoint vs --lora max {ckpt_vs_lora} levels; --lora vs base mean {lora_vs_base:.1f}")
    assert ckpt_vs_lora <= 1 and lora_vs_base > 2, (ckpt_vs_lora, lora_vs_base)
    assert np.array_equal(images["scale0"], images["base"])
    assert relight.main(["--preset", "tiny", "--lora", str(tmp_path / "none"), *common, "--output",
                         str(tmp_path / "x.png")]) == 2


def test_resume_is_exact(lora_run, small_data, cache_dir, tmp_path):
    """Resume the LoRA run mid-epoch from step 4: adapters, conv_in, EMA, s, stats and every exported file end
    where the straight run ends."""
    ref, _, _ = lora_run
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-4", out / "checkpoint-4")
    shutil.copy(ref / "stats.jsonl", out / "stats.jsonl")
    result = run_train(train_args(small_data, cache_dir, out, *LORA_ARGS, "--export_fp32",
                                  "--resume_from_checkpoint", "latest"))
    assert result["global_step"] == STEPS
    assert_same_run(out, ref, first_new_step=5)
    a, b = (load_tensors(d / "pytorch_lora_weights.safetensors") for d in (ref, out))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_resume_with_other_weights_is_refused(lora_run, small_data, cache_dir, tmp_path):
    ref, _, _ = lora_run
    out = tmp_path / "full"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-4", out / "checkpoint-4")
    with pytest.raises(SystemExit, match="cannot resume from .*checkpoint-4.*--lora_rank"):
        run_train(train_args(small_data, cache_dir, out, "--resume_from_checkpoint", "latest"))


@pytest.mark.parametrize("argv, message", [
    (["--lora_rank", "-1"], "--lora_rank must be >= 0"),
    (["--lora_include_convs"], "need --lora_rank > 0"),
    (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha must be > 0"),
    (["--lora_rank", "4", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--lora_rank", "4", "--lora_target_modules", " , "], "--lora_target_modules is empty"),
])
def test_bad_lora_flags_exit_with_a_clear_message(argv, message):
    from eddpm.config import resolve_config

    with pytest.raises(SystemExit) as info:
        resolve_config(argv)
    assert message in str(info.value), str(info.value)


def test_lora_preset_is_the_iclight_run_with_adapters():
    from eddpm.config import resolve_config

    full, lora = resolve_config(["--preset", "iclight"]), resolve_config(["--preset", "iclight_lora"])
    assert lora.lora_rank == 16 and lora.lora_alpha is None and lora.lora_target_modules == ",".join(
        ("to_k", "to_q", "to_v", "to_out.0"))
    assert (lora.train_batch_size * lora.gradient_accumulation_steps
            == full.train_batch_size * full.gradient_accumulation_steps)  # the same 16 images a step
    assert lora.gradient_checkpointing and lora.mixed_precision == "bf16" and lora.use_ema
    assert not lora.use_8bit_adam and not lora.offload_ema  # the adapters' optimizer state and EMA are small


# --- two processes -----------------------------------------------------------------------------------------

DUMP_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
import train
from safetensors.torch import save_file

checkpoint_state = train.training_state


def training_state(run):  # every rank: what a checkpoint would hold, written per rank for the test
    state = checkpoint_state(run)
    tensors = {{"unet." + k: v for k, v in state["unet"].items()}}
    tensors.update({{f"ema.{{i}}": v for i, v in enumerate(state["ema"]["shadow_params"])}})
    tensors["scores"] = state["policy"]["scores"]
    save_file({{k: v.detach().cpu().contiguous() for k, v in tensors.items()}},
              os.path.join(run.cfg.output_dir, f"rank{{run.accelerator.process_index}}-step{{run.global_step}}.st"))
    return state


train.training_state = training_state
train.main(sys.argv[1:])
"""


def test_two_ranks_hold_the_same_adapters_and_scores(small_data, cache_dir, tmp_path):
    """torchrun, 2 ranks, 4 steps: at each checkpoint both ranks hold bit-identical adapters, conv_in, EMA and s
    (DDP without find_unused_parameters: every trained tensor gets a gradient)."""
    out = tmp_path / "two"
    script = tmp_path / "dump_train.py"
    script.write_text(DUMP_SCRIPT.format(repo=str(REPO)))
    argv = train_args(small_data, cache_dir, out, *LORA_ARGS, "--max_train_steps", 4)
    seconds = run_torchrun_script(script, argv)
    print(f"torchrun, 2 ranks, 4 LoRA steps: {seconds:.1f} s")
    for step in (2, 4):
        r0, r1 = (load_tensors(out / f"rank{r}-step{step}.st") for r in (0, 1))
        assert set(r0) == set(r1) and any(k.startswith("unet.") and "lora_B" in k for k in r0)
        differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
        assert differ == [], differ[:5]
    b = [v for k, v in r0.items() if "lora_B" in k]
    assert all(bool(v.any()) for v in b)  # the adapters moved from B = 0
    assert [r["scores_rank_spread"] for r in read_stats(out)] == [0.0] * 4
    lora_file = load_tensors(out / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float16 for v in lora_file.values())  # the default export: float16


def run_torchrun_script(script: Path, argv: list) -> float:
    """tests/test_train.py's torchrun, launching `script` instead of train.py."""
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                           str(script), *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "(2 process(es), cpu" in proc.stdout, proc.stdout[:500]
    assert json.loads((Path(argv[argv.index("--output_dir") + 1]) / "config.json").read_text())["lora_rank"] == RANK
    return time.perf_counter() - start
