"""What a training run leaves behind: validation relights, and the output folder's unet/, scheduler/, offsets.

Validation relights go through the demo's code path (`eddpm.relighting.Relighter`) on the training device, in
the training precision, with the EMA weights swapped in for the duration (no second UNet in memory).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from eddpm.plots import plot_scores, read_stats
from eddpm.scheduler import EDDPMScheduler

GRID_GRAY = 127  # the background of the sample grid where tiles of different sizes leave space


def learned_scheduler(policy, noise_schedule, final_keep_rate: float, mask_mode: str) -> EDDPMScheduler:
    """The learned steps as a diffusers scheduler: the training schedule plus s and the mask mode. Spacing
    "trailing": a run of fewer steps than learned still starts at the largest kept t (t = T-1)."""
    num_kept = max(1, round(final_keep_rate * policy.num_train_timesteps))
    return EDDPMScheduler.from_config(noise_schedule.config, scores=policy.scores.tolist(),
                                      num_kept_steps=num_kept, mask_mode=mask_mode, timestep_spacing="trailing")


class ema_weights:
    """`with ema_weights(unet, ema):` the model holds the EMA weights inside, its own weights after."""

    def __init__(self, unet, ema):
        self.unet, self.ema = unet, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())
        return self.unet

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.unet.parameters())


def base_model_name(base_model: str) -> str:
    """What the offsets' metadata calls the base: a hub id as given, a local folder by its name (no machine path)."""
    return os.path.basename(os.path.normpath(base_model)) if os.path.isdir(base_model) else base_model


def tile_grid(tiles: list[np.ndarray]) -> np.ndarray:
    """Stack uint8 [h_i, w_i, 3] tiles vertically, each padded with gray on the right to the widest one."""
    width = max(t.shape[1] for t in tiles)
    rows = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=GRID_GRAY) for t in tiles]
    return np.concatenate(rows, axis=0)


def validate(cfg, accelerator, unet, parts, dataset, scheduler, step: int) -> str | None:
    """Relight the conditions of the first dataset rows with the learned steps; writes samples/step-<step>.png.

    `unet` is the unwrapped training UNet holding the weights to show (swap the EMA in first)."""
    from PIL import Image

    from eddpm.relighting import Relighter
    from eddpm.settings import RelightSettings

    device = accelerator.device
    parts.vae.to(device), parts.text_encoder.to(device)
    relighter = Relighter(unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(scheduler.config), scheduler,
                          device=device, dtype=unet.dtype)
    tiles, info = [], {}
    was_training = unet.training
    unet.eval()
    with accelerator.autocast():
        for i in range(min(cfg.num_validation_images, len(dataset))):
            row, (w, h) = dataset.rows[i], dataset.buckets[i]
            foreground = dataset.load_example(i, matte_fn=parts.matte_fn).condition  # on gray, any source
            settings = RelightSettings(prompt=row.text, width=w, height=h, steps=scheduler.config.num_kept_steps,
                                       guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed + i,
                                       highres_denoise=0.0, sampler="eddpm")  # one pass
            images, info = relighter.relight(foreground, settings)
            tiles.append(np.concatenate([foreground, images[0]], axis=1))  # condition | relit
    unet.train(was_training)
    parts.vae.cpu(), parts.text_encoder.cpu()
    if not tiles:
        return None
    path = os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(tile_grid(tiles)).save(path)
    accelerator.print(f"train.py: validation relights -> {path} ({info.get('unet_calls')} UNet calls each)")
    return path


def export_searched(cfg, accelerator, unet, parts, dataset, scheduler) -> list[int]:
    """scheduler_searched/: the --export_searched_schedule K steps searched on the final weights
    (eddpm/schedule_search.py), as an EDDPMScheduler that keeps exactly those steps, plus search.json (what the
    search ran and cost). They were chosen for DPM-Solver++ 2M (sampler "eddpm_dpmpp_2m"); scheduler/ stays the
    learned steps. Trajectories: the first --search_trajectories dataset rows of row 0's size, their captions,
    the validation guidance scale."""
    import json
    import time

    from eddpm.relighting import Relighter
    from eddpm.schedule_search import (
        relighter_eps_fn,
        search_schedule,
        searched_scheduler,
        training_alphas_cumprod,
    )

    start = time.perf_counter()
    device = accelerator.device
    parts.vae.to(device), parts.text_encoder.to(device)
    relighter = Relighter(unet, parts.vae, parts.text_encoder, parts.tokenizer, dict(scheduler.config), scheduler,
                          device=device, dtype=unet.dtype)
    rows = [i for i in range(len(dataset)) if dataset.buckets[i] == dataset.buckets[0]][:cfg.search_trajectories]
    conditions = [dataset.load_example(i, matte_fn=parts.matte_fn).condition for i in rows]
    eps_fn, shape = relighter_eps_fn(relighter, conditions, [dataset.rows[i].text for i in rows],
                                     cfg.validation_guidance_scale)
    noise = torch.randn((len(rows), *shape), generator=torch.Generator().manual_seed(cfg.seed)).to(device, unet.dtype)
    was_training = unet.training
    unet.eval()
    with torch.inference_mode(), accelerator.autocast():
        found = search_schedule(eps_fn, noise, cfg.export_searched_schedule, training_alphas_cumprod(scheduler))
    unet.train(was_training)
    parts.vae.cpu(), parts.text_encoder.cpu()
    result = found[cfg.export_searched_schedule]
    folder = os.path.join(cfg.output_dir, "scheduler_searched")
    searched_scheduler(scheduler, result.timesteps).save_pretrained(folder)
    with open(os.path.join(folder, "search.json"), "w") as fh:
        json.dump({**result.describe(), "sampler": "eddpm_dpmpp_2m (DPM-Solver++ 2M on these steps)",
                   "seconds": round(time.perf_counter() - start, 2)}, fh, indent=1)
    accelerator.print(f"train.py: searched {len(result.timesteps)} steps {result.timesteps} -> {folder}")
    return result.timesteps


def export(cfg, accelerator, unet, parts, dataset, scheduler, step: int) -> dict:
    """unet/ (fp16 unless --export_fp32), scheduler/, iclight_offsets.safetensors and its LDM-keyed twin
    iclight_offsets_ldm.safetensors (eddpm/ldm.py), scores.png, final samples;
    for a LoRA run also pytorch_lora_weights.safetensors and conv_in.safetensors, and unet/ and the offsets hold
    the merged weights (eddpm/lora.py).

    `unet` is the unwrapped UNet holding the final (EMA) weights; it is cast in place, so call this last."""
    from eddpm import models
    from eddpm.ldm import save_iclight_offsets_ldm
    from eddpm.lora import has_adapters, merge_lora_, save_lora
    from eddpm.weights import save_iclight_offsets

    out = cfg.output_dir
    scheduler.save_pretrained(os.path.join(out, "scheduler"))
    lora_files = []
    if has_adapters(unet):  # a LoRA run: its LoRA files, then the adapters folded in, so all below sees a plain UNet
        lora_files = [os.path.basename(p) for p in save_lora(unet, out, torch.float32 if cfg.export_fp32
                                                               else torch.float16)]
        merge_lora_(unet)
    sample_path = validate(cfg, accelerator, unet, parts, dataset, scheduler, step)
    searched = export_searched(cfg, accelerator, unet, parts, dataset, scheduler) if cfg.export_searched_schedule else None
    base_unet = models.load_base_unet(cfg.base_model, cfg.seed)
    offsets = save_iclight_offsets(unet, base_unet, os.path.join(out, "iclight_offsets.safetensors"),
                                   base_name=base_model_name(cfg.base_model))
    save_iclight_offsets_ldm(offsets, os.path.join(out, "iclight_offsets_ldm.safetensors"))  # ComfyUI's UNet loader
    del base_unet
    unet.to(torch.float32 if cfg.export_fp32 else torch.float16)
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    stats = read_stats(os.path.join(out, "stats.jsonl"))
    plot_scores(torch.tensor(scheduler.config.scores), scheduler.kept_timesteps, stats, os.path.join(out, "scores.png"))
    kept = [int(t) for t in scheduler.kept_timesteps]
    accelerator.print(f"train.py: done at step {step}. Learned {len(kept)} steps: {kept}\n"
                      f"  outputs in {out}: unet/, scheduler/, iclight_offsets.safetensors, iclight_offsets_ldm.safetensors, "
                      "scores.png, samples/"
                      + "".join(f", {name}" for name in lora_files))
    return {"kept_timesteps": kept, "samples": sample_path, "searched_timesteps": searched}
